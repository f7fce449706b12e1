"""Where a sweep's first trials wait for each other (see `sweep.stages.probe._wait_for_peers`).

Through Ray's key-value store in the GCS (the one Ray Tune keeps its trainable registry in), not through
an actor: an actor takes a worker process of its own, and on a small machine that was one of the two
workers Ray prestarts for the driver (the second trial worker then started from scratch, ~1 s later), and
an idle actor's worker costs ~1 % of a core for as long as the sweep runs.
"""

from __future__ import annotations

import os
import socket
import time

NAMESPACE = "sweep"
POLL_S = 0.02  # a waiting worker asks the GCS this often (one small RPC): the last arrival waits at most this


def arrive(prefix: str, needed: int, timeout_s: float) -> int:
    """Check this worker process in under `prefix` and return once `needed` workers have (or `timeout_s`
    passed), with how many had. Call only inside a Ray worker or driver."""
    from ray.experimental import internal_kv

    me = f"{prefix}/{socket.gethostname()}:{os.getpid()}"
    internal_kv._internal_kv_put(me, b"", namespace=NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while True:
        arrived = len(internal_kv._internal_kv_list(prefix + "/", namespace=NAMESPACE))
        if arrived >= needed or time.monotonic() >= deadline:
            return arrived
        time.sleep(POLL_S)


def clear(prefix: str) -> None:
    """Remove a finished sweep's check-ins (the driver, after Tune returns)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(prefix + "/", del_by_prefix=True, namespace=NAMESPACE)
