"""DINOv3.txt ViT-L/16: transformers' DINOv3 ViT backbone; text from the official dinov3 package."""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from spar_pipeline.backbones.base import Backbone

__all__ = ["Dinov3Backbone", "build_dinov3_model"]


# official dinov3 key (regex) -> transformers DINOv3ViTModel key; None: not a parameter there
_OFFICIAL = [
    (r"cls_token", "embeddings.cls_token"),
    (r"mask_token", "embeddings.mask_token"),
    (r"storage_tokens", "embeddings.register_tokens"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"rope_embed\..*", None),
    (r"blocks\.(\d+)\.attn\.qkv\.bias_mask", None),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"model.layer.\1.attention.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"model.layer.\1.attention.o_proj.\2"),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"model.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    (r"blocks\.(\d+)\.(norm[12])\.(weight|bias)", r"model.layer.\1.\2.\3"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]


def _official_name(key: str) -> str | None:
    for pattern, repl in _OFFICIAL:
        if re.fullmatch(pattern, key):
            return None if repl is None else re.sub(pattern, repl, key)
    return key  # unknown: kept, so the strict load names it


def build_dinov3_model(cfg: dict) -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    return DINOv3ViTModel(DINOv3ViTConfig(**cfg))


class Dinov3Backbone(Backbone):
    family = "dinov3"
    qkv_keys = ("q_proj", "k_proj", "v_proj")
    text_hub_entry = ""

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layer

    def patchembed_params(self):
        return list(self.model.embeddings.patch_embeddings.parameters())

    def adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official facebookresearch/dinov3 backbone file (``dinov3_vitl16_pretrain_lvd1689m-*.pth``,
        the protocol's ``backbone_weights``) renamed to transformers' DINOv3 ViT: fused qkv split, the
        masked (always zero) key bias dropped, RoPE periods left to the module (a buffer it computes)."""
        if not any(k.startswith("blocks.") and k.endswith("attn.qkv.weight") for k in state):
            return state
        if all(k.startswith("backbone.") for k in state if k.startswith(("backbone.", "blocks."))):
            state = {k.removeprefix("backbone."): v for k, v in state.items()}
        want = self.model.state_dict()
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            name = _official_name(key)
            if name is None:
                continue
            if name.endswith("attention.qkv.weight") or name.endswith("attention.qkv.bias"):
                stem, kind = name.rsplit(".qkv.", 1)
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    if f"{stem}.{part}.{kind}" in want:  # no k_proj.bias: DINOv3 masks the key bias to zero
                        out[f"{stem}.{part}.{kind}"] = chunk
                continue
            if name in want:
                value = value.reshape(want[name].shape)  # mask_token is [1, D] upstream, [1, 1, D] here
            out[name] = value
        return {f"model.{k}": v for k, v in out.items()}

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        P = self.patch_size
        gh, gw = math.ceil(H / P), math.ceil(W / P)
        if (gh * P, gw * P) != (H, W):  # stretched, as the reference does
            x = F.interpolate(x, size=(gh * P, gw * P), mode="bicubic", align_corners=False)
        out = self.model(pixel_values=x).last_hidden_state  # after the backbone's final norm
        skip = 1 + self.model.config.num_register_tokens  # CLS and register tokens
        return out[:, skip:].reshape(B, gh, gw, -1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """dino.txt text tower (official ``dinov3`` package), dims 1024–2047: the patch-aligned half.
        Weights come from SPAR_DINOTXT_WEIGHTS / SPAR_DINOV3_BACKBONE_WEIGHTS when set (local files)."""
        try:
            from dinov3.hub.dinotxt import dinov3_vitl16_dinotxt_tet1280d20h24l
        except ImportError:
            raise RuntimeError(
                f"{self.name}: text features need the dino.txt text tower: "
                "pip install git+https://github.com/facebookresearch/dinov3 (dense features work without it)"
            ) from None
        if getattr(self, "_text", None) is None:
            kwargs = {k: os.environ[e] for k, e in (("weights", "SPAR_DINOTXT_WEIGHTS"),
                                                     ("backbone_weights", "SPAR_DINOV3_BACKBONE_WEIGHTS"))
                      if os.environ.get(e)}
            model, tokenizer = dinov3_vitl16_dinotxt_tet1280d20h24l(**kwargs)
            object.__setattr__(self, "_text", (model.eval(), tokenizer))  # not a submodule: not in state_dict
        model, tokenizer = self._text
        device = next(self.parameters()).device
        model.to(device)
        tokens = tokenizer.tokenize(list(prompts)).to(device)
        return model.encode_text(tokens)[:, 1024:]
