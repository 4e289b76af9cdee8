"""Train: steps per second and the share of step time spent waiting for data (goal ≤ 2%).

Two set-ups. ``tiny``: tiny-siglip through the real stages (ingest, augment, extract, train),
with 0 and 1 loader worker processes. ``siglip2``: the real SigLIP2 ViT-B/16-512 architecture
(random weights unless cached) on 512×768 images; its teacher maps are random float16 arrays
written straight into the store (a real extract at this size takes minutes on a CPU), so the
figure is the training step and the data path (tar byte-range read, decode, augment, Zarr
read), not the teacher. A handful of steps each. Also the loader alone (images per second per
process) at 512×768: the rate one loader worker can feed, to compare with a GPU's step rate.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path

from bench.common import save


def _recipe(tmp: Path, preset: str, **train: str) -> str:
    from spar_pipeline.resources import stages_dir

    text = (stages_dir() / f"{preset}.toml").read_text()
    for key, value in train.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if n == 0:  # a key the preset leaves at its default
            text = text.replace("[train]\n", f"[train]\n{key} = {value}\n", 1)
    path = tmp / f"{preset}-bench.toml"
    path.write_text(text)
    return str(path)


def _figures(rep: dict) -> dict:
    # steady state: without the first wait, which includes starting the loader workers
    first = rep["data_wait_first_seconds"]
    steady = (rep["data_wait_share"] * rep["seconds"] - first) / max(rep["seconds"] - first, 1e-9)
    return dict(steps=rep["steps_this_run"], seconds=rep["seconds"], steps_per_second=rep["steps_per_second"],
                seconds_per_step=1 / max(rep["steps_per_second"], 1e-9), data_wait_share=rep["data_wait_share"],
                first_wait_seconds=first, steady_data_wait_share=steady)


def _tiny(tmp: Path, workers: int, per_tar: int) -> dict:
    from spar_pipeline import augment, extract, ingest, train
    from spar_pipeline.run import Run
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source

    tars = make_sa1b_source(tmp / f"src{workers}", n_tars=2, per_tar=per_tar, size=(240, 160), seed=3)
    run = Run(str(tmp / f"tiny{workers}"))
    run.resolve_recipe(_recipe(tmp, "tiny-cpu", loader_workers=str(workers), epochs="1", checkpoint_every="1000"))
    ingest.run(run, [str(t) for t in tars])
    augment.run(run)
    extract.run(run, workers=1, progress=False)
    return dict(loader_workers=workers, **_figures(train.run(run, progress=False)))


def _siglip2_run(tmp: Path, n: int, workers: int):
    """A run whose augment and extract manifests (and store) are written directly: 512×768 full images."""
    import numpy as np

    from spar_pipeline import ingest, manifest
    from spar_pipeline.run import Run
    from spar_pipeline.store import FeatureStore, map_checksum
    from spar_pipeline.mini.sa1b_writer import make_sa1b_tar

    tar = make_sa1b_tar(tmp / "src" / "sa_000000.tar", list(range(1, n + 1)), size=(768, 512), seed=3)
    run = Run(str(tmp / "siglip2"))
    run.resolve_recipe(_recipe(tmp, "siglip2-b16", loader_workers=str(workers), epochs="1", holdout_fraction="0.15",
                               checkpoint_every="100000"))
    ingest.run(run, [str(tar)])
    ids = manifest.read_manifest(run, "ingest")["image_id"].to_pylist()
    full = dict(src_height=512, src_width=768, resized_height=512, resized_width=768, mode="full", crop_top=0,
                crop_left=0, crop_height=512, crop_width=768, flip=False, height=512, width=768)
    manifest.write_part(run, "augment", [dict(image_id=i, status="ok", reason="", **full) for i in ids])
    store = FeatureStore.create(run.store_url, {"digest": "bench-random"})
    rng = np.random.default_rng(0)
    rows = []
    for i in ids:
        arr = (rng.standard_normal((32, 48, 768)) * 0.5).astype(np.float16)
        store.write(i, arr)
        rows.append(dict(image_id=i, status="ok", reason="", grid_h=32, grid_w=48, dim=768, checksum=map_checksum(arr),
                         windows=0, seconds=0.0, worker="bench", fingerprint="bench-random"))
    manifest.write_part(run.teacher(), "extract", rows)
    return run


def _loader_rate(run) -> float:
    from spar_pipeline.pairs import PairDataset
    from spar_pipeline.split import training_items

    items, _ = training_items(run)
    ds = PairDataset(items, run.store_url, {}, run.recipe.ingest.max_pixels)
    ds[0]
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t)


def main(quick: bool = False) -> dict:
    import torch

    from spar_pipeline import train

    logging.getLogger("spar_pipeline").setLevel(logging.WARNING)
    out: dict = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["tiny"] = [_tiny(tmp, w, 8 if quick else 16) for w in (0, 1)]
        for r in out["tiny"]:
            print(f"tiny-siglip  loader_workers={r['loader_workers']}  {r['steps']} steps  "
                  f"{r['steps_per_second']:.2f} steps/s  data wait {100 * r['data_wait_share']:.1f}% "
                  f"(steady {100 * r['steady_data_wait_share']:.1f}%)")
        n, steps = (4, 2) if quick else (7, 5)
        run = _siglip2_run(tmp, n, workers=2)
        out["loader_512x768_images_per_second_one_process"] = _loader_rate(run)
        print(f"loader alone, 512×768 (tar read + decode + augment + Zarr read): "
              f"{out['loader_512x768_images_per_second_one_process']:.1f} images/s per process")
        rep = train.run(run, progress=False, stop_after_steps=steps)
        out["siglip2_b16_512x768"] = dict(loader_workers=2, train_images=rep["train_images"], **_figures(rep))
        r = out["siglip2_b16_512x768"]
        print(f"siglip2-b16-512 @512×768  {r['steps']} steps  {r['seconds_per_step']:.2f} s/step  "
              f"data wait {100 * r['data_wait_share']:.2f}% (steady {100 * r['steady_data_wait_share']:.2f}%)")
    return save("train", out)


if __name__ == "__main__":
    main()
