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
