"""DINOv3: the official facebookresearch/dinov3 backbone file loads into the transformers model.

The official layout (tests/_dinov3_layout.py) is written from the upstream module names, independently of
the loader's mapping table, and must give the same features.
"""

from __future__ import annotations

import torch

from spar_pipeline.backbones import _load_into, load_state

from _dinov3_layout import official_state, tiny_dinov3  # tests/ is on sys.path (tests/conftest.py)


def test_official_checkpoint_loads_and_gives_the_same_features(tmp_path):
    source, target = tiny_dinov3(0), tiny_dinov3(1)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want, before = source.dense(x), target.dense(x)
    assert not torch.allclose(want, before, atol=1e-3)
    path = tmp_path / "dinov3_vitl16_pretrain_lvd1689m-tiny.pth"
    torch.save(official_state(source), path)  # a plain tensor dict, as upstream ships (loaded weights_only)
    _load_into(target, load_state(str(path)), str(path))
    with torch.no_grad():
        torch.testing.assert_close(target.dense(x), want, atol=1e-5, rtol=1e-5)
