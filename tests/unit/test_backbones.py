"""Backbones: registry, dense paths (checked against the libraries' own forwards), freezing, weights."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a download, whatever runs these tests

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spar_pipeline.backbones import Backbone, build, list_backbones  # noqa: E402

TINY = ["tiny-siglip", "tiny-clip"]
REAL = {"siglip2-b16-512": (512, 768), "openclip-b16-maskclip": (224, 512), "dinov3txt-l16": (384, 1024)}
OPTIONS = ["all", "blk_0", "blk_-1", "mlp_-1", "qkv_-1", "posembed", "patchembed", "blk_-1,blk_-2"]
_BUILT: dict[str, Backbone] = {}
_WARNINGS: dict[str, list[str]] = {}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _get(name: str) -> Backbone:
    """One build per backbone per test session (the real ones take seconds); its warnings are kept."""
    if name not in _BUILT:
        handler, logger = _Collect(), logging.getLogger("spar_pipeline.backbones")
        logger.addHandler(handler)
        try:
            _BUILT[name] = build(name)
        finally:
            logger.removeHandler(handler)
        _WARNINGS[name] = handler.messages
    return _BUILT[name]


def _param(name: str):
    return pytest.param(name, marks=[] if name in TINY else [pytest.mark.slow])


ALL = [_param(n) for n in list_backbones()]


def test_registry():
    # mini-clip: tests/unit/test_mini_world.py; mini-clip-rope: tests/unit/test_rope.py
    assert set(list_backbones()) == set(TINY) | set(REAL) | {"mini-clip", "mini-clip-rope"}
    with pytest.raises(ValueError, match="available: .*tiny-siglip"):
        build("no-such-backbone")


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (128, 96), (16, 16), (224, 160)])
def test_tiny_dense_shapes(name, size):
    b = _get(name)
    assert (b.patch_size, b.window) == (16, 64) and len(b.mean) == len(b.std) == 3
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = b.dense(x)
        torch.testing.assert_close(b(x), out)
    assert out.shape == (2, size[0] // 16, size[1] // 16, b.dim) and torch.isfinite(out).all()


def test_non_multiple_sizes_follow_each_reference():
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert _get("tiny-siglip").dense(x).shape[1:3] == (5, 6)  # SigLIP2 zero-pads bottom/right
        assert _get("tiny-clip").dense(x).shape[1:3] == (4, 5)  # MaskCLIP's conv drops the leftover


def test_tiny_siglip_dense_is_timm_trunk_plus_pool_bypass():
    """At the native grid the pos-table resize is an identity: the trunk part must equal timm's own."""
    b = _get("tiny-siglip")
    trunk = b.model.visual.trunk
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = trunk.forward_features(x)  # timm: patch embed, pos, blocks, final norm
        pool = trunk.attn_pool
        v = F.linear(tokens, pool.kv.weight[b.dim:], pool.kv.bias[b.dim:])  # value half of kv
        v = pool.proj(v)
        want = (v + pool.mlp(pool.norm(v))).reshape(2, 4, 4, -1)
        torch.testing.assert_close(b.dense(x), want, atol=1e-5, rtol=1e-5)


def test_tiny_clip_dense_is_maskclip_on_open_clip_tokens():
    b = _get("tiny-clip")
    vis = b.model.visual
    last = vis.transformer.resblocks[-1]
    seen = {}
    hook = last.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.no_grad():
            vis(x)  # open_clip's own embeddings and first blocks
            t = seen["x"]
            W = t.shape[-1]
            t = t + last.attn.out_proj(F.linear(last.ln_1(t), last.attn.in_proj_weight[2 * W:],
                                                last.attn.in_proj_bias[2 * W:]))
            t = t + last.mlp(last.ln_2(t))
            want = (vis.ln_post(t) @ vis.proj)[:, 1:].reshape(2, 4, 4, -1)
            torch.testing.assert_close(b.dense(x), want, atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()


def _block0_dtype(b: Backbone, run) -> torch.dtype:
    seen: list[torch.dtype] = []
    hook = b.blocks()[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


def test_siglip_stream_stays_float32_under_fp16_autocast():
    """The reference adds the float32 position table to fp16 patch tokens: the stream is promoted to
    float32 through every block. Checked against timm's own forward (that order) at the native grid."""
    b = _get("tiny-siglip")
    trunk, pool = b.trunk, b.trunk.attn_pool
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731

    def reference(x):  # timm: patch embed, + float32 pos table, blocks, final norm; then the pool bypass
        v = pool.proj(F.linear(trunk.forward_features(x), pool.kv.weight[b.dim:], pool.kv.bias[b.dim:]))
        return (v + pool.mlp(pool.norm(v))).reshape(x.shape[0], x.shape[2] // 16, x.shape[3] // 16, -1)

    with torch.no_grad():
        for size in [(64, 64), (80, 112)]:  # native grid, and a resized table
            x = torch.randn(1, 3, *size)
            with fp16():
                assert _block0_dtype(b, lambda: b.dense(x)) == torch.float32, size
        x = torch.randn(2, 3, 64, 64)
        exact = b.dense(x).float()
        with fp16():
            ours, ref = b.dense(x).float(), reference(x).float()
            assert _block0_dtype(b, lambda: reference(x)) == torch.float32  # timm's order, for the record
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)  # the same order, so the same numbers
        assert (ours - exact).abs().max() <= (ref - exact).abs().max()


def test_maskclip_stream_dtype_under_fp16_autocast_is_open_clips():
    """open_clip casts its position table to the token dtype (fp16 under autocast); the dense head too."""
    b = _get("tiny-clip")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        ours = _block0_dtype(b, lambda: b.dense(x))
        theirs = _block0_dtype(b, lambda: b.model.visual(x))
        resized = _block0_dtype(b, lambda: b.dense(torch.randn(1, 3, 80, 112)))
    assert ours == theirs == resized == torch.float16


@pytest.mark.parametrize("name", TINY)
def test_normalize_is_the_reference_preprocessing(name):
    b = _get(name)
    digest = b.weights_digest
    mean, std = torch.tensor(b.mean).view(1, 3, 1, 1), torch.tensor(b.std).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 8, 12)
    torch.testing.assert_close(b.normalize(x), (x - mean) / std, atol=0, rtol=0)  # ToTensor → Normalize
    torch.testing.assert_close(b.normalize(x[0]), ((x - mean) / std)[0], atol=0, rtol=0)
    raw = torch.randint(0, 256, (1, 3, 8, 12)).float()  # the evaluation preprocessor: raw 0–255 values
    torch.testing.assert_close(b.normalize(raw, scale=255.0), (raw - 255.0 * mean) / (255.0 * std), atol=0, rtol=0)
    assert b.normalize(raw, scale=255.0).dtype == torch.float32 and b.weights_digest == digest  # no new state
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        b.normalize(torch.rand(2, 8, 12, 3))


def test_tiny_builds_are_deterministic_across_processes():
    digest = _get("tiny-siglip").weights_digest
    assert not any("RANDOM" in m for m in _WARNINGS["tiny-siglip"])  # random by design: no warning
    code = "from spar_pipeline.backbones import build; print(build('tiny-siglip').weights_digest)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip().splitlines()[-1] == digest
    assert build("tiny-clip").weights_digest == _get("tiny-clip").weights_digest
    assert len(_get("tiny-clip").weights_digest) == 16


@pytest.mark.parametrize("name", ALL)
def test_set_trainable_every_option(name):
    b = _get(name)
    try:
        for option in OPTIONS:
            if option == "posembed" and name in ("dinov3txt-l16", "mini-clip-rope"):
                with pytest.raises(ValueError, match=f"posembed.*{name}"):
                    b.set_trainable(option)  # RoPE: there is no position parameter to train
                continue
            n = b.set_trainable(option)
            trainable = {k for k, p in b.named_parameters() if p.requires_grad}
            assert n > 0 and n == sum(p.numel() for p in b.parameters() if p.requires_grad), option
            if option == "qkv_-1":
                assert trainable and all(any(s in k for s in ("qkv", "in_proj", "q_proj", "k_proj", "v_proj"))
                                         for k in trainable), trainable
            if option == "mlp_-1":
                assert all("mlp" in k for k in trainable)
            if option == "all":
                assert n == sum(p.numel() for p in b.parameters())
            if option == "blk_-1,blk_-2":  # the default: text tower, final norms and heads stay frozen
                assert n == sum(p.numel() for blk in b.blocks()[-2:] for p in blk.parameters())
        for bad, match in [("foo_1", "unknown"), ("blk_x", "integer"), ("blk_99", "blocks"), ("", "names nothing")]:
            with pytest.raises(ValueError, match=match):
                b.set_trainable(bad)
    finally:
        for p in b.parameters():
            p.requires_grad_(False)


def test_open_clip_options_really_unfreeze():
    """The reference silently unfreezes nothing for these on OpenCLIP; here they name real weights."""
    b = _get("tiny-clip")
    b.set_trainable("qkv_-1")
    assert b.blocks()[-1].attn.in_proj_weight.requires_grad
    b.set_trainable("patchembed")
    assert b.model.visual.conv1.weight.requires_grad
    b.set_trainable("posembed")
    assert b.model.visual.positional_embedding.requires_grad


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, suffix):
    b = build("tiny-siglip")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / f"student{suffix}"
    state = {k: v.contiguous() for k, v in b.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    again = build("tiny-siglip", checkpoint=str(path))
    assert again.weights_digest == b.weights_digest != _get("tiny-siglip").weights_digest
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(again.dense(x), b.dense(x))


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in _get("tiny-clip").state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="does not fit backbone tiny-siglip"):
        build("tiny-siglip", checkpoint=str(path))
    with pytest.raises(ValueError, match="not a file"):
        build("tiny-siglip", checkpoint=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("name", TINY)
def test_class_embeddings(name):
    b = _get(name)
    lines = ["background, sky, wall\n", "cat", "dog, puppy"]
    templates = ["a photo of a {}.", "a bad photo of the {}.", "a {} in a video game."]
    emb, index = b.class_embeddings(lines, templates)
    assert emb.shape == (6, b.dim) and emb.dtype == torch.float32
    assert index.tolist() == [0, 0, 0, 1, 2, 2]
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(6))
    with torch.no_grad():
        manual = F.normalize(b.encode_text([t.format("puppy") for t in templates]).float(), dim=-1).mean(0)
    torch.testing.assert_close(emb[5], F.normalize(manual, dim=0), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_siglip2_text_offline_is_one_clear_error():
    b = _get("siglip2-b16-512")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        b.encode_text(["a photo of a cat."])
    assert time.perf_counter() - t0 < 5  # no network wait
    msg = str(err.value)
    assert "\n" not in msg and "timm/ViT-B-16-SigLIP2-512" in msg and "cache" in msg


@pytest.mark.slow
def test_dinov3_text_without_package_says_what_to_install():
    pytest.importorskip("transformers")
    try:
        import dinov3  # noqa: F401
        pytest.skip("the official dinov3 package is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="pip install") as err:
        _get("dinov3txt-l16").encode_text(["a photo of a cat."])
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_architecture_random_weights_dense_512x768(name):
    window, dim = REAL[name]
    b = _get(name)
    random_lines = [m for m in _WARNINGS[name] if "RANDOM" in m]
    assert len(random_lines) == 1 and name in random_lines[0] and "\n" not in random_lines[0]
    assert (b.patch_size, b.window, b.dim) == (16, window, dim)
    with torch.no_grad():
        out = b.dense(torch.randn(1, 3, 512, 768))
    assert out.shape == (1, 32, 48, dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip", "mini-clip"])
def test_a_single_pass_split_anywhere_is_the_same_pass(name):
    """``finish(prefix(x, d))`` is ``dense(x)`` to the bit at every split; the frozen depth and the prefix's
    digest follow what the trainable spec leaves unchanged."""
    b = build(name).eval()
    x = torch.randn(2, 3, 70, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = b.dense(x)
        for d in range(b.split_limit() + 1):
            assert torch.equal(b(b.prefix(x, d)), want), d
    n = len(b.blocks())
    assert b.split_limit() == (n - 1 if name == "tiny-clip" else n)  # MaskCLIP's last block is its own
    b.set_trainable("blk_-1")
    assert b.frozen_depth() == min(n - 1, b.split_limit())
    b.set_trainable("blk_-1,patchembed")
    assert b.frozen_depth() == 0
    other = build(name).eval()
    other.set_trainable("blk_-1")
    digest = other.prefix_digest(n - 1)
    with torch.no_grad():
        other.blocks()[-1].parameters().__next__().add_(1.0)  # a trained last block: its prefix is the same
        assert other.prefix_digest(n - 1) == digest == b.prefix_digest(n - 1)
        other.blocks()[0].parameters().__next__().add_(1.0)
    assert other.prefix_digest(n - 1) != digest and other.prefix_digest(0) == b.prefix_digest(0)
