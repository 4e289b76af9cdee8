"""The model card of an exported student: Hub metadata (YAML front matter) and what a user needs.

The front matter follows the Hugging Face model-card fields: ``library_name``, ``pipeline_tag``,
``base_model``, ``tags``, ``datasets`` and the evaluation results as ``model-index`` entries
(one per dataset, the student's single-pass mIoU). The body says what SPAR did, the recipe and
teacher, the training images, the run's results table, the pictures, three ways to load the
student and the dense-head caveat. Everything comes from ``spar_config.json`` and the manifests.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["write_card", "front_matter", "results_table"]

PRETTY = {"voc21": "PASCAL VOC 21", "voc20": "PASCAL VOC 20", "context60": "PASCAL Context 60",
          "context59": "PASCAL Context 59", "ade20k": "ADE20K", "cityscapes": "Cityscapes", "scenes": "mini scenes"}


def write_card(folder: Path, config: dict, rows: Sequence[dict], label: str, *, images: dict, pictures: list[str],
               repo_id: str | None = None, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``folder/README.md``; returns {"results": number of model-index results}."""
    name = (repo_id or "").split("/")[-1] or f"spar-{config['backbone']}"
    meta = front_matter(config, rows, label, name)
    body = _body(config, rows, label, images, pictures, repo_id, notes, name)
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body
    tmp = folder / ".tmp-README.md"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(folder / "README.md")
    return {"results": len(meta["model-index"][0]["results"])}


def front_matter(config: dict, rows: Sequence[dict], label: str, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "library_name": "open_clip" if config["weights_layout"] == "open_clip" else "pytorch",
        "pipeline_tag": "image-feature-extraction",
    }
    if config.get("base_model"):
        meta["base_model"] = config["base_model"]
    meta["tags"] = ["spar", "dense-features", "open-vocabulary-segmentation", "knowledge-distillation",
                    config["family"], "spar-pipeline"]
    if config.get("base_model"):  # a real backbone: distilled on SA-1B images (the recipe's tars)
        meta["datasets"] = ["SA-1B"]
    results = []
    for r in _student_rows(rows, label):
        results.append({
            "task": {"type": "image-segmentation", "name": "Open-vocabulary semantic segmentation"},
            "dataset": {"type": r["dataset"], "name": PRETTY.get(r["dataset"], r["dataset"])},
            "metrics": [{"type": "mean_iou", "value": round(float(r["miou"]), 2), "name": "mIoU (single pass)"}],
        })
    meta["model-index"] = [{"name": name, "results": results}]
    return meta


def _student_rows(rows: Sequence[dict], label: str) -> list[dict]:
    out = [r for r in rows
           if r["model"] == label and r["mode"] == "single" and float(r.get("scale", 1.0) or 1.0) == 1.0]
    return sorted(out, key=lambda r: r["dataset"])


def results_table(rows: Sequence[dict], label: str) -> str:
    """Markdown: one row per model × mode (× stride, scale), one mIoU column per dataset, then the mean."""
    if not rows:
        return ""
    datasets = [d for d in PRETTY if any(r["dataset"] == d for r in rows)]
    datasets += sorted({r["dataset"] for r in rows} - set(datasets))
    grid: dict[tuple, dict[str, float]] = {}
    for r in rows:
        model = "SPAR student (this model)" if r["model"] == label else r["model"]
        mode = r["mode"] if r["mode"] == "single" else f"{r['mode']} s={r['stride']}"
        scale = float(r.get("scale", 1.0) or 1.0)
        if scale != 1.0:
            mode += f" ×{scale:g}"
        grid.setdefault((model, mode), {})[r["dataset"]] = float(r["miou"])
    lines = ["| model | mode | " + " | ".join(PRETTY.get(d, d) for d in datasets) + " | mean |",
             "|---|---|" + "---:|" * (len(datasets) + 1)]
    for (model, mode), cells in grid.items():
        vals = [cells.get(d) for d in datasets]
        mean = sum(vals) / len(vals) if all(v is not None and not math.isnan(v) for v in vals) else None
        fmt = [("" if v is None else f"{v:.2f}") for v in [*vals, mean]]
        lines.append(f"| {model} | {mode} | " + " | ".join(fmt) + " |")
    return "\n".join(lines) + "\n"


def _body(config: dict, rows, label, images: dict, pictures: list[str], repo_id, notes, name) -> str:
    table = results_table(rows, label)
    out = [f"# {name}: a SPAR student of `{config['backbone']}`\n", _intro(config),
           "## Recipe and teacher\n", *_recipe_table(config, images), "",
           "## Training images\n", _training_images(config, images),
           "## Results\n",
           (table + "\nmIoU × 100, open-vocabulary segmentation with the 80 ImageNet prompt templates; "
            "`sliding` is the frozen base model with windows at that stride (the teacher's kind of "
            "inference), `single` one pass over the whole image.\n") if table else
           "No evaluation rows in the run (`spar-pipeline evaluate --run RUN --dataset NAME=PATH` adds them).\n"]
    if pictures:
        out += ["## Pictures\n"] + [f"![{Path(p).stem}]({p})\n" for p in pictures]
        out += ["PCA: first three principal components as RGB, teacher (sliding) left, student (single pass) "
                "right, one basis. Segmentation: the student's single-pass labels over a held-out image.\n"]
    out += ["## How to load it\n", *_loading(config, repo_id or "ORG/NAME")]
    out += ["## The dense head (read this before using the features)\n",
            "The features SPAR trained are not the output of the base model's usual forward. Dense head: "
            f"{config['dense_head']}. Plain open_clip applies its pooled image head instead, so code that "
            "computes dense features itself must apply this head (as SCLIP/NACLIP/ProxyCLIP-style code does "
            "for its own attention variants): take the patch tokens as described, or use `spar_pipeline.load` "
            "and `.dense(x)`. `spar_config.json` records the head, window, patch size and normalisation.\n"]
    if notes:
        out += ["## Notes\n"] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _intro(config: dict) -> str:
    teacher, train = config.get("teacher") or {}, config["recipe"].get("train", {})
    extract = config["recipe"].get("extract", {})
    window = teacher.get("window", extract.get("window", "?"))
    stride = teacher.get("stride", extract.get("stride", "?"))
    return ("SPAR (Single-Pass Any-Resolution ViT, CVPR 2026) distils a vision-language ViT into a student "
            "that, in **one forward pass at any resolution**, produces the dense features that a finely strided "
            f"sliding-window copy of the frozen model produces. The teacher ran windows of {window} px at stride "
            f"{stride} over each training image once and stored its feature map; the student (the same "
            f"architecture, `{train.get('trainable', '?')}` trainable) was trained with a mean-squared error "
            "against those maps, single pass, batch size 1. Text features are unchanged: use the same text tower "
            "and prompts as the base model.\n")


def _recipe_table(config: dict, images: dict) -> list[str]:
    teacher, recipe, student = config.get("teacher") or {}, config["recipe"], config.get("student") or {}
    train = recipe.get("train", {})
    t = {k: teacher.get(k, "?") for k in ("window", "stride", "upsample", "dtype", "digest", "weights")}
    return [
        "| | |", "|---|---|",
        f"| backbone | `{config['backbone']}` ({config['family']}, patch {config['patch_size']}, "
        f"window {config['window']}, dim {config['dim']}) |",
        f"| base model | {config.get('base_model') or 'spar-pipeline built-in weights'} |",
        f"| recipe | `{recipe.get('name')}` (fingerprint `{recipe.get('fingerprint')}`) |",
        f"| teacher | sliding window {t['window']}, stride {t['stride']}, upsample ×{t['upsample']}, stored "
        f"{t['dtype']}; fingerprint `{t['digest']}`, teacher weights `{t['weights']}` |",
        f"| training | {images.get('epochs', '?')} epoch(s) (recipe: {train.get('epochs', '?')}), "
        f"lr {train.get('lr')}, weight decay {train.get('weight_decay')}, precision {train.get('precision')}, "
        f"trainable `{train.get('trainable')}` |",
        f"| held-out teacher MSE | student {_num(student.get('val_mse'))} vs pretrained "
        f"{_num(student.get('baseline_val_mse'))} (best epoch {student.get('epoch', '?')}) |",
        f"| input normalisation | mean {config['mean']}, std {config['std']} (RGB in [0, 1]) |",
        f"| weights digest | `{config['weights_digest']}` |",
    ]


def _training_images(config: dict, images: dict) -> str:
    augment = config["recipe"].get("augment", {})
    tars = images.get("tars") or []
    listed = f" ({', '.join(tars[:4])}{', …' if len(tars) > 4 else ''})" if tars else ""
    ids = f", ids ≤ {images['max_id']}" if images.get("max_id") else ""
    return (f"{images.get('images', '?')} images ({images.get('teacher_maps', '?')} teacher maps) from "
            f"{len(tars)} SA-1B-layout tar(s){listed}{ids}; each augmented once (random resize, scale "
            f"{augment.get('scale')}, ratio {augment.get('ratio_range')}, crop, flip) and the same augmented "
            "image used by teacher and student.\n")


def _loading(config: dict, hub: str) -> list[str]:
    spar = ["```python", "import spar_pipeline", f'model = spar_pipeline.load("hf-hub:{hub}")   # or the folder',
            "feats = model.features(\"photo.jpg\")                  # [h, w, D] float32, SPAR's dense head",
            "labels = model.segment(\"photo.jpg\", [\"background\", \"road\", \"car\", \"sky\"])  # [H, W] class ids",
            "```", ""]
    hubconf = ["```python", "import torch",
               "model = torch.hub.load(\"PATH/TO/spar-pipeline\", \"spar\", \"PATH/TO/THIS/FOLDER\", source=\"local\")",
               "```", ""]
    if config["weights_layout"] == "open_clip":
        first = ["1. **open_clip** (the whole CLIP, both towers):", "", "```python", "import open_clip",
                 f'model = open_clip.create_model("hf-hub:{hub}")        # or "local-dir:PATH/TO/THIS/FOLDER"',
                 f'tokenizer = open_clip.get_tokenizer("hf-hub:{hub}")',
                 f"# code that builds `{config['open_clip_model']}` itself: pretrained=\"open_clip_model.safetensors\"",
                 "```", ""]
    else:
        entry = config.get("dinov3_hub") or {"backbone": "dinov3_vitl16", "dinotxt": ""}
        hub, weights = '"facebookresearch/dinov3"', config["weights"]
        text = ([f'dinotxt, tokenizer = torch.hub.load({hub}, "{entry["dinotxt"]}", '
                 f'weights="DINOTXT_HEAD_AND_TEXT.pth", backbone_weights="{weights}")'] if entry["dinotxt"] else [])
        first = ["1. **facebookresearch/dinov3** (the official backbone layout):", "", "```python", "import torch",
                 f'backbone = torch.hub.load({hub}, "{entry["backbone"]}", weights="{weights}")', *text,
                 "```", "", "Dense features: the backbone's last-layer patch tokens after its final norm; text: "
                 "dims 1024–2047 of the dino.txt text tower (unchanged by SPAR), as SPAR evaluates.", ""]
    return first + ["2. **spar_pipeline** (SPAR's dense head applied):", "", *spar,
                    "3. **torch.hub** from a spar-pipeline checkout:", "", *hubconf]


def _num(v) -> str:
    return "?" if v is None else f"{float(v):.4g}"
