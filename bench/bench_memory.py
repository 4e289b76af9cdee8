"""Peak memory of each stage: every stage of a tiny-cpu run in its own subprocess, and (full mode)
the SigLIP2 ViT-B/16 teacher on one 512×512 image and one training step at 512×768.
Writes bench/results/memory.json.

    python -m bench memory [--quick]

Two figures per stage: ``maxrss_mb``, the largest peak resident set (VmHWM) of any one process of
the stage's tree (the stage process, its Dask workers and loader processes), and
``tree_peak_mb``, the largest sum of RSS over the whole tree, sampled every 50 ms with psutil
(what the machine must hold at once). Not ``wait4``/``getrusage`` maxrss: Linux carries the
parent's high-water mark into a forked child across exec, so a bench process holding a 4 GB
model would report 4 GB for every stage.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil

from bench.common import save

_PRELUDE = """
import logging, sys
logging.getLogger("spar_pipeline").setLevel(logging.ERROR)
from spar_pipeline.run import Run
run = Run(sys.argv[1])
"""

STAGES = {
    "ingest": "from spar_pipeline import ingest; ingest.run(run, sys.argv[2:])",
    "augment": "from spar_pipeline import augment; augment.run(run)",
    "extract": "from spar_pipeline import extract; extract.run(run, workers=1, progress=False)",
    "train": "from spar_pipeline import train; train.run(run, progress=False)",
}


def _hwm(pid: int) -> int:
    """Peak RSS (VmHWM) of one live process, in bytes; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _tree(proc: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, largest VmHWM) over the process and its descendants."""
    total = peak = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
        peak = max(peak, _hwm(p.pid))
    return total, peak


def measure(code: str, args: list[str]) -> dict:
    """Run ``code`` in a fresh interpreter; its peak memory and wall seconds."""
    t = time.perf_counter()
    final = "\nprint('VMHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])\n"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_PRELUDE) + code + final, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak, largest = [0], [0]
    done = threading.Event()

    def sample() -> None:
        proc = psutil.Process(child.pid)
        while not done.is_set():
            try:
                total, hwm = _tree(proc)
            except psutil.Error:
                return
            peak[0], largest[0] = max(peak[0], total), max(largest[0], hwm)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"stage subprocess failed ({child.returncode}): {stderr.decode()[-800:]}")
    own = [int(line.split()[1]) * 1024 for line in stdout.decode().splitlines() if line.startswith("VMHWM ")]
    return dict(maxrss_mb=max(largest[0], *own) / 2**20, tree_peak_mb=peak[0] / 2**20,
                seconds=time.perf_counter() - t)


def _tiny(tmp: Path, per_tar: int) -> dict:
    from spar_pipeline.run import Run
    from spar_pipeline.mini.sa1b_writer import make_sa1b_source

    tars = make_sa1b_source(tmp / "src", n_tars=2, per_tar=per_tar, size=(240, 160), seed=3)
    run = Run(str(tmp / "run"))
    run.resolve_recipe("tiny-cpu")
    out = {}
    for stage, code in STAGES.items():
        out[stage] = measure(code, [run.url, *(str(t) for t in tars)] if stage == "ingest" else [run.url])
    return out


_SIGLIP_EXTRACT = """
import torch
from spar_pipeline.backbones import build
from spar_pipeline.windows import sliding_features
b = build("siglip2-b16-512")
sliding_features(b, torch.randn(1, 3, 512, 512), 512, 24, batch=10)
"""

_SIGLIP_TRAIN_STEP = """
import torch
from spar_pipeline.backbones import build
b = build("siglip2-b16-512").train()
b.set_trainable("blk_-1,blk_-2")
opt = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=2e-5)
loss = torch.nn.functional.mse_loss(b.dense(torch.randn(1, 3, 512, 768)), torch.randn(1, 32, 48, 768))
loss.backward(); opt.step()
"""


def main(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stages = _tiny(Path(tmp), 4 if quick else 12)
    out = {"tiny-cpu": stages}
    if not quick:
        out["siglip2-b16-512"] = {"build_only": measure("from spar_pipeline.backbones import build; "
                                                        "build('siglip2-b16-512')", ["-"]),
                                  "extract_512x512": measure(_SIGLIP_EXTRACT, ["-"]),
                                  "train_step_512x768": measure(_SIGLIP_TRAIN_STEP, ["-"])}
    for group, rows in out.items():
        for stage, r in rows.items():
            print(f"{group:16s} {stage:20s} largest process {r['maxrss_mb']:7.0f} MB   whole tree {r['tree_peak_mb']:7.0f} MB"
                  f"   ({r['seconds']:.1f} s)")
    return save("memory", dict(quick=quick, **out,
                               note="maxrss = largest VmHWM of one process of the tree; tree = sampled sum of RSS"))


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
