"""Shared fixtures: offline hub, a real moto S3 server on 127.0.0.1, fresh buckets."""

from __future__ import annotations

import os
import socket
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


# The longest file (the mini world end to end, 4–9 minutes) is collected first, so that under make test's two
# pytest-xdist workers (--no-loadscope-reorder keeps this order) it runs beside the others instead of alone at
# the end (measured: scheduled last, it ran alone for the suite's last 6 of 20 minutes).
_FIRST = ("tests/e2e/test_demo.py",)  # node ids are relative to the repository root


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))  # stable: the rest keep their order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's real S3 server; the AWS_* variables point every client (and subprocess) at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-log",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"spar-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
