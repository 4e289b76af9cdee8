"""Pretrain ``mini-clip`` on generated scene–caption pairs, on CPU, from a seed.

Why: the miniature world needs a vision-language model whose weights ship in the package, so
the demo reproduces the paper's Table 1 and Fig. 3 with no download. The model is built through
the same open_clip path as every other backbone (``backbones.build``'s constructor, random init from
the spec's seed), trained at its native 64×64 window (8×8 patches of 8 px) on ``scenes.make_scene``
images whose objects range from two patches across to larger than the window (``ZOOM``), and saved
as a half-precision safetensors state dict of the Backbone.

The loss is CLIP's symmetric InfoNCE on the scene's caption ("a striped red circle and a blue square
on grass"; half of them wrapped in one of the 80 ImageNet templates, so the text tower has seen the
prompts ``evaluate`` averages), with one hard negative per image on the text side (the caption with
one object's shape swapped, which colour alone cannot tell apart), plus a dense alignment term as
SigLIP 2 and TIPS add to CLIP's: every patch token of the attention-pool bypass (the features the
pipeline reads) against the 24 phrases a patch can show (four background words, twenty
"colour shape" classes). A fixed number of steps makes the weights a pure function of the seed;
``minutes`` only caps the wall time (a capped run says so and is not the reference).

Reproduce the shipped weights (README, "The miniature world", gives the measured time)::

    nice -n 10 spar-pipeline pretrain-mini --out spar_pipeline/assets/mini-clip.safetensors --seed 0
    nice -n 10 spar-pipeline pretrain-mini --backbone mini-clip-rope --seed 0 \
        --out spar_pipeline/assets/mini-clip-rope.safetensors
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["main", "DEFAULT_STEPS", "BATCH", "POOL", "MINUTES", "SHIPPED_STEPS"]

log = logging.getLogger(__name__)

DEFAULT_STEPS = 8000  # the shipped mini-clip weights' step count
# Each model pretrain-mini trains (the same one with a position table, or with rotary positions) and its shipped
# weights' steps: a rotary step was timed at ~1.1× a table step, so 8000 looked past the 90 minutes (bench/NOTES.md).
SHIPPED_STEPS = {"mini-clip": DEFAULT_STEPS, "mini-clip-rope": 7000}
BATCH = 128  # the shipped weights' pairs a step (256 for half the steps was worse: bench/NOTES.md)
POOL = 100000  # distinct training scenes, generated once and flipped at random
# The default wall-time cap: well above the reference run's measured time (README), so the documented
# command is not cut short on a slower machine; a smaller cap is for trials, and a capped run says so.
MINUTES = 180.0
LR, WD, WARMUP = 1e-3, 0.05, 100
# Object sizes of a training scene, native window pixels: [lo, 2·lo) with lo log-uniform in ZOOM, so the
# model sees objects from 2 patches across to larger than its window (crops), at every scale the
# benchmark's scales 1–4 show it through a sliding window.
ZOOM = (12, 48)
DENSE_WEIGHT, DENSE_SCALE = 1.0, 50.0  # the patch-phrase term's weight; its logit scale (the scenes benchmark's)


def _captions(seed: int, base: list[tuple[str, str]], templates: list[str]) -> tuple[list[str], list[str]]:
    """Half the captions (and their hard negatives, the same way) wrapped in an ImageNet template."""
    rng = np.random.default_rng([seed, 99])
    pos, neg = [], []
    for cap, bad in base:
        if rng.random() < 0.5:
            t = templates[int(rng.integers(len(templates)))]
            cap, bad = (t.format(c[2:] if c.startswith("a ") else c) for c in (cap, bad))
        pos.append(cap)
        neg.append(bad)
    return pos, neg


def _negative(scene, rng: np.random.Generator) -> str:
    """The scene's caption with one named object's shape swapped for another: a hard negative that
    only a model which sees shape (not only colour) can tell from the caption."""
    from spar_pipeline.mini.scenes import SHAPES

    named = [o for o in scene.objects if f"{o.colour} {o.shape}" in scene.caption]
    if not named:
        return scene.caption
    o = named[int(rng.integers(len(named)))]
    other = [s for s in SHAPES if s != o.shape][int(rng.integers(len(SHAPES) - 1))]
    return scene.caption.replace(f"{o.colour} {o.shape}", f"{o.colour} {other}", 1)


def _pool(seed: int, n: int, size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """``n`` scenes: images [n, size, size, 3], the phrase under each patch's centre [n, g, g] (an index
    into ``_phrases()``: the scene's background word or its object's "colour shape") and the captions
    with their hard negatives."""
    from spar_pipeline.mini.scenes import BACKGROUNDS, make_scene

    images = np.empty((n, size, size, 3), np.uint8)
    under = np.empty((n, size // patch, size // patch), np.int64)
    centre = slice(patch // 2, size, patch)
    caps = []
    rng = np.random.default_rng([seed, 98])
    for i in range(n):
        lo = int(round(ZOOM[0] * (ZOOM[1] / ZOOM[0]) ** rng.random()))
        crowd = (1, 4) if lo < 20 else (1, 3) if lo < 32 else (1, 2)
        sc = make_scene(seed, i, (size, size), n_objects=crowd, object_size=(lo, 2 * lo))
        images[i] = sc.image
        lab = sc.label[centre, centre].astype(np.int64)
        under[i] = np.where(lab == 0, BACKGROUNDS.index(sc.background), len(BACKGROUNDS) - 1 + lab)
        caps.append((sc.caption, _negative(sc, rng)))
    return torch.from_numpy(images), torch.from_numpy(under), caps


def _phrases() -> list[str]:
    """What a patch can show: the four background words, then the 20 "colour shape" classes."""
    from spar_pipeline.mini.scenes import BACKGROUNDS, CLASS_LINES

    return list(BACKGROUNDS) + CLASS_LINES[1:]


def _image_and_dense(b, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One trunk pass: the pooled image embedding (open_clip's encode_image) and the dense tokens the
    pipeline reads (the attention-pool bypass of ``SiglipBackbone.dense``), [B, N, D]. A rotary trunk runs
    the backbone's own blocks (timm's ``forward_features`` would not rotate)."""
    from spar_pipeline.backbones.openclip_family import attention_pool_bypass

    t = b.trunk
    tokens = t.forward_features(x) if b.rope is None else b.final_tokens(b.prefix(x, 0))
    return t.forward_head(tokens), attention_pool_bypass(t.attn_pool, tokens)


def _lr(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))


def main(out: str | Path = "mini-clip.safetensors", seed: int = 0, minutes: float = MINUTES,
         steps: int = DEFAULT_STEPS, threads: int = 2, pool: int = POOL, batch: int = BATCH,
         backbone: str = "mini-clip") -> dict:
    """Train mini-clip (or ``backbone``, another spec of its kind: mini-clip-rope) for ``steps`` steps of
    ``batch`` pairs drawn from ``pool`` generated scenes (stopping early past ``minutes``) and write the weights
    to ``out``. Returns a small report (steps, loss, seconds, capped)."""
    from safetensors.torch import save_file

    from spar_pipeline.backbones import _construct, get_spec
    from spar_pipeline.datasets import templates

    torch.set_num_threads(threads)
    spec = get_spec(backbone)
    torch.manual_seed(seed)
    b = _construct(backbone, spec)  # same open_clip path as build(), random init
    model, K = b.model.train(), b.window
    t0 = time.perf_counter()
    images, under, base = _pool(seed, pool, K, b.patch_size)
    tpl = templates()
    caps, negs = _captions(seed, base, tpl)
    phrase_tokens = [b.tokenizer([t.format(p) for p in _phrases()]) for t in tpl]  # the dense term's, per template
    tokens, neg_tokens = b.tokenizer(caps), b.tokenizer(negs)
    log.info("pretrain-mini: %d scenes generated in %.0f s", pool, time.perf_counter() - t0)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token_embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token_embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}], lr=LR)
    g = torch.Generator().manual_seed(seed)
    deadline = t0 + minutes * 60
    loss_avg, step = float("nan"), 0
    for step in range(steps):
        if time.perf_counter() > deadline:
            log.warning("pretrain-mini: stopped by the %.0f-minute cap at step %d of %d; NOT the reference weights",
                        minutes, step, steps)
            break
        idx = torch.randint(0, pool, (batch,), generator=g)
        x = images[idx].permute(0, 3, 1, 2).float()
        flip = torch.rand(batch, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        x = b.normalize(x, scale=255.0)
        target = under[idx]
        target[flip] = target[flip].flip(-1)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps)
        pooled, dense = _image_and_dense(b, x)
        img = F.normalize(pooled, dim=-1)
        texts = torch.cat([tokens[idx], neg_tokens[idx]])  # the batch's captions, then their hard negatives
        txt = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # [B, 2B]
        # Scenes may share a caption: every text equal to an image's own caption is a positive for it.
        same = (tokens[idx][:, None, :] == texts[None, :, :]).all(-1).float()
        to_text = same / same.sum(1, keepdim=True)
        to_image = same[:, :batch].T / same[:, :batch].T.sum(1, keepdim=True)
        loss = (torch.sum(-to_text * logits.log_softmax(1), 1).mean()
                + torch.sum(-to_image * logits[:, :batch].T.log_softmax(1), 1).mean()) / 2
        # Dense alignment (as SigLIP 2 and TIPS add to CLIP's loss): each patch token against the phrases,
        # its own (the object or background under its centre) the positive; one template per step.
        words = F.normalize(model.encode_text(phrase_tokens[step % len(tpl)]), dim=-1)
        patch_logits = DENSE_SCALE * F.normalize(dense, dim=-1) @ words.T  # [B, N, phrases]
        loss = loss + DENSE_WEIGHT * F.cross_entropy(patch_logits.flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if step == 0 else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log.info("pretrain-mini: step %d/%d loss %.3f (%.0f s)", step, steps, loss_avg, time.perf_counter() - t0)
    else:
        step = steps
    b.eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in b.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"backbone": backbone, "seed": str(seed), "steps": str(step),
                                         "batch": str(batch), "pool": str(pool),
                                         "command": "spar-pipeline pretrain-mini"})
    report = dict(steps=step, loss=round(loss_avg, 4), seconds=round(time.perf_counter() - t0, 1),
                  capped=step < steps, out=str(out))
    log.info("pretrain-mini: %s", report)
    return report


if __name__ == "__main__":  # the same command as `spar-pipeline pretrain-mini` (options declared once, in cli/mini.py)
    import sys

    from spar_pipeline.cli import app

    app(["pretrain-mini", *sys.argv[1:]], prog_name="spar-pipeline")
