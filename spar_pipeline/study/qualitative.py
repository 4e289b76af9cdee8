"""The study's two pictures that need models: the qualitative panel (Fig. 5) and the PCA (Fig. 7).

- Fig. 5: for a few benchmark images (evenly spread over the validation split, never trained on):
  image | ground truth | pretrained single pass | sliding teacher | each chosen student, in one
  palette (``pictures.class_colours``; ignored pixels black) with one legend of the classes shown.
- Fig. 7: the same images as dense features: the teacher (sliding windows at its stride), the
  pretrained single pass and each student, projected on the first three principal axes of the
  TEACHER's features only (centred and scaled by the teacher's 1st–99th percentiles), so a student
  that matches its teacher looks like it and the pretrained single pass shows what it lacks.

They are made only when missing: ``figures/qualitative.json`` keeps what they show (images, models
and each student's weights size and last epoch); the same again reuses the PNGs on disk.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Sequence

import numpy as np
import torch

from spar_pipeline.errors import EvaluateError, OptionError
from spar_pipeline.study.figures import Picture
from spar_pipeline.study.inputs import PRETRAINED, Study
from spar_pipeline.study.tables import dataset_order, model_cells, model_mean, sliding_reference

__all__ = ["qualitative", "choose_students", "teacher_pca"]

log = logging.getLogger(__name__)

KEPT = ("reports", "figures", "qualitative.json")
NAMES = ("fig5_qualitative.png", "fig7_pca.png")


def choose_students(study: Study, wanted: Sequence[str] | None = None, most: int = 3) -> list[str]:
    """``wanted`` when given, else up to ``most`` students with weights, best mean single-pass mIoU first."""
    with_weights = [s.name for s in study.students if _best(study.run, s.name) is not None]
    if wanted:
        unknown = [n for n in wanted if n not in with_weights]
        if unknown:
            raise OptionError(f"--student {unknown[0]}: no such student with weights in {study.run.url}; "
                             f"students with weights: {', '.join(with_weights) or 'none'}")
        return list(wanted)
    datasets = dataset_order(study.rows)

    def score(name: str) -> float:
        mean = model_mean(model_cells(study.rows, name), datasets)
        return -1e9 if mean is None else mean

    return sorted(with_weights, key=lambda n: -score(n))[:most]


def qualitative(study: Study, datasets: dict[str, str], *, students: Sequence[str] | None = None, images: int = 3,
                device: str | None = None) -> tuple[list[Picture], list[str]]:
    """(Fig. 5 and Fig. 7 pictures, lines saying why one is not drawn). ``datasets``: name -> root of
    the benchmarks that may be shown (the first one evaluated in the run is used)."""
    from spar_pipeline.datasets import get_dataset

    run = study.run
    if not datasets:
        return [], ["Fig. 5 and Fig. 7 need a benchmark: `report --dataset NAME=PATH`."]
    evaluated = [d for d in dataset_order(study.rows) if d in datasets]
    name = (evaluated or list(datasets))[0]
    bench = get_dataset(name, datasets[name])
    chosen = choose_students(study, students)
    stride = sliding_reference(study) or study.teacher_stride()
    if not len(bench) or stride is None:
        return [], [f"Fig. 5 and Fig. 7: {name} has no images, or the run has no teacher stride."]
    picks = sorted({round(i * (len(bench) - 1) / max(1, images - 1)) for i in range(min(images, len(bench)))})
    key = dict(dataset=name, root=os.path.abspath(datasets[name]), images=[bench.items[i][0] for i in picks],
               stride=stride, recipe=run.recipe.fingerprint,
               students={n: _identity(study, n) for n in chosen})
    titles = (f"Fig. 5 shape: {name} predictions", "Fig. 7 shape: PCA of dense features (teacher basis)")
    captions = (f"{name} validation images: ground truth, the pretrained single pass, the sliding teacher "
                f"(s={stride}) and {', '.join(chosen) or 'no student yet'}; one palette, black = ignored.",
                "First three principal axes of the teacher's features only, the same projection for every model.")
    if run.exists(*KEPT) and all(run.exists("reports", "figures", n) for n in NAMES):
        if json.loads(run.read_bytes(*KEPT)) == key:
            return [Picture(n, t, c, None) for n, t, c in zip(NAMES, titles, captions)], []
    pngs = _draw(study, bench, picks, chosen, stride, device)
    run.write_bytes_atomic(json.dumps(key, indent=1).encode(), *KEPT)
    return [Picture(n, t, c, p) for n, t, c, p in zip(NAMES, titles, captions, pngs)], []


def teacher_pca(teacher: torch.Tensor, others: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """[h, w, D] maps -> [h, w, 3] RGB in [0, 1]: the teacher's top-3 principal axes (fitted on the
    teacher alone), each model projected with the teacher's mean and scaled by its 1st–99th percentiles."""
    h, w, D = teacher.shape
    t = teacher.reshape(-1, D).double().cpu()
    mean = t.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(t - mean, full_matrices=False)
    axes = vh[: min(3, vh.shape[0])].T
    proj_t = (t - mean) @ axes
    lo, hi = torch.quantile(proj_t, 0.01, dim=0), torch.quantile(proj_t, 0.99, dim=0)
    out = []
    for m in [teacher, *others]:
        p = ((m.reshape(-1, D).double().cpu() - mean) @ axes - lo) / (hi - lo).clamp_min(1e-12)
        if p.shape[1] < 3:
            p = torch.cat([p, torch.zeros(p.shape[0], 3 - p.shape[1], dtype=p.dtype)], dim=1)
        out.append(p.clamp(0, 1).reshape(m.shape[0], m.shape[1], 3).float().numpy())
    return out


# ---- helpers -----------------------------------------------------------------------------
def _best(run, name: str) -> tuple[str, ...] | None:
    """Parts of student ``name``'s best weights in the run (``weights.student_checkpoint``), None before any."""
    from spar_pipeline.weights import student_checkpoint

    try:
        return student_checkpoint(run, name)
    except EvaluateError:
        return None


def _identity(study: Study, name: str) -> list:
    s = study.student(name)
    size = study.run.fs.size(study.run.path(*_best(study.run, name)))
    return [int(size or 0), max((r["epoch"] for r in s.curve), default=None) if s else None]


@torch.no_grad()
def _draw(study: Study, bench, picks: list[int], chosen: list[str], stride: int, device) -> tuple[bytes, bytes]:
    from spar_pipeline.backbones import build
    from spar_pipeline.datasets import resize_scale
    from spar_pipeline.segment import normalise, predict, resize_image
    from spar_pipeline.weights import pretrained_model, resolve_checkpoint
    from spar_pipeline.windows import sliding_features

    recipe = study.run.recipe
    cfg = recipe.evaluate
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pretrained, bname = pretrained_model(None, recipe, dev)
    models = {n: build(bname, resolve_checkpoint(study.run, n), device=dev).eval() for n in chosen}
    text = tuple(t.to(dev) for t in pretrained.class_embeddings(bench.class_lines, _templates()))
    ds_cfg, scale = cfg.datasets.get(bench.name), resize_scale(bench.name, cfg)
    if ds_cfg is None:
        from spar_pipeline.recipe import DatasetEval

        ds_cfg = DatasetEval(logit_scale=40.0)
    seg_rows, pca_rows = [], []
    for i in picks:
        image, gt, _ = bench[i]
        preds = [predict(pretrained, image, text, ds_cfg, scale, "single"),
                 predict(pretrained, image, text, ds_cfg, scale, "sliding", stride, cfg.window_batch)]
        preds += [predict(m, image, text, ds_cfg, scale, "single") for m in models.values()]
        seg_rows.append((image, gt, preds))
        snapped = _snap(resize_image(image, scale), pretrained.patch_size)
        x = normalise(pretrained, snapped)
        teacher = sliding_features(pretrained, x, window=pretrained.window, stride=stride).float()
        maps = [pretrained.dense(x)[0].float()] + [m.dense(x)[0].float() for m in models.values()]
        pca_rows.append((snapped, teacher_pca(teacher, maps)))
    names = [c.split(",")[0].strip() for c in bench.class_lines]
    heads = ["image", "ground truth", "pretrained single", f"sliding teacher s={stride}", *chosen]
    return _segmentation_panel(seg_rows, heads, names), _pca_panel(
        pca_rows, ["image", f"teacher (sliding s={stride})", "pretrained single", *chosen])


def _templates() -> list[str]:
    from spar_pipeline.datasets import templates

    return templates()


def _snap(image: np.ndarray, patch: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    nh, nw = max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)
    return image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)


def _segmentation_panel(rows, heads: list[str], names: list[str]) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from spar_pipeline.pictures import class_colours

    palette = class_colours(len(names))
    h, w = rows[0][0].shape[:2]
    cols = len(heads)
    present: set[int] = set()
    for _, gt, preds in rows:
        present |= {int(c) for c in np.unique(gt) if c != 255}
        for p in preds:
            present |= {int(c) for c in np.unique(p)}
    legend_rows = -(-len(present) // 8)
    fig = Figure(figsize=(2.2 * cols * w / max(h, w) + 0.4, 2.2 * len(rows) * h / max(h, w) + 0.5 + 0.25 * legend_rows),
                 dpi=110, layout="constrained")
    axs = fig.subplots(len(rows), cols, squeeze=False)
    _show(axs, [[image, _colour(gt, palette)] + [_colour(p, palette) for p in preds] for image, gt, preds in rows],
          heads)
    handles = [Patch(color=palette[c] / 255.0, label=names[c]) for c in sorted(present) if c < len(names)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(8, max(1, len(handles))), fontsize=8)
    return _png(fig)


def _pca_panel(rows, heads: list[str]) -> bytes:
    from matplotlib.figure import Figure

    h, w = rows[0][0].shape[:2]
    cols = len(heads)
    fig = Figure(figsize=(2.2 * cols * w / max(h, w) + 0.4, 2.2 * len(rows) * h / max(h, w) + 0.4), dpi=110,
                 layout="constrained")
    axs = fig.subplots(len(rows), cols, squeeze=False)
    _show(axs, [[image, *maps] for image, maps in rows], heads)
    return _png(fig)


def _show(axs, grid: list[list[np.ndarray]], heads: list[str]) -> None:
    """Both panels' layout: each picture in its own axes, no ticks, the first row titled by ``heads``."""
    for r, cells in enumerate(grid):
        for c, cell in enumerate(cells):
            ax = axs[r][c]
            ax.imshow(cell, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heads[c], fontsize=9)


def _colour(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    ok = (label >= 0) & (label < len(palette))
    out[ok] = palette[label[ok]]
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
