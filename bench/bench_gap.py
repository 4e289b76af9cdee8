"""Why the miniature world's student does not close the teacher's lead: two measures on a finished
`make demo` run (or the run ``SPAR_GAP_RUN`` names, student ``SPAR_GAP_STUDENT``, default "default");
figures in bench/NOTES.md. Writes bench/results/gap.json.

    python -m bench gap [--quick]

1. **MSE is not the margin.** On benchmark images at one scale: mIoU and MSE (to the stitched
   teacher map) of the teacher moved part of the way towards the student, T + a(S - T), and towards
   the pretrained single pass, T + a(P - T). Equal MSE, unequal mIoU says where the student's error lies.
2. **Where one pass parts from the windows.** Per block, the single pass's tokens against the same
   block's tokens of the K-pixel windows (token-aligned stride, averaged per token), as a share of the
   windows' token variance: the frozen blocks' share is what the unfrozen ones start from. And the
   windows' own tokens up to block L, then the remaining pretrained blocks in one pass: which blocks
   lose what the windows give. Full mode also trains the student's two blocks on the windows' tokens
   after block 4 and, as the control, on the single pass's (``trained_tail``): how much of the lead
   two blocks recover when the frozen blocks do not drift.
3. **Locality alone.** The pretrained single pass with every attention limited to a window's reach
   (``local_dense``; no training), its position table stretched or tiled: how much of the lead is the
   one pass's attention reaching past what a window sees.
4. **What the store keeps of the teacher.** The windows' maps stitched four ways (``stitch_readouts``):
   raw features on the token grid (the stored map, what the student regresses: its ceiling), unit
   features on the token grid, and both at pixel level (unit there is ``evaluate``'s sliding teacher).
   The share of the teacher's lead over the single pass the stored map keeps is the most of it any
   student that learns the store can recover.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import save

ALPHAS = (0.25, 0.5, 0.75)


def block_tokens(backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Each trunk block's output tokens [B, gh, gw, D] of ``backbone.dense(x)`` (forward hooks)."""
    blocks = backbone.trunk.blocks
    B, _, H, W = x.shape
    gh, gw = -(-H // backbone.patch_size), -(-W // backbone.patch_size)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.reshape(B, gh, gw, -1))) for b in blocks]
    try:
        backbone.dense(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def windowed_block_tokens(backbone, x: torch.Tensor, stride_patches: int = 2) -> list[torch.Tensor]:
    """Per block, tokens [gh, gw, D] of windows of ``backbone.window`` at a stride of whole patches,
    averaged over the windows holding each token (the teacher's stitching, at token level)."""
    from spar_pipeline.windows import window_starts

    P, K = backbone.patch_size, backbone.window
    _, _, H, W = x.shape
    k, gh, gw = K // P, H // P, W // P
    boxes = [(t, l) for t in window_starts(gh, k, stride_patches) for l in window_starts(gw, k, stride_patches)]
    crops = torch.cat([x[..., t * P:t * P + K, l * P:l * P + K] for t, l in boxes])
    per_block = block_tokens(backbone, crops)
    count = torch.zeros(gh, gw, 1)
    sums = [torch.zeros(gh, gw, o.shape[-1]) for o in per_block]
    for j, (t, l) in enumerate(boxes):
        count[t:t + k, l:l + k] += 1
        for acc, o in zip(sums, per_block):
            acc[t:t + k, l:l + k] += o[j].float()
    return [acc / count for acc in sums]


def windows_then_one_pass(backbone, windowed: list[torch.Tensor], after: int, blocks=None) -> torch.Tensor:
    """Dense map [gh, gw, D]: the windows' tokens after block ``after`` (1-based), then the remaining
    blocks (or ``blocks``), the final norm and the dense head in one pass over the image; ``after`` =
    depth is the windows all the way, at token level."""
    return _tail(backbone.trunk.blocks[after:] if blocks is None else blocks, backbone, windowed[after - 1])


def _tail(blocks, backbone, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``blocks`` (each attention limited by ``mask``, if given) then ``backbone``'s final norm and dense
    head over tokens [gh, gw, D], one pass (rotated, for a rotary trunk)."""
    from spar_pipeline.backbones.openclip_family import attention_pool_bypass

    gh, gw = tokens.shape[:2]
    z, rope, trunk = tokens.reshape(1, gh * gw, -1), backbone.rotation(gh, gw), backbone.trunk
    for blk in blocks:
        z = backbone.run_block(blk, z, rope, mask)
    return attention_pool_bypass(trunk.attn_pool, trunk.norm(z)).reshape(gh, gw, -1).float()


def local_dense(backbone, x: torch.Tensor, radius: int, tile: bool = False) -> torch.Tensor:
    """Dense map [gh, gw, D] of one pass in which every block's token attends only to the tokens within
    ``radius`` of it (a window's reach: radius K / 2P), the position table stretched over the image as
    the single pass does, or with ``tile`` repeated at its native size so every neighbourhood sees the
    positions a window does. Not a student: how much of the teacher's lead locality alone gives."""
    t = backbone.trunk
    p = backbone.prefix(x[:1], 0)
    _, gh, gw = p.grid
    tokens = p.tokens
    if tile:  # swap the stretched table (prefix's) for the native one tiled; norm_pre must not mix them
        if t.pos_embed is None:
            raise ValueError(f"local_dense: {backbone.name} has no position table to tile (rotary positions)")
        assert isinstance(t.norm_pre, torch.nn.Identity), "tiling needs the table added last (no norm_pre)"
        n = int(t.pos_embed.shape[1] ** 0.5)
        tiled = t.pos_embed.reshape(1, n, n, -1).repeat(1, -(-gh // n), -(-gw // n), 1)[:, :gh, :gw]
        tokens = tokens + (tiled.reshape(1, gh * gw, -1) - backbone.position_grid(gh, gw)).to(tokens.dtype)
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    mask = ((yy[:, None] - yy[None]).abs() <= radius) & ((xx[:, None] - xx[None]).abs() <= radius)
    return _tail(t.blocks, backbone, tokens.reshape(gh, gw, -1), mask.to(tokens.device))


READOUTS = {"stored map (token grid, raw)": ("raw", False), "token grid, unit": ("unit", False),
            "pixel level, raw": ("raw", True), "pixel level, unit (evaluate's sliding)": ("unit", True)}
STORED, SLIDING = "stored map (token grid, raw)", "pixel level, unit (evaluate's sliding)"


@torch.no_grad()
def stitch_readouts(backbone, x: torch.Tensor, emb: torch.Tensor, stride: int,
                    batch: int = 64) -> tuple[dict, torch.Tensor]:
    """Cosine maps of one image's K-pixel windows at ``stride`` for each of ``READOUTS``: features raw or
    unit-length, averaged on the P/r grid then brought to the token grid ([Q, H/P, W/P], ``windows.Canvas``,
    the paper's stitch) or upsampled ×P and averaged per pixel ([Q, H, W], ``segment.sliding_logits``); and the
    stored map itself [H/P, W/P, D] (``windows.sliding_features``'), so a caller runs the windows once."""
    from spar_pipeline.windows import Canvas, upsample, window_starts

    _, _, H, W = x.shape
    K, P = backbone.window, backbone.patch_size
    boxes = [(t, l) for t in window_starts(H, K, stride) for l in window_starts(W, K, stride)]
    D = backbone.dim
    token = {n: Canvas(H, W, P, stride, D, x.device) for n in ("raw", "unit")}
    pixel = {n: torch.zeros(D, H, W, device=x.device) for n in ("raw", "unit")}
    count = torch.zeros(1, H, W, device=x.device)
    for b in range(0, len(boxes), batch):
        part = boxes[b:b + batch]
        raw = backbone.dense(torch.stack([x[0, :, t:t + K, l:l + K] for t, l in part])).float().permute(0, 3, 1, 2)
        for norm, f in (("raw", raw), ("unit", F.normalize(raw, dim=1))):
            for (t, l), m, u in zip(part, upsample(f, token[norm].r), upsample(f, P)):
                token[norm].add_upsampled(m, t, l)
                pixel[norm][:, t:t + u.shape[1], l:l + u.shape[2]] += u
        for t, l in part:
            count[:, t:t + K, l:l + K] += 1  # slicing stops at the image's edge, as the windows do
    out, stored = {}, token["raw"].result()
    for name, (norm, at_pixels) in READOUTS.items():
        f = pixel[norm] / count if at_pixels else token[norm].result().permute(2, 0, 1)
        f = F.normalize(f, dim=0) if norm == "raw" else f  # unit features: the mean of the windows' cosines
        out[name] = torch.einsum("dhw,qd->qhw", f, emb.to(f.device, torch.float32))
    return out, stored


def trained_tail(run_dir: str, epochs: int = 8, lr: float = 1e-4, seed: int = 0) -> dict:
    """The student's two blocks trained (AdamW, MSE to the stored teacher maps, float32, the run's
    split) on two inputs: the windows' tokens after block depth-2 (as if the frozen blocks did not
    drift) and the single pass's (the recipe's student). Held-out MSE each epoch; the two tails."""
    import copy

    from spar_pipeline.backbones import build
    from spar_pipeline.pairs import PairDataset
    from spar_pipeline.run import Run
    from spar_pipeline.segment import normalise
    from spar_pipeline.split import training_items

    run = Run(run_dir)
    pre = build(run.recipe.recipe.backbone, run.recipe.recipe.checkpoint or None)
    after = len(pre.trunk.blocks) - 2
    train, val = training_items(run)
    pairs = PairDataset(train + val, run.teacher("default").store_url, {}, run.recipe.ingest.max_pixels)
    data = []
    with torch.no_grad():
        for i in range(len(pairs)):
            _, img, teacher = pairs[i]
            x = normalise(pre, img.permute(1, 2, 0).numpy())
            data.append({"windows": windowed_block_tokens(pre, x)[after - 1], "single": block_tokens(pre, x)[after - 1][0],
                         "teacher": teacher.float()})
    fit, held = data[:len(train)], data[len(train):]
    out: dict = {"after_block": after, "train_images": len(fit), "held_out_images": len(held), "epochs": epochs}
    for inputs in ("windows", "single"):
        torch.manual_seed(seed)
        tail = copy.deepcopy(pre.trunk.blocks[after:]).train()
        opt = torch.optim.AdamW(tail.parameters(), lr=lr, weight_decay=1e-4)
        curve = []
        for _ in range(epochs):
            for j in torch.randperm(len(fit)).tolist():
                loss = F.mse_loss(_tail(tail, pre, fit[j][inputs]), fit[j]["teacher"])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                curve.append(sum(float(F.mse_loss(_tail(tail, pre, d[inputs]), d["teacher"])) for d in held) / len(held))
        out[inputs] = {"held_out_mse": curve, "tail": tail.eval()}
    return out


def divergence(single: list[torch.Tensor], windows: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Per block (squared error of the single pass to the windows, the windows' token variance), summed
    over the image's tokens; their ratio is the share of the variance one pass gets wrong."""
    out = []
    for s, w in zip(single, windows):
        s = s[0, :w.shape[0], :w.shape[1]].float()
        out.append((float(((s - w) ** 2).sum()), float(((w - w.mean((0, 1))) ** 2).sum())))
    return out


def _miou_of(maps, bench, n, emb, index, ds) -> float:
    """mIoU of dense maps [h, w, D] read as the single pass is."""
    return _miou_of_cosines((torch.einsum("hwd,qd->qhw", F.normalize(f, dim=-1), emb) for f in maps), bench, n,
                            index, ds)


def _miou_of_cosines(cosines, bench, n, index, ds) -> float:
    """mIoU of cosine maps [Q, h, w] at any resolution."""
    from spar_pipeline.metrics import SegMetric

    metric = SegMetric(bench.num_classes)
    for i, cos in zip(range(n), cosines):
        _, gt, _ = bench[i]
        metric.update(_labels(cos, gt, index, ds), gt)
    return float(metric.compute()["miou"])


def _labels(cos: torch.Tensor, gt, index, ds):
    """Cosine maps [Q, h, w] brought to the label's size and post-processed as ``evaluate`` does."""
    from spar_pipeline.segment import postprocess

    cos = F.interpolate(cos[None], size=gt.shape[:2], mode="bilinear", align_corners=False)[0]
    return postprocess(cos, index, ds).numpy()


@torch.no_grad()
def measure(run_dir: str, student: str = "default", n: int = 24, scale: float = 2.0, n_blocks: int = 8,
            tails: dict | None = None) -> dict:
    """Both measures for ``student`` of the mini run ``run_dir`` at ``scale`` × the recipe's resize;
    with ``tails`` (``trained_tail``'s), the mIoU of each trained tail on its own inputs too."""
    from spar_pipeline.backbones import build
    from spar_pipeline.datasets import get_dataset, resize_scale, templates
    from spar_pipeline.evaluate import scaled
    from spar_pipeline.metrics import SegMetric
    from spar_pipeline.run import Run
    from spar_pipeline.segment import normalise, resize_image
    from spar_pipeline.weights import resolve_checkpoint

    run = Run(run_dir)
    recipe = run.recipe
    cfg, stride = recipe.evaluate, recipe.extract.stride
    bench = get_dataset("scenes", str(Path(run_dir) / "bench" / "scenes"))
    n = min(n, len(bench))
    pre = build(recipe.recipe.backbone, recipe.recipe.checkpoint or None)
    stu = build(recipe.recipe.backbone, resolve_checkpoint(run, student))
    emb, index = pre.class_embeddings(bench.class_lines, templates())
    size, ds = scaled(resize_scale("scenes", cfg), scale), cfg.datasets["scenes"]
    maps = {"teacher": [], "pretrained": [], "student": [], "local attention": []}
    if pre.trunk.pos_embed is not None:  # a rotary model has no table to tile
        maps["local attention, tiled table"] = []
    reach = pre.window // pre.patch_size // 2
    blocks = {"pretrained": None, "student": None}
    depth = len(pre.trunk.blocks)
    oracle: dict[int, list[torch.Tensor]] = {L: [] for L in (2, depth - 2, depth)}
    tail_maps: dict[str, list[torch.Tensor]] = {k: [] for k in ("windows", "single")} if tails else {}
    readouts = {name: SegMetric(bench.num_classes) for name in READOUTS}
    for i in range(n):
        image, gt, _ = bench[i]
        x = normalise(pre, resize_image(image, size))
        cosines, stored = stitch_readouts(pre, x, emb, stride)
        maps["teacher"].append(stored)
        for name, cos in cosines.items():
            readouts[name].update(_labels(cos, gt, index, ds), gt)
        maps["pretrained"].append(pre.dense(x)[0].float())
        maps["student"].append(stu.dense(x)[0].float())
        maps["local attention"].append(local_dense(pre, x, reach))
        if "local attention, tiled table" in maps:
            maps["local attention, tiled table"].append(local_dense(pre, x, reach, tile=True))
        if i < n_blocks:
            crop = x[..., :x.shape[2] // pre.patch_size * pre.patch_size, :x.shape[3] // pre.patch_size * pre.patch_size]
            win = windowed_block_tokens(pre, crop)
            single = {"pretrained": block_tokens(pre, crop), "student": block_tokens(stu, crop)}
            for L, fs in oracle.items():
                fs.append(windows_then_one_pass(pre, win, L))
            if tails:
                cut = tails["after_block"]
                tail_maps["windows"].append(windows_then_one_pass(pre, win, cut, tails["windows"]["tail"]))
                tail_maps["single"].append(_tail(tails["single"]["tail"], pre, single["pretrained"][cut - 1][0]))
            for name, tokens in single.items():
                d = divergence(tokens, win)
                blocks[name] = d if blocks[name] is None else [(a + c, b + e) for (a, b), (c, e) in zip(blocks[name], d)]

    def mse(fs) -> float:
        return sum(float(((f - t) ** 2).mean()) for f, t in zip(fs, maps["teacher"])) / n

    rows = {name: {"miou": _miou_of(maps[name], bench, n, emb, index, ds), "mse": mse(maps[name])} for name in maps}
    for a in ALPHAS:
        for name in ("student", "pretrained"):
            mixed = [t + a * (f - t) for t, f in zip(maps["teacher"], maps[name])]
            rows[f"teacher+{a}({name}-teacher)"] = {"miou": _miou_of(mixed, bench, n, emb, index, ds), "mse": mse(mixed)}
    share = {name: [round(e / v, 3) for e, v in d] for name, d in blocks.items()}
    k = min(n, n_blocks)
    after = {"0 (single pass)": _miou_of(maps["pretrained"][:k], bench, k, emb, index, ds)}
    after |= {str(L): _miou_of(fs, bench, k, emb, index, ds) for L, fs in oracle.items()}
    trained = {f"trained tail on {name} tokens": _miou_of(fs, bench, k, emb, index, ds) for name, fs in tail_maps.items()}
    teacher = {name: float(m.compute()["miou"]) for name, m in readouts.items()}
    single, stored, sliding = rows["pretrained"]["miou"], teacher[STORED], teacher[SLIDING]
    kept = (stored - single) / (sliding - single) if sliding != single else float("nan")
    return {"run": run_dir, "student": student, "images": n, "scale": scale, "maps": rows,
            "teacher_readouts": teacher, "stored_share_of_lead": kept,
            "block_error_share": share, "windows_up_to_block_miou": after | trained, "block_images": k}


def main(quick: bool = False) -> dict:
    run_dir = os.environ.get("SPAR_GAP_RUN", "runs/demo")
    student = os.environ.get("SPAR_GAP_STUDENT", "default")
    from spar_pipeline.run import Run

    if not os.path.isfile(Run(run_dir).student(student).best_weights):  # local runs
        print(f"gap: no student {student!r} in {run_dir} (run `make demo` first, or set SPAR_GAP_RUN); skipped")
        return {"skipped": f"no student {student!r} in {run_dir}"}
    out: dict = {}
    tails = None
    if not quick:  # the two-block tails trained on the run's store: about 8 minutes on 2 cores
        tails = trained_tail(run_dir)
        for name in ("windows", "single"):
            print(f"tail after block {tails['after_block']} trained on {name} tokens, held-out MSE per epoch: "
                  + " ".join(f"{v:.4f}" for v in tails[name]["held_out_mse"]))
        out["trained_tail"] = {k: ({"held_out_mse": v["held_out_mse"]} if isinstance(v, dict) else v)
                               for k, v in tails.items()}
    for scale in ((2.0,) if quick else (2.0, 4.0)):
        r = measure(run_dir, student, n=8 if quick else 24, scale=scale, n_blocks=4 if quick else 16, tails=tails)
        print(f"scale {scale:g} ({r['images']} images): " + "; ".join(
            f"{k} mIoU {v['miou']:.2f} MSE {v['mse']:.4f}" for k, v in r["maps"].items()))
        print("  the teacher's windows read four ways, mIoU: " + "; ".join(
            f"{k} {v:.2f}" for k, v in r["teacher_readouts"].items())
              + f"; the stored map keeps {100 * r['stored_share_of_lead']:.0f} % of the sliding teacher's lead")
        for name, share in r["block_error_share"].items():
            print(f"  {name}: share of the windows' token variance one pass gets wrong, per block: {share}")
        print("  the windows' tokens up to block L, then the pretrained blocks (or a trained tail) in one pass, mIoU: "
              + ", ".join(f"{L}: {m:.2f}" for L, m in r["windows_up_to_block_miou"].items()))
        out[f"scale_{scale:g}"] = r
    return save("gap", out)
