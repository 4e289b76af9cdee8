"""The official facebookresearch/dinov3 checkpoint layout, written here from the upstream module names (fused
``attn.qkv`` with a ``bias_mask``, ``ls1.gamma``, ``mlp.fc1``, ``storage_tokens``, ``[1, D]`` mask token, RoPE
``periods``) independently of the loader's mapping table and the exporter: shared by the backbone and export tests."""

from __future__ import annotations

import torch

from spar_pipeline.backbones.dinov3 import Dinov3Backbone, build_dinov3_model

CFG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_register_tokens": 4, "patch_size": 16, "layerscale_value": 1e-5, "key_bias": False,
       "rope_theta": 100.0, "pos_embed_rescale": 2.0, "layer_norm_eps": 1e-5}


def tiny_dinov3(seed: int) -> Dinov3Backbone:
    """A two-layer DINOv3 backbone with every weight drawn from ``seed``."""
    torch.manual_seed(seed)
    model = build_dinov3_model(CFG)
    for p in model.parameters():  # layer scales start at 1e-5: make every weight matter
        torch.nn.init.normal_(p, std=0.2)
    return Dinov3Backbone("tiny-dinov3", model, 64, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 16, 64).eval()


def official_state(b: Dinov3Backbone) -> dict[str, torch.Tensor]:
    """``b``'s weights under the official facebookresearch/dinov3 names, written from upstream, not the loader."""
    m, D = b.model, CFG["hidden_size"]
    out = {"cls_token": m.embeddings.cls_token.detach().clone(),
           "mask_token": m.embeddings.mask_token.detach().reshape(1, D).clone(),
           "storage_tokens": m.embeddings.register_tokens.detach().clone(),
           "patch_embed.proj.weight": m.embeddings.patch_embeddings.weight.detach().clone(),
           "patch_embed.proj.bias": m.embeddings.patch_embeddings.bias.detach().clone(),
           "rope_embed.periods": torch.arange(1, 5, dtype=torch.float32),
           "norm.weight": m.norm.weight.detach().clone(), "norm.bias": m.norm.bias.detach().clone()}
    for i, layer in enumerate(m.model.layer):
        a = layer.attention
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
        # upstream keeps a key bias that bias_mask zeroes; any value must be harmless
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([a.q_proj.bias, torch.randn(D), a.v_proj.bias]).detach()
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
        out[f"blocks.{i}.attn.proj.weight"] = a.o_proj.weight.detach().clone()
        out[f"blocks.{i}.attn.proj.bias"] = a.o_proj.bias.detach().clone()
        for n in (1, 2):
            out[f"blocks.{i}.ls{n}.gamma"] = getattr(layer, f"layer_scale{n}").lambda1.detach().clone()
            norm = getattr(layer, f"norm{n}")
            out[f"blocks.{i}.norm{n}.weight"], out[f"blocks.{i}.norm{n}.bias"] = norm.weight.detach(), norm.bias.detach()
        out[f"blocks.{i}.mlp.fc1.weight"] = layer.mlp.up_proj.weight.detach().clone()
        out[f"blocks.{i}.mlp.fc1.bias"] = layer.mlp.up_proj.bias.detach().clone()
        out[f"blocks.{i}.mlp.fc2.weight"] = layer.mlp.down_proj.weight.detach().clone()
        out[f"blocks.{i}.mlp.fc2.bias"] = layer.mlp.down_proj.bias.detach().clone()
    return out
