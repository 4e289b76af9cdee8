"""Where work runs: one Dask cluster per stage invocation, or an existing scheduler.

Stage logic never knows where it runs; this module decides. A local cluster uses worker
*processes* (one per GPU, each seeing only its own device through CUDA_VISIBLE_DEVICES, or N
CPU workers), so the client never initialises CUDA. ``--scheduler`` attaches to a cluster whose
workers were started elsewhere with ``dask worker tcp://HOST:8786 --resources GPU=1``.

A task that raises a ``SparError`` (a weights digest that differs from the client's, a spec the
worker cannot use) would fail the same way on every try: ``Engine.submit`` brings it back as a value
instead of an error, so Dask does not retry it, and ``Engine.results`` fails the stage at once with
its line. Other errors (a flaky read, a dead worker) keep Dask's retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from spar_pipeline.errors import EndpointError, OptionError, SparError, first_line

__all__ = ["Engine", "open_engine", "check_scheduler", "worker_device"]

log = logging.getLogger(__name__)


@dataclass
class Engine:
    client: "distributed.Client"  # noqa: F821
    resources: dict[str, int] | None  # per-task resources to ask for (GPU=1 on GPU clusters)
    description: str

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info().get("workers", {}))

    def submit(self, fn: Callable, *args: Any, retries: int = 0, **kwargs: Any) -> "distributed.Future":  # noqa: F821
        """``fn(*args)`` on a worker with this engine's resources; ``retries`` apply to errors that may pass
        (a SparError comes back as a value: retrying it would only repeat it)."""
        return self.client.submit(_settled, fn, *args, resources=self.resources, retries=retries, **kwargs)

    def results(self, futures: Iterable["distributed.Future"]) -> Iterator[Any]:  # noqa: F821
        """Results of ``submit``ted tasks as they finish; the first SparError cancels the rest and is raised."""
        from distributed import as_completed

        futures = list(futures)
        for fut in as_completed(futures):
            out = fut.result()
            if isinstance(out, _Failed):
                self.client.cancel(futures)
                raise out.error
            yield out


@dataclass
class _Failed:
    error: SparError


def _settled(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except SparError as e:
        return _Failed(e)


def _cpu_threads(workers: int) -> str:
    return str(max(1, (os.cpu_count() or 1) // max(workers, 1)))


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def _worker_environ(threads: str) -> Iterator[None]:
    """What a local worker process starts with, in place of distributed's ``pre-spawn-environ`` default.

    That default gives every worker ONE BLAS/OpenMP thread (the Nanny's ``env`` comes too late to change it) and
    ``MALLOC_TRIM_THRESHOLD_=65536``, which hands each freed tensor buffer back to the OS and faults it in again
    on the next forward. Measured on the miniature teacher (2 cores, one worker; bench/NOTES.md, "Extract in a
    Dask worker"): 14.4 s for 4 images with the default, 6.4 s with 2 threads, 4.6 s without the trim threshold
    as well (4.4 s in the client's own process). A spawned worker inherits the client's environment, which
    distributed lets win over its config, so the share is set there too while the workers start; the client's
    own values are put back when the cluster closes."""
    import dask

    before = {k: os.environ.get(k) for k in (*THREAD_VARIABLES, "MALLOC_TRIM_THRESHOLD_")}
    try:
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, threads))
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": dict.fromkeys(THREAD_VARIABLES, threads)}):
            yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_device(gpu: int) -> str:
    """What CUDA_VISIBLE_DEVICES shows the worker of ``--gpus`` id ``gpu``. Ids count the devices this
    process sees (as train's do): under CUDA_VISIBLE_DEVICES=2,3, GPU 0 is physical device 2."""
    seen = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return seen[gpu] if gpu < len(seen) else str(gpu)


@contextlib.contextmanager
def open_engine(
    gpus: list[int] | None = None, workers: int | None = None, scheduler: str | None = None
) -> Iterator[Engine]:
    import warnings

    import dask
    from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

    # The scheduler always serves HTTP (health, metrics) and says so when 8787 is taken: not the user's concern.
    warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)

    # distributed resets its loggers to INFO on import; the stage's own progress line is enough.
    if logging.getLogger("spar_pipeline").getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("distributed").setLevel(logging.WARNING)

    # A worker that dies mid-task makes the scheduler resubmit it elsewhere; allow a few deaths.
    with dask.config.set({"distributed.scheduler.allowed-failures": 3, "distributed.worker.daemon": False}):
        if scheduler:
            client = _connect(Client, scheduler)
            try:
                info = _check_workers(client, scheduler)
            except EndpointError:
                client.close()
                raise
            has_gpu = any(w.get("resources", {}).get("GPU") for w in info.values())
            try:
                yield Engine(client, {"GPU": 1} if has_gpu else None, f"scheduler {scheduler} ({len(info)} workers)")
            finally:
                client.close()
            return
        if not gpus and workers is None:
            from spar_pipeline.devices import default_gpus

            gpus = list(default_gpus()) or None  # a GPU machine uses its GPUs unless told --workers N
        n = len(gpus) if gpus else (workers or 1)
        with _worker_environ(_cpu_threads(n)):
            if gpus:
                specs = {f"gpu{g}": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                                               "env": {"CUDA_VISIBLE_DEVICES": worker_device(g)}}}
                         for g in gpus}
                cluster = SpecCluster(
                    workers=specs,
                    scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                    silence_logs=logging.WARNING,
                )
                resources, desc = {"GPU": 1}, f"{len(gpus)} GPU worker(s) on GPUs {','.join(map(str, gpus))}"
            else:
                cluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.WARNING,
                    env={"CUDA_VISIBLE_DEVICES": ""},
                )
                resources, desc = None, f"{n} CPU worker process(es)"
            client = Client(cluster)
            try:
                yield Engine(client, resources, desc)
            finally:
                client.close()
                cluster.close()


def check_scheduler(scheduler: str) -> None:
    """Refuse, before any work, a ``--scheduler`` that is no Dask address (scheme://host:port), does not
    answer, or has no workers."""
    from distributed import Client
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(scheduler)
        get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except ValueError as e:
        raise OptionError(f"--scheduler {scheduler!r}: not a Dask scheduler address ({first_line(e)}); "
                          "e.g. --scheduler tcp://host:8786") from None
    client = _connect(Client, scheduler)
    try:
        _check_workers(client, scheduler)
    finally:
        client.close()


def _check_workers(client, scheduler: str) -> dict:
    info = client.scheduler_info().get("workers", {})
    if not info:
        raise EndpointError(f"scheduler {scheduler} has no workers: the tasks would wait forever; start "
                            f"workers with `dask worker {scheduler}` (add --resources GPU=1 on GPU machines)")
    return info


def _connect(client_cls, scheduler: str):
    """A client of ``scheduler``, or one line naming it. Dask retries the connection until its
    ``distributed.comm.timeouts.connect`` (30 s by default) has passed."""
    import dask

    timeout = dask.config.get("distributed.comm.timeouts.connect", "30s")
    try:
        return client_cls(scheduler, timeout=timeout)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        raise EndpointError(f"--scheduler {scheduler}: no Dask scheduler answered within {timeout} ({first_line(e)})"
                            ) from None
