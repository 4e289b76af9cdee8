"""mini-clip-rope: the miniature world's model with rotary positions in token units instead of a table."""

import pytest
import torch

from spar_pipeline.backbones import BackboneError, build


@pytest.fixture(scope="module")
def rope():
    return build("mini-clip-rope", checkpoint=None)


def test_rotary_attention_depends_on_offsets_only(rope):
    """A block over a 4×4 grid of tokens gives the same output as over those tokens placed anywhere in a
    larger grid with attention kept among them: positions enter as offsets, in tokens, at any image size."""
    import copy

    blk, D = copy.deepcopy(rope.trunk.blocks[0]), rope.dim
    with torch.no_grad():
        blk.attn.qkv.weight.mul_(8.0)  # peaked attention (random init is near uniform), so positions show
    small = torch.randn(1, 16, D)
    alone = rope.run_block(blk, small, rope.rotation(4, 4))
    for top, left in ((0, 0), (3, 5), (6, 2)):
        big = torch.randn(1, 10 * 9, D)
        idx = torch.tensor([(top + i) * 9 + left + j for i in range(4) for j in range(4)])
        big[0, idx] = small[0]
        mask = torch.zeros(90, 90, dtype=torch.bool)
        mask[idx[:, None], idx[None]] = True
        mask |= torch.eye(90, dtype=torch.bool)  # every other token attends to itself (no empty rows)
        placed = rope.run_block(blk, big, rope.rotation(10, 9), attn_mask=mask)[0, idx]
        torch.testing.assert_close(placed, alone[0], atol=1e-5, rtol=1e-5)
    # and the rotation is there: without it the block gives another output
    assert (rope.run_block(blk, small) - alone).abs().max() > 0.05


def test_rotary_model_has_no_table_and_splits_like_the_table_model(rope):
    assert rope.trunk.pos_embed is None and rope.posembed_params() == []
    assert not any("pos_embed" in k for k in rope.state_dict())
    with pytest.raises(ValueError, match="no position table"):
        rope.position_grid(4, 4)
    x = torch.randn(2, 3, 64, 104)  # not a multiple of the patch: padded as the table model is
    with torch.no_grad():
        whole = rope.dense(x)
        assert whole.shape == (2, 8, 13, rope.dim)
        for depth in (1, 4, rope.split_limit()):
            torch.testing.assert_close(rope.finish(rope.prefix(x, depth)), whole)


def test_table_weights_do_not_load_into_the_rotary_model(tmp_path):
    from safetensors.torch import save_file

    table = build("mini-clip")
    path = tmp_path / "table.safetensors"
    save_file({k: v.contiguous() for k, v in table.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match=r"does not fit backbone mini-clip-rope: .*unexpected.*pos_embed"):
        build("mini-clip-rope", checkpoint=str(path))


def test_rotary_pretraining_is_a_pure_function_of_its_seed_and_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from spar_pipeline.mini import pretrain

    for name in "ab":
        rep = pretrain.main(tmp_path / f"{name}.safetensors", seed=3, steps=2, pool=300, batch=8,
                            backbone="mini-clip-rope")
        assert rep["steps"] == 2 and not rep["capped"]
    wa, wb = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["backbone"] == "mini-clip-rope"
    b = build("mini-clip-rope", checkpoint=str(tmp_path / "a.safetensors"))
    pretrain.main(tmp_path / "init.safetensors", seed=3, steps=0, pool=300, batch=8, backbone="mini-clip-rope")
    init = load_file(str(tmp_path / "init.safetensors"))
    assert any(not torch.equal(wa[k], init[k]) for k in wa if ".attn.qkv." in k)  # trained through the rotation
    with torch.no_grad():
        assert b.dense(torch.randn(1, 3, 128, 96)).shape == (1, 16, 12, b.dim)


def test_the_rotary_recipe_is_the_miniature_worlds(tmp_path):
    """`run --recipe mini-rope` with nothing to read makes the mini world's scene tars and benchmark, as `mini`
    does (not the tiny recipes' generic images)."""
    from spar_pipeline.mini import demo
    from spar_pipeline.run import Run

    for name, mini in (("mini-rope", True), ("mini", True), ("tiny-cpu", False)):
        run = Run(str(tmp_path / name))
        run.resolve_recipe(name)
        assert demo.generates_source(run) and demo.is_mini(run) is mini, name
    run = Run(str(tmp_path / "mini-rope"))
    assert run.recipe.recipe.backbone == "mini-clip-rope" and tuple(run.recipe.augment.scale) == (512, 384)
