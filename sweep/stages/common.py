"""What every stage needs: a Ray connection, the storage root, stage logging."""

from __future__ import annotations

import logging
import os
import sys
import time

from sweep.config import PipelineConfig

log = logging.getLogger("sweep")


def say(message: str) -> None:
    """One line of progress for the user, on stderr (stdout stays clean for `--format json`)."""
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


def init_ray(config: PipelineConfig) -> None:
    """Connect to the configured cluster, or start a local Ray on demand."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    # the project must be importable in every worker; an installed package is, a checkout may not be
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # logical CPUs: Ray Train workers and Ray Data tasks must fit side by side even on a 2-core machine
    num_cpus = config.ray.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             configure_logging=True, logging_level=logging.WARNING)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
