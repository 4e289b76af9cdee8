"""The student leaves the pipeline: an exported folder open_clip loads, ``spar_pipeline.load``,
torch.hub, the model card, the Hub (offline, real clients), and the DINOv3 official layout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import spar_pipeline
from spar_pipeline import export
from spar_pipeline.api import LoadError, resolve_student, split_student
from spar_pipeline.backbones import build
from spar_pipeline.errors import SparError
from spar_pipeline.run import Run

from _cli import EXE  # tests/ is on sys.path (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]


def _trained_run(workdir: Path) -> Run:
    """A tiny-cpu run trained for one epoch, evaluated (single pass; timed on a small image) and with a
    PCA and a segmentation picture in RUN/reports/ named as the run's held-out look names them."""
    from spar_pipeline import augment, evaluate, extract, ingest, pictures, train
    from spar_pipeline.datasets import make_synthetic
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source

    make_sa1b_source(workdir / "src", n_tars=1, per_tar=4, seed=3)
    run = Run(str(workdir / "run"))
    run.resolve_recipe("tiny-cpu")
    ingest.run(run, [str(workdir / "src" / "*.tar")])
    augment.run(run)
    extract.run(run, workers=1, progress=False)
    train.run(run, epochs=1, progress=False)
    data = make_synthetic("cityscapes", workdir / "data", n=2, size=(64, 128))
    evaluate.run(run, {"cityscapes": str(data / "cityscapes")}, checkpoints=["pretrained", "best"],
                 timing_size=(64, 128))
    image = workdir / "held_out.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(image)
    pictures.pca_image(str(image), run.path("reports", "pca_3.png"), run=run, checkpoint="best", stride=32)
    pictures.segment_image(str(image), ["background", "sky", "road"], run.path("reports", "segmentation_3.png"),
                           run=run, checkpoint="best")
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run = _trained_run(tmp)
    report = export.run(run, str(tmp / "out"))
    return run, tmp / "out", report


def _x(h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_open_clip_loads_the_folder_with_the_students_weights(exported):
    import open_clip
    from safetensors.torch import load_file

    run, out, report = exported
    assert {"open_clip_config.json", "open_clip_model.safetensors", "spar_config.json", "README.md"} <= set(os.listdir(out))
    model = open_clip.create_model(f"local-dir:{out}")
    student = load_file(run.student().path("checkpoints", "best_open_clip.safetensors"))
    got = model.state_dict()
    assert set(got) == set(student)
    for k, v in student.items():
        assert torch.equal(got[k], v), k
    pretrained = build("tiny-siglip").model.state_dict()  # the export is the student, not the base model
    assert any(not torch.equal(got[k], pretrained[k]) for k in got)
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5] and config["model_cfg"]["embed_dim"] == 64
    spar = json.loads((out / "spar_config.json").read_text())
    assert spar["backbone"] == "tiny-siglip" and spar["window"] == 64 and spar["patch_size"] == 16
    assert spar["teacher"]["stride"] == 24 and spar["recipe"]["name"] == "tiny-cpu"
    assert "attention-pool" in spar["dense_head"] and report["weights"] == "open_clip_model.safetensors"


def test_load_gives_the_best_checkpoints_dense_features(exported, tmp_path):
    run, out, _ = exported
    reference = build("tiny-siglip", run.student().path("checkpoints", "best.safetensors"))
    x = _x()
    with torch.no_grad():
        want = reference.dense(x)
        for source, kw in ((str(out), {}), (run.url, {}), (f"{run.url}:default", {}),
                           (run.student().path("checkpoints", "best.safetensors"), {"backbone": "tiny-siglip"})):
            model = spar_pipeline.load(source, **kw)
            assert (model.dense(x) - want).abs().max().item() <= 1e-6, source
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 100, 3), dtype=np.uint8))
    image.save(tmp_path / "photo.png")
    feats = model.features(image)
    assert feats.shape == (5, 7, 64) and feats.dtype == torch.float32
    assert torch.allclose(model.features(tmp_path / "photo.png"), feats, atol=1e-6)  # a path decodes the same
    assert model.features(image, mode="sliding", stride=24).shape == (4, 6, 64)  # snapped to 64×96 first
    labels = model.segment(str(tmp_path / "photo.png"), ["background", "sky", "road"])
    assert labels.shape == (70, 100) and labels.dtype == np.int64 and set(np.unique(labels)) <= {0, 1, 2}


def test_sources_that_name_nothing_are_one_line(exported, tmp_path):
    run, _, _ = exported
    with pytest.raises(SparError, match="no student 'nosuch'.*default"):
        resolve_student(run, "nosuch")
    with pytest.raises(LoadError, match="needs the backbone"):
        spar_pipeline.load(run.student().path("checkpoints", "best.safetensors"))
    with pytest.raises(LoadError, match="not an exported folder"):
        spar_pipeline.load(str(tmp_path / "nothing"))
    assert split_student("runs/x:s1") == ("runs/x", "s1")
    assert split_student("s3://bucket/run") == ("s3://bucket/run", None)
    assert split_student("C:\\runs\\x") == ("C:\\runs\\x", None)


def test_model_card_front_matter_parses_and_names_the_results(exported):
    from spar_pipeline.manifest import read_manifest

    run, out, report = exported
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "open_clip" and "spar" in meta["tags"]
    row = next(r for r in read_manifest(run, "evaluate").to_pylist() if r["model"] == "best")
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["type"] == "cityscapes" and result["task"]["type"] == "image-segmentation"
    assert result["metrics"][0]["value"] == pytest.approx(row["miou"], abs=0.006) and report["results"] == 1
    body = text.split("---\n", 2)[2]
    assert "| SPAR student (this model) | single |" in body and "| pretrained | single |" in body
    assert f"{row['miou']:.2f}" in body and "stride 24" in body and "4 images" in body
    pictures = [line[line.index("(") + 1:-1] for line in body.splitlines() if line.startswith("![")]
    assert len(pictures) == 2 and all((out / p).is_file() for p in pictures)
    for p in pictures:
        with Image.open(out / p) as im:
            assert im.format == "PNG" and im.size[0] > 0
    for needle in ("open_clip.create_model", "spar_pipeline.load", "torch.hub.load", "dense head"):
        assert needle in body, needle


def test_torch_hub_local_loads_the_same_student(exported):
    _, out, _ = exported
    model = torch.hub.load(str(REPO), "spar", str(out), source="local")
    with torch.no_grad():
        assert torch.equal(model.dense(_x()), spar_pipeline.load(str(out)).dense(_x()))
    assert hasattr(model, "segment") and model.name == "tiny-siglip"


def test_hf_hub_source_reads_the_local_cache_and_says_so_offline(exported, tmp_path, monkeypatch):
    """The real huggingface_hub client on a cache laid out as the Hub leaves it; nothing is downloaded."""
    from huggingface_hub import constants

    _, out, _ = exported
    repo = tmp_path / "hub" / "models--spar-org--tiny-student"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in out.iterdir():
        if f.is_file():
            (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = spar_pipeline.load("hf-hub:spar-org/tiny-student")
    with torch.no_grad():
        assert torch.equal(model.dense(_x()), spar_pipeline.load(str(out)).dense(_x()))
    with pytest.raises(LoadError) as e:
        spar_pipeline.load("hf-hub:spar-org/not-cached")
    assert "not in the local Hugging Face cache" in str(e.value) and "\n" not in str(e.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def test_push_without_network_fails_in_one_line_and_the_folder_stays(exported, tmp_path):
    run, _, _ = exported
    out = tmp_path / "pushed"
    secret = "hf_thisIsNotARealTokenButMustNeverBePrinted"
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_TOKEN=secret, HF_HUB_OFFLINE="0",
               COLUMNS="200")
    res = subprocess.run([EXE, "export", "--run", run.url, "--out", str(out), "--push", "spar-org/tiny-student"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--push spar-org/tiny-student" in errors[0] and "upload failed" in errors[0]
    assert "Traceback" not in res.stderr and secret not in res.stdout + res.stderr
    assert {"open_clip_config.json", "open_clip_model.safetensors", "spar_config.json", "README.md"} <= set(os.listdir(out))
    with pytest.raises(export.ExportError, match="no Hugging Face token|offline"):  # the in-process door, offline
        export.push(out, "spar-org/tiny-student")


def test_dinov3_students_export_in_the_official_layout(tmp_path):
    """The exporter's official keys equal the independently written upstream layout, and load back."""
    from _dinov3_layout import official_state, tiny_dinov3  # tests/ is on sys.path (tests/conftest.py)

    from spar_pipeline.backbones import _load_into, load_state

    source, target = tiny_dinov3(0), tiny_dinov3(1)
    state = export.official_dinov3_state(source)
    upstream = official_state(source)
    assert set(state) == set(upstream)
    for k, v in upstream.items():
        assert state[k].shape == v.shape, k
        if not k.startswith("rope_embed") and not k.endswith("attn.qkv.bias"):
            assert torch.equal(state[k], v), k
    path = tmp_path / export.DINOV3_WEIGHTS
    torch.save(state, path)
    _load_into(target, load_state(str(path)), str(path))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(target.dense(x), source.dense(x), atol=1e-6, rtol=1e-6)


def test_plain_open_clip_in_a_fresh_process_loads_a_tiny_clip_export(tmp_path):
    """tiny-clip is a stock open_clip VisionTransformer: a process that imports only open_clip loads it."""
    from safetensors.torch import save_file

    recipe = (REPO / "stages" / "tiny-cpu.toml").read_text().replace('backbone = "tiny-siglip"', 'backbone = "tiny-clip"')
    (tmp_path / "tiny-clip.toml").write_text(recipe)
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe(str(tmp_path / "tiny-clip.toml"))
    student = build("tiny-clip")
    with torch.no_grad():
        for p in student.blocks()[-1].parameters():
            p.add_(0.01)  # a "trained" last block
    os.makedirs(run.student().checkpoints)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, run.student().best_weights)
    save_file({k: v.contiguous() for k, v in student.model.state_dict().items()}, str(tmp_path / "want.safetensors"))
    report = export.run(run, str(tmp_path / "out"))
    assert report["results"] == 0 and report["pictures"] == 0 and not report["notes"]
    code = ("import sys, open_clip, torch; from safetensors.torch import load_file; "
            "m = open_clip.create_model('local-dir:' + sys.argv[1]); want = load_file(sys.argv[2]); "
            "got = m.state_dict(); assert set(got) == set(want); "
            "assert all(torch.equal(got[k], want[k]) for k in want); "
            "assert 'spar_pipeline' not in sys.modules; print('ok', len(want))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path / "want.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr
    with torch.no_grad():
        assert torch.equal(spar_pipeline.load(str(tmp_path / "out")).dense(_x()), student.dense(_x()))


def test_model_card_of_a_dinov3_student_names_the_official_entries(tmp_path):
    from spar_pipeline.model_card import write_card

    config = {"backbone": "dinov3txt-l16", "family": "dinov3", "weights_layout": "dinov3-official",
              "weights": export.DINOV3_WEIGHTS, "base_model": "facebook/dinov3-vitl16-pretrain-lvd1689m",
              "dense_head": export.DENSE_HEADS["dinov3"], "window": 384, "patch_size": 16, "dim": 1024,
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "weights_digest": "0" * 16,
              "dinov3_hub": {"backbone": "dinov3_vitl16", "dinotxt": "dinov3_vitl16_dinotxt_tet1280d20h24l"},
              "teacher": {"window": 384, "stride": 24}, "recipe": {"name": "dinov3txt-l16", "train": {}},
              "student": {}}
    rows = [{"model": "s1", "mode": "single", "stride": 0, "dataset": "voc21", "miou": 61.234},
            {"model": "pretrained", "mode": "sliding", "stride": 24, "dataset": "voc21", "miou": 58.0}]
    assert write_card(tmp_path, config, rows, "s1", images={}, pictures=[], repo_id="org/spar-dinov3")["results"] == 1
    text = (tmp_path / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "pytorch" and meta["base_model"] == config["base_model"]
    assert meta["datasets"] == ["SA-1B"] and meta["model-index"][0]["name"] == "spar-dinov3"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 61.23
    assert 'torch.hub.load("facebookresearch/dinov3", "dinov3_vitl16", weights="dinov3_backbone.pth")' in text
    assert 'backbone_weights="dinov3_backbone.pth"' in text and "| pretrained | sliding s=24 |" in text
