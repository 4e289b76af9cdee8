"""The report that ends ``spar-pipeline run``: a look at one held-out image, then the summary.

- ``held_out_look``: on one held-out image the student never saw, the forward seconds of the
  student single pass against the sliding-window teacher at the recipe's strides, timed as the
  paper does (``timing``: only the ViT forward passes of one image of the recipe's ``timing_size``,
  the paper's 1024×2048 in its presets, the recipe's warm-up passes, then one timed), and two
  pictures written to ``RUN/reports/`` (uploaded there for object-store runs): the PCA picture
  (teacher left, student right, one basis) and a segmentation overlay. The pictures are made again
  on every call (cheap, and they must show the newest student); the speeds are measured once per
  run, machine and timing settings and kept in ``RUN/reports/forward_seconds.json``
  (``look_speeds``): a forward's cost depends on the architecture and the machine, not on the
  weights, and a sliding pass is slow on a CPU.
- ``write_summary``: the stage counts, the teacher store, training, evaluation and the look, printed
  and kept in RUN/reports/summary.md.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from spar_pipeline import manifest
from spar_pipeline.run import Run
from spar_pipeline.weights import BEST, load_models

__all__ = ["held_out_look", "look_speeds", "write_summary", "store_bytes", "DEMO_CLASSES"]

log = logging.getLogger(__name__)

# Demo classes for the overlay (background first): readable names, not a benchmark.
DEMO_CLASSES = ["background", "sky", "tree", "road", "building", "person", "car", "water"]


def held_out_look(run: Run, *, classes: list[str] | None = None) -> dict[str, Any]:
    """{"image_id", "size", "checkpoint", "seconds": {mode: forward s}, "forward_size", "pictures": {name: url}}."""
    from spar_pipeline import augmentation
    from spar_pipeline.pictures import pca_image, segment_image
    from spar_pipeline.split import training_items

    recipe = run.recipe
    _, held_out = training_items(run)
    if not held_out:
        return {}
    image_id = held_out[0].image_id
    image = augmentation.augmented_image(run, image_id).permute(1, 2, 0).numpy()  # uint8 [H, W, 3]
    checkpoint = "best" if run.exists(*BEST) else "pretrained"
    teacher, student = load_models(None, checkpoint, run)

    seconds = look_speeds(run, teacher, student)

    pictures = {}
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp, "image.png")
        from PIL import Image

        Image.fromarray(np.ascontiguousarray(image)).save(png)
        outs = {"pca": Path(tmp, f"pca_{image_id}.png"), "segmentation": Path(tmp, f"segmentation_{image_id}.png")}
        pca_image(str(png), str(outs["pca"]), backbone=teacher, run=run, checkpoint=checkpoint,
                  stride=recipe.extract.stride, student=student)
        segment_image(str(png), classes or DEMO_CLASSES, str(outs["segmentation"]), backbone=teacher,
                      checkpoint=checkpoint, run=run, prob_thd=0.0, student=student)
        for name, out in outs.items():
            run.write_bytes_atomic(out.read_bytes(), "reports", out.name)
            pictures[name] = run.url_for("reports", out.name)
    size = tuple(recipe.evaluate.timing_size)
    log.info("held-out image %d (%dx%d); forward seconds at %d×%d: %s", image_id, image.shape[1], image.shape[0],
             *size, ", ".join(f"{k} {v:.4f} s" for k, v in seconds.items()))
    return {"image_id": image_id, "size": (int(image.shape[1]), int(image.shape[0])), "checkpoint": checkpoint,
            "seconds": seconds, "forward_size": size, "pictures": pictures}


def look_speeds(run: Run, teacher, student) -> dict[str, float]:
    """Forward seconds of the student single pass and the teacher sliding at the extract stride and
    the evaluation strides (``timing``, the paper's protocol at the recipe's ``timing_size``, warm-up
    and sub-batch), taken from RUN/reports/forward_seconds.json when it was measured with the same
    backbone, machine and settings, else measured and written there."""
    import json

    from spar_pipeline.timing import device_label, forward_seconds

    recipe = run.recipe
    timed = dict(size=tuple(recipe.evaluate.timing_size), warmup=recipe.evaluate.timing_warmup,
                 window_batch=recipe.evaluate.window_batch)
    strides = list(dict.fromkeys([recipe.extract.stride, *recipe.evaluate.strides]))
    key = dict(backbone=recipe.recipe.backbone, device=device_label(teacher), strides=strides,
               **{**timed, "size": list(timed["size"])})
    where = ("reports", "forward_seconds.json")
    if run.exists(*where):
        kept = json.loads(run.read_bytes(*where))
        if kept.get("key") == key:
            return kept["seconds"]
    seconds = {"single (student)": forward_seconds(student, "single", **timed)}
    for stride in strides:
        seconds[f"sliding s={stride} (teacher)"] = forward_seconds(teacher, "sliding", stride, **timed)
    run.write_bytes_atomic(json.dumps(dict(key=key, seconds=seconds), indent=1).encode(), *where)
    return seconds


def store_bytes(run: Run, rows: list[dict]) -> tuple[int, int, str]:
    """(bytes on storage, raw float16 bytes, the store's map dtype and codec) of the stored teacher maps."""
    from spar_pipeline.store import FeatureStore

    if not rows:
        return 0, 0, ""
    store = FeatureStore.open(run.store_url, storage_options=run.storage_options)
    stored = sum(store.nbytes_stored(r["image_id"]) for r in rows)
    raw = sum(r["grid_h"] * r["grid_w"] * r["dim"] * 2 for r in rows)
    return stored, raw, f"{store.dtype}, codec {store.codec}"


def _counts(table) -> tuple[int, int]:
    rows = table.to_pylist()
    return sum(r["status"] == "ok" for r in rows), sum(r["status"] == "rejected" for r in rows)


def write_summary(run: Run, reports: dict[str, Any]) -> str:
    lines = [f"# spar-pipeline run summary", "", f"- run: `{run.url}`", f"- recipe: `{run.recipe.name}` "
             f"(fingerprint {run.recipe.fingerprint}), backbone `{run.recipe.recipe.backbone}`"]
    if reports.get("report"):  # `run` writes the study page after this summary, which it links
        lines.append(f"- study report (tables, figures): `{reports['report']['index']}`")
    lines.append("")
    lines += ["| stage | ok | rejected |", "|---|---|---|"]
    for stage in ("ingest", "augment", "extract"):
        ok, rej = _counts(manifest.read_manifest(run.teacher() if stage == "extract" else run, stage))
        lines.append(f"| {stage} | {ok} | {rej} |")
    ext = [r for r in manifest.read_manifest(run.teacher(), "extract").to_pylist() if r["status"] == "ok"]
    stored, raw, layout = store_bytes(run, ext)
    lines += ["", "## Teacher store", ""]
    if raw:
        lines.append(f"- {len(ext)} maps, {stored / 1e6:.2f} MB stored vs {raw / 1e6:.2f} MB raw float16 "
                     f"({stored / raw:.2f}×; {layout})")
    summaries = [s for s in manifest.read_manifest(run, "summary").to_pylist() if s["stage"] == "extract"]
    if summaries:
        s = summaries[-1]
        lines.append(f"- last extract: {s['items_per_second']:.2f} images/s, {s['windows_per_second']:.1f} windows/s "
                     f"over {s['seconds']:.1f} s")
    train = manifest.read_manifest(run.student(), "train").to_pylist()
    if train:
        lines += ["", "## Training (held-out MSE against the teacher)", "", "| epoch | step | train_loss | val_mse | baseline_val_mse |",
                  "|---|---|---|---|---|"]
        cell = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731 - no held-out slice: no val_mse
        for t in sorted(train, key=lambda r: r["epoch"]):
            lines.append(f"| {t['epoch']} | {t['step']} | {t['train_loss']:.4g} | {cell(t['val_mse'])} | "
                         f"{cell(t['baseline_val_mse'])} |")
        last = max(train, key=lambda r: r["epoch"])
        if last["val_mse"] is None:
            lines += ["", f"No held-out slice (holdout_fraction = 0): no val_mse; the best student is the last "
                      f"epoch's (epoch {last['epoch']})."]
        elif last["baseline_val_mse"] > 0:
            lines += ["", f"Held-out MSE after epoch {last['epoch']}: {last['val_mse'] / last['baseline_val_mse']:.2f}× "
                      "the pretrained single pass (lower is closer to the teacher)."]
    evaluated = manifest.read_manifest(run, "evaluate").to_pylist()
    if evaluated:
        lines += ["", "## Open-vocabulary segmentation (mIoU)", "", "| model | mode | dataset | mIoU | forward s "
                  "@H×W (paper's protocol) | predict s/image (end to end) |", "|---|---|---|---|---|---|"]
        names = {"pretrained": "pretrained", "best": "SPAR student (best)"}
        for e in evaluated:
            scale = float(e.get("scale", 1.0))
            mode = e["mode"] + (f" s={e['stride']}" if e["stride"] else "") + ("" if scale == 1.0 else f" ×{scale:g}")
            lines.append(f"| {names.get(e['model'], e['model'])} | {mode} | {e['dataset']} | {e['miou']:.2f} | "
                         f"{e['forward_seconds']:.4f} @{e['forward_height']}×{e['forward_width']} | "
                         f"{e['predict_seconds']:.4f} |")
    look = reports.get("look") or {}
    if look:
        fh, fw = look.get("forward_size", (1024, 2048))
        single = look["seconds"].get("single (student)")
        size = "" if (fh, fw) == (1024, 2048) else "; the paper's is 1024×2048, this recipe's timing_size differs"
        lines += ["", f"## Single pass against sliding window (forward passes of one {fh}×{fw} image, timed as "
                  f"the paper does{size})", "", "| model | forward s | × single pass |", "|---|---|---|"]
        for k, v in look["seconds"].items():
            lines.append(f"| {k} | {v:.4f} | {v / single:.1f}× |" if single else f"| {k} | {v:.4f} | |")
        w, h = look["size"]
        lines += ["", f"Pictures of held-out image {look['image_id']} ({w}×{h}; student: {look['checkpoint']}):", ""]
        lines += [f"- {k}: `{v}`" for k, v in look["pictures"].items()]
    if reports.get("timings"):
        lines += ["", "## Stage wall time", ""]
        lines += [f"- {k}: {v:.1f} s" for k, v in reports["timings"].items()]
    text = "\n".join(lines) + "\n"
    run.write_bytes_atomic(text.encode(), "reports", "summary.md")
    return text
