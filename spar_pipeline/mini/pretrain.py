"""Pretrain ``mini-clip`` contrastively on generated scene–caption pairs, on CPU, from a seed.

Why: the miniature world needs a vision-language model whose weights ship in the package, so
the demo reproduces the paper's Table 1 with no download. The model is built through the same
open_clip path as every other backbone (``backbones.build``'s constructor, random init from the
spec's seed), trained at its native 64×64 window on ``scenes.make_scene`` images with CLIP's
symmetric InfoNCE loss, and saved as a half-precision safetensors state dict of the Backbone.

Captions are the scene's own ("a striped red circle and a blue square on grass"), wrapped half
of the time in one of the 80 ImageNet templates, so the text tower has seen the prompts that
``evaluate`` averages. A fixed number of steps makes the weights a pure function of the seed;
``minutes`` only caps the wall time (a capped run says so and is not the reference).

Reproduce the shipped weights (about 20 minutes on 2 cores)::

    nice -n 10 spar-pipeline pretrain-mini --out spar_pipeline/assets/mini-clip.safetensors --seed 0
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["main", "DEFAULT_STEPS", "BATCH", "POOL"]

log = logging.getLogger(__name__)

DEFAULT_STEPS = 400  # the shipped weights' step count
BATCH = 128
POOL = 20000  # distinct training scenes, generated once and flipped at random
LR, WD, WARMUP = 1e-3, 0.05, 50


def _captions(seed: int, n: int, base: list[str], templates: list[str]) -> list[str]:
    rng = np.random.default_rng([seed, 99])
    out = []
    for cap in base[:n]:
        if rng.random() < 0.5:
            t = templates[int(rng.integers(len(templates)))]
            cap = t.format(cap[2:] if cap.startswith("a ") else cap)
        out.append(cap)
    return out


def _pool(seed: int, n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    from spar_pipeline.mini.scenes import make_scene

    images = np.empty((n, size, size, 3), np.uint8)
    caps = []
    for i in range(n):
        sc = make_scene(seed, i, (size, size))
        images[i] = sc.image
        caps.append(sc.caption)
    return torch.from_numpy(images), caps


def _lr(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))


def main(out: str | Path = "mini-clip.safetensors", seed: int = 0, minutes: float = 40.0,
         steps: int = DEFAULT_STEPS, threads: int = 2) -> dict:
    """Train mini-clip for ``steps`` steps of ``BATCH`` pairs (stopping early past ``minutes``) and
    write the weights to ``out``. Returns a small report (steps, loss, seconds, capped)."""
    from safetensors.torch import save_file

    from spar_pipeline.backbones import _construct, get_spec
    from spar_pipeline.datasets import templates

    torch.set_num_threads(threads)
    spec = get_spec("mini-clip")
    torch.manual_seed(seed)
    b = _construct("mini-clip", spec)  # same open_clip path as build(), random init
    model, K = b.model.train(), b.window
    t0 = time.perf_counter()
    images, base = _pool(seed, POOL, K)
    caps = _captions(seed, POOL, base, templates())
    tokens = b.tokenizer(caps)
    log.info("pretrain-mini: %d scenes generated in %.0f s", POOL, time.perf_counter() - t0)
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
        idx = torch.randint(0, POOL, (BATCH,), generator=g)
        x = images[idx].permute(0, 3, 1, 2).float()
        flip = torch.rand(BATCH, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        x = b.normalize(x, scale=255.0)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        # Scenes may share a caption: every pair with the same caption counts as a positive.
        same = (tokens[idx][:, None, :] == tokens[idx][None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = (torch.sum(-target * logits.log_softmax(1), 1).mean()
                + torch.sum(-target * logits.T.log_softmax(1), 1).mean()) / 2
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
    save_file(state, str(out), metadata={"seed": str(seed), "steps": str(step), "batch": str(BATCH),
                                         "pool": str(POOL), "command": "spar-pipeline pretrain-mini"})
    report = dict(steps=step, loss=round(loss_avg, 4), seconds=round(time.perf_counter() - t0, 1),
                  capped=step < steps, out=str(out))
    log.info("pretrain-mini: %s", report)
    return report


if __name__ == "__main__":  # the same command as `spar-pipeline pretrain-mini` (options declared once, in cli/mini.py)
    import sys

    from spar_pipeline.cli import app

    app(["pretrain-mini", *sys.argv[1:]], prog_name="spar-pipeline")
