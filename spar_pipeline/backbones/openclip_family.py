"""SigLIP2 (timm trunk, attention-pool bypass) and MaskCLIP (OpenCLIP) dense heads.

Both are open_clip models; only the dense path differs from open_clip's own forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from spar_pipeline.backbones.base import Backbone, Partial
from spar_pipeline.errors import BackboneError

__all__ = ["SiglipBackbone", "MaskClipBackbone", "RotaryBlock", "attention_pool_bypass"]


class _OpenClipText:
    """Text side shared by both: open_clip's tokenizer and encode_text."""

    tokenizer = None

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name}: no tokenizer available")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts)).to(device)
        return self.model.encode_text(tokens)

    def text_params(self) -> list[nn.Parameter]:
        vision = {id(p) for p in self.model.visual.parameters()}
        return [p for p in self.model.parameters() if id(p) not in vision]


class SiglipBackbone(_OpenClipText, Backbone):
    family = "siglip"
    qkv_keys = ("qkv",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rope: nn.Module | None = None  # axial rotary positions (``use_rope``), or the trunk's position table

    def use_rope(self, temperature: float) -> None:
        """Rotary positions in token units in every trunk self-attention, for a trunk built without a position
        table: an offset of d tokens is the same rotation at every image size, where a stretched table gives a
        window fewer rows of positions the larger the image (bench/NOTES.md, "rotary positions"). timm's own
        ``AttentionRope`` takes each block's weights unchanged (same names) and ``RotaryEmbeddingCat`` the grid."""
        from timm.layers import AttentionRope, RotaryEmbeddingCat

        t = self.trunk
        if t.pos_embed is not None:
            raise BackboneError(f"{self.name}: rotary positions need a trunk without a position table (pos_embed none)")
        for i, blk in enumerate(t.blocks):
            old = blk.attn
            rotary = AttentionRope(old.qkv.in_features, old.num_heads, qkv_bias=old.qkv.bias is not None,
                                   num_prefix_tokens=t.num_prefix_tokens, attn_drop=old.attn_drop.p,
                                   proj_drop=old.proj_drop.p)
            rotary.load_state_dict(old.state_dict())  # also checks that nothing (q/k norms, gates) is left out
            t.blocks[i] = RotaryBlock(blk, rotary)
        self.rope = RotaryEmbeddingCat(t.blocks[0].attn.head_dim, temperature=temperature, in_pixels=False)

    def rotation(self, gh: int, gw: int) -> torch.Tensor | None:
        """The rotary embedding of a gh × gw token grid (None without rotary positions)."""
        return None if self.rope is None else self.rope.get_embed([gh, gw])

    @staticmethod
    def run_block(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One trunk block, called as a module (forward hooks see it), with the rotation when there is one."""
        kwargs = {k: v for k, v in (("rope", rope), ("attn_mask", attn_mask)) if v is not None}
        return blk(x, **kwargs)

    @property
    def trunk(self) -> nn.Module:
        return self.model.visual.trunk

    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def posembed_params(self):
        return [p for n, p in self.model.visual.named_parameters() if "pos_embed" in n]

    def patchembed_params(self):
        return [p for n, p in self.model.visual.named_parameters() if "patch_embed" in n]

    def split_limit(self) -> int:
        return len(self.blocks())

    def embed_params(self):
        t = self.trunk
        table = [] if t.pos_embed is None else [t.pos_embed]
        return [*t.patch_embed.parameters(), *table, *t.norm_pre.parameters()]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.prefix(x, 0))

    def position_grid(self, gh: int, gw: int) -> torch.Tensor:
        """The position table stretched to a gh × gw token grid, [1, gh·gw, D], as the single pass adds it.
        It keeps the parameter's dtype, as timm and the reference add it: under fp16 autocast the float32
        table promotes the fp16 patch tokens, so the residual stream stays float32 in every block."""
        pos = self.trunk.pos_embed
        if pos is None:
            raise BackboneError(f"{self.name}: no position table (its positions are rotary)")
        n = int(math.isqrt(pos.shape[1]))
        grid = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False, antialias=False)
        return grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

    def prefix(self, x: torch.Tensor, depth: int) -> Partial:
        t = self.trunk
        B, _, H, W = x.shape
        P = self.patch_size
        gh, gw = math.ceil(H / P), math.ceil(W / P)
        if (gh * P, gw * P) != (H, W):  # dynamic padding: zeros bottom/right of the normalised image
            x = F.pad(x, (0, gw * P - W, 0, gh * P - H))
        # contiguous tokens: a transposed stream made every LayerNorm copy it first (bench/bench_profile.py)
        tokens = t.patch_embed.proj(x).flatten(2).transpose(1, 2).contiguous()
        tokens = t.patch_embed.norm(tokens)
        if t.pos_embed is not None:
            tokens = tokens + self.position_grid(gh, gw)
        tokens = t.norm_pre(t.patch_drop(t.pos_drop(tokens)))
        rope = self.rotation(gh, gw)
        for blk in t.blocks[:depth]:
            tokens = self.run_block(blk, tokens, rope)
        return Partial(tokens, depth, (B, gh, gw))

    def finish(self, p: Partial) -> torch.Tensor:
        return attention_pool_bypass(self.trunk.attn_pool, self.final_tokens(p)).reshape(*p.grid, -1)

    def final_tokens(self, p: Partial) -> torch.Tensor:
        """The trunk's normed last-block tokens [B, N, D] (what timm's ``forward_features`` returns)."""
        t = self.trunk
        tokens, rope = p.tokens, self.rotation(*p.grid[1:])
        for blk in t.blocks[p.depth:]:
            tokens = self.run_block(blk, tokens, rope)
        return t.norm(tokens)


class RotaryBlock(nn.Module):
    """A timm ``Block`` whose attention takes the rotation (timm's ``Block.forward`` has no argument for it):
    the block's own parts under their own names, so a state dict fits both."""

    def __init__(self, blk: nn.Module, attn: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = blk.norm1, attn, blk.ls1, blk.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = blk.norm2, blk.mlp, blk.ls2, blk.drop_path2
        if set(self.state_dict()) != set(blk.state_dict()):
            raise BackboneError(f"RotaryBlock: timm's Block has parts it does not run: {sorted(blk.state_dict())[:4]}")

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def attention_pool_bypass(pool: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """SigLIP2's dense head on final tokens [B, N, D]: the MAP head with each token receiving its own value
    (no latent query, no q/k); shared by ``SiglipBackbone.dense`` and mini-clip's pretraining."""
    B, N, D = tokens.shape
    v = pool.kv(tokens).reshape(B, N, 2, D)[:, :, 1]
    v = pool.proj_drop(pool.proj(v))
    return v + pool.mlp(pool.norm(v))


class MaskClipBackbone(_OpenClipText, Backbone):
    family = "maskclip"
    qkv_keys = ("in_proj",)  # nn.MultiheadAttention names its fused q/k/v weights in_proj_*

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def posembed_params(self):
        return [self.visual.positional_embedding]

    def patchembed_params(self):
        return list(self.visual.conv1.parameters())

    def split_limit(self) -> int:
        return len(self.blocks()) - 1  # the last block is MaskCLIP's own (value path only): never shared

    def embed_params(self):
        v = self.visual
        return [*v.conv1.parameters(), v.class_embedding, v.positional_embedding, *v.ln_pre.parameters()]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.prefix(x, 0))

    def prefix(self, x: torch.Tensor, depth: int) -> Partial:
        v = self.visual
        B = x.shape[0]
        x = v.conv1(x)  # leftover bottom/right pixels (< P) are dropped, as the reference does
        width, gh, gw = x.shape[1:]
        x = x.reshape(B, width, gh * gw).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(B, 1, width, dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1)
        pos = v.positional_embedding.to(x.dtype)
        if x.shape[1] != pos.shape[0]:
            n = int(math.isqrt(pos.shape[0] - 1))
            grid = pos[1:].reshape(1, n, n, width).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                                 align_corners=False, antialias=False)
            if grid.shape[-2:] != (gh, gw):
                raise RuntimeError(f"position grid {tuple(grid.shape[-2:])} != {(gh, gw)}")
            pos = torch.cat([pos[:1], grid.to(x.dtype).permute(0, 2, 3, 1).reshape(gh * gw, width)])
        x = v.ln_pre(v.patch_dropout(x + pos))
        for blk in self.blocks()[:depth]:
            x = blk(x)
        return Partial(x, depth, (B, gh, gw))

    def finish(self, p: Partial) -> torch.Tensor:
        v, x = self.visual, p.tokens
        blocks = self.blocks()
        for blk in blocks[p.depth:-1]:
            x = blk(x)
        last, width = blocks[-1], x.shape[-1]
        # MaskCLIP: value path only in the last block; both residuals and the MLP kept.
        y = last.ln_1(x)
        val = F.linear(y, last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
        x = x + last.attn.out_proj(val)
        x = x + last.mlp(last.ln_2(x))
        x = v.ln_post(x) @ v.proj
        return x[:, 1:].reshape(*p.grid, -1)
