"""A smaller store: int8 teacher maps (per-channel scale) against float16. Writes
bench/results/quant.json.

    python -m bench quant [--quick]
    python -m bench.bench_quant --store RUN/features.zarr [--limit N]

The second form measures the map error alone on an existing float16 store (a real teacher's,
e.g. a paper-recipe run), without extracting or training anything: the check to make before
setting ``store_dtype = "int8"`` for a new run of that teacher.

Two runs of the miniature world (mini-clip, its real pretrained weights, generated scenes) from
the same tars, seed and split, through the real stages: one stores float16 maps, one int8 (both
uncompressed, so bytes and reads compare the formats). Measured:

- map error of the int8 store against the float16 one: relative MSE (error energy / signal
  energy) and per-pixel cosine, over every extracted map; next to it, computed here on the same
  float16 maps but not stored, per-pixel int8 and per-channel fp8 (e4m3), the alternatives;
- stored bytes per map and read milliseconds per map (median);
- the student trained from each store, scored by the training loss on the held-out images
  against the *float16* teacher maps (so both students face the same targets), and the
  pretrained model's score for scale.
"""

from __future__ import annotations

import logging
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import median_time, save


def _recipe(tmp: Path, dtype: str, epochs: int) -> str:
    from spar_pipeline.resources import stages_dir

    text = (stages_dir() / "mini.toml").read_text()
    text = text.replace("[extract]\n", f'[extract]\nstore_dtype = "{dtype}"\ncodec = "none"\n', 1)
    text, n = re.subn(r"(?m)^epochs = .*$", f"epochs = {epochs}", text)
    assert n == 1
    path = tmp / f"mini-{dtype}.toml"
    path.write_text(text)
    return str(path)


def _pipeline(tmp: Path, tars: list[str], dtype: str, epochs: int):
    from spar_pipeline import augment, extract, ingest, train
    from spar_pipeline.run import Run

    run = Run(str(tmp / dtype))
    run.resolve_recipe(_recipe(tmp, dtype, epochs))
    ingest.run(run, tars)
    augment.run(run)
    t = time.perf_counter()
    extract.run(run, workers=1, progress=False)
    extract_s = time.perf_counter() - t
    report = train.run(run, processes=1, progress=False)
    return run, extract_s, report


def _errors(ref: np.ndarray, got: np.ndarray) -> dict:
    x, y = ref.reshape(-1, ref.shape[-1]).astype(np.float64), got.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
    return dict(err=float(((x - y) ** 2).sum()), energy=float((x ** 2).sum()), cos_mean=float(cos.mean()),
                cos_min=float(cos.min()))


def _per_pixel_int8(m: np.ndarray) -> np.ndarray:
    x = m.astype(np.float32)
    scale = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-30) / 127
    return (np.clip(np.rint(x / scale), -127, 127) * scale).astype(np.float16)


def _fp8_per_channel(m: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(m.astype(np.float32))
    scale = x.abs().amax(dim=(0, 1)).clamp_min(1e-30) / 448.0  # e4m3's largest finite value
    return ((x / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale).to(torch.float16).numpy()


def _summary(parts: list[dict]) -> dict:
    return dict(rel_mse=sum(p["err"] for p in parts) / sum(p["energy"] for p in parts),
                cos_mean=statistics.mean(p["cos_mean"] for p in parts), cos_min=min(p["cos_min"] for p in parts))


def map_errors(maps: dict[int, np.ndarray], stored_int8: dict[int, np.ndarray] | None = None) -> dict:
    """Errors of each 8-bit format against float16 ``maps`` (id -> map); the per-channel int8 of
    the store is ``stored_int8`` when given (read back from an int8 store), else computed here."""
    from spar_pipeline.store import dequantize_int8, quantize_int8

    ids = sorted(maps)
    per_channel = stored_int8 or {i: dequantize_int8(*quantize_int8(maps[i])) for i in ids}
    return {
        "int8_per_channel_stored": _summary([_errors(maps[i], per_channel[i]) for i in ids]),
        "int8_per_pixel": _summary([_errors(maps[i], _per_pixel_int8(maps[i])) for i in ids]),
        "fp8_e4m3_per_channel": _summary([_errors(maps[i], _fp8_per_channel(maps[i])) for i in ids]),
    }


def _print_errors(errors: dict) -> None:
    for k, e in errors.items():
        print(f"  {k:26s} rel MSE {e['rel_mse']:.2e}   cosine mean {e['cos_mean']:.6f}  min {e['cos_min']:.5f}")


def store_errors(url: str, limit: int = 64, storage_options: dict | None = None) -> dict:
    """``map_errors`` on up to ``limit`` maps of an existing float16 store."""
    from spar_pipeline.store import FeatureStore, StoreError

    store = FeatureStore.open(url, storage_options)
    if store.dtype != "float16":
        raise StoreError(f"{url} stores {store.dtype} maps; the error is measured against float16 ones")
    ids = store.ids()[:limit]
    if not ids:
        raise StoreError(f"{url} holds no maps yet")
    maps = {i: store.read(i) for i in ids}
    out = dict(store=url, maps=len(ids), map_shape_example=list(maps[ids[0]].shape), errors=map_errors(maps))
    print(f"{len(ids)} maps of {url} (e.g. {out['map_shape_example']}); errors against the stored float16:")
    _print_errors(out["errors"])
    return out


def _read_ms(store, ids: list[int], repeats: int = 5) -> float:
    return 1e3 * median_time(lambda: [store.read(i) for i in ids], repeats) / len(ids)


def main(quick: bool = False) -> dict:
    from spar_pipeline import heldout, manifest
    from spar_pipeline.mini.scenes import make_scene_source
    from spar_pipeline.store import FeatureStore
    from spar_pipeline.weights import load_models

    logging.getLogger("spar_pipeline").setLevel(logging.WARNING)
    n_tars, per_tar, epochs = (2, 8, 2) if quick else (4, 16, 8)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as t:
        tmp = Path(t)
        tars = make_scene_source(tmp / "src", n_tars=n_tars, per_tar=per_tar, seed=0)
        runs, extract_s, reports = {}, {}, {}
        for dtype in ("float16", "int8"):
            runs[dtype], extract_s[dtype], reports[dtype] = _pipeline(tmp, tars, dtype, epochs)
        stores = {d: FeatureStore.open(r.store_url) for d, r in runs.items()}
        ids = sorted(r["image_id"] for r in manifest.read_manifest(runs["float16"].teacher(), "extract").to_pylist()
                     if r["status"] == "ok")
        maps = {i: stores["float16"].read(i) for i in ids}
        errors = map_errors(maps, {i: stores["int8"].read(i) for i in ids})
        nbytes = {d: statistics.mean(s.nbytes_stored(i) for i in ids) for d, s in stores.items()}
        read_ms = {d: _read_ms(s, ids[:16]) for d, s in stores.items()}
        # each student against the float16 teacher maps of the same held-out images
        scores = {}
        for label, (run, ckpt) in {"pretrained": (runs["float16"], "pretrained"),
                                   "student_float16": (runs["float16"], "best"),
                                   "student_int8": (runs["int8"], "best")}.items():
            _, model = load_models(None, ckpt, run, device="cpu", need_pretrained=False)
            scores[label] = heldout.feature_mse(model.eval(), runs["float16"])
    out = dict(
        quick=quick, backbone="mini-clip (shipped weights)", images=len(ids), epochs=epochs,
        map_shape_example=list(maps[ids[0]].shape), errors=errors,
        bytes_per_map=nbytes, bytes_int8_vs_float16=nbytes["int8"] / nbytes["float16"],
        read_ms_per_map=read_ms, extract_seconds=extract_s,
        held_out_mse_vs_float16_teacher=scores,
        student_int8_vs_float16=scores["student_int8"] / scores["student_float16"],
        train_val_mse_own_store={d: r["best_val_mse"] for d, r in reports.items()},
    )
    print(f"{len(ids)} maps like {out['map_shape_example']}, {epochs} epochs; errors against the float16 maps:")
    _print_errors(errors)
    print(f"bytes per map: float16 {nbytes['float16']:.0f}, int8 {nbytes['int8']:.0f} "
          f"({out['bytes_int8_vs_float16']:.3f}×); read ms per map: float16 {read_ms['float16']:.3f}, "
          f"int8 {read_ms['int8']:.3f}")
    print("held-out MSE against the float16 teacher: " + ", ".join(f"{k} {v:.5f}" for k, v in scores.items())
          + f"; int8-trained / float16-trained = {out['student_int8_vs_float16']:.3f}")
    return save("quant", out)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.bench_quant")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--store", help="measure the map error alone on this existing float16 store")
    parser.add_argument("--limit", type=int, default=64, help="maps read from --store")
    args = parser.parse_args()
    if args.store:
        from spar_pipeline.store import StoreError

        try:
            store_errors(args.store, args.limit)
        except StoreError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        main(quick=args.quick)
