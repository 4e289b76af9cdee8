"""Security: nothing is ever unpickled, tar members are never extracted, credentials never shown.

The code scan walks the package's syntax trees (comments and docstrings cannot trip it, and a
planted sample proves it can fail). The credential test runs the whole pipeline on moto S3 with
the secret given on the command line and in the environment, plus a links file whose URL
carries ``user:password@`` and a signed query, then searches every log line, manifest,
report, checkpoint header and store attribute for them.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import spar_pipeline

PACKAGE = Path(spar_pipeline.__file__).parent
EXE = str(Path(sys.executable).with_name("spar-pipeline"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_calls(source: str) -> list[str]:
    """What in ``source`` can unpickle: imports of pickle-like modules, ``torch.load`` without
    ``weights_only=True``, ``allow_pickle=True``, ``pandas.read_pickle``, ``tarfile`` extraction."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                found.append("allow_pickle not False")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = ast.unparse(node.func.value)
            if name == "load" and owner == "torch":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if name in ("read_pickle", "extractall", "loads") and owner in ("pd", "pandas", "pickle") or \
                    name == "extractall":
                found.append(f"line {node.lineno}: {owner}.{name}")
    return found


def test_the_scan_catches_what_it_looks_for():
    planted = ("import pickle\nfrom dill import loads\nimport torch, numpy as np\nx = torch.load('a.pt')\n"
               "y = np.load('a.npy', allow_pickle=True)\nimport tarfile\ntarfile.open('t').extractall('/')\n"
               "z = torch.load('b.pt', weights_only=True)\n")
    found = unsafe_calls(planted)
    assert len(found) == 5, found
    assert unsafe_calls('"""never import pickle or torch.load(x)"""\n# allow_pickle=True\n') == []


def test_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = {str(p.relative_to(PACKAGE)): unsafe_calls(p.read_text()) for p in files}
    assert {k: v for k, v in problems.items() if v} == {}


# ---- credentials ---------------------------------------------------------------------------------
PASSWORD = "hunter2-do-not-log"
SIGNATURE = "sig-do-not-log"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="1")
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=600)


def test_credentials_never_shown_or_stored(s3_bucket, source, tmp_path):
    import fsspec

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    for tar in sorted(source.glob("*.tar"))[:1]:
        fs.put(str(tar), f"{s3_bucket}/src/{tar.name}")
    options = json.dumps({"key": key_id, "secret": secret})
    run = f"{s3_bucket}/run"
    outs = [_cli("run", f"{s3_bucket}/src", "--run", run, "--limit", "2", "--epochs", "1", "--workers", "1",
                 "--storage-options", options)]
    assert outs[0].returncode == 0, outs[0].stderr[-3000:]
    outs.append(_cli("verify", "--run", run, "--storage-options", options))
    outs.append(_cli("status", "--run", run, "--storage-options", options))
    # failures: their one-line errors must not echo what they were given
    links = tmp_path / "links.txt"
    links.write_text(f"file_name\tcdn_link\nsa_000000.tar\thttps://user:{PASSWORD}@127.0.0.1:9/sa_000000.tar"
                     f"?Policy=p&Signature={SIGNATURE}&Key-Pair-Id=k\n")
    outs.append(_cli("ingest", "--links", str(links), "--tars", "sa_000000", "--run", f"{s3_bucket}/run2",
                     "--recipe", "tiny-cpu", "--storage-options", options))
    outs.append(_cli("ingest", f"https://user:{PASSWORD}@127.0.0.1:9/sa_000001.tar", "--run", f"{s3_bucket}/run3",
                     "--recipe", "tiny-cpu"))
    outs.append(_cli("status", "--run", f"s3://user:{PASSWORD}@{s3_bucket[5:]}/run"))
    assert all(o.returncode != 0 for o in outs[3:]), [o.stderr[-500:] for o in outs[3:]]
    for o in outs[3:]:
        assert "Traceback" not in o.stderr, o.stderr[-2000:]
    text = "\n".join(o.stdout + o.stderr for o in outs)
    assert "sa_000000" in text and "127.0.0.1:9" in text  # the errors do say what and where
    stored = {p: fs.cat_file(p) for p in fs.find(s3_bucket) if "/src/" not in p and not p.endswith(".tar")}
    assert any("/manifests/train/" in p for p in stored) and any("/reports/" in p for p in stored)
    for needle in (secret, key_id, PASSWORD, SIGNATURE):
        assert needle not in text, needle
        leaks = [p for p, data in stored.items() if needle.encode() in data]
        assert not leaks, (needle, leaks)


@pytest.mark.parametrize("shown", [
    "https://user:{pw}@host/sa_000000.tar", "s3://k:{pw}@bucket/run", "x?Signature={pw}&Policy={pw}",
    "tcp://admin:{pw}@scheduler:8786",
])
def test_redact_strips_userinfo_and_signed_queries(shown):
    from spar_pipeline.fsutil import redact

    assert PASSWORD not in redact(shown.format(pw=PASSWORD))
