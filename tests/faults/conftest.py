"""One prepared source and runs shared by the whole fault suite (built once, copied per case)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spar_pipeline import augment, extract, ingest, train
from spar_pipeline.run import Run
from spar_pipeline.mini.sa1b_writer import make_sa1b_source

from faults._support import N_TARS, PER_TAR, SIZE, copy_run, fault_recipe


@pytest.fixture(scope="session")
def faults_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def source(faults_dir) -> Path:
    make_sa1b_source(faults_dir / "src", n_tars=N_TARS, per_tar=PER_TAR, size=SIZE, seed=3)
    return faults_dir / "src"


@pytest.fixture(scope="session")
def recipe(faults_dir) -> Path:
    return fault_recipe(faults_dir)


@pytest.fixture(scope="session")
def augmented(faults_dir, source, recipe) -> Path:
    """Ingested and augmented, nothing extracted: the start of the extract cases."""
    run = Run(str(faults_dir / "augmented"))
    run.resolve_recipe(str(recipe))
    ingest.run(run, [str(source)])
    augment.run(run)
    return faults_dir / "augmented"


@pytest.fixture(scope="session")
def extracted(faults_dir, augmented) -> Path:
    """One clean, uninterrupted run through extract: the reference of every case."""
    run = copy_run(augmented, faults_dir / "extracted")
    extract.run(run, workers=1, progress=False)
    return faults_dir / "extracted"


@pytest.fixture(scope="session")
def trained(faults_dir, extracted) -> Path:
    """The same run trained without interruption: the reference for resumed training."""
    run = copy_run(extracted, faults_dir / "trained")
    train.run(run, progress=False)
    return faults_dir / "trained"
