"""The student's training step: eval mode throughout, gradient accumulation equal to a larger batch."""

from __future__ import annotations

import pytest
import torch

from spar_pipeline.backbones import build, list_backbones
from spar_pipeline.student import Student

CHEAP = {"tiny-siglip", "tiny-clip", "mini-clip"}  # the real architectures build in seconds at random weights
CPU = torch.device("cpu")


def _student(name: str, **kw) -> Student:
    return Student(build(name), "blk_-1", lr=1e-3, weight_decay=1e-4, precision="fp32", device=CPU, **kw)


def _image(seed: int, size=(64, 96)) -> torch.Tensor:
    return torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in CHEAP else [pytest.mark.slow])
                                  for n in list_backbones()])
def test_dense_inside_a_training_step_equals_eval(name):
    """Every module stays in eval mode while the student trains (freezing is by requires_grad), so
    the forward of a training step is the eval forward: for DINOv3.txt, train mode would switch on
    RoPE's random coordinate rescale."""
    student = _student(name)
    model, img = student.model, _image(0)
    x = student.input(img)
    with torch.no_grad():
        eval_map = model.dense(x)
    grad_map = model.dense(x).detach()  # the same kernels as the step's forward (grad enabled)
    torch.testing.assert_close(grad_map, eval_map, rtol=1e-4, atol=1e-5)
    seen = []

    def hook(module, args, out):
        seen.append((out.detach().clone(), [n for n, m in model.named_modules() if m.training]))

    before = {n: p.detach().clone() for n, p in student.params}
    handle = model.register_forward_hook(hook)
    try:
        loss, stepped = student.train_step(img, torch.zeros(eval_map.shape[1:]))
    finally:
        handle.remove()
    (step_map, training), = seen
    assert training == [], training[:5]
    assert torch.equal(step_map, grad_map)
    assert stepped and loss > 0
    assert any(not torch.equal(p, before[n]) for n, p in student.params)  # it was a real optimizer step
    assert not any(m.training for m in model.modules())


def test_frozen_blocks_kept_per_image_train_the_same_weights():
    """On a CPU the frozen blocks' output is kept per image and later epochs start from it: the same losses
    and weights to the bit as the full pass each time, with the blocks run once per image."""
    images = [_image(i, (64, 80)) for i in range(3)]
    targets = [torch.randn(8, 10, 96, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    runs = {}
    for budget in (0, 1 << 26):
        torch.manual_seed(0)
        student = Student(build("mini-clip"), "blk_-1,blk_-2", lr=1e-3, weight_decay=1e-4, precision="fp32",
                          device=CPU, prefix_budget=budget)
        losses = [student.train_step(img, t, key=i)[0].item()
                  for _ in range(3) for i, (img, t) in enumerate(zip(images, targets))]
        losses.append(student.mse(images[0], targets[0], key=0).item())
        runs[budget] = (losses, {n: p.detach().clone() for n, p in student.params}, student)
    (plain, w0, s0), (kept, w1, s1) = runs[0], runs[1 << 26]
    assert s0.depth == 0 and s1.depth == 4 and len(s1.prefixes) == 3
    assert s1.prefixes.misses == 3 and s1.prefixes.hits == 7  # 9 steps and a validation over 3 images
    assert plain == kept
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert plain[0] != plain[3]  # it learned: the second epoch's loss moved


def test_a_budget_too_small_keeps_nothing_and_changes_nothing():
    student = Student(build("mini-clip"), "blk_-1", lr=1e-3, weight_decay=1e-4, precision="fp32", device=CPU,
                      prefix_budget=16)
    student.train_step(_image(0), torch.zeros(8, 12, 96), key=0)
    student.train_step(_image(0), torch.zeros(8, 12, 96), key=0)
    assert student.depth == 5 and len(student.prefixes) == 0 and student.prefixes.misses == 2
