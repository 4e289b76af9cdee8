"""The ``evaluate`` stage: open-vocabulary mIoU on the six benchmarks, single-pass and sliding.

One unit of work is one (model, mode, stride, scale, dataset): every image is resized to ``scale`` ×
the recipe's evaluation size and segmented with ``segment.predict``, a ``SegMetric`` accumulates the
whole set, and one evaluate-manifest row is written with its per-class IoU (``class_iou`` in class
order, ``class_names``) and two speeds: ``forward_seconds``, the paper's figure (``timing``: only the
ViT forward passes of one image of the recipe's timing size × ``scale`` (the paper's 1024×2048), warm-up passes
then one timed; the same for every dataset of a model × mode × stride × scale), and
``predict_seconds``, the wall time of the whole ``predict`` (resize, forward, similarity,
upsampling, post-processing) over this dataset divided by its images (on a CPU the images run one per
torch thread at a time, so this is the stage's throughput, not one image's latency). A model is
``pretrained``, a student's name (its best epoch) or a weights file (``weights.resolve_checkpoint``). A key
already in the manifest with the same image count is not redone. Finally ``RUN/reports/table.md`` and ``table.csv`` are
rewritten from the whole manifest in the shape of the paper's Table 1.

Text features are computed once per dataset with the PRETRAINED backbone's text tower,
before any student checkpoint is loaded (docs/reference.md, "Evaluation"), so a checkpoint that also
fine-tuned the text tower does not change them.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
import weakref
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from spar_pipeline.backbones.base import Backbone
from spar_pipeline.devices import model_device
from spar_pipeline.errors import EvaluateError
from spar_pipeline.prefixes import PrefixCache
from spar_pipeline.run import Run
from spar_pipeline.timing import forward_time
from spar_pipeline.weights import BEST, pretrained_model, resolve_checkpoint

__all__ = ["run", "write_table", "table_rows", "resolve_checkpoint", "EvaluateError"]

log = logging.getLogger(__name__)

STAGE = "evaluate"
MODE_CHOICES = ("single", "sliding")
_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pretrained model -> its class embeddings


# ---- public ------------------------------------------------------------------------------
def run(run_dir: Run | None, datasets: dict[str, str], *, checkpoints: Sequence[str] = ("pretrained",),
        modes: Sequence[str] = ("single",), strides: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,), limit: int | None = None, backbone=None, recipe=None,
        device: str | torch.device | None = None, redo: bool = False,
        timing_size: Sequence[int] | None = None, prefixes: PrefixCache | None = None) -> list[dict]:
    """CLI ``evaluate``: mIoU of each checkpoint × mode(/stride) × scale × dataset; rows returned and, with
    a run, written to the evaluate manifest plus RUN/reports/table.md and table.csv.

    ``datasets``: benchmark name -> dataset root (``--dataset NAME=PATH``, repeatable).
    ``checkpoints``: "pretrained" (the recipe's weights), a student's name (its best epoch; "best" is the
    default student) or a file path (``--checkpoint``, repeatable). ``modes``: "single" and/or "sliding"
    (``--mode``). ``strides``: sliding strides (``--stride``, repeatable; default the recipe's
    ``evaluate.strides``). ``scales``: factors of the recipe's evaluation size (``--scale``, repeatable;
    the paper's Fig. 3 resolution axis). ``limit``: first N images of each dataset (``--limit``).
    ``backbone``: a backbone name overriding the recipe's, or a built Backbone used as the pretrained
    model. ``recipe``: a Recipe or preset name (default the run's frozen one). ``redo``: evaluate again
    even when the manifest has the row. ``timing_size``: (height, width) of the image ``forward_seconds``
    is timed on at scale 1 (default the recipe's ``[evaluate] timing_size``, the paper's 1024×2048 in its
    presets; × scale, each side rounded, at other scales). ``prefixes``: on a CPU, where single passes keep the
    blocks the recipe's students freeze (``[train] trainable``), for every model sharing them to finish
    (``prefixes.PrefixCache``; ``run`` passes one to all its calls; by default one per call of several
    checkpoints).
    """
    from spar_pipeline.backbones import build
    from spar_pipeline.datasets import get_dataset, templates

    recipe = _recipe(run_dir, recipe)
    cfg = recipe.evaluate
    if not datasets:
        raise EvaluateError("no dataset given; pass --dataset NAME=PATH, e.g. --dataset voc21=data/VOCdevkit/VOC2012")
    plan = _plan(modes, cfg.strides if strides is None else strides)
    factors = _scales(scales)
    benches = {}
    for name, root in datasets.items():
        if name not in cfg.datasets:
            raise EvaluateError(f"recipe {recipe.name!r} has no [evaluate.datasets.{name}] settings "
                                f"(it has: {', '.join(cfg.datasets) or 'none'})")
        benches[name] = get_dataset(name, root)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pretrained, bname = pretrained_model(backbone, recipe, dev)
    paths = {ck: resolve_checkpoint(run_dir, ck) for ck in checkpoints}  # fail early on a missing file or name
    labels = _labels(checkpoints, paths)
    if dev.type != "cpu":
        prefixes = None  # a GPU runs the blocks again faster than it would hold them
    elif prefixes is None and len(checkpoints) > 1:
        prefixes = PrefixCache()
    shares = prefixes is not None and isinstance(pretrained, Backbone)
    depth = pretrained.depth_frozen_by(recipe.train.trainable) if shares else 0

    # Text features once per class list, from the pretrained text tower (never a student's), when first needed;
    # kept with a built pretrained model for the next call given the same one (``run`` evaluates in several calls).
    tmpl, text = templates(), _TEXTS.setdefault(pretrained, {})

    def text_of(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(benches[name].class_lines), str(dev))
        if key not in text:
            emb, index = pretrained.class_embeddings(benches[name].class_lines, tmpl)
            text[key] = (emb.detach().to(dev), index.to(dev))
        return text[key]

    existing = _existing(run_dir) if run_dir is not None and not redo else {}
    rows: list[dict] = []
    for ck, label in zip(checkpoints, labels):
        model = None
        for mode, stride in plan:
            for scale in factors:
                for name, bench in benches.items():
                    n = len(bench) if limit is None else min(int(limit), len(bench))
                    key = (label, mode, stride, scale, name)
                    if key in existing and existing[key]["images"] == n:
                        log.info("evaluate %s: already in the manifest, skipped", "/".join(map(str, key)))
                        rows.append(existing[key])
                        continue
                    txt = text_of(name)  # before the student is built: the pretrained text tower
                    if model is None:
                        model = pretrained if paths[ck] is None else build(bname, paths[ck], device=dev)
                        if _is_file(ck, paths) and _text_differs(pretrained, model):  # not a student's name
                            log.warning("evaluate %s: its text tower is not the pretrained model's, and every model is "
                                        "scored against the pretrained model's text features; to evaluate another "
                                        "pretrained model, make it the recipe's [recipe] checkpoint", label)
                        from_kept = _kept_passes(model, prefixes, depth)
                    shared = (from_kept, datasets[name]) if mode == "single" and from_kept is not None else None
                    row = _evaluate_one(model, label, bench, name, n, txt, cfg, mode, stride, scale,
                                        timing_size or cfg.timing_size, shared)
                    if run_dir is not None:
                        from spar_pipeline.manifest import write_part

                        write_part(run_dir, STAGE, [row])
                    rows.append(row)
    if run_dir is not None:
        write_table(run_dir)
    return rows


def _evaluate_one(model, label: str, bench, name: str, n: int, text, cfg, mode: str, stride: int, scale: float,
                  timing_size: Sequence[int], shared: tuple[Callable, str] | None = None) -> dict:
    """One manifest row: ``n`` images of ``bench`` at ``scale`` × the recipe's
    resize, their mIoU and per-class IoU, the forward timing at ``timing_size`` × ``scale``. ``shared``:
    (``_kept_passes``' function for this model, the dataset's root): single passes kept for models sharing
    their first blocks."""
    from spar_pipeline.datasets import resize_scale
    from spar_pipeline.metrics import SegMetric
    from spar_pipeline.segment import predict

    ds_cfg, size = cfg.datasets[name], scaled(resize_scale(name, cfg), scale)
    metric = SegMetric(bench.num_classes)

    def one(i: int):
        image, gt, _ = bench[i]
        kept = None if shared is None else (lambda x: shared[0](x, (shared[1], i, size)))
        return predict(model, image, text, ds_cfg, size, mode, stride or None, cfg.window_batch, kept), gt

    t0 = time.perf_counter()
    for pred, gt in _images_in_parallel(one, n, model_device(model)):
        metric.update(pred, gt)
    predict_seconds = (time.perf_counter() - t0) / n if n else math.nan  # predict returns on the host: synchronised
    fwd = forward_time(model, mode, stride or None, size=scaled(timing_size, scale), warmup=cfg.timing_warmup,
                       window_batch=cfg.window_batch)
    result = metric.compute()
    log.info("evaluate %s %s%s ×%g %s: mIoU %.2f over %d images, %.4f s/image end to end; forward %.4f s at %d×%d",
             label, mode, f" s={stride}" if stride else "", scale, name, result["miou"], n, predict_seconds, fwd.seconds,
             *fwd.size)
    return {"model": label, "mode": mode, "stride": int(stride), "scale": float(scale), "dataset": name,
            "miou": float(result["miou"]), "forward_seconds": float(fwd.seconds), "forward_height": fwd.size[0],
            "forward_width": fwd.size[1], "predict_seconds": float(predict_seconds), "images": int(n),
            "class_iou": [float(v) for v in result["iou"]],
            "class_names": [line.strip() for line in bench.class_lines]}


def _kept_passes(model, cache: PrefixCache | None, depth: int) -> Callable | None:
    """(normalised image, key) -> the image's single pass through ``model``'s first ``depth`` blocks, from
    ``cache`` (made and kept on a miss), under the key and the digest of those blocks' weights (hashed once
    per model); None when nothing is shared."""
    if cache is None or not depth or not isinstance(model, Backbone) or not model.split_limit():
        return None
    depth = min(depth, model.split_limit())
    digest = model.prefix_digest(depth)
    return lambda x, key: cache.get((digest, *key), lambda: model.prefix(x, depth))


def _images_in_parallel(one, n: int, device: torch.device) -> Iterator:
    """``one(i)`` for i < n, in order. On a CPU, one image per torch thread at a time, each image on one
    thread: the small ops of one prediction do not keep several cores busy (bench/NOTES.md, "Evaluate: an image
    per core": 1.1–1.5× the images per second of one image on 2 threads, the same label maps). A GPU
    predicts one image at a time. The process's thread count is put back after."""
    workers = min(torch.get_num_threads(), n) if device.type == "cpu" else 1
    if workers <= 1:
        yield from (one(i) for i in range(n))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="evaluate")
    try:
        ahead = deque(pool.submit(one, i) for i in range(min(n, 2 * workers)))  # a few in flight, not the whole set
        following = len(ahead)  # the next image to submit
        while ahead:
            out = ahead.popleft().result()
            if following < n:
                ahead.append(pool.submit(one, following))
                following += 1
            yield out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error stops the rest; running ones finish first
        torch.set_num_threads(before)


def scaled(size: Sequence[int], scale: float) -> tuple[int, ...]:
    """``size`` × ``scale``, each side rounded (at least 1): the evaluated resize and the timed image."""
    return tuple(max(1, int(round(int(v) * float(scale)))) for v in size)


def table_rows(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Table 1 shape: one row per model × mode[/stride][×scale, when not 1], one column per dataset (registry order),
    then Mean (Mean6 when all six benchmarks are present; blank when a row lacks a dataset), the
    forward seconds of one image as the paper times it ("forward s @H×W") and the mean end-to-end
    seconds per image over the row's datasets ("predict s/img"). Returns (header, rows of formatted cells)."""
    from spar_pipeline.datasets import list_datasets

    order = list_datasets()
    present = [d for d in order if any(r["dataset"] == d for r in rows)]
    present += sorted({r["dataset"] for r in rows} - set(order))
    mean_name = "Mean6" if set(order) <= set(present) else "Mean"
    grid: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        grid.setdefault((r["model"], r["mode"], int(r["stride"]), float(r.get("scale", 1.0))), {})[r["dataset"]] = r
    sizes = {(r["forward_height"], r["forward_width"]) for r in rows}
    fwd_name = "forward s" + (f" @{next(iter(sizes))[0]}×{next(iter(sizes))[1]}" if len(sizes) == 1 else "")
    header = ["model", "mode", *present, mean_name, fwd_name, "predict s/img"]
    out = []
    for (model, mode, stride, scale), cells in grid.items():
        vals = [cells[d]["miou"] if d in cells else None for d in present]
        mean = (sum(vals) / len(vals)) if vals and all(v is not None for v in vals) else None
        how = (mode if mode == "single" else f"{mode} s={stride}") + ("" if scale == 1.0 else f" ×{scale:g}")
        out.append([model, how, *(_fmt(v) for v in vals), _fmt(mean),
                    _mean_cell(cells.values(), "forward_seconds"), _mean_cell(cells.values(), "predict_seconds")])
    return header, out


def _mean_cell(rows, column: str) -> str:
    vals = [r[column] for r in rows if not math.isnan(r[column])]
    return f"{sum(vals) / len(vals):.4f}" if vals else ""


def write_table(run: Run, rows: Sequence[dict] | None = None) -> tuple[str, str]:
    """Rewrite RUN/reports/table.md and table.csv from ``rows`` (default: the whole evaluate manifest)."""
    if rows is None:
        rows = _manifest_rows(run)
    header, body = table_rows(rows)
    rule = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"
    md = ["| " + " | ".join(header) + " |", rule]
    md += ["| " + " | ".join(cells) + " |" for cells in body]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    run.write_bytes_atomic(("\n".join(md) + "\n").encode(), "reports", "table.md")
    run.write_bytes_atomic(buf.getvalue().encode(), "reports", "table.csv")
    return run.path("reports", "table.md"), run.path("reports", "table.csv")


# ---- helpers -----------------------------------------------------------------------------
def _recipe(run: Run | None, recipe):
    from spar_pipeline.recipe import load_recipe

    if run is not None:
        return run.resolve_recipe(recipe) if recipe is not None else run.recipe
    if recipe is None:
        raise EvaluateError("evaluate needs --run RUN or --recipe NAME (the recipe holds the per-dataset settings)")
    return load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe


def _plan(modes: Sequence[str], strides: Sequence[int]) -> list[tuple[str, int]]:
    plan: list[tuple[str, int]] = []
    for mode in modes:
        if mode == "single":
            plan.append(("single", 0))
        elif mode == "sliding":
            if not strides:
                raise EvaluateError("sliding mode needs a stride: pass --stride S or set [evaluate].strides")
            for s in strides:
                if int(s) < 1:
                    raise EvaluateError(f"--stride {s}: must be ≥ 1")
                plan.append(("sliding", int(s)))
        else:
            raise EvaluateError(f"mode {mode!r}: choose from {', '.join(MODE_CHOICES)}")
    return list(dict.fromkeys(plan))


def _scales(scales: Sequence[float]) -> list[float]:
    out = []
    for f in scales:
        if not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0):
            raise EvaluateError(f"--scale {f}: must be a number > 0 (1 = the recipe's evaluation size)")
        out.append(float(f))
    if not out:
        raise EvaluateError("no scale given; use --scale 1 for the recipe's evaluation size")
    return list(dict.fromkeys(out))


def _text_differs(pretrained: Backbone, model: Backbone) -> bool:
    """Whether ``model`` holds another text tower than ``pretrained``: a whole other pretrained model given as a
    weights file, whose text features this stage would not read (a student's text tower is the pretrained one)."""
    a, b = pretrained.text_params(), model.text_params()  # both built on the stage's device
    return len(a) != len(b) or not all(torch.equal(x, y) for x, y in zip(a, b))


def _is_file(checkpoint: str, paths: dict[str, str | None]) -> bool:
    """A checkpoint given as a weights file: it resolved to itself (a student's name resolves to its best file)."""
    return paths[checkpoint] == checkpoint


def _labels(checkpoints: Sequence[str], paths: dict[str, str | None]) -> list[str]:
    """Row labels: "pretrained", a student's name as given ("best" included), or a weights file's stem
    (its full path when two stems clash)."""
    if not checkpoints:
        raise EvaluateError("no checkpoint given; use pretrained, a student name or a weights file")
    stems = [Path(c).stem if _is_file(c, paths) else c for c in checkpoints]
    return [s if stems.count(s) == 1 else c for s, c in zip(stems, checkpoints)]


def _existing(run: Run) -> dict[tuple, dict]:
    return {(r["model"], r["mode"], int(r["stride"]), float(r["scale"]), r["dataset"]): r
            for r in _manifest_rows(run)}


def _manifest_rows(run: Run) -> list[dict]:
    """The evaluate manifest's rows; a run evaluated by an older version is refused with the way out
    (v1 rows timed the whole predict; v2 rows have no scale and no per-class IoU, which are not guessed)."""
    from spar_pipeline.manifest import ManifestError, read_manifest

    try:
        return read_manifest(run, STAGE).to_pylist()
    except ManifestError as e:
        raise EvaluateError(f"{e}; or move {run.url_for('manifests', STAGE)} aside and evaluate again "
                            "(v3 rows time only the forward passes, as the paper does, and keep scale and "
                            "per-class IoU)") from None


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
