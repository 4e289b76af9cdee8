"""Training's float32 matmul precision: the reference's "medium" on a GPU only, put back after the loop."""

from __future__ import annotations

import pytest
import torch

from spar_pipeline.devices import matmul_precision, matmul_precision_for
from spar_pipeline.trainer import Trainer

CUDA, CPU = torch.device("cuda:0"), torch.device("cpu")


@pytest.fixture
def high():
    """The process-wide setting at "high" (neither PyTorch's default nor "medium"), the caller's put back after."""
    caller = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield "high"
    torch.set_float32_matmul_precision(caller)


def test_medium_on_a_gpu_and_nothing_on_the_cpu():
    assert matmul_precision(CUDA) == "medium"
    assert matmul_precision(torch.device("cuda", 3)) == "medium"
    assert matmul_precision(CPU) is None  # "medium" would make the CPU's oneDNN float32 matmuls bf16


def test_the_setting_holds_inside_and_the_previous_one_comes_back(high):
    with matmul_precision_for(CUDA):  # sets a flag only: no GPU needed
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == high
    with matmul_precision_for(CPU):
        assert torch.get_float32_matmul_precision() == high
    with pytest.raises(RuntimeError), matmul_precision_for(CUDA):
        raise RuntimeError("a training that fails")
    assert torch.get_float32_matmul_precision() == high


def test_trainer_trains_under_it_for_its_device(high, monkeypatch):
    monkeypatch.setattr(Trainer, "_train", lambda self: torch.get_float32_matmul_precision())  # the loop's setting
    trainer = Trainer.__new__(Trainer)  # no model or data: only the precision around the loop is under test
    trainer.device = CUDA
    assert trainer.train() == "medium"
    assert torch.get_float32_matmul_precision() == high
    trainer.device = CPU
    assert trainer.train() == high
