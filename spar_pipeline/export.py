"""The export stage: a run's student as a folder other code loads, with a model card, optionally pushed.

``spar-pipeline export --run R [--student NAME] --out DIR [--push ORG/NAME]`` writes DIR:

- open_clip students (SigLIP2, OpenCLIP/MaskCLIP families): ``open_clip_config.json`` and
  ``open_clip_model.safetensors``, open_clip's own ``local-dir:``/``hf-hub:`` layout written with
  its ``save_config_for_hf`` helper (the same two files its ``save_for_hf`` writes), plus the
  tokenizer files when the tokenizer is a Hugging Face one. ``open_clip.create_model("local-dir:DIR")``
  builds the model with the student's weights;
- DINOv3.txt students: ``dinov3_backbone.pth``, a plain tensor dict in the official
  facebookresearch/dinov3 key layout (fused ``attn.qkv`` with its ``bias_mask``, ``ls1.gamma``,
  ``mlp.fc1``, ``storage_tokens``, RoPE ``periods``), loadable with ``torch.load(weights_only=True)``;
- ``spar_config.json``: what plain open_clip does not apply, SPAR's dense head (backbone name,
  head, window, patch, mean/std), with the teacher fingerprint and the recipe the student came from;
- ``README.md``: the model card (``model_card``), and ``images/``: the run's PCA and segmentation
  pictures when it has them.

The folder is complete before any push; ``--push`` uploads it with ``huggingface_hub`` (token from
``HF_TOKEN`` or a saved login). A push that cannot happen is one line, and the folder stays.
Writing is idempotent: an export into the same folder again replaces its files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from spar_pipeline.errors import SparError, first_line
from spar_pipeline.run import Run

__all__ = ["run", "push", "ExportError", "official_dinov3_state", "DINOV3_WEIGHTS", "DENSE_HEADS"]

log = logging.getLogger(__name__)

DINOV3_WEIGHTS = "dinov3_backbone.pth"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
DENSE_HEADS = {
    "siglip": "siglip2-attention-pool-bypass: trunk, final norm, then per patch token the attention pool's value "
              "projection, its output projection and its residual MLP (v + mlp(norm(v))); no latent query",
    "maskclip": "maskclip: the last block's attention replaced by its value path (x + out_proj(v(ln_1(x))), then the "
                "block's MLP), then ln_post and proj; class token dropped",
    "dinov3": "dinov3-patch-tokens: the backbone's last-layer patch tokens after its final norm; class and register "
              "tokens dropped",
}


class ExportError(SparError, RuntimeError):
    """The export or its push cannot be done as asked; the message says why and what to do."""


def run(run_dir: Run, out: str, *, student: str | None = None, push_to: str | None = None) -> dict[str, Any]:
    """Export ``student`` (default: the run's one student) of ``run`` to the folder ``out``."""
    from spar_pipeline.api import SPAR_CONFIG, resolve_student
    from spar_pipeline.backbones import build, get_spec
    from spar_pipeline.manifest import read_manifest
    from spar_pipeline.model_card import write_card
    from spar_pipeline.recipe import recipe_to_dict

    files = resolve_student(run_dir, student)
    b = build(files.backbone, files.weights)
    spec = get_spec(files.backbone)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if b.family in ("siglip", "maskclip"):
        weights = _write_open_clip(b, spec, folder, notes)
    elif b.family == "dinov3":
        weights = DINOV3_WEIGHTS
        _atomic_torch_save(official_dinov3_state(b), folder / weights)
    else:  # pragma: no cover - every registered family is handled above
        raise ExportError(f"{files.backbone}: no export layout for family {b.family!r}")

    recipe = recipe_to_dict(run_dir.recipe)
    config = {
        "format": "spar-pipeline-export", "format_version": 1,
        "backbone": files.backbone, "family": b.family, "dense_head": DENSE_HEADS[b.family],
        "window": b.window, "patch_size": b.patch_size, "dim": b.dim, "mean": list(b.mean), "std": list(b.std),
        "weights": weights, "weights_layout": "dinov3-official" if b.family == "dinov3" else "open_clip",
        "weights_digest": b.weights_digest,
        "open_clip_model": spec.get("open_clip_model"), "base_model": (spec.get("pretrained") or {}).get("hf_hub"),
        "teacher": files.teacher,
        "recipe": {"name": recipe["recipe"]["name"], "fingerprint": run_dir.recipe.fingerprint,
                   "augment": recipe["augment"], "extract": recipe["extract"], "train": recipe["train"]},
        "student": {"name": files.name, "run": files.run_url, **{k: files.info[k] for k in
                    ("epoch", "step", "val_mse", "baseline_val_mse") if k in files.info}},
    }
    if b.family == "dinov3":  # the official torch.hub entries this file plugs into
        text = spec.get("text_hub_entry", "")
        config["dinov3_hub"] = {"backbone": text.split("_dinotxt")[0] or "dinov3_vitl16", "dinotxt": text}
    _atomic_text(folder / SPAR_CONFIG, json.dumps(config, indent=2) + "\n")

    rows = read_manifest(run_dir, "evaluate").to_pylist() if run_dir.exists("manifests", "evaluate") else []
    images = _training_images(run_dir, files.name)
    pictures = _copy_pictures(run_dir, folder)
    card = write_card(folder, config, rows, files.label, images=images, pictures=pictures, repo_id=push_to,
                      notes=notes)
    report = {"out": str(folder), "backbone": files.backbone, "student": files.name, "weights": weights,
              "results": card["results"], "pictures": len(pictures), "notes": notes}
    if push_to:
        report["pushed"] = push(folder, push_to)
    return report


# ---- layouts ---------------------------------------------------------------------------------
def _write_open_clip(b, spec: dict, folder: Path, notes: list[str]) -> str:
    """open_clip's two files: its config (``save_config_for_hf``) and the model's state dict."""
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    model = b.model
    model_config = open_clip.get_model_config(spec["open_clip_model"])  # build() registered spar-* configs
    if model_config is None:  # pragma: no cover - build() would have failed first
        raise ExportError(f"{b.name}: open_clip has no config {spec['open_clip_model']!r}")
    visual = model.visual
    saved = visual.image_mean, visual.image_std
    visual.image_mean, visual.image_std = b.mean, b.std  # the preprocess the model was trained with
    try:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            save_config_for_hf(model, Path(tmp, OPEN_CLIP_CONFIG), model_config=model_config)
            state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(Path(tmp, OPEN_CLIP_WEIGHTS)))
            tokenizer = getattr(b, "tokenizer", None)
            if hasattr(tokenizer, "save_pretrained"):  # HF tokenizers: open_clip's local-dir reads them here
                tokenizer.save_pretrained(tmp)
            elif (model_config.get("text_cfg") or {}).get("hf_tokenizer_name"):
                notes.append(f"tokenizer not included ({model_config['text_cfg']['hf_tokenizer_name']} is not in "
                             "the local Hugging Face cache): open_clip's local-dir text side needs its files here")
            for p in Path(tmp).iterdir():
                p.chmod(0o644)  # safetensors writes 0600; the folder is for sharing
                os.replace(p, folder / p.name)
    finally:
        visual.image_mean, visual.image_std = saved
    if "timm_trunk" in spec:
        notes.append(f"the vision trunk is a spar-pipeline test architecture: `import spar_pipeline.backbones` and "
                     f"build('{b.name}') once (it registers the trunk with timm) before open_clip.create_model")
    return OPEN_CLIP_WEIGHTS


def official_dinov3_state(b) -> dict[str, torch.Tensor]:
    """A Dinov3Backbone's weights in facebookresearch/dinov3's key layout (the inverse of its
    ``adapt_state``): q/k/v fused into ``attn.qkv`` with a zero key bias masked by ``bias_mask``."""
    m = b.model
    cfg = m.config
    D, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = D // heads
    emb = m.embeddings

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu").clone().contiguous()

    out = {"cls_token": t(emb.cls_token), "mask_token": t(emb.mask_token).reshape(1, D),
           "storage_tokens": t(emb.register_tokens),
           "patch_embed.proj.weight": t(emb.patch_embeddings.weight), "patch_embed.proj.bias": t(emb.patch_embeddings.bias),
           "rope_embed.periods": float(cfg.rope_theta) ** (2 * torch.arange(head_dim // 4, dtype=torch.float32)
                                                           / (head_dim // 2)),
           "norm.weight": t(m.norm.weight), "norm.bias": t(m.norm.bias)}
    for i, layer in enumerate(m.model.layer):
        a, p = layer.attention, f"blocks.{i}"
        out[f"{p}.attn.qkv.weight"] = t(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        if a.q_proj.bias is not None:
            k_bias = a.k_proj.bias if a.k_proj.bias is not None else torch.zeros(D)
            out[f"{p}.attn.qkv.bias"] = t(torch.cat([a.q_proj.bias, k_bias, a.v_proj.bias]))
            out[f"{p}.attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D) if a.k_proj.bias is None
                                                        else torch.ones(D), torch.ones(D)])
        out[f"{p}.attn.proj.weight"], out[f"{p}.attn.proj.bias"] = t(a.o_proj.weight), t(a.o_proj.bias)
        for n in (1, 2):
            out[f"{p}.ls{n}.gamma"] = t(getattr(layer, f"layer_scale{n}").lambda1)
            norm = getattr(layer, f"norm{n}")
            out[f"{p}.norm{n}.weight"], out[f"{p}.norm{n}.bias"] = t(norm.weight), t(norm.bias)
        out[f"{p}.mlp.fc1.weight"], out[f"{p}.mlp.fc1.bias"] = t(layer.mlp.up_proj.weight), t(layer.mlp.up_proj.bias)
        out[f"{p}.mlp.fc2.weight"], out[f"{p}.mlp.fc2.bias"] = t(layer.mlp.down_proj.weight), t(layer.mlp.down_proj.bias)
    return out


# ---- what the card shows ---------------------------------------------------------------------
def _training_images(run: Run, name: str = "default") -> dict[str, Any]:
    """Counts and sources of the images student ``name`` was distilled on (from the manifests)."""
    from spar_pipeline.manifest import read_manifest

    info: dict[str, Any] = {"max_id": run.recipe.ingest.max_id}
    student = run.student(name)
    teacher = run.teacher((student.settings or {}).get("teacher", "default"))
    if teacher.exists("manifests", "extract"):
        info["teacher_maps"] = len(read_manifest(teacher, "extract"))
    if run.exists("manifests", "ingest"):
        rows = read_manifest(run, "ingest").to_pylist()
        ok = [r for r in rows if r.get("status") == "ok"]
        info["images"] = len(ok)
        info["tars"] = sorted({str(r["source"]).rsplit("/", 1)[-1] for r in ok if r.get("source")})
    if student.exists("manifests", "train"):
        train = read_manifest(student, "train").to_pylist()
        info["epochs"] = len(train)
    return info


def _copy_pictures(run: Run, folder: Path) -> list[str]:
    """The run's PCA and segmentation pictures copied to ``folder/images/``; their relative paths."""
    found = []
    for pattern in ("pca_*.png", "segmentation_*.png"):
        found += sorted(run.fs.glob(run.path("reports", pattern)))
    out = []
    for path in found:
        name = path.rsplit("/", 1)[-1]
        (folder / "images").mkdir(exist_ok=True)
        _atomic_bytes(folder / "images" / name, run.fs.cat_file(path))
        out.append(f"images/{name}")
    return out


# ---- the Hub ---------------------------------------------------------------------------------
def push(folder: str | os.PathLike, repo_id: str, token: str | None = None) -> str:
    """Upload ``folder`` to the model repository ``repo_id``; returns its URL. One-line errors, the
    folder untouched; the token never appears in them."""
    from huggingface_hub import HfApi, get_token

    keep = f"the exported folder {folder} is complete; upload it later with `hf upload {repo_id} {folder}`"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"--push {repo_id!r}: expected ORG/NAME, e.g. --push my-org/spar-siglip2-b16")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ExportError(f"--push {repo_id}: the Hub is offline (HF_HUB_OFFLINE is set); {keep}")
    token = token or get_token()
    if not token:
        raise ExportError(f"--push {repo_id}: no Hugging Face token (set HF_TOKEN or run `hf auth login`); {keep}")
    try:
        api = HfApi(token=token)
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="spar-pipeline export")
    except Exception as e:  # no network, refused, unauthorised: all told the same way
        reason = first_line(e, typed=True).replace(token, "***")
        raise ExportError(f"--push {repo_id}: upload failed ({reason}); {keep}") from None
    return str(url)


# ---- writing -----------------------------------------------------------------------------------
def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    _atomic_bytes(path, text.encode())


def _atomic_torch_save(state: dict, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(state, tmp)
    os.replace(tmp, path)
