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
    # written, not print()ed: on a Ray Train worker print() is patched to tee into a logger, which doubled it
    sys.stderr.write(f"[sweep] {message}\n")
    sys.stderr.flush()


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


def quiet_training_data(ds):
    """`ds` without Ray Data's progress bars: feeding Ray Train, they come from its split coordinator actor as
    dozens of half-drawn lines per epoch among the stage's own progress lines."""
    ds.context.enable_progress_bars = False  # the dataset's own copy of the context
    return ds


# decoded training images up to this size are split among the workers by sweep, in a fixed order
ORDERED_SPLIT_BYTES = 2 << 30


def train_datasets(ds, config: PipelineConfig, n_images: int) -> tuple[dict, object | None]:
    """Ray Train's `datasets` and `dataset_config` (None: Ray Train's default) for `ds`, the pipeline's
    `n_images` training images, decoded, on `pretrain.workers` workers.

    Images that fit in memory (float32, at most ORDERED_SPLIT_BYTES) are decoded before training, kept in
    `ds`'s order and split into `workers` equal parts `train_0`, `train_1`, ..., each taken whole by the worker
    of that rank (`train_shard`): a seeded run trains every worker on the same images in the same order each
    time. A larger set is handed to Ray Train as `train`, split while streaming: its split coordinator gives
    blocks to whichever worker asks first, so which images a worker trains on varies between runs."""
    import ray.train

    if n_images * config.data.channels * config.data.image_size ** 2 * 4 > ORDERED_SPLIT_BYTES:
        return {"train": ds}, None
    ds.context.execution_options.preserve_order = True  # the dataset's own context: the order of `ds`
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # its plan and progress lines, on the driver, among the stage's own
    try:
        parts = ds.materialize().split(config.pretrain.workers, equal=True)
    finally:
        data_log.setLevel(level)
    return {f"train_{rank}": part for rank, part in enumerate(parts)}, ray.train.DataConfig(datasets_to_split=[])


def train_shard(ordered: bool, rank: int):
    """This worker's training data (see `train_datasets`), on a Ray Train worker."""
    import ray.train

    return ray.train.get_dataset_shard(f"train_{rank}" if ordered else "train")


def train_logging():
    """Ray Train's `ray.train` loggers at WARNING for sweep's trainers: their INFO lines (worker group start,
    process group, "Checkpoint successfully created" per checkpoint) drowned the stages' own progress; Ray's
    log files keep every level."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def quiet_train_reports() -> None:
    """On a Ray Train worker: no "Reporting training result N: TrainingReport(...)" INFO line per report and
    worker. Ray Train V2 logs it under a logger named by its file's path, outside the `ray.train` loggers
    that RunConfig's LoggingConfig sets; its warnings still show. Ray internals: if they move, the lines do."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
