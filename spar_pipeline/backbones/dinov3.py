"""DINOv3.txt ViT-L/16: transformers' DINOv3 ViT backbone; text from the official dinov3 package."""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from spar_pipeline.backbones.base import Backbone

__all__ = ["Dinov3Backbone", "build_dinov3_model"]


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
