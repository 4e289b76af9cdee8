"""The one place that resolves (backbone, checkpoint, run) into models: which weights each model has,
and one line when a checkpoint cannot be found."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from spar_pipeline.errors import EvaluateError
from spar_pipeline.run import Run
from spar_pipeline.weights import BEST, load_models, resolve_checkpoint


@pytest.fixture
def run_with_best(tmp_path):
    from spar_pipeline.backbones import build

    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")  # backbone tiny-siglip, no base checkpoint
    student = build("tiny-siglip")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)  # weights no pretrained model has
    os.makedirs(os.path.dirname(run.path(*BEST)))  # the default student's checkpoint folder
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, run.path(*BEST))
    return run, student


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_pretrained_is_one_model_and_best_another(run_with_best):
    run, student = run_with_best
    base, same = load_models(None, "pretrained", run, device="cpu")
    assert same is base and base.name == "tiny-siglip"  # the run's recipe backbone
    pretrained, best = load_models(None, "best", run, device="cpu")
    assert _same_weights(pretrained, base) and not _same_weights(best, base)
    assert _same_weights(best, student.cpu())
    none, only = load_models(None, "best", run, device="cpu", need_pretrained=False)
    assert none is None and _same_weights(only, best)
    kept, given = load_models(base, "best", run, device="cpu", model=best)
    assert kept is base and given is best  # models already built are used as they are


def test_checkpoints_that_cannot_be_found(tmp_path):
    assert resolve_checkpoint(None, "pretrained") is None
    with pytest.raises(EvaluateError, match="needs --run"):
        resolve_checkpoint(None, "best")
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")
    with pytest.raises(EvaluateError, match="no best checkpoint yet"):
        load_models(None, "best", run, device="cpu")
    with pytest.raises(EvaluateError, match="no such file"):
        load_models(None, str(tmp_path / "nope.safetensors"), run, device="cpu")
