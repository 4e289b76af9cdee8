"""augmentation + augment stage: the reference rules (branches by hand, 2000-draw stats), purity, pixels, resume."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spar_pipeline import augment, manifest
from spar_pipeline.augmentation import Draw, apply, augmented_image, draw
from spar_pipeline.recipe import load_recipe
from spar_pipeline.run import Run

PAPER = load_recipe("siglip2-b16").augment
EXTENDED = load_recipe("siglip2-b16-extended").augment
N_DRAWS = 2000


def _cfg(**changes):
    return dataclasses.replace(PAPER, **changes)


# ---- hand-computed branches (numbers derived from the reference rules, docs/reference.md) ----------

def test_upscale_branch_by_hand():
    # source 1000×1333 (h×w), r fixed at 0.3: target (int(2048·0.3), int(1024·0.3)) = (614, 307);
    # s = min(614/1333 = 0.4606, 307/1000 = 0.307) = 0.307; new size int(1333·0.307+0.5) = int(409.73) = 409,
    # int(1000·0.307+0.5) = 307. Short side 307 < 512 → upscale: w = max(int(409·512/307) = int(682.1), 512) = 682
    # → floor-16 672; h = max(int(307·512/307), 512) = 512. No crop, no random draw for it.
    d = draw(0, 7, 1000, 1333, _cfg(ratio_range=(0.3, 0.3), prob_flip=1.0))
    assert d == Draw(src_height=1000, src_width=1333, resized_height=307, resized_width=409, mode="upscale",
                     crop_top=0, crop_left=0, crop_height=307, crop_width=409, flip=True, height=512, width=672)


def test_upscale_branch_computes_the_scale_first():
    # Found by brute force over r on a 2250×1500 source: r = 0.383 → target (784, 392); s = 392/1500;
    # resized 588×392. The reference's int(588 · (512/392)) = int(767.9999999999999) = 767 → 752, while
    # int(588 · 512 / 392) = int(768.0) = 768 would keep 768: the two orders differ by 16 px here.
    assert int(588 * (512 / 392)) == 767 and int(588 * 512 / 392) == 768
    d = draw(0, 7, 1500, 2250, _cfg(ratio_range=(0.383, 0.383)))
    assert (d.mode, d.resized_width, d.resized_height) == ("upscale", 588, 392)
    assert (d.width, d.height) == (752, 512)


def test_full_branch_by_hand():
    # r = 0.7: target (int(1433.6), int(716.8)) = (1433, 716); s = min(1433/1333 = 1.075, 716/1000) = 0.716;
    # new size (int(954.43+0.5), int(716+0.5)) = (954, 716). Short 716 ≥ 512; prob_crop 0 → random() > 0 → full:
    # squash to (16·⌊954/16⌋, 16·⌊716/16⌋) = (944, 704).
    d = draw(0, 7, 1000, 1333, _cfg(ratio_range=(0.7, 0.7), prob_crop=0.0, prob_flip=0.0))
    assert d == Draw(src_height=1000, src_width=1333, resized_height=716, resized_width=954, mode="full",
                     crop_top=0, crop_left=0, crop_height=716, crop_width=954, flip=False, height=704, width=944)


def test_crop_branch_by_hand():
    # Same resize (716×954). prob_crop 1 → always crop. crop_min_frac 1: randint(716, 716) inclusive = 716 → 704,
    # randint(954, 954) = 954 → 944. Offsets uniform over [0, 716−704 = 12] and [0, 954−944 = 10], both inclusive.
    cfg = _cfg(ratio_range=(0.7, 0.7), prob_crop=1.0, crop_min_frac=1.0)
    draws = [draw(0, i, 1000, 1333, cfg) for i in range(400)]
    for d in draws:
        assert (d.mode, d.resized_height, d.resized_width) == ("crop", 716, 954)
        assert (d.crop_height, d.crop_width, d.height, d.width) == (704, 944, 704, 944)
    assert {d.crop_top for d in draws} == set(range(13))
    assert {d.crop_left for d in draws} == set(range(11))


def test_crop_sizes_clamp_to_min_side_by_hand():
    # 716×954 with crop_min_frac 0.4: crop_h = randint(⌊286.4⌋ = 286, 716) → max(·, 512) → floor-16.
    # It is 512 when randint ≤ 527: P = (527−286+1)/(716−286+1) = 242/431 = 0.561.
    # crop_w = randint(⌊381.6⌋ = 381, 954): 512 when ≤ 527: P = 147/574 = 0.256. Largest: 704 and 944.
    cfg = _cfg(ratio_range=(0.7, 0.7), prob_crop=1.0)
    draws = [draw(3, i, 1000, 1333, cfg) for i in range(N_DRAWS)]
    hs, ws = np.array([d.crop_height for d in draws]), np.array([d.crop_width for d in draws])
    assert abs((hs == 512).mean() - 242 / 431) < 0.04
    assert abs((ws == 512).mean() - 147 / 574) < 0.04
    assert hs.min() == 512 and hs.max() == 704 and ws.min() == 512 and ws.max() == 944
    assert (hs % 16 == 0).all() and (ws % 16 == 0).all()
    for d in draws:
        assert 0 <= d.crop_top <= 716 - d.crop_height and 0 <= d.crop_left <= 954 - d.crop_width


def test_degenerate_sizes_raise():
    tiny = load_recipe("tiny-cpu").augment
    with pytest.raises(ValueError, match="too extreme"):
        draw(0, 1, 2, 5000, tiny)  # the short side rounds to 0 pixels
    with pytest.raises(ValueError, match="empty"):
        draw(0, 1, 0, 100, tiny)


# ---- statistics over ≥ 2000 draws of 1500×2250 sources -------------------------------------

def _check_valid(d: Draw, cfg) -> None:
    assert d.height % cfg.snap == 0 and d.width % cfg.snap == 0, d
    assert d.height >= cfg.min_side and d.width >= cfg.min_side, d
    assert 0 <= d.crop_top and d.crop_top + d.crop_height <= d.resized_height, d
    assert 0 <= d.crop_left and d.crop_left + d.crop_width <= d.resized_width, d
    if d.mode == "crop":
        assert (d.crop_height, d.crop_width) == (d.height, d.width), d
    else:
        assert (d.crop_top, d.crop_left, d.crop_height, d.crop_width) == (0, 0, d.resized_height, d.resized_width)
    if d.mode == "full":
        assert (d.height, d.width) == (d.resized_height // 16 * 16, d.resized_width // 16 * 16), d


def test_paper_statistics_1500x2250():
    draws = [draw(0, i, 1500, 2250, PAPER) for i in range(N_DRAWS)]
    modes = [d.mode for d in draws]
    assert abs(modes.count("crop") / N_DRAWS - 0.5) < 0.05
    assert modes.count("upscale") == 0  # short side int(1024r) ≥ 512 for 3:2 sources
    assert abs(sum(d.flip for d in draws) / N_DRAWS - 0.5) < 0.05
    short = np.array([min(d.resized_height, d.resized_width) for d in draws])
    assert short.min() >= 512 and short.max() < 1024
    assert abs(short.mean() - 767.5) < 15  # int(1024r), r ~ U[0.5, 1)
    for d in draws:
        _check_valid(d, PAPER)
        # keep ratio: the long side is the 3:2 image's, int(2250·s + 0.5) with s = short/1500
        assert abs(d.resized_width - 1.5 * d.resized_height) <= 1, d


def test_extended_statistics_stay_valid():
    draws = [draw(0, i, 1500, 2250, EXTENDED) for i in range(N_DRAWS)]
    for d in draws:
        _check_valid(d, EXTENDED)
        assert max(d.resized_height, d.resized_width) <= 2560
    # long side int(2560r), short = 2/3 of it: < 512 (upscale) when r < 0.3, i.e. 0.1/0.8 of draws
    modes = [d.mode for d in draws]
    assert abs(modes.count("upscale") / N_DRAWS - 0.125) < 0.03
    rest = N_DRAWS - modes.count("upscale")
    assert abs(modes.count("crop") / rest - 0.5) < 0.05


# ---- purity -----------------------------------------------------------------------------------

def test_draw_is_pure_in_seed_and_id():
    ids = list(range(300))
    first = {i: draw(0, i, 1500, 2250, PAPER) for i in ids}
    random.seed(123)
    np.random.seed(123)  # global generators play no part
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    again = {i: draw(0, i, 1500, 2250, PAPER) for i in shuffled}
    assert again == first
    other_seed = {i: draw(1, i, 1500, 2250, PAPER) for i in ids}
    assert sum(other_seed[i] != first[i] for i in ids) > 0.9 * len(ids)
    assert len({(d.mode, d.resized_height, d.crop_top, d.crop_left, d.flip) for d in first.values()}) > 250


# ---- apply ---------------------------------------------------------------------------------

def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def test_apply_pixels_by_hand():
    img = _image(1000, 1333)
    up = draw(0, 7, 1000, 1333, _cfg(ratio_range=(0.3, 0.3), prob_flip=0.0))
    assert torch.equal(apply(img, up), _chw(_resize(_resize(img, 409, 307), 672, 512)))
    full = draw(0, 7, 1000, 1333, _cfg(ratio_range=(0.7, 0.7), prob_crop=0.0, prob_flip=0.0))
    assert torch.equal(apply(img, full), _chw(_resize(_resize(img, 954, 716), 944, 704)))
    crop = draw(0, 7, 1000, 1333, _cfg(ratio_range=(0.7, 0.7), prob_crop=1.0, crop_min_frac=1.0, prob_flip=0.0))
    t, left = crop.crop_top, crop.crop_left
    assert torch.equal(apply(img, crop), _chw(_resize(img, 954, 716)[t:t + 704, left:left + 944]))


def test_apply_shapes_flip_and_channel_order():
    tiny = load_recipe("tiny-cpu").augment
    img = _image(160, 240, seed=1)
    draws = [draw(0, i, 160, 240, tiny) for i in range(60)] + [draw(0, i, 160, 240, dataclasses.replace(
        tiny, ratio_range=(0.2, 0.4))) for i in range(10)]
    assert {d.mode for d in draws} == {"upscale", "full", "crop"}
    for d in draws:
        out = apply(img, d)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, d.height, d.width)
        flipped = apply(img, dataclasses.replace(d, flip=not d.flip))
        assert torch.equal(flipped, out.flip(-1))
        assert not torch.equal(flipped, out)  # the image is not mirror-symmetric
    # mmcv resizes BGR; bilinear works per channel, so RGB in gives the same pixels
    d = draws[0]
    assert torch.equal(apply(np.ascontiguousarray(img[..., ::-1]), d), apply(img, d).flip(0))
    big = _image(1500, 2250, seed=2)
    for i in range(4):
        d = draw(0, i, 1500, 2250, PAPER)
        assert tuple(apply(big, d).shape) == (3, d.height, d.width)


def test_apply_refuses_another_source_size():
    d = draw(0, 1, 160, 240, load_recipe("tiny-cpu").augment)
    with pytest.raises(ValueError, match="draw was made for 240×160"):
        apply(_image(161, 240), d)
    with pytest.raises(ValueError, match="uint8 RGB"):
        apply(_image(160, 240).astype(np.float32), d)


# ---- the stage on a real run ---------------------------------------------------------------

IDS = list(range(1, 13))


def _size(i: int) -> tuple[int, int]:
    return (240, 160) if i % 3 else (400, 100)  # every third image is wide enough to need the upscale branch


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder with its ingest manifest (no augment rows) and its tar; copied per test."""
    from spar_pipeline import ingest
    from spar_pipeline.mini.sa1b_writer import make_sa1b_tar

    tmp = tmp_path_factory.mktemp("augment")
    tar = make_sa1b_tar(tmp / "src" / "sa_000000.tar", IDS, size=_size, seed=3)
    run = Run(str(tmp / "ingested"))
    run.resolve_recipe("tiny-cpu")
    report = ingest.run(run, [str(tar)])
    assert report["ok"] == len(IDS)
    return tmp / "ingested", tar


def _fresh_run(ingested, dest: Path) -> Run:
    shutil.copytree(ingested[0], dest)
    return Run(str(dest))


@pytest.fixture(scope="module")
def augmented(ingested, tmp_path_factory) -> Run:
    run = _fresh_run(ingested, tmp_path_factory.mktemp("aug") / "run")
    report = augment.run(run)
    assert (report["done"], report["rejected"]) == (len(IDS), 0)
    return run


def _rows(run: Run) -> list[dict]:
    return sorted(manifest.read_manifest(run, "augment").to_pylist(), key=lambda r: r["image_id"])


def test_stage_rows_are_the_draws(augmented):
    rows = _rows(augmented)
    assert [r["image_id"] for r in rows] == IDS
    seed, cfg = augmented.recipe.recipe.seed, augmented.recipe.augment
    for r in rows:
        w, h = _size(r["image_id"])
        assert r["status"] == "ok" and r["reason"] == ""
        assert Draw(**{k: r[k] for k in Draw.__dataclass_fields__}) == draw(seed, r["image_id"], h, w, cfg)
    assert {r["mode"] for r in rows} == {"upscale", "full", "crop"}
    assert augment.run(augmented)["done"] == 0  # rerun does nothing


def _member_pixels(tar: Path, image_id: int) -> np.ndarray:
    with tarfile.open(tar) as tf:
        data = tf.extractfile(f"sa_{image_id}.jpg").read()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_augmented_image_is_apply_of_the_member(augmented, ingested):
    rows = {r["image_id"]: r for r in _rows(augmented)}
    for i in IDS:
        d = Draw(**{k: rows[i][k] for k in Draw.__dataclass_fields__})
        out = augmented_image(augmented, i)
        assert torch.equal(out, apply(_member_pixels(ingested[1], i), d))
        assert torch.equal(augmented_image(augmented.url, i), out)  # a URL string works too
    with pytest.raises(KeyError, match="no ok augment row"):
        augmented_image(augmented, 999)


_CHILD = """
import hashlib, json, sys
from spar_pipeline.augmentation import augmented_image
out = {}
for i in json.loads(sys.argv[2]):
    t = augmented_image(sys.argv[1], i)
    out[i] = [list(t.shape), str(t.dtype), hashlib.sha256(t.numpy().tobytes()).hexdigest()]
print(json.dumps(out))
"""


def _digest(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype), hashlib.sha256(t.numpy().tobytes()).hexdigest()]


def test_two_processes_produce_identical_pixels(augmented):
    args = [sys.executable, "-c", _CHILD, augmented.url]
    procs = [subprocess.Popen(args + [json.dumps(order)], stdout=subprocess.PIPE, text=True)
             for order in (IDS, IDS[::-1])]  # different processes, different orders
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    here = {str(i): _digest(augmented_image(augmented, i)) for i in IDS}
    assert outs[0] == here


def test_resume_after_limit_and_after_a_kill(ingested, tmp_path, monkeypatch):
    one_shot = _fresh_run(ingested, tmp_path / "one")
    assert augment.run(one_shot)["done"] == len(IDS)
    expected = _rows(one_shot)

    limited = _fresh_run(ingested, tmp_path / "limited")
    assert augment.run(limited, limit=5)["done"] == 5
    assert len(_rows(limited)) == 5
    assert augment.run(limited)["done"] == len(IDS) - 5
    assert augment.run(limited)["done"] == 0
    assert _rows(limited) == expected

    # killed after its first part: parts of PART_ROWS rows, the second write never happens
    monkeypatch.setattr(augment, "PART_ROWS", 4)
    real_write = manifest.write_part
    calls = []

    def dying_write(run, stage, rows, name=None):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_write(run, stage, rows, name)

    killed = _fresh_run(ingested, tmp_path / "killed")
    monkeypatch.setattr(manifest, "write_part", dying_write)
    with pytest.raises(KeyboardInterrupt):
        augment.run(killed)
    monkeypatch.setattr(manifest, "write_part", real_write)
    assert len(_rows(killed)) == 4
    assert augment.run(killed)["done"] == len(IDS) - 4
    assert _rows(killed) == expected
    parts = sorted((tmp_path / "killed" / "manifests" / "augment").glob("part-*.parquet"))
    assert len(parts) == 3 and all(pq.read_metadata(p).num_rows <= 4 for p in parts)


def test_impossible_sizes_are_rejected_with_a_reason(ingested, tmp_path):
    run = _fresh_run(ingested, tmp_path / "run")
    bad = dict(source="file:///nowhere.tar", member="sa_x.jpg", offset=0, size=1, checksum="", status="ok", reason="")
    manifest.write_part(run, "ingest", [dict(bad, image_id=100, width=0, height=160),
                                        dict(bad, image_id=101, width=5000, height=2)])
    report = augment.run(run)
    assert (report["done"], report["rejected"]) == (len(IDS), 2)
    rows = {r["image_id"]: r for r in _rows(run)}
    assert rows[100]["status"] == "rejected" and "empty" in rows[100]["reason"]
    assert rows[101]["status"] == "rejected" and "too extreme" in rows[101]["reason"]
    assert augment.run(run)["done"] == 0  # rejected rows are final
    with pytest.raises(KeyError):
        augmented_image(run, 101)


def test_exif_orientation_6_is_turned_in_ingest_and_augment(tmp_path):
    """As the reference's OpenCV decode: a 240×160 JPEG tagged orientation 6 is a 160×240 image."""
    from spar_pipeline import ingest
    from spar_pipeline.mini.sa1b_writer import make_sa1b_tar

    tar = make_sa1b_tar(tmp_path / "sa_000000.tar", [1, 2], size=(240, 160), seed=5, bad={2: "exif_rotated"})
    with tarfile.open(tar) as tf:
        data = tf.extractfile("sa_2.jpg").read()
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6  # PIL itself leaves the pixels as stored
    run = Run(str(tmp_path / "run"))
    run.resolve_recipe("tiny-cpu")
    ingest.run(run, [str(tar)])
    augment.run(run)
    ing = {r["image_id"]: r for r in manifest.read_manifest(run, "ingest").to_pylist()}
    rows = {r["image_id"]: r for r in _rows(run)}
    assert (ing[1]["width"], ing[1]["height"]) == (240, 160) and (ing[2]["width"], ing[2]["height"]) == (160, 240)
    assert (rows[2]["src_width"], rows[2]["src_height"]) == (160, 240) and rows[2]["status"] == "ok"
    turned = np.ascontiguousarray(np.rot90(_member_pixels(tar, 2), -1))  # 90° clockwise
    d = Draw(**{k: rows[2][k] for k in Draw.__dataclass_fields__})
    assert torch.equal(augmented_image(run, 2), apply(turned, d))
