"""Projection to paper scale: 25,000 SA-1B images through the siglip2-b16 recipe — windows,
FLOPs, store bytes and hours on one H100. Writes bench/results/projection.json.

    python -m bench projection

Sizes come from the recipe's own augmentation draw (docs/reference.md, `augmentation.draw`) for
image ids 1..25,000, assuming every SA-1B source is 2250×1500 (SA-1B's usual size; orientation
does not change the window count). The FLOPs per window and per training forward are counted
(FlopCounterMode); the measured efficiency comes from bench/results/flops.json when present.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from bench.common import RESULTS, forward_flops, save

IMAGES = 25_000
SOURCE = (1500, 2250)  # (height, width) of a typical SA-1B image
H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM dense bf16/fp16 tensor-core peak
ASSUMED_GPU_EFFICIENCY = 0.4  # a ViT-B at batch 10 of 1024 tokens in fp16: 35–50% of peak is typical
TRAIN_EPOCHS = 10


def _measured_efficiency() -> float | None:
    try:
        cases = json.loads((RESULTS / "flops.json").read_text())["cases"]
        return next(c["efficiency_vs_matmul"] for c in cases if c["backbone"] == "siglip2-b16-512")
    except (OSError, KeyError, StopIteration, ValueError):
        return None


# store options against raw float16 (the default, codec "none"): measured rows of bench/results/store.json
STORE_OPTIONS = {"blosc": "blosc-zstd-3-bitshuffle", "int8": "int8-none"}


def _store_ratios() -> dict[str, float]:
    """Stored / raw float16 bytes of each store option, from the last store bench (synthetic maps)."""
    try:
        rows = json.loads((RESULTS / "store.json").read_text())["store"]
    except (OSError, KeyError, ValueError):
        return {}
    return {name: rows[label]["bytes_vs_raw"] for name, label in STORE_OPTIONS.items() if label in rows}


def main(quick: bool = False) -> dict:
    from spar_pipeline.augmentation import draw
    from spar_pipeline.recipe import load_recipe
    from spar_pipeline.windows import count_windows

    recipe = load_recipe("siglip2-b16")
    K, s, seed = recipe.extract.window, recipe.extract.stride, recipe.recipe.seed
    per_window = forward_flops("siglip2-b16-512", K, K)
    windows = tokens = store_bytes = 0
    train_flops = 0.0
    sizes: Counter = Counter()
    for image_id in range(1, IMAGES + 1):
        d = draw(seed, image_id, *SOURCE, recipe.augment)
        sizes[(d.height, d.width)] += 1
        windows += count_windows(d.height, d.width, K, s)
        store_bytes += (d.height // 16) * (d.width // 16) * 768 * 2  # float16 [H/16, W/16, 768], before the codec
        tokens += (d.height // 16) * (d.width // 16)
    # A ViT forward is a·N + b·N² FLOPs in its N tokens (per-token layers, attention); fit a and b on
    # two counted sizes and check a third, instead of counting each of the ~1,500 distinct sizes.
    f1, f4, f8 = (forward_flops("siglip2-b16-512", h, w) for h, w in ((512, 512), (1024, 1024), (1024, 2048)))
    b = (f4 / 4096 - f1 / 1024) / (4096 - 1024)
    a = f1 / 1024 - b * 1024
    fit_error = abs(a * 8192 + b * 8192 ** 2 - f8) / f8
    for (h, w), n in sizes.items():  # the student's single pass, once per image per epoch
        N = (h // 16) * (w // 16)
        train_flops += n * (a * N + b * N * N)
    # training step ≈ forward + backward through the 2 trainable blocks (≈ 2× their forward) + the
    # input-gradient-free frozen part: forward × (1 + 2·2/12) is a fair count; written as an assumption
    train_flops = int(train_flops * (1 + 2 * 2 / 12) * TRAIN_EPOCHS)
    extract_flops = windows * per_window
    measured = _measured_efficiency()
    ratios = _store_ratios()
    out = dict(
        images=IMAGES, source_size=list(SOURCE), window=K, stride=s, recipe="siglip2-b16",
        distinct_sizes=len(sizes), windows=windows, windows_per_image=windows / IMAGES,
        tokens_per_image=tokens / IMAGES, flops_per_window=per_window, extract_flops=extract_flops,
        store_bytes_float16=store_bytes, store_bytes_per_image=store_bytes / IMAGES,
        store_bytes_options={name: store_bytes * r for name, r in ratios.items()},
        train_flops_10_epochs=train_flops, forward_flops_fit=dict(per_token=a, per_token_pair=b,
                                                                  relative_error_at_8192_tokens=fit_error),
        assumptions=dict(
            h100_peak_flops=H100_BF16_DENSE, assumed_gpu_efficiency=ASSUMED_GPU_EFFICIENCY,
            measured_cpu_efficiency_vs_matmul=measured,
            source="every source 2250×1500; sizes from augmentation.draw (seed 0) for ids 1..25000",
            store=f"float16 [H/16, W/16, 768], default codec none; options at {ratios} of raw "
                  "(synthetic maps, bench/results/store.json)",
            train=f"{TRAIN_EPOCHS} epochs, single pass per image, backward through 2 of 12 blocks: forward × 4/3",
        ),
    )
    hours = {}
    for label, eff in (("assumed_gpu_efficiency", ASSUMED_GPU_EFFICIENCY), ("measured_cpu_efficiency", measured)):
        if eff:
            hours[label] = dict(efficiency=eff, extract_hours=extract_flops / (H100_BF16_DENSE * eff) / 3600,
                                train_hours=train_flops / (H100_BF16_DENSE * eff) / 3600)
    out["h100_hours"] = hours
    print(f"{IMAGES} images, {len(sizes)} distinct augmented sizes; {windows:,} windows "
          f"({windows / IMAGES:.0f}/image, K={K}, s={s}); {per_window / 1e9:.1f} GFLOP/window")
    print(f"extract {extract_flops / 1e15:.1f} PFLOP; store {store_bytes / 1e9:.1f} GB float16 "
          f"({store_bytes / IMAGES / 1e6:.2f} MB/image"
          + "".join(f", {store_bytes * r / 1e9:.1f} GB {name}" for name, r in ratios.items())
          + f"); train {TRAIN_EPOCHS} epochs {train_flops / 1e15:.1f} PFLOP")
    for label, h in hours.items():
        print(f"one H100 at {h['efficiency']:.2f} of {H100_BF16_DENSE / 1e12:.0f} TFLOP/s ({label}): "
              f"extract {h['extract_hours']:.1f} h, train {h['train_hours']:.1f} h")
    return save("projection", out)


if __name__ == "__main__":
    main()
