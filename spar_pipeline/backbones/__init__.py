"""Backbones: one registry of JSON specs (``configs/``), one ``build`` door.

``build(name, checkpoint=None)`` gives a :class:`Backbone` with SPAR's dense head. Weights
come from a local file (safetensors, or a torch file loaded with ``weights_only=True``), an
open_clip pretrained tag already in the local Hugging Face cache, or — with neither — a
seeded random initialisation, announced once. Nothing here downloads.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from spar_pipeline.backbones.base import Backbone, BackboneError, parse_trainable

__all__ = ["Backbone", "BackboneError", "build", "list_backbones", "get_spec", "parse_trainable"]

log = logging.getLogger(__name__)
_CONFIGS = Path(__file__).parent / "configs"


@functools.cache
def _registry() -> dict[str, dict[str, Any]]:
    specs = {}
    for path in sorted(_CONFIGS.glob("*.json")):
        if path.stem in specs:  # pragma: no cover - file names are unique
            raise BackboneError(f"backbone {path.stem!r} registered twice")
        specs[path.stem] = json.loads(path.read_text())
    return specs


def list_backbones() -> list[str]:
    return sorted(_registry())


def get_spec(name: str) -> dict[str, Any]:
    if name not in _registry():
        raise BackboneError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return copy.deepcopy(_registry()[name])


@functools.cache
def _register_open_clip_configs() -> None:
    import open_clip

    open_clip.add_model_config(_CONFIGS / "open_clip")


def _register_timm_trunk(name: str, kwargs: dict) -> None:
    """Tiny timm trunks are registered like timm's own, so open_clip builds them the same way."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if name in timm.list_models(name):
        return

    def entry(pretrained: bool = False, **overrides):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            overrides.pop(key, None)
        return VisionTransformer(**{**kwargs, **overrides})

    entry.__name__ = name
    entry.__module__ = __name__
    register_model(entry)


def _hub_file(repo: str, names: tuple[str, ...]) -> str | None:
    """A file of ``repo`` already in the local Hugging Face cache, or None (never a download)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for n in names:
        path = try_to_load_from_cache(repo, n)
        if isinstance(path, str) and os.path.exists(path):
            return path
    return None


def load_state(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file; never unpickles arbitrary objects."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: not a state dict")
    return state


def _load_into(b: Backbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of either a Backbone state dict (keys ``model.*``) or the wrapped model's own
    (an open_clip or transformers file); a DDP ``module.`` prefix is dropped."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = b.adapt_state(state)
    target = b
    if set(state) != set(b.state_dict()) and set(state) == set(b.model.state_dict()):
        target = b.model
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        want, got = set(target.state_dict()), set(state)
        missing, extra = sorted(want - got)[:3], sorted(got - want)[:3]
        detail = (f"missing {missing}, unexpected {extra}" if missing or extra
                  else str(e).splitlines()[-1].strip()[:200])
        raise BackboneError(f"checkpoint {source} does not fit backbone {b.name}: {detail}") from None


def _tokenizer(spec: dict, name: str):
    import open_clip

    if spec["open_clip_model"].startswith("spar-tiny"):
        from open_clip.tokenizer import SimpleTokenizer

        ctx = json.loads((_CONFIGS / "open_clip" / f"{spec['open_clip_model']}.json").read_text())["text_cfg"]
        return SimpleTokenizer(context_length=ctx["context_length"])
    hub = spec.get("pretrained", {}).get("hf_hub")
    if spec["family"] == "siglip":
        local = os.environ.get("SPAR_TOKENIZER_DIR")
        if not local and hub and _hub_file(hub, ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")) is None:
            return _MissingTokenizer(name, hub)
        return open_clip.get_tokenizer(spec["open_clip_model"] if not local else f"local-dir:{local}")
    return open_clip.get_tokenizer(spec["open_clip_model"])  # CLIP BPE ships with open_clip


class _MissingTokenizer:
    """Raises on use, so dense features still work without the tokenizer files."""

    def __init__(self, name: str, hub: str):
        self.name, self.hub = name, hub

    def __call__(self, prompts):
        raise RuntimeError(
            f"{self.name}: the text tokenizer ({self.hub}) is not in the local Hugging Face cache; "
            f"run `huggingface-cli download {self.hub}` once on a connected machine, or set SPAR_TOKENIZER_DIR"
        )


def build(name: str, checkpoint: str | None = None, device: str | torch.device = "cpu") -> Backbone:
    """The backbone ``name`` with weights from ``checkpoint`` (path or pretrained tag) when given."""
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.get("seed", 0))  # identical random weights in every process
        b = _construct(name, spec)
    _load_weights(b, spec, checkpoint)
    return b.to(device).eval()


def _construct(name: str, spec: dict) -> Backbone:
    family = spec["family"]
    if family in ("siglip", "maskclip"):
        import open_clip

        from spar_pipeline.backbones.openclip_family import MaskClipBackbone, SiglipBackbone

        _register_open_clip_configs()
        if "timm_trunk" in spec:
            oc = json.loads((_CONFIGS / "open_clip" / f"{spec['open_clip_model']}.json").read_text())
            _register_timm_trunk(oc["vision_cfg"]["timm_model_name"], spec["timm_trunk"])
        logging.getLogger().disabled, was = True, logging.getLogger().disabled  # open_clip warns on the root logger
        try:
            model = open_clip.create_model(spec["open_clip_model"], pretrained=None)
        finally:
            logging.getLogger().disabled = was
        cls = SiglipBackbone if family == "siglip" else MaskClipBackbone
        if family == "siglip":
            dim = model.visual.trunk.attn_pool.proj.out_features
            patch = model.visual.trunk.patch_embed.proj.kernel_size[0]
        else:
            dim = model.visual.proj.shape[1]
            patch = model.visual.conv1.kernel_size[0]
        b = cls(name, model, spec["window"], spec["mean"], spec["std"], patch, dim)
        if "rope" in spec:
            b.use_rope(**spec["rope"])
        b.tokenizer = _tokenizer(spec, name)
        return b
    if family == "dinov3":
        from spar_pipeline.backbones.dinov3 import Dinov3Backbone, build_dinov3_model

        model = build_dinov3_model(spec["dinov3"])
        b = Dinov3Backbone(name, model, spec["window"], spec["mean"], spec["std"], spec["dinov3"]["patch_size"],
                           spec["dinov3"]["hidden_size"])
        b.text_hub_entry = spec.get("text_hub_entry", "")
        return b
    raise ValueError(f"backbone {name}: unknown family {family!r}")  # pragma: no cover


def _load_weights(b: Backbone, spec: dict, checkpoint: str | None) -> None:
    if checkpoint and os.path.exists(checkpoint):
        _load_into(b, load_state(checkpoint), checkpoint)
        return
    shipped = spec.get("weights") and Path(__file__).parent.parent / "assets" / spec["weights"]
    if shipped and not checkpoint:  # weights that ship inside the package (mini-clip)
        if shipped.is_file():
            _load_into(b, load_state(str(shipped)), str(shipped))
        else:
            log.warning("%s: shipped weights %s missing: using RANDOM weights", b.name, shipped)
        return
    pretrained = spec.get("pretrained")
    if checkpoint and (not pretrained or checkpoint != pretrained.get("tag")):
        raise BackboneError(f"checkpoint {checkpoint!r} for {b.name}: not a file and not a known pretrained tag"
                         + (f" (known: {pretrained['tag']})" if pretrained else ""))
    path = pretrained and _hub_file(pretrained["hf_hub"], ("open_clip_model.safetensors", "model.safetensors",
                                                            "open_clip_pytorch_model.bin"))
    if path:
        _load_into(b, load_state(path), path)
        log.info("%s: pretrained weights from %s", b.name, path)
    elif pretrained:
        log.warning("%s: no weights given and %s is not in the local cache: using RANDOM weights", b.name,
                    pretrained["hf_hub"])
