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


def ray_address(config: PipelineConfig) -> str | None:
    """The cluster to connect to (`ray.address`, else $RAY_ADDRESS); None: sweep starts a local Ray."""
    return config.ray.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(config: PipelineConfig, dashboard: bool = False) -> None:
    """Connect to the configured cluster, or start a local Ray on demand.

    ``dashboard``: start the local Ray with its dashboard. Ray Train needs it (without it, its
    PlacementGroupCleaner logs "State API unavailable" every second); Ray Data and Tune do not, and on a
    small machine it costs about 1.5 s of start-up and a share of a core while it runs."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(config)
    # the project must be importable in every worker; an installed package is, a checkout may not be
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # logical CPUs: Ray Train workers and Ray Data tasks must fit side by side even on a 2-core machine
    num_cpus = config.ray.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
             configure_logging=True, logging_level=logging.WARNING)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
