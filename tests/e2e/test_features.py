"""Features for many images: folders, globs, list files; a Zarr store or .npy files; resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spar_pipeline import features
from spar_pipeline.errors import OptionError, SourceError

from _cli import EXE  # tests/ is on sys.path (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny():
    from spar_pipeline.api import load

    return load("tiny-siglip")


def _images(folder: Path, n: int, size=(96, 128), corrupt: str | None = "b/broken.jpg") -> list[str]:
    names = []
    for i in range(n):
        name = f"{'a' if i % 2 else 'b'}/img{i:02d}.{'png' if i % 3 else 'jpg'}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        names.append(name)
    if corrupt:
        (folder / corrupt).parent.mkdir(parents=True, exist_ok=True)
        (folder / corrupt).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return names


def _done_maps(store: Path) -> int:
    return sum(1 for p in (store / "maps").glob("*/c/0/0/0")) if (store / "maps").is_dir() else 0


def test_zarr_features_over_a_folder_resume_after_a_kill(tmp_path, tiny):
    src, out = tmp_path / "images", tmp_path / "feats.zarr"
    names = _images(src, 10, size=(192, 256))
    cmd = [EXE, "features", str(src), "--out", str(out), "--backbone", "tiny-siglip", "--mode", "sliding",
           "--stride", "16"]
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while _done_maps(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, first_err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed midway"
    before = _done_maps(out)
    assert 2 <= before < 10
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{10 - before} written, {before} already done, 1 unreadable" in res.stdout, res.stdout
    broken = [line for line in res.stderr.splitlines() if "broken.jpg" in line]
    assert len(broken) == 1 and "not a readable image" in broken[0] and "Traceback" not in res.stderr
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["maps"]) == sorted([*names, "b/broken.jpg"])
    assert index["settings"]["mode"] == "sliding" and index["settings"]["stride"] == 16
    for name in (names[0], names[-1]):  # every map is whole and the teacher's (float16 as the feature store)
        got = features.read(str(out), name)
        want = features.dense_map(tiny, features.image_array(src / name), mode="sliding", stride=16).numpy()
        assert got.dtype == np.float16 and got.shape == want.shape == (12, 16, 64)
        np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3, rtol=2e-3)
    again = features.run(tiny, [str(src)], str(out), mode="sliding", stride=16, progress=False)
    assert (again["written"], again["skipped"], again["unreadable"]) == (0, 10, 1)
    with pytest.raises(OptionError, match="other settings .*mode, stride"):  # a single pass into the same store
        features.run(tiny, [str(src)], str(out), progress=False)


def test_npy_folder_from_a_list_file_and_a_glob(tmp_path, tiny):
    src = tmp_path / "images"
    names = _images(src, 4, corrupt=None)
    listing = tmp_path / "list.txt"
    listing.write_text("# two of them\nimages/a/img01.png\n\nimages/b/img00.jpg  # the first\n")
    rep = features.run(tiny, [str(listing)], str(tmp_path / "npy"), progress=False)
    assert rep == {"out": str(tmp_path / "npy"), "written": 2, "skipped": 0, "unreadable": 0, "images": 2}
    assert sorted(p.name for p in (tmp_path / "npy").glob("*.npy")) == ["a__img01.npy", "b__img00.npy"]
    arr = np.load(tmp_path / "npy" / "a__img01.npy", allow_pickle=False)
    want = tiny.features(src / "a" / "img01.png").numpy()
    assert arr.dtype == np.float32 and np.array_equal(arr, want)
    rep = features.run(tiny, [str(src / "*" / "*.png")], str(tmp_path / "npy"), progress=False)
    assert (rep["written"], rep["skipped"]) == (1, 1)  # img01 again, img02 new (names relative to images/)
    assert json.loads((tmp_path / "npy" / "index.json").read_text())["maps"]["a/img01.png"] == "a__img01.npy"
    one = features.run(tiny, [str(src / names[0])], str(tmp_path / "one.npy"), progress=False, scale=0.5)
    assert one["shape"] == [3, 4, 64] and np.load(tmp_path / "one.npy").shape == (3, 4, 64)  # 48×64 after ×0.5


def test_bad_arguments_are_one_line(tmp_path, tiny):
    with pytest.raises(SourceError, match="no images here"):
        features.run(tiny, [str(tmp_path / "missing")], str(tmp_path / "o"), progress=False)
    _images(tmp_path / "images", 2, corrupt=None)
    with pytest.raises(OptionError, match="--mode sliding needs --stride"):
        features.run(tiny, [str(tmp_path / "images")], str(tmp_path / "o"), mode="sliding", progress=False)
    with pytest.raises(OptionError, match="holds one image"):
        features.run(tiny, [str(tmp_path / "images")], str(tmp_path / "o.npy"), progress=False)
    with pytest.raises(OptionError, match="--scale"):
        features.run(tiny, [str(tmp_path / "images")], str(tmp_path / "o"), scale=0, progress=False)
