"""What every command shares: the app, its shared options, one way to report errors, option parsers.

A command body runs inside ``reporting()``: logging is set up once, a ``SparError`` (or an
``OSError``: disk full, permission, an object store past its retries) becomes one red line and exit
code 2, and anything else, being a bug, one line naming it and how to see the traceback (exit 1).
Usage errors (a value typer/click refuses) are one line too, through ``_Commands``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from enum import Enum
from typing import Any, Iterator, List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer.core import TyperGroup

from spar_pipeline.errors import OptionError, SparError, first_line

__all__ = ["app", "console", "Mode", "Count", "reporting", "open_run", "tool_run", "gpu_ids", "names", "datasets", "RunOpt",
           "RecipeOpt", "StorageOpt"]

MESSAGE_LIMIT = 600  # characters of one error line; messages that name many keys stay whole


class _Commands(TyperGroup):
    """Usage errors (a bad option value, a missing argument) in one line, like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click's usage errors: BadParameter, MissingParameter, NoSuchOption...
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already (typer checks the same)
                ctx = getattr(e, "ctx", None)
                hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
                message = e.format_message().replace("Value error, ", "")  # pydantic's prefix on a refused choice
                typer.secho(f"error: {message}{hint}", err=True, fg="red")
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.secho("error: aborted", err=True, fg="red")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help="SPAR feature-store pipeline: ingest → augment → extract → train → evaluate. "
    "Every command resumes: rerun it after a failure to finish what is left.",
)
console = Console(stderr=True)
_verbose = [False]


@app.callback()
def _options(
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar="SPAR_VERBOSE",
                                 help="Debug logging, and the traceback of an unexpected error (before the command)."),
) -> None:
    _verbose[0] = verbose


class Mode(str, Enum):
    """How a model sees an image: one pass on the whole image, or sliding windows."""

    single = "single"
    sliding = "sliding"


def _at_least(minimum: int):
    def check(value: Any) -> Any:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v < minimum:
                raise typer.BadParameter(f"{v} is not allowed; it must be ≥ {minimum} (leave the option out for "
                                         "the default)")
        return value

    return check


def Count(default: Any = None, *names: str, help: str, minimum: int = 1) -> Any:  # noqa: N802 - reads like typer.Option
    """An option holding a count or size (workers, epochs, a limit, a stride): refused below ``minimum``,
    never read as "the default" (0 would silently mean it)."""
    return typer.Option(default, *names, callback=_at_least(minimum), help=help)


RunOpt = typer.Option(..., "--run", help="Run folder: a local path or an fsspec URL such as s3://bucket/prefix.")
RecipeOpt = typer.Option(
    None, "--recipe", help="Preset name (tiny-cpu, siglip2-b16, ...) or a TOML path. Frozen into RUN/run.toml on first use."
)
StorageOpt = typer.Option(
    None, "--storage-options", help='JSON of fsspec storage options, e.g. \'{"anon": false}\'. AWS_* variables are honoured.'
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("distributed", "fsspec", "botocore", "s3fs", "aiobotocore", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code)


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """The body of every command: known failures one line (exit 2), a bug one line and a hint (exit 1)."""
    verbose = _verbose[0]
    root = logging.getLogger()
    saved = root.handlers[:], root.level  # put back afterwards: a command run in-process leaves no handler behind
    _setup_logging(verbose)
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except (SparError, OSError) as e:
        _fail(first_line(e, MESSAGE_LIMIT), 2)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to finish what is left", 130)
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, the traceback on request
        store = _object_store_error(e)
        if store:
            _fail(store, 2)
        if verbose:
            raise
        _fail(f"unexpected {first_line(e, MESSAGE_LIMIT, typed=True)} (a bug; `spar-pipeline --verbose` before "
              "the same command shows the traceback)", 1)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _object_store_error(e: BaseException) -> Optional[str]:
    """The line for an object store client's own error that s3fs passes through (no endpoint, no
    credentials: after botocore's retries), else None."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError:  # pragma: no cover - s3fs not installed: no S3 URLs either
        return None
    if isinstance(e, NoCredentialsError):
        return ("object store: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or --storage-options '{\"anon\": true}' for a public bucket")
    if isinstance(e, (BotoCoreError, ClientError)):
        return f"object store: {first_line(e, MESSAGE_LIMIT)}"
    return None


def storage(storage_options: Optional[str]) -> Optional[dict]:
    if not storage_options:
        return None
    try:
        options = json.loads(storage_options)
    except json.JSONDecodeError as e:
        raise OptionError(f"--storage-options: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(options, dict):
        raise OptionError(f"--storage-options {storage_options!r}: expected a JSON object, e.g. '{{\"anon\": false}}'")
    return options


def open_run(run: str, recipe: Optional[str], storage_options: Optional[str], default: Optional[str] = None):
    """The run folder with its recipe resolved (``default``: the preset a new run starts on when none is given)."""
    from spar_pipeline.run import Run

    r = Run(run, storage(storage_options))
    r.resolve_recipe(recipe, default=default)
    return r


def tool_run(run: Optional[str], storage_options: Optional[str]):
    return open_run(run, None, storage_options) if run else None


def gpu_ids(gpus: Optional[str]) -> Optional[list[int]]:
    """``--gpus 0,1`` as ids that exist on this machine; None when not given."""
    if gpus is None:
        return None
    try:
        ids = [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise OptionError(f"--gpus {gpus!r}: expected comma-separated GPU ids, e.g. --gpus 0,1") from None
    from spar_pipeline.devices import check_gpus

    check_gpus(ids)
    return ids


def names(option: str, value: Optional[str], example: str) -> Optional[list[str]]:
    """A comma-separated list option; given but empty is refused rather than read as "not given"."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise OptionError(f"{option} {value!r}: expected comma-separated names, e.g. {option} {example}")
    return items


def scheduler_ok(scheduler: Optional[str]) -> None:
    """A given ``--scheduler`` answers and has workers (checked before any work)."""
    if scheduler is not None:
        from spar_pipeline.engine import check_scheduler

        check_scheduler(scheduler)


def datasets(items: List[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise OptionError(f"--dataset {item!r}: expected NAME=PATH, e.g. --dataset voc21=data/VOCdevkit/VOC2012")
        out[name.strip()] = path.strip()
    return out


def one_of(**given: Any) -> None:
    """Options that choose the same thing (where work runs) cannot be combined."""
    named = [k for k, v in given.items() if v is not None]
    if len(named) > 1:
        opts = " and ".join("--" + k.replace("_", "-") for k in named)
        raise OptionError(f"{opts} choose the same thing (where the work runs): give one of them")
