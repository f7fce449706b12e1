"""What the stages share: the Ray connection (and the checks before a local Ray starts), progress lines and
quieter Ray logging, the training stages' Ray Train helpers (data split, checkpoints, MLflow metrics, Ctrl-C),
and one-line error causes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from sweep.config import PipelineConfig


def say(message: str) -> None:
    """One line of progress for the user, on stderr (stdout stays clean for `--format json`)."""
    # written, not print()ed: on a Ray Train worker print() is patched to tee into a logger, which doubled it
    sys.stderr.write(f"[sweep] {message}\n")
    sys.stderr.flush()


def ray_address(config: PipelineConfig) -> str | None:
    """The cluster to connect to (`ray.address`, else $RAY_ADDRESS); None: sweep starts a local Ray."""
    return config.ray.address or os.environ.get("RAY_ADDRESS") or None


def local_num_cpus(config: PipelineConfig) -> int:
    """Logical CPUs of the local Ray sweep starts: Ray Train workers and Ray Data tasks must fit side by side
    even on a 2-core machine."""
    return config.ray.num_cpus or max(4, os.cpu_count() or 1)


ALL_STAGES = ("pretrain", "baselines", "extract", "probe", "report")


def resource_problems(config: PipelineConfig, cpus: float, gpus: float, stages=ALL_STAGES) -> list[str]:
    """What the pipeline's `stages` ask of a Ray with `cpus` logical CPUs and `gpus` GPUs that it can never
    get: Ray would wait for it forever (Ray Train retrying its worker group every minute, Ray Data and Tune
    pending)."""
    p, e, q = config.pretrain, config.extract, config.probe
    where = (f"the local Ray has {cpus:g} CPU(s) (ray.num_cpus, default max(4, cores)) and {gpus:g} GPU(s); lower "
             f"the setting, or set ray.address to a cluster that has them")
    problems = []
    trains = "pretrain" in stages or ("baselines" in stages and config.baselines)  # both on pretrain.workers
    if trains and p.workers * p.cpus_per_worker > cpus:
        problems.append(f"pretrain.workers x cpus_per_worker = {p.workers} x {p.cpus_per_worker:g} CPUs: {where}")
    if trains and p.use_gpu and p.workers > gpus:
        problems.append(f"pretrain.use_gpu with {p.workers} worker(s) needs as many GPUs: {where}")
    if "extract" in stages and e.actors * e.cpus_per_actor > cpus:
        problems.append(f"extract.actors x cpus_per_actor = {e.actors} x {e.cpus_per_actor:g} CPUs: {where}")
    if "extract" in stages and e.actors * e.gpus_per_actor > gpus:
        problems.append(f"extract.actors x gpus_per_actor = {e.actors} x {e.gpus_per_actor:g} GPUs: {where}")
    if "probe" in stages and (q.cpus_per_trial > cpus or q.gpus_per_trial > gpus):
        problems.append(f"probe.cpus_per_trial / gpus_per_trial = {q.cpus_per_trial:g} / {q.gpus_per_trial:g}: "
                        f"{where}")
    return problems


def check_ray(config: PipelineConfig, stages=ALL_STAGES, timeout: float = 5.0) -> None:
    """Before any of `stages`: a local Ray must have what they ask for (ConfigError naming the setting), and
    a cluster address must answer (Ray's own connection retries for minutes, printing only its own lines).
    A cluster's resources are not checked: it may autoscale."""
    from urllib.parse import urlsplit

    from sweep.config import ConfigError, ray_address_problem

    address = ray_address(config)
    problem = ray_address_problem(address) if address and not config.ray.address else None  # $RAY_ADDRESS's
    if problem:
        raise ConfigError(f"$RAY_ADDRESS: {problem}")
    if not address:
        p, e, q = config.pretrain, config.extract, config.probe
        gpus = 0
        if p.use_gpu or e.gpus_per_actor or q.gpus_per_trial:  # torch only where a GPU is asked for
            import torch

            gpus = torch.cuda.device_count()
        problems = resource_problems(config, local_num_cpus(config), gpus, stages)
        if problems:
            raise ConfigError("; ".join(problems))
        return
    if address == "auto" or os.environ.get("RAY_ADDRESS"):  # auto: Ray finds a running head itself, at once
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if parts.hostname and parts.port:
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
        except OSError as e:
            raise RuntimeError(f"ray.address: nothing answers at {address} ({e.strerror or e}); start the cluster "
                               f"(`ray up cluster.yaml`, `ray start --head`) or fix the address") from None


def init_ray(config: PipelineConfig, dashboard: bool = False) -> None:
    """Connect to the configured cluster, or start a local Ray on demand.

    ``dashboard``: start the local Ray with its dashboard. Ray Train needs it (without it, its
    PlacementGroupCleaner logs "State API unavailable" every second); Ray Data and Tune do not, and on a
    small machine it costs about 1.5 s of start-up and a share of a core while it runs."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(config)
    driver_log_environment()
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    local_ray_environment()
    running = running_local_cluster()
    if running:
        say(f"a Ray cluster runs on this machine ({running}, started by `ray start`); sweep starts its own local Ray "
            f"as `ray.address` is null: set `ray.address: auto` (or $RAY_ADDRESS) to run on that one")
    start_local_ray(local_num_cpus(config), dashboard)


def start_local_ray(num_cpus: int, dashboard: bool, log_to_driver: bool = True,
                    configure_logging: bool = True) -> None:
    """A new local Ray for this process, even where `ray start` left one running (a bare `ray.init()` joins
    that one, and refuses `num_cpus`)."""
    import ray

    dashboard_port = _own_state_api() if dashboard else None
    # Ray turns token authentication on for a new local cluster and warns that it did, at every start.
    with errors_only("ray._private.authentication.authentication_token_setup"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port, log_to_driver=log_to_driver, configure_logging=configure_logging,
                 logging_level=logging.WARNING)


_STATE_API_SET = "_SWEEP_SET_RAY_API_SERVER_ADDRESS"  # marks a RAY_API_SERVER_ADDRESS that sweep set itself


def _own_state_api() -> int | None:
    """A free port for the dashboard of the local Ray about to start, and $RAY_API_SERVER_ADDRESS pointing at it
    (Ray's processes inherit this process's environment); a user's own setting is kept (None).

    Why: Ray Train's PlacementGroupCleaner asks Ray's state API whether the training controller lives, and
    finds the API by looking for a Ray on this machine. With another Ray running (`ray start --head`, a second
    sweep) it asked that one, printed "Found multiple active Ray instances" every second, or was told the
    controller is gone and exited (at another moment it would have removed the training's placement group)."""
    if os.environ.get("RAY_API_SERVER_ADDRESS") and not os.environ.get(_STATE_API_SET):
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ[_STATE_API_SET] = "1"
    return port


def running_local_cluster() -> str | None:
    """The address of a Ray that `ray start --head` left running on this machine (the one a bare `ray.init()`
    joins), if it answers; else None."""
    from ray._common.utils import get_ray_address_file

    try:
        with open(get_ray_address_file(None)) as f:
            address = f.read().strip()
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except (OSError, ValueError):
        return None
    return address


@contextlib.contextmanager
def errors_only(logger_name: str):
    """The named logger shows only errors while the block runs, then its own level again."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def dropped_messages(logger_name: str, *starts: str):
    """The named logger's records that start with any of `starts` left out while the block runs."""
    drop = _DropMessages(*starts)
    log = logging.getLogger(logger_name)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def driver_log_environment() -> None:
    """How this driver prints its workers' lines ("(RayTrainWorker pid=...) [sweep] ..."), where the user has not
    said: repeated lines of several workers folded into one (Ray's default, named), and the prefix without
    colour codes when stderr is not a terminal (a log file, CI, `ray job logs`), where they show as text."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def local_ray_environment() -> None:
    """Settings for a local Ray that sweep starts, in this process's environment (which Ray's processes
    inherit), each kept where the user has set it:

    - `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`: Ray Train's watcher for nodes a cloud reclaims; one machine has
      none, and its actor printed an ERROR-level line from Ray's C++ core at each training run
      (ray-project/ray#53727: restartable actors with arguments in the object store).
    - a warnings filter for the RayDeprecationWarning that Ray Train's own DatasetManager raises in Ray Data
      (`ExecutionOptions.exclude_resources`) at each training run: nothing sweep can change.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray_internal = "ignore:`ExecutionOptions.exclude_resources` is deprecated"
    filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    if ray_internal not in filters:
        os.environ["PYTHONWARNINGS"] = ",".join(filters + [ray_internal])


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_ray_data() -> None:
    """In this process (the driver, or a Ray Train worker reading its shard): none of Ray Data's INFO lines per
    dataset run ("Starting execution of Dataset ...", its plan, "✔️ Dataset ... execution finished") and not
    its warning that progress bars are off (sweep turns them off, `quiet_dataset`, and prints its own
    progress), nor its warning at each GPU extraction that naming both CPUs and GPUs for an actor is
    "experimental" (supported, Ray only warns; the encoder actor asks for both, as
    `extract.cpus_per_actor` / `gpus_per_actor` say). Ray Data's other warnings and errors still show, and its
    log files keep every line. Ray internals: if the loggers move, the lines come back."""
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    for name, start in (("ray.data._internal.progress", "Progress bars disabled"),
                        ("ray.data._internal.execution.operators.map_operator",
                         "Specifying both num_cpus and num_gpus for map tasks is experimental")):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(start))


def quiet_dataset(ds):
    """`ds` without Ray Data's progress bars: feeding Ray Train they come from its split coordinator actor as
    dozens of half-drawn lines per epoch, and in the extract stage (or any non-interactive output) as a
    nine-line block every 10 s, among the stage's own progress lines."""
    ds.context.enable_progress_bars = False  # the dataset's own copy of the context
    return ds


PROGRESS_SECONDS = 10.0  # at most one progress line per stage this often


class Progress:
    """A stage's progress line, at most every PROGRESS_SECONDS: "<label>: 44/210 trials (detail), 10s, ~38s
    left". The estimate is the rate since the first units arrived, once `eta_after` more are done: the wait
    for the first ones is the workers' start (a GPU actor's CUDA and model: ~20 s), and counting it in gave
    "~6384s left" for a minute's extraction."""

    def __init__(self, label: str, total: int, unit: str, eta_after: int = 1, final: bool = True):
        self.label, self.total, self.unit, self.eta_after, self.final = label, total, unit, eta_after, final
        self.restart()

    def restart(self) -> None:
        self.start = self.last = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (when, how many) at the first units' arrival

    def update(self, done: int, detail: str | Callable[[], str] = "") -> None:
        """A line if one is due; `detail` may be a function, called only then (cheap to call every step)."""
        now = time.perf_counter()
        self.seen(done)
        if (done >= self.total and not self.final) or (done < self.total and now - self.last < PROGRESS_SECONDS):
            return
        self.last, elapsed = now, now - self.start
        detail = detail() if callable(detail) else detail
        say(f"{self.label}: {done}/{self.total} {self.unit}{f' ({detail})' if detail else ''}, {elapsed:.0f}s"
            f"{self.eta(done)}")

    def seen(self, done: int) -> None:
        """`done` units so far, for the estimate, without a line."""
        if self.first is None and done > 0:
            self.first = (time.perf_counter(), done)

    def eta(self, done: int) -> str:
        """", ~38s left" once the rate can be told (see the class), else ""."""
        if self.first is None or done - self.first[1] < max(self.eta_after, 1) or done >= self.total:
            return ""
        rate = (done - self.first[1]) / max(time.perf_counter() - self.first[0], 1e-9)
        return f", ~{(self.total - done) / rate:.0f}s left"

    def said(self) -> None:
        """The caller printed a line of its own: the next one is due PROGRESS_SECONDS from now."""
        self.last = time.perf_counter()


# decoded training images up to this size are split among the workers by sweep, in a fixed order
ORDERED_SPLIT_BYTES = 2 << 30
DECODE_NOTICE_IMAGES = 20_000  # from this many, the decode before training is said (it takes a while)


def train_datasets(ds, config: PipelineConfig, n_images: int) -> tuple[dict, object | None, int | None]:
    """Ray Train's `datasets` and `dataset_config` (None: Ray Train's default) for `ds`, the pipeline's
    `n_images` training images, decoded (unreadable ones dropped), on `pretrain.workers` workers; and how many
    images are left to train on (None where not known before training).

    Images that fit in memory (float32, at most ORDERED_SPLIT_BYTES) are decoded before training, kept in
    `ds`'s order and split into `workers` equal parts `train_0`, `train_1`, ..., each taken whole by the worker
    of that rank (`train_shard`; the first images repeated where the images do not divide evenly): a seeded
    run trains every worker on the same images in the same order each time; `check_training_images` then
    says how many were unreadable. A larger set is handed to Ray Train as `train`, split while streaming: its
    split coordinator gives blocks to whichever worker asks first, so which images a worker trains on varies
    between runs."""
    import ray.train

    if n_images * config.data.channels * config.data.image_size ** 2 * 4 > ORDERED_SPLIT_BYTES:
        return {"train": ds}, None, None
    ds.context.execution_options.preserve_order = True  # the dataset's own context: the order of `ds`
    quiet_ray_data()  # its plan and progress lines, on the driver, among the stage's own
    if n_images >= DECODE_NOTICE_IMAGES:
        say(f"decoding {n_images} training images before training")
    decoded = ds.materialize()
    usable = decoded.count()
    workers = config.pretrain.workers
    if usable % workers:
        # an equal split drops the remainder, the same images every run: repeat the first few instead (as
        # torch's DistributedSampler pads), so every image is trained on and the workers' shares stay equal
        decoded = decoded.union(decoded.limit(workers - usable % workers)).materialize()
    parts = decoded.split(workers, equal=True) if usable else []
    return ({f"train_{rank}": part for rank, part in enumerate(parts)}, ray.train.DataConfig(datasets_to_split=[]),
            usable)


class TrainingDataError(RuntimeError):
    pass


def check_training_images(config: PipelineConfig, stage: str, listed: int, usable: int | None) -> int:
    """The number of training images to train on: `usable` of the `listed` ones (all of them where `usable`
    is not known before training). Says how many were unreadable; raises when no worker would get an image
    (the workers would wait for data forever), naming one unreadable file and its error."""
    workers = config.pretrain.workers
    if usable is None:
        return listed
    if usable == 0:
        raise TrainingDataError(f"{stage}: none of the {listed} training images of data.train could be read"
                                f"{_first_unreadable(config)}")
    if usable < workers:
        raise TrainingDataError(f"{stage}: {usable} readable training image(s) for pretrain.workers={workers}: "
                                f"each worker needs at least one; lower pretrain.workers or add images")
    if usable < listed:
        say(f"{stage}: {listed - usable} of {listed} training images unreadable, skipped "
            f"(`sweep extract` lists each one in its feature manifest){_first_unreadable(config)}")
    return usable


def _first_unreadable(config: PipelineConfig, limit: int = 64, look: int = 10_000) -> str:
    """"; e.g. <file>: <error>" for the first unreadable one of the first `limit` training images decoded,
    else for the first missing file of the first `look`, else ""."""
    from sweep.data.preprocess import unreadable_rows
    from sweep.data.table import build_table

    rows = build_table(config).frame
    train = rows[rows["split"] == "train"]
    bad = unreadable_rows(train.head(limit), config.data.image_size, config.data.channels)
    if not bad:
        gone = next((p for p, i in zip(train["path"].head(look), train["index"].head(look))
                     if i < 0 and not os.path.isfile(p)), None)
        bad = [(gone, "FileNotFoundError")] if gone else []
    return f"; e.g. {bad[0][0]!r}: {bad[0][1]}" if bad else ""


def trained_with_other_settings(what: str, recorded: dict | None, wanted: dict, folder: str,
                                features: str | None = None) -> str:
    """The error for a finished model (`what` in `folder`) whose recorded settings are not the pipeline's:
    which settings changed, and the ways on. `recorded` is None for models finished before sweep recorded
    their settings; only the parts recorded are compared. `features`: the model's feature store, named too
    where it exists: a retrained model makes it stale (the extract stage would stop at it next)."""
    from sweep.config import changed_settings
    from sweep.storage import exists

    recorded = recorded or {}
    changed = changed_settings(recorded, {k: v for k, v in wanted.items() if k in recorded})
    why = ("changed: " + "; ".join(changed)) if changed else "its settings were not recorded by the sweep that made it"
    return (f"{folder} holds {what} trained with other settings ({why}). To keep it, restore those settings or "
            f"train into another storage (--set storage=PATH); to retrain here, delete {folder}"
            + (f" and its features, {features}" if features and exists(features) else ""))


def trained_on_other_images(what: str, recorded: dict | None, get_table, folder: str,
                            labels: bool = False) -> str | None:
    """The error for a finished model (`what` in `folder`) trained on other training images than the
    pipeline's now (`recorded`: `training_images` of the images it was trained on; None for a model from
    before sweep recorded them: not compared, and `get_table()`, the pipeline's image table, not built), else
    None. `labels`: the classes count too (a supervised model)."""
    from sweep.data.table import training_images

    if not recorded:
        return None
    return other_images_problem(what, recorded, training_images(get_table()), folder, labels)


def other_images_problem(what: str, recorded: dict, now: dict, folder: str, labels: bool = False) -> str | None:
    """`trained_on_other_images` for two `training_images` records at hand: then, `recorded`; `now`."""
    if recorded.get("ids") == now["ids"] and (not labels or recorded.get("labels") == now["labels"]):
        return None
    which = "images" if recorded.get("ids") != now["ids"] else "labels"
    return (f"{folder} holds {what} trained on other training {which} ({recorded.get('images')} training images "
            f"then, {now['images']} now): data.train's files, labels or splits changed since it was trained (the "
            f"splits are drawn per class: adding or removing an image redraws its class's). To keep it, restore "
            f"those images; to train again, use another storage (--set storage=PATH) or delete {folder}")


def load_checkpoint_state(checkpoint, file_name: str, what: str, speak: bool):
    """The training state (`file_name`, a torch file) of Ray Train's latest checkpoint of this run (or of a
    newer one stored in its folder that Ray Train did not register, as Ctrl-C leaves them); where that
    one cannot be read (cut short by a crash while it was stored, a full disk), of the newest earlier one kept
    beside it (checkpoint folder names sort by time); None when the run has none, or none readable (it then
    starts over). Said (`speak`: one worker) when the latest is passed over. Before, a damaged latest
    checkpoint failed every rerun the same way, while the one before it was intact."""
    import pyarrow.fs as pafs
    import ray.train
    import torch

    if checkpoint is not None:
        fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
        folder = latest.rsplit("/", 1)[0]
    else:
        # Ray Train hands none when its run snapshot lists none: a run stopped (Ctrl-C, a killed driver) between
        # a worker storing a checkpoint and the controller registering it leaves the checkpoints without the
        # snapshot, and the rerun trained from step 0 beside them. The newest readable one in the run folder.
        try:
            storage = ray.train.get_context().get_storage()
        except Exception:  # noqa: BLE001 - no context or storage to look in: start over, as before
            return None
        fs, folder, latest = storage.storage_filesystem, storage.experiment_fs_path.rstrip("/"), None
    try:
        kept = fs.get_file_info(pafs.FileSelector(folder))
    except OSError:
        kept = []
    # Newer ones than the registered latest too: Ctrl-C lets the workers store a checkpoint or two that the
    # controller never registers (an s3 demo stopped at step 20 of 40 had 10 registered, 20 and 30 stored,
    # and the rerun trained from step 10 again)
    stored = {i.path for i in kept if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}
    candidates = sorted(stored | {latest} if latest else stored, reverse=True)
    if not candidates:  # a first start
        return None
    problem = None
    for i, path in enumerate(candidates):
        try:
            with ray.train.Checkpoint(path=path, filesystem=fs).as_directory() as d:
                state = torch.load(Path(d) / file_name, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the one before
            problem = problem or f"{path}/{file_name}: {one_line(e)}"
            continue
        if i and speak:
            say(f"{what}: the latest checkpoint cannot be read ({problem}); resuming from the one before, {path}")
        if (latest is None or path > latest) and speak:
            say(f"{what}: {path} was stored but not registered by Ray Train (the run stopped in between): "
                f"resuming from it")
        return state
    if speak:
        say(f"{what}: no checkpoint of this run can be read ({problem}); starting over")
    return None


RUN_IMAGES_FILE = "training_images.json"  # in a Ray Train run folder: the images that run trains on


def check_run_images(what: str, run_folder: str, now: dict, labels: bool = False) -> None:
    """Before a Ray Train run starts or resumes in `run_folder`: the first start records the training images
    (`now`, `training_images` of the pipeline's table) beside its checkpoints; a resumed run must train on
    the same ones (a finished model's marker is compared the same way; an interrupted run
    resumed over other images mixed two data sets in one model). RuntimeError with what to do."""
    from sweep.storage import read_json, write_json

    path = f"{run_folder}/{RUN_IMAGES_FILE}"
    before = read_json(path)
    if before is None:  # a new run, or one from before sweep recorded its images
        write_json(path, now)
        return
    problem = other_images_problem(f"an interrupted {what} run", before, now, run_folder, labels)
    if problem:
        raise RuntimeError(problem)


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
    that RunConfig's LoggingConfig sets; its warnings still show. Ray internals: if they move, the lines do.
    Also Ray Data's lines about the worker's own shard (`quiet_ray_data`)."""
    quiet_ray_data()
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class WorkerMetrics:
    """A training worker's MLflow metrics (rank 0 of pretrain and the baselines), logged window by window. An
    MLflow server at the tracking URI is asked first (a few ms; nothing for a SQLite store): while it does not
    answer, the metrics are held and training goes on, said once; they are logged when it answers again.
    MLflow's client retried each request to a dead server for ~4 minutes, the training standing still, and
    then failed the run."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, uri: str, run_id: str, label: str):
        from mlflow.tracking import MlflowClient

        self.client, self.uri, self.run_id, self.label = MlflowClient(uri), uri, run_id, label
        self.held: list = []
        self.lost_at: str | None = None  # where the server was first found gone (None: it answers)

    def answers(self) -> bool:
        from sweep import tracking

        return tracking.lost_server(self.uri) is None

    def log(self, metrics: list, at: str) -> bool:
        """Log `metrics` (and any held ones); False where the server does not answer (they are held)."""
        self.held += metrics
        if not self.answers():
            if self.lost_at is None:
                self.lost_at = at
                say(f"{self.label}: the MLflow server at {self.uri} does not answer ({at}); training goes on, its "
                    f"metrics are held and logged once the server answers")
            return False
        for i in range(0, len(self.held), self.BATCH):
            self.client.log_batch(self.run_id, metrics=self.held[i: i + self.BATCH])
        if self.lost_at is not None:
            say(f"{self.label}: the MLflow server answers again ({at}); the metrics held since {self.lost_at} "
                f"are logged")
        self.held, self.lost_at = [], None
        return True

    def close(self) -> None:
        """At the end of training: held metrics that could not be logged are said (the weights are saved)."""
        if self.held and not self.log([], "the end of training"):
            say(f"{self.label}: {len(self.held)} metric values since {self.lost_at} are not in MLflow (the server at "
                f"{self.uri} does not answer); the trained weights are saved")


def one_line(e: BaseException) -> str:
    """An exception for a message: its type and the first line of its text."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def error_cause(e: BaseException | str) -> str:
    """One line for the user: Ray's task, actor and worker-group errors carry the remote traceback after a
    header (`ray::Actor.method() (pid=..., ...)`, in colour codes); their last line is the cause."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _storage_refused() -> re.Pattern:
    """A write the storage refused (`storage.REFUSED_WRITE`) in an error's text, in the words of Python,
    pyarrow ('[errno 28]') and safetensors ('os error 28')."""
    from sweep.storage import REFUSED_WRITE

    words = "|".join(re.escape(os.strerror(n)) for n in sorted(REFUSED_WRITE))
    return re.compile(rf"{words}|(errno|os error) ({'|'.join(map(str, sorted(REFUSED_WRITE)))})\b", re.IGNORECASE)


def storage_cause(cause: str, folder: str) -> str:
    """A training stage's failure `cause`, naming `folder` (where its checkpoints and weights go) when the
    storage refused a write: Ray Train's checkpoint copy and safetensors name no file ('OSError: [Errno 28]
    Error writing bytes to file. Detail: [errno 28] No space left on device')."""
    named = "cannot write " in cause  # a WriteError (`storage.writing`, `staged_dir`) names its file already
    return f"{cause} (writing under {folder})" if _storage_refused().search(cause) and not named else cause


def fit_interruptibly(trainer, stage: str):
    """`trainer.fit()` of a Ray Train V2 trainer, with Ctrl-C as sweep's stages take it: the first one asks
    Ray Train to abort the run (its workers stop; the checkpoints already written stay, for the rerun to
    resume from), then KeyboardInterrupt (exit 130); a second one interrupts at once. Ray Train's own
    handler called `sys.exit(0)` when its controller had already gone, so the command ended with status 1
    and no message, and it stayed installed after `fit`, taking a later Ctrl-C (another stage of `sweep run`)
    for its finished run. The process's own SIGINT handler is back after `fit`. Ray internals (the trainer's
    `_register_sigint_handler`): if they move, Ray Train's handling stays."""
    import ray

    interrupted = False

    def register(controller):
        def on_sigint(signum, frame):
            nonlocal interrupted
            if interrupted:
                raise KeyboardInterrupt
            interrupted = True
            say(f"{stage}: interrupted; stopping the workers (the last checkpoint is kept for a rerun; Ctrl-C "
                f"again to stop at once)")
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:
                pass  # already gone

        signal.signal(signal.SIGINT, on_sigint)

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    if main and hasattr(trainer, "_register_sigint_handler"):
        # a process that ignores SIGINT (a background job of a script) goes on ignoring it, as Python and the
        # other stages do: Ray Train's handler, and then ours, made only the training stages stop
        trainer._register_sigint_handler = (lambda controller: None) if before is signal.SIG_IGN else register
    try:
        result = trainer.fit()
    except Exception:
        if interrupted:  # the abort's consequence, not a failure
            raise KeyboardInterrupt from None
        raise
    finally:
        if main and before is not None:
            signal.signal(signal.SIGINT, before)
    if interrupted:
        raise KeyboardInterrupt
    return result


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
