"""Frozen blocks once (``spar_pipeline.prefixes``): what keeping a single pass's frozen blocks saves on a CPU.

Paired, alternating, on one image: a student training step (``Student.train_step``, trainable
``blk_-1,blk_-2``) running every block against one that finishes the image's kept ``Partial`` (a later epoch),
and a student's single pass at evaluation against finishing the pretrained model's kept pass. ``mini``:
mini-clip on a 384×288 training image (the mini recipe's largest) and the 512×384 benchmark image (scale 4);
``siglip2`` (not in ``--quick``): SigLIP2 B/16-512 at random weights, 512×768.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import save


def _pairs(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately (the machine's drift hits both)."""
    ta, tb = [], []
    a(), b()  # warm-up
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def _case(name: str, train_hw: tuple[int, int], eval_hw: tuple[int, int], repeats: int) -> dict:
    from spar_pipeline.backbones import build
    from spar_pipeline.student import Student

    cpu = torch.device("cpu")
    students = {budget: Student(build(name), "blk_-1,blk_-2", lr=1e-5, weight_decay=0.0, precision="fp32",
                                device=cpu, prefix_budget=budget) for budget in (0, 1 << 30)}
    img = torch.randint(0, 256, (3, *train_hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probe = students[0].model
    with torch.no_grad():
        target = probe.dense(students[0].input(img))[0] + 0.01
    full, kept = _pairs(lambda: students[0].train_step(img, target, key=0),
                        lambda: students[1 << 30].train_step(img, target, key=0), repeats)
    model = students[0].model
    x = torch.randn(1, 3, *eval_hw, generator=torch.Generator().manual_seed(1))
    depth = students[1 << 30].depth
    with torch.no_grad():
        partial = model.prefix(x, depth)
        one, finished = _pairs(lambda: model.dense(x), lambda: model(partial), repeats)
    out = dict(backbone=name, blocks=len(model.blocks()), frozen_depth=depth, train_image=list(train_hw),
               train_step_full_s=round(full, 4), train_step_kept_s=round(kept, 4), train_speedup=round(full / kept, 2),
               eval_image=list(eval_hw), single_pass_full_s=round(one, 4), single_pass_finished_s=round(finished, 4),
               eval_speedup=round(one / finished, 2))
    print(f"{name}: train step {full * 1000:.0f} ms -> {kept * 1000:.0f} ms with the frozen {depth} of "
          f"{out['blocks']} blocks kept ({out['train_speedup']}×); single pass {eval_hw[0]}×{eval_hw[1]} "
          f"{one * 1000:.0f} ms -> {finished * 1000:.0f} ms finished from the kept pass ({out['eval_speedup']}×)")
    return out


def main(quick: bool = False) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cases = [_case("mini-clip", (288, 384), (384, 512), repeats=10)]
    if not quick:
        cases.append(_case("siglip2-b16-512", (512, 768), (512, 768), repeats=3))
    return save("prefixes", dict(threads=torch.get_num_threads(), cases=cases))
