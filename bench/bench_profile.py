"""Where the SigLIP2 ViT-B/16-512 window forward spends its time on a CPU, and which levers move it.
Writes bench/results/profile.json.

    python -m bench profile [--quick]

Why: `flops` measures ~0.3–0.4 of the matmul ceiling; this says where the rest goes. One forward
(after a warm-up) runs under torch.profiler in the extract stage's CPU setting (float32, matmul
precision "medium"); self CPU time is grouped by category and set against the forward's wall
time, and the matmul category's own FLOP/s (FLOPs from FlopCounterMode, as `flops` counts them)
says whether the GEMMs themselves reach the ceiling. Then each lever is timed alternately with
the baseline (B V B V …, median of per-pair ratios), with its FLOP/s against both the "medium"
float32 ceiling and the ceiling at the precision it computes in (bf16 for autocast / bf16 model:
the fair one), and its final features compared with the float32 "highest" reference (the extract
stage stores them as training targets). Quick: 1 window, 3 pairs, no torch.compile (~30 s of
compile per variant); full: 2 windows, 5 pairs, plus torch.compile (alone, with bf16 autocast,
with the bf16 model).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import resource
import statistics
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from bench.common import DenseOnly, backbone, flops_per_op, forward_flops, matmul_flops, save
from spar_pipeline.windows import sliding_features_many

NAME = "siglip2-b16-512"

# Category of an op by name; ops not listed (copy_, empty, fill_, …) take their nearest listed
# ancestor's category (a copy_ under contiguous is a layout copy, under _to_copy a dtype conversion,
# under addmm the bias broadcast into the GEMM output), and "rest" when none is.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm",
               "aten::mkldnn_", "aten::convolution", "aten::_convolution", "aten::conv2d", "aten::_mkl", "aten::_mm"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::_softmax",
                  "aten::softmax"),
    "layer_norm": ("aten::layer_norm", "aten::native_layer_norm"),
    "gelu": ("aten::gelu", "aten::silu", "aten::tanh", "aten::sigmoid"),
    "dtype_conversion": ("aten::to", "aten::_to_copy", "aten::_autocast_to"),
    "elementwise": ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::add_", "aten::mul_"),
    "layout_copy": ("aten::contiguous", "aten::clone", "aten::reshape", "aten::permute", "aten::transpose",
                    "aten::view", "aten::flatten", "aten::unbind", "aten::select", "aten::expand", "aten::t",
                    "aten::as_strided", "aten::_reshape_alias", "aten::_unsafe_view", "aten::slice", "aten::stack",
                    "aten::cat", "aten::pad", "aten::constant_pad_nd"),
}
_EXACT = {"aten::to", "aten::t", "aten::add", "aten::mul", "aten::sub", "aten::div", "aten::add_", "aten::mul_",
          "aten::view", "aten::mm", "aten::bmm", "aten::select", "aten::slice", "aten::cat", "aten::pad", "aten::tanh"}


def _category_of_name(name: str) -> str | None:
    for cat, names in CATEGORIES.items():
        for n in names:
            if (name == n) if n in _EXACT else name.startswith(n):
                return cat
    return None


def _category(event) -> str:
    e = event
    while e is not None:
        cat = _category_of_name(e.name)
        if cat is not None:
            return cat
        e = e.cpu_parent
    return "layout_copy" if event.name == "aten::copy_" else "rest"


# --- levers: each a context manager applied around the timed call ------------------------------

_LIBC = None


def _mallopt(trim: int, mmap: int) -> bool:
    """glibc heap thresholds (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD); False where there is no glibc."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        return bool(_LIBC.mallopt(-1, trim)) and bool(_LIBC.mallopt(-3, mmap))
    except (OSError, AttributeError):
        return False


# glibc's dynamic thresholds settle, for this forward's largest buffers (1024×3072 float32 = 12 MiB),
# at mmap ≈ 12 MiB / trim ≈ 24 MiB: freed blocks above the trim line go back to the OS and every
# forward page-faults ~300 MB back in (checked: same minor-fault count as an untouched process).
_MALLOC_DEFAULT_LIKE = (24 << 20, 12 << 20)
_MALLOC_KEEP = (1 << 30, 1 << 30)


@contextlib.contextmanager
def _transposed_tokens(b) -> Iterator[None]:
    """The token layout before the fix in ``SiglipBackbone.dense``: ``flatten(2).transpose(1, 2)``
    left the stream [B, N, D] with strides (N·D, 1, N); every residual add keeps its first input's
    layout, so all 12 blocks ran on a transposed stream and every LayerNorm first copied it to
    contiguous (a strided transpose, ~17× slower than a plain copy). Same values, same output bits;
    kept as a lever so the fix's gain stays measurable."""
    h = b.trunk.patch_embed.norm.register_forward_hook(
        lambda m, i, o: o.transpose(1, 2).contiguous().transpose(1, 2))
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def _malloc_keep() -> Iterator[None]:
    """Keep freed heap memory in the process (no trim, no mmap) so buffers are not re-faulted."""
    _mallopt(*_MALLOC_KEEP)
    try:
        yield
    finally:
        _mallopt(*_MALLOC_DEFAULT_LIKE)


def variants(b, names: list[str]) -> dict[str, tuple[Callable[[], contextlib.AbstractContextManager], object, str]]:
    """name -> (context factory, model for sliding_features_many, precision the matmuls compute in)."""
    out = {}
    # the whole backbone cast to bfloat16 (weights); its input is cast in ``dense``
    b16 = copy.deepcopy(b).to(torch.bfloat16) if any("bf16_model" in n for n in names) else None
    for name in names:
        parts = name.split("+")
        model, precision = b, "float32_medium"
        if "bf16_model" in parts:
            model, precision = DenseOnly(b16, lambda x, m=b16: m.dense(x.to(torch.bfloat16))), "bfloat16"
        if "compile" in parts:  # default mode; the first call (compile seconds) is reported apart
            model = DenseOnly(b, torch.compile(model.dense))
        if "autocast_bf16" in parts:
            precision = "bfloat16"

        def ctx(parts=parts, target=b16 if "bf16_model" in parts else b) -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            if "transposed_tokens" in parts:
                stack.enter_context(_transposed_tokens(target))
            if "autocast_bf16" in parts:
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            if "malloc_keep" in parts:
                stack.enter_context(_malloc_keep())
            return stack

        out[name] = (ctx, model, precision)
    return out


def _run(model, image: torch.Tensor, ctx) -> tuple[torch.Tensor, float, int]:
    """Features of ``image``, wall seconds and minor page faults of the call."""
    with ctx():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        y = sliding_features_many(model, [image], model.window, 24, batch=8)[0]
        dt = time.perf_counter() - t
        return y, dt, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def numerics(y: torch.Tensor, ref: torch.Tensor) -> dict:
    """Cosine similarity per feature vector (mean, min) and relative MSE against the reference."""
    y, ref = y.float().flatten(0, -2), ref.float().flatten(0, -2)
    cos = F.cosine_similarity(y, ref, dim=-1)
    return dict(cosine_mean=cos.mean().item(), cosine_min=cos.min().item(),
                rel_mse=((y - ref) ** 2).sum().item() / (ref ** 2).sum().item())


def breakdown(b, x: torch.Tensor, ctx=contextlib.nullcontext, model=None) -> dict:
    """Profile one ``dense`` forward of the window batch ``x`` (after a warm-up): self CPU time by
    category as a share of the forward's wall time, and the FLOP/s of the matmul and attention ops."""
    from torch.profiler import ProfilerActivity, profile

    model = model or b
    with torch.no_grad(), ctx():
        model.dense(x)  # warm-up
        ceil = ceiling_now()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            model.dense(x)
            wall = time.perf_counter() - t
    seconds: dict[str, float] = {c: 0.0 for c in (*CATEGORIES, "rest")}
    for e in prof.events():
        seconds[_category(e)] += e.self_cpu_time_total / 1e6
    seconds["untraced (python, profiler)"] = max(0.0, wall - sum(seconds.values()))
    counts = _flop_counts(x.shape[0], x.shape[-2], x.shape[-1])
    mm, attn = counts["matmul"], counts["attention"]
    return dict(wall_seconds=wall, seconds=seconds, share={c: s / wall for c, s in seconds.items()},
                matmul_flops=mm, attention_flops=attn,
                matmul_flops_per_s=mm / seconds["matmul"], attention_flops_per_s=attn / seconds["attention"],
                ceilings_now=ceil, matmul_vs_medium_ceiling=mm / seconds["matmul"] / ceil["float32_medium"],
                matmul_vs_bfloat16_ceiling=mm / seconds["matmul"] / ceil["bfloat16"])


def _flop_counts(batch: int, height: int, width: int) -> dict:
    """Counted FLOPs split into GEMM/conv ("matmul") and attention (counted as bmm on meta)."""
    per_op = flops_per_op(NAME, height, width, batch)
    attn = sum(v for k, v in per_op.items() if "bmm" in k or "attention" in k)
    return dict(matmul=sum(per_op.values()) - attn, attention=attn, per_op=per_op)


def levers(b, image: torch.Tensor, names: list[str], pairs: int, ref: torch.Tensor) -> dict:
    """Each variant timed alternately with the baseline (B V B V …); speedup = median of per-pair
    ratios. Efficiency: the variant's FLOP/s over the matmul ceiling measured just before it, at
    float32 "medium" and at the variant's own precision (median over pairs)."""
    n = _windows(image, b.window)
    flops = n * forward_flops(NAME, b.window, b.window)
    _mallopt(*_MALLOC_DEFAULT_LIKE)  # an explicit, restorable stand-in for glibc's dynamic default
    base_ctx = contextlib.nullcontext
    rows: dict[str, dict] = {}
    for name, (ctx, model, precision) in variants(b, names).items():
        t = time.perf_counter()
        y, _, _ = _run(model, image, ctx)  # warm-up (compiles, for compile variants)
        first_call = time.perf_counter() - t
        _run(b, image, base_ctx)
        base, var, ratios, faults, eff_medium, eff_own, eff_base = [], [], [], [], [], [], []
        for _ in range(pairs):
            _, tb, _ = _run(b, image, base_ctx)
            ceil = ceiling_now()  # next to the variant's call: the load changes by the second here
            _, tv, fv = _run(model, image, ctx)
            base.append(tb), var.append(tv), ratios.append(tb / tv), faults.append(fv)
            eff_medium.append(flops / tv / ceil["float32_medium"]), eff_base.append(flops / tb / ceil["float32_medium"])
            eff_own.append(flops / tv / ceil["bfloat16" if precision == "bfloat16" else "float32_medium"])
        secs = statistics.median(var)
        rows[name] = dict(
            precision=precision, seconds_per_window=secs / n, baseline_seconds_per_window=statistics.median(base) / n,
            speedup=statistics.median(ratios), speedup_range=[min(ratios), max(ratios)],
            achieved_flops=flops / secs, efficiency_vs_float32_medium=statistics.median(eff_medium),
            baseline_efficiency_vs_float32_medium=statistics.median(eff_base),
            efficiency_vs_own_precision=statistics.median(eff_own), minor_faults_per_call=statistics.median(faults),
            **numerics(y, ref), **({"compile_seconds": first_call} if "compile" in name else {}))
        print(f"  {name:34s} ×{rows[name]['speedup']:.2f} ({min(ratios):.2f}–{max(ratios):.2f})  "
              f"{rows[name]['achieved_flops'] / 1e9:6.0f} GFLOP/s = {rows[name]['efficiency_vs_float32_medium']:.2f} of medium, "
              f"{rows[name]['efficiency_vs_own_precision']:.2f} of {precision} ceiling; cos "
              f"{rows[name]['cosine_mean']:.5f} rel-MSE {rows[name]['rel_mse']:.1e}"
              + (f"  (compile {first_call:.0f} s)" if "compile" in name else ""), flush=True)
    return rows


def _windows(image: torch.Tensor, K: int) -> int:
    from spar_pipeline.windows import count_windows

    return count_windows(image.shape[-2], image.shape[-1], K, 24)


def ceilings() -> dict:
    """Large-matmul FLOP/s at each precision (2048², as `flops` measures them)."""
    torch.set_float32_matmul_precision("highest")
    highest = matmul_flops(2048, 5)
    torch.set_float32_matmul_precision("medium")
    return dict(highest=highest, **ceiling_now(5))


def ceiling_now(repeats: int = 3) -> dict:
    """The "medium" float32 and bfloat16 ceilings, measured now (~0.2 s)."""
    return dict(float32_medium=matmul_flops(2048, repeats), bfloat16=matmul_flops(2048, repeats, torch.bfloat16))


def reference(b, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Final features in true float32 (precision "highest"), and the baseline ("medium") against them."""
    torch.set_float32_matmul_precision("highest")
    try:
        ref = _run(b, image, contextlib.nullcontext)[0]
    finally:
        torch.set_float32_matmul_precision("medium")
    return ref, numerics(_run(b, image, contextlib.nullcontext)[0], ref)


def print_breakdown(title: str, bd: dict) -> None:
    print(f"{title}: forward {bd['wall_seconds']:.3f} s (under the profiler)")
    for c, s in sorted(bd["share"].items(), key=lambda kv: -kv[1]):
        print(f"  {c:28s} {s * 100:5.1f}%  {bd['seconds'][c] * 1e3:7.1f} ms")
    print(f"  matmul ops alone: {bd['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s = {bd['matmul_vs_medium_ceiling']:.2f} "
          f"of the medium ceiling, {bd['matmul_vs_bfloat16_ceiling']:.2f} of bfloat16 (measured just before); "
          f"attention: {bd['attention_flops_per_s'] / 1e9:.0f} GFLOP/s", flush=True)


BEST_EAGER = "malloc_keep+bf16_model"
# the baseline has contiguous tokens (adopted); "transposed_tokens" is the layout before, for the record
QUICK_LEVERS = ["transposed_tokens", "malloc_keep", "autocast_bf16", "bf16_model", BEST_EAGER]
FULL_LEVERS = QUICK_LEVERS + ["malloc_keep+autocast_bf16", "compile", "compile+autocast_bf16",
                              "compile+malloc_keep+bf16_model"]


def main(quick: bool = False) -> dict:
    torch.set_float32_matmul_precision("medium")  # as the extract stage sets it on a CPU
    b = backbone(NAME)
    ceil = ceilings()
    print(f"{torch.get_num_threads()} threads: matmul 2048² float32 medium {ceil['float32_medium'] / 1e9:.0f}, "
          f"highest {ceil['highest'] / 1e9:.0f}, bfloat16 {ceil['bfloat16'] / 1e9:.0f} GFLOP/s")
    image = torch.randn(3, 512, 512 if quick else 528)  # 1 or 2 windows of 512 at stride 24
    x = torch.randn(1 if quick else 2, 3, 512, 512)
    _mallopt(*_MALLOC_DEFAULT_LIKE)
    base = breakdown(b, x)
    print_breakdown("baseline float32 medium", base)
    ctx, model, _ = variants(b, [BEST_EAGER])[BEST_EAGER]
    tuned = breakdown(b, x.to(torch.bfloat16), ctx, model)
    print_breakdown(BEST_EAGER, tuned)
    ref, base_num = reference(b, image)
    print(f"baseline (medium) vs float32 highest: cos {base_num['cosine_mean']:.5f} rel-MSE {base_num['rel_mse']:.1e}")
    rows = levers(b, image, QUICK_LEVERS if quick else FULL_LEVERS, 3 if quick else 5, ref)
    return save("profile", dict(
        quick=quick, backbone=NAME, threads=torch.get_num_threads(), torch=torch.__version__,
        windows=_windows(image, b.window), ceilings=ceil, breakdown_baseline=base, breakdown_best_eager=tuned,
        best_eager=BEST_EAGER, baseline_numerics_vs_highest=base_num, levers=rows,
        note=("share = self CPU time / wall time of one profiled dense forward; speedup = median of per-pair "
              "baseline/variant ratios, timed alternately; numerics vs the float32 'highest' reference features "
              "(random weights); baseline malloc = glibc thresholds pinned at their dynamic values (mmap 12 MiB, "
              "trim 24 MiB)")))


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
