"""Extract: model-forward share of stage time, and images/s with 1 and 2 worker processes.

Tiny backbone (tiny-cpu recipe, real ingest and augment), and the real SigLIP2 ViT-B/16-512
architecture (random weights) on 512×512 images, one window each (the stage on 6 images with 1 and 2
workers, full mode only). Efficiency = time inside the teacher (windows, stitching) / worker wall time of the stage (goal ≥ 0.9). Two
figures: the whole stage (cluster start and model build included) and steady state: stage
``task_seconds`` (its first batch includes the worker's model build) and, cleaner, ``extract_batch``
run in this process on a warmed model (what a long paper-scale run sees per batch).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from bench.common import save


def _run(workers: int, n_tars: int, per_tar: int, size: tuple[int, int], recipe: str) -> dict:
    from spar_pipeline import augment, extract, ingest
    from spar_pipeline.run import Run
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source

    with tempfile.TemporaryDirectory() as tmp:
        tars = make_sa1b_source(Path(tmp) / "src", n_tars=n_tars, per_tar=per_tar, size=size, seed=3)
        run = Run(str(Path(tmp) / "run"))
        run.resolve_recipe(recipe)
        ingest.run(run, [str(t) for t in tars])
        augment.run(run)
        rep = extract.run(run, workers=workers, progress=False)
    return _figures(rep, workers)


def _figures(rep: dict, workers: int) -> dict:
    images = rep["done"] + rep["rejected"]
    return dict(
        workers=workers,
        images=images,
        windows=rep["windows"],
        wall_seconds=rep["seconds"],
        images_per_second=images / rep["seconds"],
        windows_per_second=rep["windows"] / rep["seconds"],
        forward_seconds=rep["forward_seconds"],
        task_seconds=rep["task_seconds"],
        stage_efficiency=rep["forward_seconds"] / (rep["seconds"] * workers),
        steady_efficiency=rep["forward_seconds"] / max(rep["task_seconds"], 1e-9),
    )


def _siglip2_run(tmp: Path, n: int):
    """A siglip2-b16 run of n images of 512×512 (one window each); augment rows written directly as
    full-image draws (the recipe's own draw would give ~1500×1000 images, ~100 windows each)."""
    from spar_pipeline import ingest, manifest
    from spar_pipeline.run import Run
    from spar_pipeline.mini.sa1b_writer import make_sa1b_tar

    tar = make_sa1b_tar(tmp / "src" / "sa_000000.tar", list(range(1, n + 1)), size=(512, 512), seed=3)
    run = Run(str(tmp / "run"))
    run.resolve_recipe("siglip2-b16")
    ingest.run(run, [str(tar)])
    full = dict(src_height=512, src_width=512, resized_height=512, resized_width=512, mode="full", crop_top=0,
                crop_left=0, crop_height=512, crop_width=512, flip=False, height=512, width=512)
    ids = manifest.read_manifest(run, "ingest")["image_id"].to_pylist()
    manifest.write_part(run, "augment", [dict(image_id=i, status="ok", reason="", **full) for i in ids])
    return run


def _siglip2(workers: int, n: int) -> dict:
    """The real SigLIP2 ViT-B/16-512 architecture (random weights) through the extract stage."""
    from spar_pipeline import extract

    with tempfile.TemporaryDirectory() as tmp:
        run = _siglip2_run(Path(tmp), n)
        return _figures(extract.run(run, workers=workers, progress=False), workers)


def steady(run, name: str, warm: int) -> dict:
    """Worker-side steady state, in this process: ``extract_batch`` (decode threads, teacher, store
    writes, manifest part) on all pending images after ``warm`` of them warmed it up. The model is
    the one this process already built (same seeded weights as a worker's)."""
    import torch

    from bench.common import backbone
    from spar_pipeline import extract
    from spar_pipeline.store import FeatureStore

    b = backbone(name)
    r = run.recipe
    torch.set_float32_matmul_precision("medium")
    fp = extract.teacher_fingerprint(run, b.weights_digest, b.patch_size)
    FeatureStore.create(run.store_url, fp, codec=r.extract.codec, level=r.extract.codec_level)
    spec = extract.ExtractSpec(run.url, {}, name, "", r.extract, r.ingest.max_pixels, fp)
    extract._MODELS.clear()
    extract._MODELS[(name, "")] = b
    items = extract.plan(run)
    extract.extract_batch(spec, items[:warm])
    rep = extract.extract_batch(spec, items[warm:])
    images = rep["done"] + rep["rejected"]
    return dict(images=images, windows=rep["windows"], seconds=rep["seconds"], forward_seconds=rep["forward_seconds"],
                images_per_second=images / rep["seconds"], efficiency=rep["forward_seconds"] / rep["seconds"])


def _tiny_steady(per_tar: int) -> dict:
    from spar_pipeline import augment, ingest
    from spar_pipeline.run import Run
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source

    with tempfile.TemporaryDirectory() as tmp:
        tars = make_sa1b_source(Path(tmp) / "src", n_tars=2, per_tar=per_tar, size=(240, 160), seed=3)
        run = Run(str(Path(tmp) / "run"))
        run.resolve_recipe("tiny-cpu")
        ingest.run(run, [str(t) for t in tars])
        augment.run(run)
        return steady(run, "tiny-siglip", 4)


def _siglip2_steady(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return steady(_siglip2_run(Path(tmp), n + 1), "siglip2-b16-512", 1)


def _print(name: str, r: dict) -> None:
    print(f"{name:16s} workers={r['workers']}  {r['images']} images  {r['images_per_second']:.2f} img/s  "
          f"{r['windows_per_second']:.2f} win/s  efficiency stage={r['stage_efficiency']:.2f} "
          f"steady={r['steady_efficiency']:.2f}", flush=True)


def main(quick: bool = False) -> dict:
    logging.getLogger("spar_pipeline").setLevel(logging.ERROR)
    per_tar = 6 if quick else 16
    rows = [_run(w, 2, per_tar, (240, 160), "tiny-cpu") for w in (1, 2)]
    for r in rows:
        _print("tiny-siglip", r)
    scaling = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    print(f"2 workers / 1 worker images/s (tiny): {scaling:.2f}×")
    in_process = {"tiny-siglip": _tiny_steady(per_tar), "siglip2-b16-512": _siglip2_steady(2 if quick else 4)}
    for name, r in in_process.items():
        print(f"{name:16s} steady state in one process: {r['images']} images, {r['images_per_second']:.2f} img/s, "
              f"teacher / batch wall time = {r['efficiency']:.2f}", flush=True)
    real = [] if quick else [_siglip2(1, 6), _siglip2(2, 6)]
    for r in real:
        _print("siglip2-b16-512", r)
    out = {"tiny": rows, "scaling_2_over_1": scaling, "steady_in_process": in_process,
           "siglip2_b16_512x512_stage": real, "quick": quick}
    if len(real) == 2:
        out["siglip2_scaling_2_over_1"] = real[1]["images_per_second"] / real[0]["images_per_second"]
        print(f"2 workers / 1 worker images/s (siglip2): {out['siglip2_scaling_2_over_1']:.2f}×")
    return save("extract", out)


if __name__ == "__main__":
    main()
