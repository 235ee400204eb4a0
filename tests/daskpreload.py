"""A `dask worker --preload` that declares a `sectors worker` identity, for the engine's tests.

Until the tests start real `sectors worker` processes, a plain `dask worker` with this
preload speaks the contract of `sealing/backends/dask/identity.py`: its identity comes from
the `SECTORS_TEST_IDENTITY` environment variable (JSON, sent as is, so a test can send a
malformed one), its heartbeat reports free space from `SECTORS_TEST_FREE` (JSON) and the
policy file named in the identity, re-read on every heartbeat with `PolicyWatcher`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from distributed import Worker

from sectorfsm.sched.policy import PolicyWatcher
from sectorfsm.sealing.backends.dask.identity import IDENTITY_KEY, METRICS_KEY


def dask_setup(worker: Worker) -> None:
    """Set the worker's startup information and heartbeat metrics (runs before it joins)."""
    identity: Any = json.loads(os.environ["SECTORS_TEST_IDENTITY"])
    free = json.loads(os.environ.get("SECTORS_TEST_FREE", "{}"))
    policy = identity.get("policy", {}) if isinstance(identity, dict) else {}
    watcher = PolicyWatcher(policy["file"], clock=time.time) if policy.get("file") else None

    def report() -> dict[str, Any]:
        if watcher is None:
            return {"file": None, "fields": None, "error": None, "loaded_at": None}
        watcher.poll()
        fields = watcher.policy.as_myscheduler() if watcher.loaded_at is not None else None
        return {
            "file": str(watcher.path),
            "fields": fields,
            "error": watcher.error,
            "loaded_at": watcher.loaded_at,
        }

    if isinstance(identity, dict) and "policy" in identity:
        identity["policy"] = report()
    worker.startup_information[IDENTITY_KEY] = lambda w: identity
    worker.metrics[METRICS_KEY] = lambda w: {"free": free, "policy": report(), "jobs": {}}
