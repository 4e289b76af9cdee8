"""The run folder: one URL that holds the frozen recipe, manifests, store, checkpoints, reports.

Layout: ``RUN/run.toml`` (recipe + fingerprint), ``RUN/manifests/<stage>/``,
``RUN/features.zarr``, ``RUN/checkpoints/``, ``RUN/reports/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tomllib
import uuid
from typing import Any

import tomli_w

from spar_pipeline.errors import RunError
from spar_pipeline.fsutil import filesystem, is_local, redact
from spar_pipeline.recipe import Recipe, load_recipe, recipe_diff, recipe_from_dict, recipe_to_dict

__all__ = ["Run", "RunError", "STORE"]

RUN_FILE = "run.toml"
STORE = "features.zarr"  # the teacher feature store, inside the run folder


def _recorded(data: dict, dotted: str) -> bool:
    """Whether the dotted key (``evaluate.timing_size``) is written in the frozen run.toml ``data``."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


class Run:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if re.match(r"^[\w+.-]+://[^/]*@", url):  # s3://key:secret@bucket would end up in logs and errors
            raise RunError(f"{redact(url)}: credentials in the run URL are not supported; "
                           "use the AWS_* variables or --storage-options")
        self.url = url.rstrip("/") if "://" in url else os.path.abspath(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self._recipe: Recipe | None = None

    def __repr__(self) -> str:
        return f"Run({redact(self.url)!r})"

    @property
    def local(self) -> bool:
        return is_local(self.fs)

    def path(self, *parts: str) -> str:
        """Path inside ``self.fs``."""
        return "/".join([self.root.rstrip("/"), *parts])

    def url_for(self, *parts: str) -> str:
        """Full URL of a member, for components that open their own filesystem (the store)."""
        return "/".join([self.url, *parts])

    @property
    def store_url(self) -> str:
        """URL of the run's teacher feature store (``RUN/features.zarr``)."""
        return self.url_for(STORE)

    # ---- small I/O helpers shared by stages -------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        """Whole-or-nothing write: rename on local disk, one PUT on object stores."""
        target = self.path(*parts)
        parent = target.rsplit("/", 1)[0]
        if self.local:
            os.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:  # a full disk leaves no half-written temporary behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(target, data)

    # ---- recipe -------------------------------------------------------------------------
    def frozen_recipe(self) -> Recipe | None:
        if not self.exists(RUN_FILE):
            return None
        data = tomllib.loads(self.read_bytes(RUN_FILE).decode())
        data.pop("fingerprint", None)
        data.pop("teacher", None)
        return recipe_from_dict(data, source=f"{redact(self.url)}/{RUN_FILE}")

    def resolve_recipe(self, recipe: Recipe | str | None = None, default: str | None = None) -> Recipe:
        """The run's recipe: freeze the given one on first use (``default``, a preset, when none is given
        and none is frozen yet), refuse a different one later."""
        frozen = self.frozen_recipe()
        if recipe is None and frozen is None:
            recipe = default
        if isinstance(recipe, str):
            recipe = load_recipe(recipe)
        if frozen is None:
            if recipe is None:
                raise RunError(
                    f"{redact(self.url)}: no {RUN_FILE} yet; start the run with a recipe, e.g. --recipe tiny-cpu"
                )
            data = recipe_to_dict(recipe)
            data["fingerprint"] = recipe.fingerprint
            self.write_bytes_atomic(tomli_w.dumps(data).encode(), RUN_FILE)
            frozen = recipe
        elif recipe is not None and recipe.fingerprint != frozen.fingerprint:
            # a key run.toml predates (a field added later, with a default) is no drift: the run keeps
            # the default it ran with, e.g. [evaluate] timing_size of a run started before it existed
            data = tomllib.loads(self.read_bytes(RUN_FILE).decode())
            diff = recipe_diff(frozen, recipe)
            keys = ", ".join(k for k in diff if _recorded(data, k))
            if not keys:
                self._recipe = frozen
                return frozen
            raise RunError(
                f"{redact(self.url)} was started with recipe {frozen.name!r}; the given recipe differs in: {keys}. "
                "Use a new --run, or drop --recipe to continue with the frozen one."
            )
        self._recipe = frozen
        return frozen

    @property
    def recipe(self) -> Recipe:
        if self._recipe is None:
            self._recipe = self.resolve_recipe(None)
        return self._recipe

    def record_teacher(self, fingerprint: dict) -> None:
        """Add the teacher fingerprint to run.toml once; a different one later is refused."""
        data = tomllib.loads(self.read_bytes(RUN_FILE).decode())
        old = data.get("teacher")
        if old is None:
            data["teacher"] = fingerprint
            self.write_bytes_atomic(tomli_w.dumps(data).encode(), RUN_FILE)
        elif old != fingerprint:
            keys = ", ".join(k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k))
            raise RunError(
                f"{redact(self.url)}: the teacher differs from the one this run was extracted with ({keys}); "
                "use a new --run for another teacher"
            )

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)
