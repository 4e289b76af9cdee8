"""Smoke test of the bench/ suite on tiny sizes: the cheap measures run, their figures are sane
and the JSON holds the keys the README quotes. Never asserts on time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import __main__ as bench_main
from bench import bench_extract, bench_flops, bench_memory, bench_store, common


@pytest.fixture(autouse=True)
def _keep_log_levels():
    """The benches quiet the package's loggers for their own output; tests after them need them back."""
    import logging

    names = ("spar_pipeline", "distributed")
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Results go to a temporary folder, never over the committed bench/results."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def test_every_measure_has_a_bench():
    assert {"extract", "flops", "store", "train", "inference", "memory", "projection", "levers", "read", "gap"} <= set(
        bench_main.available())


def test_flop_count_grows_with_tokens_and_attention():
    one, four = common.forward_flops("tiny-siglip", 64, 64), common.forward_flops("tiny-siglip", 128, 128)
    assert one > 0
    assert four > 4 * one  # 4× the tokens: 4× the per-token FLOPs plus 16× the attention FLOPs


def test_extraction_flops_figures():
    r = bench_flops._extraction("tiny-siglip", (128, 128), 24, 32, 1, False)
    assert r["windows"] == 16  # starts 0, 24, 48, 64 per axis for K = 64
    assert r["flops_per_window"] == common.forward_flops("tiny-siglip", 64, 64)
    assert r["seconds"] > 0 and r["achieved_flops"] > 0


def test_store_bench_json(results, monkeypatch):
    monkeypatch.setattr(bench_store, "VARIANTS", [("zstd-3", "zstd", 3, "float16"), ("int8", "none", 0, "int8"),
                                                  ("f32", "none", 0, "float32")])
    out = bench_store.main(quick=True)
    saved = json.loads((results / "store.json").read_text())
    assert saved["store"]["zstd-3"]["bytes_per_map"] == out["store"]["zstd-3"]["bytes_per_map"]
    row = saved["store"]["zstd-3"]
    assert 0 < row["bytes_vs_raw"] < 1.0  # lossless zstd shrinks the smooth synthetic maps
    assert row["read_mb_s"] > 0 and row["write_mb_s"] > 0 and saved["plain"]["read_mb_s"] > 0
    assert 0.5 < saved["store"]["int8"]["bytes_vs_raw"] < 0.55  # int8 values + float32 scales + metadata
    assert 1.99 < saved["store"]["f32"]["bytes_vs_raw"] < 2.01  # twice float16's bytes, metadata aside
    err = saved["float16_vs_float32"]  # float16 against float32 on mini-clip's real teacher maps
    assert err["images"] == 2 and 0 < err["relative_mse"] < 1e-6 and err["cosine_min"] > 0.99999
    assert 0 < err["mse_vs_single_pass_mse"] < 1e-4  # far below the error the student trains on


def test_inference_bench_uses_the_papers_timing():
    """bench inference's rows come from spar_pipeline.timing: forward seconds at the paper's image
    size (here a small one), sliding windows counted as the stitching counts them, projection flagged."""
    from bench import bench_inference
    from spar_pipeline.windows import count_windows

    b = common.backbone("tiny-siglip")
    r = bench_inference.measure(b, "tiny-siglip", size=(128, 192), strides=[24, 64], warmup=0, max_batches=1)
    assert r["image"] == [128, 192] and r["window_batch"] == 60 and r["single"]["forward_seconds"] > 0
    s24, s64 = r["s24"], r["s64"]
    assert s24["windows"] == count_windows(128, 192, 64, 24) == 28 and s24["batches"] == 1 and not s24["projected"]
    assert s64["windows"] == 6 and s24["flop_ratio"] > s64["flop_ratio"] > 0
    assert s24["flops"] == 28 * common.forward_flops("tiny-siglip", 64, 64)


def test_extract_steady_state_in_process():
    r = bench_extract._tiny_steady(per_tar=3)
    assert r["images"] == 2 and r["windows"] > 0  # 6 images, 4 used to warm up
    assert 0 < r["efficiency"] <= 1.0


def test_memory_measure_sees_an_allocation():
    r = bench_memory.measure("x = bytearray(300 * 2**20)", ["-"])
    assert r["maxrss_mb"] >= 300
    assert r["tree_peak_mb"] > 0


def test_quant_store_errors_on_an_existing_store(tmp_path):
    """The int8 error check a user runs on a real teacher's float16 store before switching."""
    from bench import bench_quant
    from spar_pipeline.store import FeatureStore, StoreError

    url = str(tmp_path / "f.zarr")
    st = FeatureStore.create(url, {"digest": "d"})
    rng = np.random.default_rng(0)
    for i in (3, 11, 7):
        st.write(i, (rng.standard_normal((4, 5, 32)) * rng.uniform(0.1, 3, 32)).astype(np.float16))
    assert st.ids() == [3, 7, 11]
    out = bench_quant.store_errors(url, limit=2)
    assert out["maps"] == 2
    e = out["errors"]
    assert 0 < e["int8_per_channel_stored"]["rel_mse"] < 1e-3
    assert e["fp8_e4m3_per_channel"]["rel_mse"] > e["int8_per_channel_stored"]["rel_mse"]  # 3 mantissa bits
    FeatureStore.create(str(tmp_path / "empty.zarr"), {"digest": "d"})
    with pytest.raises(StoreError, match="no maps"):
        bench_quant.store_errors(str(tmp_path / "empty.zarr"))


def test_gap_bench_windows_at_token_level():
    """bench gap's per-block measure: one window covering the image is the single pass itself (no
    error); on a larger image the single pass parts from the windows, and every block is measured."""
    import torch

    from bench import bench_gap

    b = common.backbone("tiny-siglip")
    x = torch.randn(1, 3, 64, 64)
    one = bench_gap.divergence(bench_gap.block_tokens(b, x), bench_gap.windowed_block_tokens(b, x))
    assert len(one) == len(b.trunk.blocks) and all(err < 1e-6 * var and var > 0 for err, var in one)
    win = bench_gap.windowed_block_tokens(b, x)
    for after in range(1, len(b.trunk.blocks) + 1):  # one window: the windows' tokens are the single pass's
        torch.testing.assert_close(bench_gap.windows_then_one_pass(b, win, after), b.dense(x)[0].float(),
                                   atol=1e-4, rtol=1e-4)
    x = torch.randn(1, 3, 96, 160)
    win = bench_gap.windowed_block_tokens(b, x, stride_patches=1)
    assert [w.shape[:2] for w in win] == [(6, 10)] * len(b.trunk.blocks)
    big = bench_gap.divergence(bench_gap.block_tokens(b, x), win)
    assert all(err > 1e-4 * var for err, var in big[1:])  # attention over 60 tokens, not 16: the blocks differ


def test_gap_bench_local_attention():
    """bench gap's locality measure: a reach covering the whole image with the table stretched is the
    single pass itself; a reach of one token is not; at the native size the tiled table is the table."""
    import torch

    from bench import bench_gap

    b = common.backbone("tiny-siglip")
    x = torch.randn(1, 3, 96, 160)
    whole = bench_gap.local_dense(b, x, radius=100)
    torch.testing.assert_close(whole, b.dense(x)[0].float(), atol=1e-4, rtol=1e-4)
    assert (bench_gap.local_dense(b, x, radius=1) - whole).abs().max() > 1e-3
    assert (bench_gap.local_dense(b, x, radius=100, tile=True) - whole).abs().max() > 1e-3  # other positions
    native = torch.randn(1, 3, b.window, b.window)
    torch.testing.assert_close(bench_gap.local_dense(b, native, radius=100, tile=True), b.dense(native)[0].float(),
                               atol=1e-4, rtol=1e-4)


def test_gap_bench_teacher_readouts():
    """bench gap's four readouts of the teacher's windows: the token-grid map of raw features is the stored
    map (``windows.sliding_features``), the pixel-level one of unit features is ``evaluate``'s sliding
    teacher (``segment.sliding_logits``); the other two differ from both."""
    import torch
    import torch.nn.functional as F

    from bench import bench_gap
    from spar_pipeline.segment import sliding_logits
    from spar_pipeline.windows import sliding_features

    b = common.backbone("tiny-siglip")
    x, stride = torch.randn(1, 3, 96, 160), 24  # r = 2 at patch 16, as the paper's
    emb = F.normalize(torch.randn(5, b.dim), dim=-1)
    out, stored_map = bench_gap.stitch_readouts(b, x, emb, stride, batch=7)
    torch.testing.assert_close(stored_map, sliding_features(b, x, b.window, stride), atol=1e-5, rtol=1e-5)
    stored = torch.einsum("hwd,qd->qhw", F.normalize(stored_map, dim=-1), emb)
    torch.testing.assert_close(out[bench_gap.STORED], stored, atol=1e-5, rtol=1e-5)
    sliding = sliding_logits(b, x, emb, (96, 160), stride)
    torch.testing.assert_close(out[bench_gap.SLIDING], sliding, atol=1e-5, rtol=1e-5)
    assert out["token grid, unit"].shape == stored.shape and out["pixel level, raw"].shape == sliding.shape
    assert (out["token grid, unit"] - stored).abs().max() > 1e-4
    assert (out["pixel level, raw"] - sliding).abs().max() > 1e-4


def test_gap_bench_without_a_run_says_so(tmp_path, monkeypatch, results):
    from bench import bench_gap

    monkeypatch.setenv("SPAR_GAP_RUN", str(tmp_path / "none"))
    assert "no student 'default'" in bench_gap.main(quick=True)["skipped"]


def test_gap_bench_trains_copies_of_the_two_blocks(tmp_path):
    """bench gap's trained tails: copies of the last two blocks trained on a real extracted run's store,
    one held-out MSE per epoch for each input, the pretrained model's own blocks left as they were."""
    import torch

    from bench import bench_gap
    from spar_pipeline import extract
    from spar_pipeline.backbones import build

    from _extracted import prepare  # tests/ is on sys.path (tests/conftest.py)

    run = prepare(str(tmp_path / "run"), tmp_path / "src", n_tars=1, per_tar=6)
    extract.run(run, workers=1, progress=False)
    out = bench_gap.trained_tail(str(tmp_path / "run"), epochs=2)
    pre = build("tiny-siglip")
    assert out["after_block"] == len(pre.trunk.blocks) - 2 and out["held_out_images"] >= 1
    assert out["train_images"] + out["held_out_images"] == 6
    for name in ("windows", "single"):
        curve = out[name]["held_out_mse"]
        assert len(curve) == 2 and all(v > 0 for v in curve)
        trained = out[name]["tail"].state_dict()
        before = pre.trunk.blocks[out["after_block"]:].state_dict()
        assert any(not torch.equal(trained[k], before[k]) for k in before)  # a trained copy, not the original
