"""A run on s3:// through a proxy that injects throttling, 5xx, dropped connections and slow replies.

With faults on 10% of requests every stage retries with backoff and ends as a clean run.
When a part of the store stays down (retries exhausted), the stage says so in one line per
unit of work, or stops with one line, and nothing already done is lost; the rerun after
recovery finishes the rest.
"""

from __future__ import annotations

import logging
import os
import re

import fsspec
import numpy as np
import pytest

from spar_pipeline import augment, extract, ingest, manifest
from spar_pipeline.run import Run
from spar_pipeline.store import FeatureStore
from spar_pipeline.verify import verify

from faults._proxy import FAULTS, FaultProxy
from faults._support import assert_maps_intact, done_once

# One botocore attempt (s3fs still retries 5 times), so that "exhausted" comes in seconds; the
# product default is 8 adaptive botocore attempts under the 5 of s3fs.
QUICK = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


def _upload(source, bucket: str) -> None:
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    for tar in sorted(source.glob("*.tar")):
        fs.put(str(tar), f"{bucket}/src/{tar.name}")


def _options(proxy: FaultProxy, extra: dict | None = None) -> dict:
    return {"client_kwargs": {"endpoint_url": proxy.url}, **(extra or {})}


def _same_as_clean(run: Run, clean: Run, stage: str, drop: tuple[str, ...]) -> None:
    def strip(r):
        return {k: v for k, v in r.items() if k not in drop}

    mine = {r["image_id"]: strip(r) for r in manifest.read_manifest(run, stage).to_pylist()}
    want = {r["image_id"]: strip(r) for r in manifest.read_manifest(clean, stage).to_pylist()}
    assert mine == want


def test_flaky_store_every_stage_retries_and_finishes(s3_server, s3_bucket, source, recipe, extracted):
    _upload(source, s3_bucket)
    clean = Run(str(extracted))
    with FaultProxy(s3_server, seed=8, rate=0.1) as proxy:
        run = Run(f"{s3_bucket}/run", _options(proxy))
        run.resolve_recipe(str(recipe))
        report = ingest.run(run, [f"{s3_bucket}/src"])
        assert report["failed_tars"] == 0 and report["ok"] == 12
        augment.run(run)
        extract.run(run, workers=1, progress=False)
        checked = verify(run)
        faults = dict(proxy.counts)
    assert all(faults.get(f, 0) >= 1 for f in FAULTS), faults
    assert checked["ingest"]["damaged"] == checked["extract"]["damaged"] == 0
    direct = Run(f"{s3_bucket}/run")  # read back without the proxy
    _same_as_clean(direct, clean, "ingest", ("source",))
    _same_as_clean(direct, clean, "augment", ())
    rows = done_once(direct.teacher(), "extract", manifest.read_manifest(clean, "augment")["image_id"].to_pylist())
    assert_maps_intact(direct)
    mine, ref = FeatureStore.open(direct.teacher().store_url), FeatureStore.open(clean.teacher().store_url)
    for image_id in rows:
        np.testing.assert_allclose(mine.read(image_id).astype(np.float32), ref.read(image_id).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


def test_store_down_loses_nothing_and_rerun_finishes(s3_server, s3_bucket, source, recipe, augmented, caplog):
    _upload(source, s3_bucket)
    clean = Run(str(augmented))
    with FaultProxy(s3_server, seed=9) as proxy:
        run = Run(f"{s3_bucket}/run", _options(proxy, QUICK))
        run.resolve_recipe(str(recipe))
        # two tars stay unreadable: one line each, the other tars are ingested
        proxy.down = lambda method, path: re.search(r"sa_00000[23]\.tar", path) is not None
        with caplog.at_level(logging.WARNING, logger="spar_pipeline.ingest"):
            report = ingest.run(run, [f"{s3_bucket}/src"])
        assert report["failed_tars"] == 2 and report["ok"] == 6
        errors = [m for m in caplog.messages if "unreadable tar" in m]
        assert len(errors) == 2 and all(len(m.splitlines()) == 1 for m in errors), errors
        assert {re.search(r"sa_\d+\.tar", m).group(0) for m in errors} == {"sa_000002.tar", "sa_000003.tar"}
        done = manifest.read_manifest(run, "ingest").to_pylist()
        # the manifest itself cannot be written: the stage stops with one error, nothing half-written
        proxy.down = lambda method, path: method == "PUT" and "/manifests/augment/" in path
        with pytest.raises(OSError) as e:
            augment.run(run)
        assert len(str(e.value).splitlines()) == 1
        assert manifest.read_manifest(run, "augment").num_rows == 0
        assert manifest.read_manifest(run, "ingest").to_pylist() == done
        # recovery: the reruns finish the rest
        proxy.down = lambda method, path: False
        assert ingest.run(run, [f"{s3_bucket}/src"])["ok"] == 6
        augment.run(run)
    _same_as_clean(Run(f"{s3_bucket}/run"), clean, "ingest", ("source",))
    _same_as_clean(Run(f"{s3_bucket}/run"), clean, "augment", ())
