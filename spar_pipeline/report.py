"""The short report that ends ``spar-pipeline run``: printed and kept in RUN/reports/summary.md."""

from __future__ import annotations

from typing import Any

from spar_pipeline import manifest
from spar_pipeline.run import Run

__all__ = ["write_summary", "store_bytes"]


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
             f"(fingerprint {run.recipe.fingerprint}), backbone `{run.recipe.recipe.backbone}`", ""]
    lines += ["| stage | ok | rejected |", "|---|---|---|"]
    for stage in ("ingest", "augment", "extract"):
        ok, rej = _counts(manifest.read_manifest(run, stage))
        lines.append(f"| {stage} | {ok} | {rej} |")
    ext = [r for r in manifest.read_manifest(run, "extract").to_pylist() if r["status"] == "ok"]
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
    train = manifest.read_manifest(run, "train").to_pylist()
    if train:
        lines += ["", "## Training (held-out MSE against the teacher)", "", "| epoch | step | train_loss | val_mse | baseline_val_mse |",
                  "|---|---|---|---|---|"]
        for t in sorted(train, key=lambda r: r["epoch"]):
            lines.append(f"| {t['epoch']} | {t['step']} | {t['train_loss']:.4g} | {t['val_mse']:.4g} | "
                         f"{t['baseline_val_mse']:.4g} |")
        last = max(train, key=lambda r: r["epoch"])
        if last["baseline_val_mse"] > 0:
            lines += ["", f"Held-out MSE after epoch {last['epoch']}: {last['val_mse'] / last['baseline_val_mse']:.2f}× "
                      "the pretrained single pass (lower is closer to the teacher)."]
    evaluated = manifest.read_manifest(run, "evaluate").to_pylist()
    if evaluated:
        lines += ["", "## Open-vocabulary segmentation (mIoU)", "", "| model | mode | dataset | mIoU | forward s "
                  "(paper's timing) | predict s/image (end to end) |", "|---|---|---|---|---|---|"]
        names = {"pretrained": "pretrained", "best": "SPAR student (best)"}
        for e in evaluated:
            mode = e["mode"] + (f" s={e['stride']}" if e["stride"] else "")
            lines.append(f"| {names.get(e['model'], e['model'])} | {mode} | {e['dataset']} | {e['miou']:.2f} | "
                         f"{e['forward_seconds']:.4f} @{e['forward_height']}×{e['forward_width']} | "
                         f"{e['predict_seconds']:.4f} |")
    look = reports.get("look") or {}
    if look:
        fh, fw = look.get("forward_size", (1024, 2048))
        single = look["seconds"].get("single (student)")
        lines += ["", f"## Single pass against sliding window (forward passes of one {fh}×{fw} image, timed as "
                  "the paper does)", "", "| model | forward s | × single pass |", "|---|---|---|"]
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
