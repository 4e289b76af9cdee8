"""Extract on Slurm: dask-jobqueue's SLURMCluster submits GPU Dask workers as Slurm jobs, and
``spar-pipeline extract --scheduler`` sends them the batches (README "Many machines", docs/multinode.md).

    pip install dask-jobqueue          # an optional extra, only where this script runs
    RUN=s3://bucket/runs/x python examples/slurm/extract.py --jobs 4 --queue gpu

Run it on a login node or in a small CPU job: the Dask scheduler lives in this process, each worker in
a Slurm job of its own with one GPU, advertised as the ``GPU=1`` resource extract asks for per task.
The run (after ingest and augment) and the source tars are in the object store; every job gets the
AWS_* variables of this environment. A worker job that dies costs its batch; run the script again to
finish what is left. Then train with examples/slurm/train.sbatch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=os.environ.get("RUN"), help="the run folder (default $RUN)")
    ap.add_argument("--jobs", type=int, default=2, help="worker jobs, one GPU each")
    ap.add_argument("--queue", default=None, help="Slurm partition of the worker jobs")
    ap.add_argument("--account", default=None)
    ap.add_argument("--cores", type=int, default=8, help="CPU cores per worker job (image decoding)")
    ap.add_argument("--memory", default="64GB", help="memory per worker job")
    ap.add_argument("--walltime", default="04:00:00")
    ap.add_argument("--interface", default=None, help="network interface the jobs reach this machine on, e.g. ib0")
    args = ap.parse_args()
    if not args.run:
        ap.error("--run RUN (or $RUN): the run folder in the object store, e.g. s3://bucket/runs/x")

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    cluster = SLURMCluster(
        queue=args.queue, account=args.account, cores=args.cores, processes=1, memory=args.memory,
        walltime=args.walltime, interface=args.interface,
        job_extra_directives=["--gpus-per-node=1"],
        worker_extra_args=["--resources", "GPU=1"],  # extract asks each task for GPU=1: one batch per GPU
        job_script_prologue=["export HF_HUB_OFFLINE=1"],  # teacher weights from the hub cache, filled once
    )
    with cluster, Client(cluster) as client:
        cluster.scale(jobs=args.jobs)
        client.wait_for_workers(1, timeout=3600)  # the queue may take a while; more workers join as they start
        print(f"extract: scheduler {cluster.scheduler_address}, {len(client.scheduler_info()['workers'])} "
              f"worker(s) so far", flush=True)
        return subprocess.run(["spar-pipeline", "extract", "--run", args.run,
                               "--scheduler", cluster.scheduler_address]).returncode


if __name__ == "__main__":
    sys.exit(main())
