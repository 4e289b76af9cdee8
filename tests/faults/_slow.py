"""Imported by the fault driver and preloaded into Dask workers: slows manifest part writes by
``SPAR_TEST_SLOW_WRITES`` seconds, so seeded kill moments land inside the work (nothing else changes).
Dask may execute a preload file twice in one process; the original function is kept on the module."""

import os
import time

from spar_pipeline import manifest

_SLOW = float(os.environ.get("SPAR_TEST_SLOW_WRITES") or 0)
if _SLOW and not hasattr(manifest, "_unslowed_write_part"):
    manifest._unslowed_write_part = manifest.write_part

    def _slow_write_part(*args, _real=manifest.write_part, **kwargs):
        time.sleep(_SLOW)
        return _real(*args, **kwargs)

    manifest.write_part = _slow_write_part
