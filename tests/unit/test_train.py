"""train: distillation beats the pretrained single pass, 2-process DDP (gloo), resume, damaged checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spar_pipeline import augment, extract, ingest, manifest, split, train
from spar_pipeline.backbones import build
from spar_pipeline.checkpoint import Checkpointer, CheckpointError, decode_state, encode_state
from spar_pipeline.errors import TrainError
from spar_pipeline.run import Run
from spar_pipeline.mini.sa1b_writer import make_sa1b_source

from _extracted import tiny_recipe  # tests/ is on sys.path (tests/conftest.py)

EPOCHS = 2
EVERY = 5  # checkpoint interval in steps


def _recipe(tmp: Path, **changes: str) -> Path:
    """tiny-cpu with a train section sized for a 20-image test: 5 held out, a step checkpoint every 5."""
    return tiny_recipe(tmp / "tiny-train.toml", **dict(dict(lr="1e-4", holdout_fraction="0.25",
                       checkpoint_every=str(EVERY), epochs=str(EPOCHS), loader_workers="1"), **changes))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A run with 20 images through ingest, augment and extract (the real stages)."""
    tmp = tmp_path_factory.mktemp("train")
    tars = make_sa1b_source(tmp / "src", n_tars=2, per_tar=10, size=(128, 96), seed=1)
    run = Run(str(tmp / "base"))
    run.resolve_recipe(str(_recipe(tmp)))
    ingest.run(run, [str(t) for t in tars])
    augment.run(run)
    extract.run(run, workers=1, progress=False)
    return tmp / "base"


def _copy(prepared: Path, dst: Path) -> Run:
    shutil.copytree(prepared, dst)
    return Run(str(dst))


def _trainable(run: Run, step: int) -> dict[str, torch.Tensor]:
    _, state = Checkpointer(run.student(), dict, every=EVERY).load(step)
    return state["model"]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """One uninterrupted single-process run: the reference for the resume tests."""
    run = _copy(prepared, tmp_path_factory.mktemp("full") / "run")
    report = train.run(run, progress=False)
    return run, report


# ---- pure parts -------------------------------------------------------------------------------
def test_split_order_and_shares_are_deterministic():
    ids = list(range(1, 41))
    tr, val = split.split_holdout(ids, seed=0, fraction=0.25)
    assert val and tr and not set(tr) & set(val) and sorted(tr + val) == ids
    assert split.split_holdout(ids, 0, 0.25) == (tr, val)
    # membership depends on the image only: adding images never moves an old one across the split
    tr2, val2 = split.split_holdout(ids + list(range(41, 81)), 0, 0.25)
    assert set(val) <= set(val2) and set(tr) <= set(tr2)
    assert split.split_holdout([1, 2], 0, 0.01)[1] and split.split_holdout([1, 2], 0, 1.0)[0]  # at least one each
    assert split.split_holdout(ids, 0, 0.0) == (ids, [])  # except fraction 0: nothing held out
    assert split.epoch_order(tr, 0, 3) == split.epoch_order(list(reversed(tr)), 0, 3) != split.epoch_order(tr, 0, 4)
    order = split.epoch_order(tr, 0, 0)
    a, b = split.rank_share(order, 0, 2), split.rank_share(order, 1, 2)
    assert len(a) == len(b) == len(order) // 2 and not set(a) & set(b)
    s = 4  # after s steps on every rank, the images consumed are a prefix of the order
    assert sorted(a[:s] + b[:s]) == sorted(order[: 2 * s])


def test_state_encoding_roundtrip_without_pickle():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.sum().backward()
    opt.step()
    import random

    state = dict(opt=opt.state_dict(), py=random.getstate(), np=np.random.get_state(), x=None, f=float("inf"))
    tensors: dict = {}
    tree = json.loads(json.dumps(encode_state(state, tensors)))
    back = decode_state(tree, tensors)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=1.0)
    opt2.load_state_dict(back["opt"])
    assert torch.equal(opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], opt.state[p]["exp_avg"])
    random.setstate(back["py"])
    np.random.set_state(back["np"])
    assert back["f"] == float("inf") and back["x"] is None


def test_train_state_roundtrip_and_recut_for_another_process_count():
    from spar_pipeline.trainer import TrainState

    cpu = torch.device("cpu")
    s = TrainState(epoch=1, position=6, step=3, seconds=2.0, wait=0.5, baseline_val_mse=0.3, best_val_mse=0.2,
                   last_val_mse=0.25)
    tensors: dict = {}
    tree = json.loads(json.dumps(encode_state(s.state_dict(world=2, images_per_step=4, loss=(1.5, 12)), tensors)))
    saved = decode_state(tree, tensors)
    four = [TrainState() for _ in range(4)]
    for rank, t in enumerate(four):
        t.load_state_dict(saved, world=4, rank=rank, device=cpu)
    assert all((t.epoch, t.step, t.position) == (1, 3, 3) for t in four)  # 12 images consumed, re-cut for 4
    assert (float(four[0].loss_sum), four[0].loss_images) == (1.5, 12)  # the global sums go on on rank 0 only
    assert all((float(t.loss_sum), t.loss_images) == (0.0, 0) for t in four[1:])
    assert (four[2].baseline_val_mse, four[2].best_val_mse, four[2].last_val_mse, four[2].seconds) == (0.3, 0.2, 0.25, 2.0)


# ---- the stage --------------------------------------------------------------------------------
def test_train_beats_pretrained_single_pass_and_exports(trained):
    run, report = trained
    rows = sorted(manifest.read_manifest(run.student(), "train").to_pylist(), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    steps_per_epoch = report["train_images"]
    assert [r["step"] for r in rows] == [steps_per_epoch * (e + 1) for e in range(EPOCHS)]
    assert report["val_images"] >= 1 and report["train_images"] + report["val_images"] == 20
    base = rows[0]["baseline_val_mse"]
    assert all(r["baseline_val_mse"] == base for r in rows)
    # the method's point: distilled single pass is closer to the sliding-window teacher than the pretrained one
    assert rows[-1]["val_mse"] < 0.9 * base, (rows, base)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["seconds"] > 0 and 0 <= r["data_wait_seconds"] < r["seconds"] for r in rows)
    assert report["steps_per_second"] > 0 and 0 <= report["data_wait_share"] < 1

    # best.safetensors: the whole backbone, loaded by build(); same weights as the best epoch checkpoint
    best = json.loads(run.student().read_bytes("checkpoints", "best.json"))
    assert best["val_mse"] == min(r["val_mse"] for r in rows)
    student = build("tiny-siglip", checkpoint=run.student().path("checkpoints", "best.safetensors"))
    pretrained = build("tiny-siglip")
    weights = _trainable(run, best["step"])
    sd = student.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in weights.items())
    assert any(not torch.equal(sd[k], pretrained.state_dict()[k]) for k in weights)
    # open_clip layout: the wrapped open_clip model's own state dict, strict-loadable into a fresh one
    from safetensors.torch import load_file

    oc = load_file(run.student().path("checkpoints", "best_open_clip.safetensors"))
    fresh = build("tiny-siglip").model
    fresh.load_state_dict(oc, strict=True)
    x = torch.randn(1, 3, 64, 96)
    oc_path = run.student().path("checkpoints", "best_open_clip.safetensors")
    assert torch.allclose(build("tiny-siglip", checkpoint=oc_path)(x),
                          student(x))

    # retention: the epoch ends and the latest 2 step checkpoints
    kept = Checkpointer(run.student(), dict, every=EVERY).entries()
    step_ckpts = [s for s in range(EVERY, rows[-1]["step"] + 1, EVERY) if s not in {r["step"] for r in rows}]
    assert kept == sorted({r["step"] for r in rows} | set(step_ckpts[-2:]))

    # a rerun with everything done does nothing and changes nothing
    again = train.run(run, progress=False)
    assert again["steps_this_run"] == 0 and again["step"] == rows[-1]["step"]


def test_resume_after_interrupt_matches_uninterrupted(trained, prepared, tmp_path):
    ref_run, ref = trained
    run = _copy(prepared, tmp_path / "run")
    steps_per_epoch = ref["train_images"]
    stop = steps_per_epoch + EVERY + 3  # mid epoch 1, past a step checkpoint: the steps after it are redone
    first = train.run(run, progress=False, stop_after_steps=stop)
    assert first["stopped"] and first["step"] == stop
    second = train.run(run, progress=False)  # resume is the default
    assert second["step"] == ref["step"] == EPOCHS * steps_per_epoch
    last_checkpoint = max(stop // EVERY * EVERY, steps_per_epoch)
    assert last_checkpoint < stop and second["steps_this_run"] == ref["step"] - last_checkpoint
    a, b = _trainable(run, ref["step"]), _trainable(ref_run, ref["step"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    rows = sorted(manifest.read_manifest(run.student(), "train").to_pylist(), key=lambda r: r["epoch"])
    ref_rows = sorted(manifest.read_manifest(ref_run.student(), "train").to_pylist(), key=lambda r: r["epoch"])
    for r, q in zip(rows, ref_rows, strict=True):
        assert r["step"] == q["step"] and r["baseline_val_mse"] == q["baseline_val_mse"]
        assert r["train_loss"] == pytest.approx(q["train_loss"], rel=1e-4)  # the epoch's loss sum was resumed too
        assert r["val_mse"] == pytest.approx(q["val_mse"], rel=1e-4)


def test_damaged_checkpoint_falls_back_to_previous(trained, tmp_path, caplog):
    ref_run, ref = trained
    run = _copy(Path(ref_run.url), tmp_path / "run")
    ck = Checkpointer(run.student(), dict, every=EVERY)
    steps = ck.entries()
    newest = Path(run.student().path("checkpoints", f"ckpt-{steps[-1]:09d}.safetensors"))
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="damaged"):
        ck.load(steps[-1])
    with caplog.at_level(logging.WARNING, logger="spar_pipeline.checkpoint"):
        entry, _ = ck.load_latest()
    assert entry.step == steps[-2] and "damaged" in caplog.text
    # training resumes from the previous one, redoes the lost steps and lands on the same weights
    report = train.run(run, progress=False)
    assert report["steps_this_run"] == steps[-1] - steps[-2] and report["step"] == ref["step"]
    a, b = _trainable(run, ref["step"]), _trainable(ref_run, ref["step"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # nothing intact at all: a clear error, not a silent restart
    for s in ck.entries():
        Path(run.student().path("checkpoints", f"ckpt-{s:09d}.json")).write_text("{torn")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train.run(run, progress=False)


@pytest.fixture(scope="module")
def two_processes(prepared, tmp_path_factory):
    """2-process DDP (gloo), one image each per optimizer step: images_per_step = 2."""
    run = _copy(prepared, tmp_path_factory.mktemp("ddp") / "run")
    return run, train.run(run, processes=2, epochs=1, progress=False, images_per_step=2)


def test_ddp_two_processes_gloo(two_processes):
    run, report = two_processes
    n_train, n_val = report["train_images"], report["val_images"]
    assert report["world"] == 2 and report["step"] == n_train // 2
    shares = report["shares"]
    assert sorted(shares) == [0, 1] and all(len(s) == n_train // 2 for s in shares.values())
    assert not set(shares[0]) & set(shares[1])
    extracted = manifest.read_manifest(run.teacher(), "extract")["image_id"].to_pylist()
    held = set(extracted) - set(shares[0]) - set(shares[1])
    assert len(held) == n_val + n_train % 2
    rows = manifest.read_manifest(run.student(), "train").to_pylist()
    assert len(rows) == 1 and rows[0]["step"] == n_train // 2 and np.isfinite(rows[0]["val_mse"])
    assert build("tiny-siglip", checkpoint=run.student().path("checkpoints", "best.safetensors")) is not None


def test_one_process_accumulating_equals_two_processes(two_processes, prepared, tmp_path):
    """images_per_step = 2 on one process (two micro-steps per optimizer step) takes the optimizer
    steps of two processes at one image each: same images per step, same weights, same losses."""
    ddp_run, ddp = two_processes
    run = _copy(prepared, tmp_path / "run")
    one = train.run(run, processes=1, epochs=1, progress=False, images_per_step=2)
    assert one["world"] == 1 and one["step"] == ddp["step"] == one["train_images"] // 2
    a, b = _trainable(run, one["step"]), _trainable(ddp_run, ddp["step"])
    assert any(not torch.equal(v, build("tiny-siglip").state_dict()[k]) for k, v in a.items())  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    (r1,), (r2,) = (manifest.read_manifest(r.student(), "train").to_pylist() for r in (run, ddp_run))
    assert r1["step"] == r2["step"]
    assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-5)
    assert r1["val_mse"] == pytest.approx(r2["val_mse"], rel=1e-5)


def test_rank_shares_give_the_same_optimizer_steps_for_1_2_4_processes():
    order = split.epoch_order(list(range(1, 24)), seed=0, epoch=0)
    steps = {}
    for world in (1, 2, 4):
        shares = [split.rank_share(order, r, world, images_per_step=4) for r in range(world)]
        per_rank = 4 // world  # micro-steps of each rank in one optimizer step
        steps[world] = [sorted(i for s in shares for i in s[k * per_rank:(k + 1) * per_rank]) for k in range(5)]
        assert all(len(s) == 20 // world for s in shares)  # 23 images: 5 whole steps, 3 left out
    assert steps[1] == steps[2] == steps[4] == [sorted(order[4 * k:4 * k + 4]) for k in range(5)]


def test_process_count_must_divide_images_per_step(prepared):
    run = Run(str(prepared))
    with pytest.raises(TrainError, match=r"2 processes do not divide \[train\].images_per_step=1") as e:
        train.run(run, processes=2, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(TrainError, match="4 processes do not divide .*=2: use 1 or 2"):
        train.run(run, processes=4, progress=False, images_per_step=2)
    assert not run.student().exists("checkpoints")  # refused before any work


# ---- the reference's data: no held-out slice, the same sorted order every epoch --------------------
@pytest.fixture(scope="module")
def sorted_no_holdout(tmp_path_factory):
    """4 images, holdout_fraction = 0, order = "sorted": the reference's training set and order."""
    tmp = tmp_path_factory.mktemp("reference-data")
    tars = make_sa1b_source(tmp / "src", n_tars=1, per_tar=4, size=(128, 96), seed=2)
    run = Run(str(tmp / "run"))
    run.resolve_recipe(str(_recipe(tmp, holdout_fraction="0", order='"sorted"')))
    ingest.run(run, [str(t) for t in tars])
    augment.run(run)
    extract.run(run, workers=1, progress=False)
    return run, train.run(run, progress=False)


def test_holdout_fraction_zero_trains_every_image_and_keeps_the_last_epoch(sorted_no_holdout):
    from spar_pipeline.report import write_summary

    run, report = sorted_no_holdout
    ids = [r["image_id"] for r in manifest.read_manifest(run.teacher(), "extract").to_pylist() if r["status"] == "ok"]
    assert report["train_images"] == len(ids) == 4 and report["val_images"] == 0
    assert report["val_mse"] is report["baseline_val_mse"] is report["best_val_mse"] is None
    rows = sorted(manifest.read_manifest(run.student(), "train").to_pylist(), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert all(r["val_mse"] is None and r["baseline_val_mse"] is None and r["train_loss"] > 0 for r in rows)
    best = json.loads(run.student().read_bytes("checkpoints", "best.json"))
    assert (best["epoch"], best["step"]) == (rows[-1]["epoch"], rows[-1]["step"])
    sd = build("tiny-siglip", checkpoint=run.student().path("checkpoints", "best.safetensors")).state_dict()
    assert all(torch.equal(sd[k], v) for k, v in _trainable(run, rows[-1]["step"]).items())
    assert not all(torch.equal(sd[k], v) for k, v in _trainable(run, rows[0]["step"]).items())
    summary = write_summary(run, {})
    assert "No held-out slice (holdout_fraction = 0)" in summary and "last epoch's (epoch 1)" in summary
    assert "no held-out slice (holdout_fraction = 0): best = last epoch" in train.summary_line(report, "best")


def test_sorted_order_is_the_same_each_epoch_and_interleaved_across_ranks(sorted_no_holdout):
    ids = [5, 3, 9, 1, 7, 2]
    assert all(split.epoch_order(ids, 0, e, "sorted") == [1, 2, 3, 5, 7, 9] for e in range(3))
    assert split.epoch_order(ids, 0, 0) != split.epoch_order(ids, 0, 1)  # the default, "shuffle"
    order = split.epoch_order(ids, 0, 0, "sorted")
    assert (split.rank_share(order, 0, 2), split.rank_share(order, 1, 2)) == ([1, 3, 7], [2, 5, 9])
    with pytest.raises(TrainError, match="order='random'"):
        split.epoch_order(ids, 0, 0, "random")
    run, report = sorted_no_holdout  # the trainer follows the recipe's order: its last epoch went in id order
    ids = [r["image_id"] for r in manifest.read_manifest(run.teacher(), "extract").to_pylist() if r["status"] == "ok"]
    assert report["shares"][0] == sorted(ids)
