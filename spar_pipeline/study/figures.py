"""The study's figures from the manifests alone (matplotlib, Agg, no display): Fig. 1 (mIoU against
forward seconds per image), Fig. 3 (mIoU and seconds against evaluation scale; a seed group as its mean
with a ± std band), the training curves
(val_mse per epoch against the pretrained baseline) and the per-class IoU gain of the best student.

Each function returns a ``Picture`` (PNG bytes, title, caption) or None when the run holds nothing to
draw yet; the page then says what would add it. One colour per model across every figure.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

from spar_pipeline.study.grouping import mean_std, seed_groups
from spar_pipeline.study.inputs import PRETRAINED, Study
from spar_pipeline.study.tables import dataset_order, model_cells, model_mean

__all__ = ["Picture", "Series", "all_figures", "speed_accuracy", "scale_sweep", "scale_series", "scale_figure",
           "training_curves", "class_gain", "colours"]

SINGLE_COLOUR, SLIDING_COLOUR = "#222222", "#c0392b"
SHOWN = 12  # classes shown at each end of a long per-class gain list


@dataclass
class Picture:
    name: str  # file name under RUN/reports/figures/
    title: str
    caption: str
    png: bytes | None  # None: already under figures/ from an earlier call (qualitative pictures)


def all_figures(study: Study) -> tuple[list[Picture], list[str]]:
    """(pictures drawn, one line per figure that could not be drawn yet and what would add it)."""
    made, missing = [], []
    for fn, why in ((speed_accuracy, "Fig. 1 needs evaluate rows with forward seconds at scale 1.0."),
                    (scale_sweep, "Fig. 3 needs evaluate rows at two scales or more (`evaluate --scale F`)."),
                    (training_curves, "Training curves need a student with train rows."),
                    (class_gain, "The per-class gain needs per-class IoU of pretrained single pass and a student.")):
        pic = fn(study)
        (made.append(pic) if pic is not None else missing.append(why))
    return made, missing


def colours(study: Study) -> dict[str, str]:
    """model name -> colour: students from a qualitative map in study order, its reds left out (the sliding
    teacher's colour)."""
    from matplotlib import colormaps

    names = [s.name for s in study.students]
    names += sorted({r["model"] for r in study.rows} - set(names) - {PRETRAINED})
    small = len(names) <= 9
    cmap = colormaps["tab10" if small else "tab20"]
    palette = [_hex(cmap(i)) for i in range(cmap.N) if i not in ((3,) if small else (6, 7))]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def speed_accuracy(study: Study) -> Picture | None:
    rows = [r for r in study.rows if math.isclose(r["scale"], 1.0)]
    datasets = dataset_order(rows)
    fig, ax = _figure(7.5, 4.6)
    drawn = 0
    single = _point(rows, PRETRAINED, "single", 0, datasets)
    if single:
        ax.scatter(*single, s=70, marker="s", color=SINGLE_COLOUR, label="pretrained single pass", zorder=3)
        drawn += 1
    strides = sorted({int(r["stride"]) for r in rows if r["model"] == PRETRAINED and r["mode"] == "sliding"},
                     reverse=True)
    slide = [(s, p) for s in strides if (p := _point(rows, PRETRAINED, "sliding", s, datasets))]
    if slide:
        ax.plot([p[0] for _, p in slide], [p[1] for _, p in slide], "-o", color=SLIDING_COLOUR,
                label="pretrained sliding (teacher)", zorder=2)
        for s, (x, y) in slide:
            ax.annotate(f"s={s}", (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8,
                        color=SLIDING_COLOUR)
        drawn += len(slide)
    col = colours(study)
    for name in col:
        p = _point(rows, name, "single", 0, datasets)
        if p:
            ax.scatter(*p, s=55, marker="o", color=col[name], edgecolor="black", linewidth=0.5,
                       label=f"{name} (single pass)", zorder=4)
            drawn += 1
    if not drawn:
        return None
    _log_axis(ax.xaxis)
    ax.set_xlabel("forward seconds per image (log scale)")
    ax.set_ylabel(_mean_label(datasets))
    ax.set_title("Accuracy against inference time")
    _legend(ax, drawn)
    return Picture("fig1_speed_accuracy.png", "Fig. 1 shape: mIoU against forward seconds per image",
                   f"{_mean_label(datasets)} at scale 1.0 against the forward seconds of one image (the paper's "
                   "timing: ViT forward passes only). Sliding points are labelled with their stride.", _png(fig))


@dataclass
class Series:
    """One line of Fig. 3: mean mIoU and seconds per scale; ``std`` (a seed group's) is drawn as a band."""

    label: str
    colour: str
    style: str
    scales: list[float]
    miou: list[float]
    seconds: list[float]
    std: list[float] | None = None
    members: tuple[str, ...] = ()  # the models folded into it (a seed group), else the one model


def scale_series(study: Study) -> list[Series]:
    """The lines of Fig. 3: the pretrained single pass, each pretrained sliding stride, then each student in
    one pass, a seed group folded into one line at the mean over its seeds with its sample std."""
    scales = sorted({r["scale"] for r in study.rows})
    datasets = dataset_order(study.rows)
    col = colours(study)
    out: list[Series] = []
    strides = sorted({int(r["stride"]) for r in study.rows if r["model"] == PRETRAINED and r["mode"] == "sliding"})
    dashes = ["--", ":", "-."]
    for mode, stride in [("single", 0), *(("sliding", s) for s in strides)]:
        pts = [(s, p) for s in scales if (p := _point(study.rows, PRETRAINED, mode, stride, datasets, s))]
        if len(pts) >= 2:
            single = mode == "single"
            out.append(Series("pretrained single pass" if single else f"pretrained sliding s={stride}",
                              SINGLE_COLOUR if single else SLIDING_COLOUR,
                              "-s" if single else dashes[len(out) % 3] + "o", [s for s, _ in pts],
                              [p[1] for _, p in pts], [p[0] for _, p in pts], members=(PRETRAINED,)))
    groups = {g[0].name: g for g in seed_groups(study.students)}
    grouped = {m.name for g in groups.values() for m in g}
    for name in col:
        if name in groups:
            members = [m.name for m in groups[name]]
            xs, mious, stds, secs = [], [], [], []
            for s in scales:
                pts = [p for m in members if (p := _point(study.rows, m, "single", 0, datasets, s))]
                if pts:
                    mean, std, _ = mean_std([p[1] for p in pts])
                    xs.append(s)
                    mious.append(mean)
                    stds.append(std)
                    secs.append(sum(p[0] for p in pts) / len(pts))
            if len(xs) >= 2:
                out.append(Series(f"{name} ({len(members)} seeds, mean ± std)", col[name], "-o", xs, mious, secs,
                                  stds, tuple(members)))
        elif name not in grouped:
            pts = [(s, p) for s in scales if (p := _point(study.rows, name, "single", 0, datasets, s))]
            if len(pts) >= 2:
                out.append(Series(f"{name} (single pass)", col[name], "-o", [s for s, _ in pts],
                                  [p[1] for _, p in pts], [p[0] for _, p in pts], members=(name,)))
    return out


def scale_figure(study: Study, series: Sequence[Series] | None = None):
    """The matplotlib Figure of Fig. 3 (accuracy left, seconds right) from ``series`` (default: the study's),
    or None with fewer than two scales or nothing to draw."""
    if len({r["scale"] for r in study.rows}) < 2:
        return None
    series = scale_series(study) if series is None else series
    if not series:
        return None
    datasets = dataset_order(study.rows)
    fig, (left, right) = _figure(11, 4.4, ncols=2)
    for line in series:
        left.plot(line.scales, line.miou, line.style, color=line.colour, label=line.label)
        right.plot(line.scales, line.seconds, line.style, color=line.colour, label=line.label)
        if line.std is not None:
            band = left.fill_between(line.scales, [m - s for m, s in zip(line.miou, line.std)],
                                     [m + s for m, s in zip(line.miou, line.std)], color=line.colour, alpha=0.2,
                                     linewidth=0)
            band.set_gid(f"band:{line.members[0]}")
    left.set_xlabel("evaluation scale (× the recipe's size)")
    left.set_ylabel(_mean_label(datasets))
    left.set_title("Accuracy against resolution")
    right.set_xlabel("evaluation scale (× the recipe's size)")
    right.set_ylabel("forward seconds per image (log scale)")
    _log_axis(right.yaxis)
    right.set_title("Inference time against resolution")
    _legend(right, len(series))
    return fig


def scale_sweep(study: Study) -> Picture | None:
    series = scale_series(study)
    fig = scale_figure(study, series)
    if fig is None:
        return None
    caption = "Images resized to the scale × the recipe's evaluation size; the forward timing at that size."
    if any(line.std is not None for line in series):
        caption += (" A seed group (students alike but for the seed) is one line at the mean over its seeds, "
                    "shaded ± the sample std.")
    return Picture("fig3_scale.png", "Fig. 3 shape: mIoU and seconds per image against evaluation scale", caption,
                   _png(fig))


def training_curves(study: Study) -> Picture | None:
    col = colours(study)
    key = "val_mse" if any(_ok(r.get("val_mse")) for s in study.students for r in s.curve) else "train_loss"
    drawn = [s for s in study.students if any(_ok(r.get(key)) for r in s.curve)]
    if not drawn:
        return None
    fig, ax = _figure(7.5, 4.6)
    for s in drawn:
        pts = [(r["epoch"] + 1, r[key]) for r in s.curve if _ok(r.get(key))]  # the manifest counts epochs from 0
        ax.plot([e for e, _ in pts], [v for _, v in pts], "-o", markersize=3, color=col[s.name], label=s.name)
    baselines: dict[str, float] = {}
    for s in drawn:
        if s.baseline_val_mse is not None and key == "val_mse":
            baselines.setdefault(s.teacher, s.baseline_val_mse)
    for i, (teacher, value) in enumerate(sorted(baselines.items())):
        ax.axhline(value, color=SINGLE_COLOUR, linestyle=["--", ":", "-."][i % 3], linewidth=1.2,
                   label=f"pretrained single pass (teacher {teacher})")
    values = [v for s in drawn for r in s.curve if _ok(v := r.get(key))] + list(baselines.values())
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("held-out MSE against the teacher" if key == "val_mse" else "training loss (no held-out slice)")
    ax.set_title("Training curves")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(ax, len(drawn) + len(baselines))
    return Picture("training_curves.png", "Training curves: val_mse per epoch",
                   "Held-out MSE of each student's single pass against its teacher's stored maps after each epoch; "
                   "dashed: the pretrained single pass, where every student starts.", _png(fig))


def class_gain(study: Study) -> Picture | None:
    """Per-class IoU of the best student (highest mean single-pass mIoU) minus the pretrained single pass."""
    rows = [r for r in study.rows if math.isclose(r["scale"], 1.0)]
    datasets = [d for d in dataset_order(rows) if _classes(model_cells(rows, PRETRAINED).get(d))]
    scored = [(model_mean(model_cells(rows, s.name), datasets), s.name) for s in study.students]
    scored = [(m, n) for m, n in scored if m is not None]
    if not datasets or not scored:
        return None
    best = max(scored)[1]
    pairs = []
    for d in datasets:
        base, stu = model_cells(rows, PRETRAINED)[d], model_cells(rows, best).get(d)
        if not _classes(stu):
            continue
        names = [n.split(",")[0].strip() for n in base.get("class_names") or _class_names(d, len(base["class_iou"]))]
        gains = [(n, s - b) for n, b, s in zip(names, base["class_iou"], stu["class_iou"]) if _ok(b) and _ok(s)]
        gains = sorted(gains, key=lambda g: g[1])
        if len(gains) > 2 * SHOWN:  # a long class list: its largest losses and gains
            d, gains = f"{d}: {SHOWN} lowest and highest of {len(gains)}", gains[:SHOWN] + gains[-SHOWN:]
        if gains:
            pairs.append((d, gains))
    if not pairs:
        return None
    height = max(3.0, 0.22 * max(len(g) for _, g in pairs) + 1.2)
    fig, axs = _figure(4.8 * len(pairs), height, ncols=len(pairs))
    for ax, (d, gains) in zip(axs if len(pairs) > 1 else [axs], pairs):
        ax.barh(range(len(gains)), [g for _, g in gains], color=["#27ae60" if g >= 0 else "#c0392b" for _, g in gains])
        ax.set_yticks(range(len(gains)), [n for n, _ in gains], fontsize=7)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("IoU gain (points)")
        ax.set_title(d, fontsize=10)
    fig.suptitle(f"{best} single pass − pretrained single pass, per class")
    return Picture("class_gain.png", f"Per-class IoU gain of {best} over the pretrained single pass",
                   "Classes absent from a benchmark are left out. Green: the student is better.", _png(fig))


# ---- helpers -----------------------------------------------------------------------------
def _point(rows, model: str, mode: str, stride: int, datasets: Sequence[str], scale: float = 1.0):
    """(mean forward seconds, mean mIoU) over ``datasets`` of one model/mode/stride/scale, or None."""
    cells = model_cells(rows, model, mode, stride, scale)
    mean = model_mean(cells, datasets)
    secs = [c["forward_seconds"] for c in cells.values() if _ok(c["forward_seconds"]) and c["forward_seconds"] > 0]
    return (sum(secs) / len(secs), mean) if mean is not None and secs else None


def _mean_label(datasets: Sequence[str]) -> str:
    return f"mIoU ({datasets[0]})" if len(datasets) == 1 else f"mean mIoU over {len(datasets)} benchmarks"


def _classes(row: dict | None) -> bool:
    return bool(row) and isinstance(row.get("class_iou"), (list, tuple)) and len(row["class_iou"]) > 0


def _class_names(dataset: str, n: int) -> list[str]:
    from spar_pipeline.datasets import class_lines

    try:
        names = [line.split(",")[0].strip() for line in class_lines(dataset)]
    except Exception:  # noqa: BLE001 - a dataset outside the registry: numbered classes
        names = []
    return names if len(names) == n else [f"class {i}" for i in range(n)]


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(float(v))


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols)
    for ax in (axes if ncols > 1 else [axes]):
        ax.grid(True, which="both", alpha=0.3)
    return fig, axes


def _log_axis(axis) -> None:
    """Log scale with readable ticks on short ranges: majors at 1, 2 and 5 × 10^k as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log") if axis.axis_name == "x" else axis.axes.set_yscale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())
    axis.axes.margins(**{axis.axis_name: 0.15})


def _legend(ax, entries: int) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              ncols=1 if entries <= 16 else 2)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _hex(rgba) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])
