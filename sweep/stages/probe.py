"""`sweep probe`: one Ray Tune trial per (encoder, feature column); every trial is an MLflow child run.

A trial reads only its column (Parquet projection; the label/split/domain columns and the shards'
footers are read once per worker process and reused by the trials that follow on the same reused
actor), trains the whole (lr, weight decay) grid at once as independent heads (`sweep.probing`), keeps
the head that is best on validation and reports its contract metrics once, at the end.

MLflow is written from the driver only, by a Tune callback when a trial completes: one writer, no SQLite
lock contention, the experiment created once. The callback takes the outcome out of the result Tune
keeps (Tune's experiment state stays small) and queues it; a writer thread makes the child runs (params,
tags, metrics and the per-epoch validation curve) of the trials finished in the last `BATCH_SECONDS`,
into a SQL store in one transaction (`sweep.tracking_sql`), so store latency never holds up Tune's
scheduling loop and the store's CPU stays a small share of the sweep. A trial that already has a FINISHED
child run for this config hash is not run again, so a rerun after an interruption does only what is
left; a child run left unfinished by an interruption (written through an MLflow server, run by run) is
deleted and its trial rerun, so each trial ends with exactly one run.

ASHA (`probe.asha`, off by default) stops weak columns early: a trial then runs one epoch per Tune step
and reports its outcome so far at every step, so a stopped trial is recorded as of its last epoch (child
run tagged `sweep.stopped_by=asha`, `epochs_run` below `probe.epochs`) and is not rerun on resume. Off by
default because every (block, timestep) column is a result of the study (the heat map): a stopped
column's cell is a result of fewer epochs, and which columns stop depends on the order trials report in.
The per-column hyperparameter search is done inside the trial by the heads either way, and early stopping
on validation within a trial is `probe.patience`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import os
import queue
import signal
import threading
import time
import uuid

import numpy as np
from ray.tune import Callback, Stopper, Trainable

from sweep.config import PipelineConfig
from sweep.features.store import FeatureStore, FeatureStoreError
from sweep.stages.common import Progress, dropped_messages, error_cause, errors_only, init_ray, ray_address, say
from sweep.stages import rendezvous
from sweep.storage import Storage

CURVE_KEYS = ("val_acc", "val_macro_f1", "val_loss", "train_loss")
RENDEZVOUS_TIMEOUT_S = 120.0  # longest a worker's first trial waits for the other workers to start
# finished trials written to MLflow together (a crash loses at most these: they rerun on resume)
BATCH_SECONDS = 2.0
TAG_STOPPED_BY = "sweep.stopped_by"  # on the child run of a trial ASHA stopped early: "asha"
# a trial's peak memory over its float16 feature column (4.9x with k-means, 4.4x without, on 300,000 x 512)
TRIAL_PEAK_OVER_COLUMN = 5.0


class ProbeError(RuntimeError):
    pass


def trial_key(encoder: str, column: str) -> str:
    return f"{encoder}/{column}"


# ------------------------------------------------------------------------------------- one trial

_META_CACHE: dict[tuple, tuple] = {}  # per worker process: (store, shards) -> (labels, split, domain)
_FOOTERS: dict[tuple, object] = {}  # per worker process: (store key, shard) -> the shard's Parquet footer
_MAX_FOOTERS = 4096  # a footer of a 200-column shard is ~100 KB in memory


def _read(store: FeatureStore, path: str, columns: list[str]):
    """Some columns of one shard. Single-threaded: a trial has its own CPU(s), and Arrow's thread pool
    doubled the CPU time of reading one float16 list column. The shard's footer is parsed once per
    worker (a complete shard never changes under its store key): one column of the benchmark's 7 shards
    of 210 columns read in 69 ms instead of 90."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = ((store.manifest() or {}).get("key"), path)
    try:
        with store.fs.open_input_file(path) as f:
            shard = pq.ParquetFile(f, metadata=_FOOTERS.get(key))
            if key not in _FOOTERS and len(_FOOTERS) < _MAX_FOOTERS:
                _FOOTERS[key] = shard.metadata
            return shard.read(columns=columns, use_threads=False)
    except (OSError, pa.ArrowException) as e:  # the file alone named: `sweep extract` makes it again
        raise FeatureStoreError(f"feature shard {path} cannot be read ({str(e).splitlines()[0]}): run `sweep "
                                f"extract`, which extracts a damaged or missing shard again") from None


def _read_meta(store: FeatureStore, files: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key = (store.root, (store.manifest() or {}).get("key"), tuple(files))
    if key not in _META_CACHE:
        parts = [_read(store, f, ["label", "split", "domain"]) for f in files]
        labels = np.concatenate([p.column("label").to_numpy() for p in parts]).astype(np.int64)
        split = np.concatenate([p.column("split").to_numpy(zero_copy_only=False) for p in parts]).astype(str)
        domain = np.concatenate([p.column("domain").to_numpy(zero_copy_only=False) for p in parts]).astype(str)
        _META_CACHE.clear()  # one store at a time is plenty
        _META_CACHE[key] = (labels, split, domain)
    return _META_CACHE[key]


def read_probe_data(store_uri: str, column: str, datasets: list[str] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features float16 (n, dim), labels, split, domain) of one column over every completed shard of
    `datasets` (default: all the store holds): only this column's data is read (Parquet column projection)."""
    import pyarrow as pa

    from sweep.features.store import column_to_numpy

    store = FeatureStore(store_uri)
    spec = next((c for c in store.columns() if c["column"] == column), None)
    if spec is None:
        raise FeatureStoreError(f"{store.root}: no feature column {column!r}")
    files = store.files(datasets)
    if not files:
        raise FeatureStoreError(f"{store.root}: no completed shards")
    labels, split, domain = _read_meta(store, files)
    # Shard by shard into one array of the meta's length: a list of every shard's rows, then joined, held
    # the column twice at once
    features = np.empty((len(labels), spec["dim"]), dtype=np.float16)
    n = 0
    for f in files:
        chunk = column_to_numpy(_read(store, f, [column]).column(column), spec["dim"])
        if n + len(chunk) <= len(features):
            features[n : n + len(chunk)] = chunk
        n += len(chunk)
    if n != len(labels):
        raise FeatureStoreError(f"{store.root}: column {column!r} has {n} rows, meta {len(labels)}")
    # Arrow's allocator (mimalloc) keeps the pages it decoded the shards into (~1.6x the column) for
    # itself: handed back, the trial's numpy and torch arrays can use them
    pa.default_memory_pool().release_unused()
    return features, labels, split, domain


@contextlib.contextmanager
def compute_threads(threads: int | None):
    """Limit torch and the BLAS/OpenMP pools (numpy, scikit-learn's k-means) to `threads` while inside;
    None leaves them alone. A probe's tensors are small: one thread per trial is fastest, and more than
    the trial's CPUs only fight the other trials (and other users) for cores."""
    if threads is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before)


def probe_column(store_uri: str, column: str, num_classes: int, probe: dict, seed: int,
                 threads: int | None = None, device: str = "cpu", datasets: list[str] | None = None) -> dict:
    """One trial's computation, without Ray: read one column (of `datasets`, default every dataset the store
    holds), probe it, return metrics and the choice.

    Returns `metrics` (contract names: val/test/OOD, k-means), the chosen `lr`, `weight_decay`,
    `best_epoch`, `epochs_run`, the chosen head's per-epoch `history`, `seconds` (wall time) and `final`
    (True: training ran to its end).
    """
    for info, outcome in probe_column_epochs(store_uri, column, num_classes, probe, seed, threads, device,
                                             datasets):
        if info["final"]:
            return outcome()  # while the column's thread limits are still in force (k-means runs in it)
    raise AssertionError("probe_epochs ended without a final epoch")


def probe_column_epochs(store_uri: str, column: str, num_classes: int, probe: dict, seed: int,
                        threads: int | None = None, device: str = "cpu", datasets: list[str] | None = None,
                        keep_head: bool = False):
    """`probe_column` one epoch at a time (an ASHA trial, which the scheduler may stop between epochs):
    yields `(info, outcome)` after each epoch, `info` as `sweep.probing.probe_epochs` gives it and
    `outcome()` what `probe_column` returns had training ended there (call it before advancing); with
    `keep_head`, the outcome also holds the chosen head (`head`: a `ProbeResult`) and the column it was
    fitted on (`data`: `read_probe_data`'s arrays), for the report."""
    from sweep.probing import ProbeConfig, Split, kmeans_scores, probe_epochs

    t0 = time.perf_counter()
    with compute_threads(threads):
        features, labels, split, domain = read_probe_data(store_uri, column, datasets)

        def part(mask: np.ndarray) -> Split:
            return Split(X=features[mask], y=labels[mask])

        is_ood = split == "ood"
        ood = {str(d): part(is_ood & (domain == d)) for d in dict.fromkeys(domain[is_ood].tolist())}
        test = part(split == "test") if (split == "test").any() else None
        cfg = ProbeConfig(lrs=probe["lrs"], weight_decays=probe["weight_decays"], epochs=probe["epochs"],
                          batch_size=probe["batch_size"], class_weights=probe["class_weights"],
                          select=probe["select"], patience=probe["patience"], seed=seed)
        kmeans: dict[str, float] = {}  # of the features alone: the same at every epoch

        def outcome_of(info: dict, result_now) -> dict:
            result = result_now()
            metrics = dict(result.metrics)
            if probe["kmeans"]:
                if not kmeans:
                    # the main dataset's images of every split (k-means reads no label; the labels only
                    # score its clusters): more images than the test split alone, whose NMI is mostly chance
                    # on a small study (see `kmeans_scores`)
                    # (indices: `features[~is_ood]` copied nearly the whole column at a trial's peak)
                    kmeans.update(kmeans_scores(features, labels, k=num_classes, seed=seed,
                                                rows=np.flatnonzero(~is_ood)))
                metrics.update(kmeans)
            return {
                "metrics": metrics, "lr": result.lr, "weight_decay": result.weight_decay,
                "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "history": result.history,
                "seconds": time.perf_counter() - t0, "final": info["final"],
                **({"head": result, "data": (features, labels, split, domain)} if keep_head else {}),
            }

        for info, result_now in probe_epochs(part(split == "train"), part(split == "val"), test, ood,
                                             num_classes, cfg, device=device):
            yield info, functools.partial(outcome_of, info, result_now)


_ARRIVED: set[str] = set()  # per worker process: the sweeps whose rendezvous it has checked in with


def _wait_for_peers(prefix: str, needed: int, timeout_s: float) -> None:
    """Hold a worker's first trial of a sweep until all the sweep's workers have started (or `timeout_s`
    passed).

    Why: with `reuse_actors=True`, Tune hands a pending trial to an actor that has just finished (and
    drops the actor it had requested for it) whenever that is sooner than the new actor's start-up. A
    probe trial takes about a second and a worker's start (process, imports) several, so without this
    wait every trial of a sweep ran on ONE actor whatever `max_concurrent_trials` said. Once all workers
    are up they each take the next trial as they finish, and the wait is never paid again.
    """
    if prefix in _ARRIVED:
        return
    _ARRIVED.add(prefix)
    rendezvous.arrive(prefix, needed, timeout_s)


class ProbeTrial(Trainable):
    """One Tune trial = one feature column, run to the end in a single `step()`.

    A class trainable, not a function one: Tune runs a function trainable in a thread of its actor, and 30
    probes in a non-main thread of a Ray worker took 16.2 s against 15.0 s on the worker's main thread,
    where an actor method runs. With `reuse_actors=True` a worker takes trial after trial through
    `reset_config`, keeping its imports, the meta columns and the shards' footers warm."""

    def setup(self, config: dict, trials: dict[str, dict], run: dict) -> None:
        # `trials` (every trial's store and column, by key) and `run` (the sweep's settings) come once per
        # worker through `tune.with_parameters`; a trial's own config is just its key. (With the whole
        # trial table in the grid, Tune deep-copied it for every trial: O(trials^2) driver CPU.)
        self.trials, self.run = trials, run
        self.key = config["trial"]
        self.epochs = None  # with ASHA: this trial's epochs so far (a probe_column_epochs generator)

    def reset_config(self, new_config: dict) -> bool:
        self._end_epochs()
        self.key = new_config["trial"]
        return True

    def step(self) -> dict:
        import torch

        trial, run = self.trials[self.key], self.run
        if run.get("rendezvous"):
            _wait_for_peers(run["rendezvous"], run["workers"], run["rendezvous_timeout_s"])
        device = "cuda" if run["gpus"] > 0 and torch.cuda.is_available() else "cpu"
        args = (trial["store"], trial["column"], run["num_classes"][trial["encoder"]], run["probe"], run["seed"],
                run["threads"], device, run["datasets"])
        if not run["probe"].get("asha"):  # the whole column in this one step
            return self._result(probe_column(*args))
        # ASHA: one epoch per step. At the epochs where ASHA may stop the trial (its rungs) and at the last
        # one, the step reports the whole outcome so far, so a stopped trial has its record in its last
        # result; in between only the val metrics (the outcome costs about a sixth of an epoch).
        if self.epochs is None:
            self.epochs = probe_column_epochs(*args)
        info, outcome = next(self.epochs)
        rungs = run["asha_rungs"]
        if info["final"] or rungs is None or info["epoch"] in rungs:
            result = self._result(outcome())
        else:
            result = {"probe_epoch": info["epoch"]}
        if info["final"]:
            self._end_epochs()
        # ASHA decides on the leader's val metrics of this epoch, the same numbers at every epoch
        return {**result, "val_acc": info["val_acc"], "val_macro_f1": info["val_macro_f1"]}

    @staticmethod
    def _result(out: dict) -> dict:
        out["worker"] = os.getpid()
        # Flat val metrics for Tune's own views (and ASHA's); the whole outcome under "probe" for the
        # MLflow callback.
        return {"val_acc": out["metrics"]["val_acc"], "val_macro_f1": out["metrics"]["val_macro_f1"],
                "probe": out, "done": out["final"]}

    def _end_epochs(self) -> None:
        if self.epochs is not None:
            self.epochs.close()  # leaves the column's thread limits
            self.epochs = None

    def cleanup(self) -> None:
        # Tune calls this (through `stop`) before it lets the actor go. As the worker then exits, the raylet
        # sends it SIGTERM at once, and Ray's handler raises SystemExit in whatever runs at that moment: in a
        # garbage-collection callback that printed "Exception ignored ... SystemExit: 1" on the user's terminal
        # at the end of about one sweep in twenty. Nothing is left to save here: SIGTERM just ends the process.
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:  # not the main thread: Ray's handler stays
            pass
        self._end_epochs()


def concurrent_workers(config: PipelineConfig, trials: int) -> int:
    """How many trials can run at once: `max_concurrent_trials`, the cluster's CPUs and GPUs (at the time
    of asking) and the number of trials, whichever is smallest; on a local Ray started by sweep where
    `max_concurrent_trials` is not set, also the machine's cores. (That Ray declares at least 4 logical
    CPUs so Ray Train and Ray Data fit side by side on a small machine; a probe trial is one busy thread, so
    more trials than cores only add workers to start: on 2 cores, 4 workers importing torch at once held
    the demo's first trial back 18 s; so also with `cpus_per_trial` below 1, which Ray would fit twice or
    more on a core.)"""
    import ray

    p = config.probe
    total = ray.cluster_resources()
    fit = [trials, p.max_concurrent_trials or trials,
           math.floor(total.get("CPU", 0) / p.cpus_per_trial + 1e-9)]
    if ray_address(config) is None and p.max_concurrent_trials is None:
        # a trial below one CPU still runs one thread (`threads` in `run`): no more trials than cores
        fit.append(max(1, math.floor((os.cpu_count() or 1) / max(1.0, p.cpus_per_trial) + 1e-9)))
    if p.gpus_per_trial > 0:
        fit.append(math.floor(total.get("GPU", 0) / p.gpus_per_trial + 1e-9))
    return max(1, min(fit))


def memory_warning(column_bytes: int, workers: int, available_bytes: int) -> str | None:
    """A warning where `workers` trials at once, each on a float16 column of `column_bytes` (the largest),
    would need more than 80 % of the memory available: Ray does not count a trial's memory, and its OOM killer
    (or the kernel's) ends trials that then fail one by one."""
    need = TRIAL_PEAK_OVER_COLUMN * column_bytes
    if workers * need <= 0.8 * available_bytes:
        return None
    fits = max(1, int(0.8 * available_bytes // need))
    return (f"each trial holds up to about {need / 2**30:.1f} GiB at its peak (~{TRIAL_PEAK_OVER_COLUMN:g}x its "
            f"largest feature column, {column_bytes / 2**30:.2f} GiB in float16), {workers} at once "
            f"{workers * need / 2**30:.1f} GiB, and {available_bytes / 2**30:.1f} GiB is free here: trials may be "
            f"killed for memory. Run fewer at once: --set probe.max_concurrent_trials={fits}")


def available_memory() -> int | None:
    """Bytes of memory available to new work on this machine (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def largest_column_bytes(stores: dict[str, FeatureStore], trials: list[dict], columns: dict[str, dict],
                         datasets: list[str]) -> int:
    """The float16 bytes of the largest column `trials` read: every image of `datasets` x its dimensions."""
    rows = {name: sum(s["rows"] for d, info in (store.manifest() or {}).get("datasets", {}).items()
                      if d in datasets for s in info["shards"])
            for name, store in stores.items()}
    return max((2 * rows.get(t["encoder"], 0) * int(columns[t["key"]]["dim"]) for t in trials), default=0)


# ------------------------------------------------------------------------------ MLflow child runs

class ChildRunWriter:
    """Writes one MLflow child run per completed trial from a thread of the driver, in batches: the trials
    that finish within `batch_seconds` of each other go to the store together (into a SQL store in one
    transaction, a few ms of CPU a run instead of ~40 through the client: `sweep.tracking_sql`)."""

    def __init__(self, config: PipelineConfig, parent_run_id: str, columns: dict[str, dict],
                 batch_seconds: float = BATCH_SECONDS):
        from sweep import tracking  # on the driver only: trial workers never import MLflow

        self.config, self.columns = config, columns
        self.tracking, self.batch_seconds = tracking, batch_seconds
        self.client = tracking.client_for(config)
        self.experiment_id = tracking.ensure_experiment(config)
        self.tags = {**tracking.stage_tags(config, "probe"), tracking.TAG_PARENT: parent_run_id,
                     tracking.TAG_PROBE_HASH: config.probe_hash()}
        p = config.probe
        self.grid_params = {"lr_grid": p.lrs, "weight_decay_grid": p.weight_decays, **_shared_params(p)}
        self.logged, self.batches, self.seconds, self.errors = 0, 0, 0.0, []
        self.uri = tracking.tracking_uri(config)
        self.lost: str | None = None  # why the tracking server stopped answering, once it has
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="probe-mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, outcome: dict) -> None:
        self._queue.put((key, outcome, time.time()))

    def close(self) -> None:
        """Write everything queued, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        closing = False
        while not closing:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.batch_seconds
            while batch[-1] is not None and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            if batch[-1] is None:
                closing = True
                batch.pop()
            if batch:
                t0 = time.perf_counter()
                errors = self.write(batch) if self._server_answers() else [
                    f"{key}: not recorded: {self.lost}" for key, _, _ in batch]
                self.logged += len(batch) - len(errors)
                self.errors += errors
                self.batches += 1
                self.seconds += time.perf_counter() - t0

    def _server_answers(self) -> bool:
        """False once an MLflow server at the tracking URI has stopped answering (asked before each batch, a
        few ms): MLflow's client retries every request to a dead server for ~4 minutes, a sweep's worth of
        runs for hours. The sweep then stops (`StopWhenTrackingLost`) and a rerun does the rest."""
        if self.lost is None:
            self.lost = self.tracking.lost_server(self.uri)
        return self.lost is None

    def write(self, batch: list[tuple[str, dict, float]]) -> list[str]:
        """Records a batch of (trial key, outcome, finish time); returns a line per trial not recorded
        (reported after the sweep; such a trial reruns next time)."""
        try:
            runs = [self.finished_run(*item) for item in batch]
            self.tracking.log_finished_runs(self.client, self.experiment_id, runs)
            return []
        except Exception:  # noqa: BLE001 - one bad run must not cost the others theirs: each on its own
            pass
        errors = []
        for item in batch:
            try:
                self.tracking.log_finished_runs(self.client, self.experiment_id, [self.finished_run(*item)])
            except Exception as e:  # noqa: BLE001
                # an SQL error ('database or disk is full') named no store, and could carry its statement
                cause = self.tracking.database_cause(e)
                errors.append(f"{item[0]}: {cause} (MLflow tracking store {self.uri})" if cause
                              else f"{item[0]}: {type(e).__name__}: {e}")
        return errors

    def finished_run(self, key: str, outcome: dict, finished: float):
        """The child run of one trial: contract params, tags and metrics, the chosen head and the curves;
        it starts when the trial's computation did and ends when the trial completed."""
        col = self.columns[key]
        params = {
            "encoder": col["encoder"], "layer": col["layer"], "column": col["column"],
            "timestep": "" if col["timestep"] is None else col["timestep"],
            "resolution": col["resolution"], "dim": col["dim"],
            "lr": outcome["lr"], "weight_decay": outcome["weight_decay"], "best_epoch": outcome["best_epoch"],
            **self.grid_params,
        }
        metrics = {k: v for k, v in outcome["metrics"].items() if v is not None and np.isfinite(v)}
        metrics.update(epochs_run=outcome["epochs_run"], trial_seconds=outcome["seconds"])
        end = int(finished * 1000)
        tags = {**self.tags, self.tracking.TAG_TRIAL: key, "mlflow.runName": key}
        if col.get("features"):
            tags[self.tracking.TAG_FEATURES] = col["features"]
        if not outcome.get("final", True):
            tags[TAG_STOPPED_BY] = "asha"
        return self.tracking.FinishedRun(
            tags=tags, params=params,
            metrics=metrics, curves={f"history_{k}": [h[k] for h in outcome["history"]] for k in CURVE_KEYS},
            start_time=end - int(1000 * outcome["seconds"]), end_time=end)


class StopWhenTrackingLost(Stopper):
    """Ends the sweep once the MLflow server stopped answering: trials finished after that are not recorded
    and would run again anyway."""

    def __init__(self, writer: ChildRunWriter):
        self.writer = writer

    def __getstate__(self):  # pickled with Tune's run config; the writer (a thread) stays on the driver
        return {**self.__dict__, "writer": None}

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.writer is not None and self.writer.lost is not None


class MlflowChildRuns(Callback):
    """Tune callback: queues each completed trial for the MLflow writer (the driver's Tune loop never waits
    on the store); prints a progress line at most every 10 s."""

    def __init__(self, writer: ChildRunWriter, total: int):
        self.writer, self.total = writer, total
        self.completed, self.failed, self.stopped = 0, 0, 0
        self.recorded_early: list[str] = []  # trials stopped after their last outcome: recorded as of an earlier epoch
        self.outcomes: dict[str, dict] = {}  # trial id -> its reported outcome, until it completes
        self.workers: set[int] = set()
        # the first trials carry the workers' start-up: no estimate from them alone
        self.progress = Progress("probe", total, "trials", eta_after=4)

    def __getstate__(self):  # Tune pickles its run config; the writer (a thread) stays on the driver
        return {**self.__dict__, "writer": None}

    def setup(self, **info):
        self.progress.restart()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Tune keeps every trial's last result and writes them all into its experiment state every few
        # seconds: the outcome (curves, metrics) is taken out of it here, and written to MLflow instead.
        outcome = result.pop("probe", None)
        if outcome is not None:
            self.outcomes[trial.trial_id] = outcome

    def on_trial_complete(self, iteration, trials, trial, **info):
        outcome = self.outcomes.pop(trial.trial_id, None)
        if outcome is None:  # stopped before reporting: nothing to record, it reruns next time
            return
        # With ASHA a step is an epoch, and the outcome comes only at rungs (see _asha_rungs): a trial stopped
        # after more steps than its outcome's epochs was stopped off a rung (not expected)
        if trial.last_result.get("training_iteration", 0) > outcome["epochs_run"]:
            self.recorded_early.append(trial.config["trial"])
        self.writer.submit(trial.config["trial"], outcome)
        self.stopped += not outcome.get("final", True)  # by the scheduler (ASHA) before its last epoch
        self.workers.add(outcome.get("worker"))
        self.completed += 1
        self._progress()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        self._progress()

    def _progress(self):
        self.progress.update(self.completed + self.failed, f"{self.failed} failed")


# ------------------------------------------------------------------------------------------ stage

def complete_stores(config: PipelineConfig) -> dict[str, FeatureStore]:
    """Each encoder's feature store; raises when one is missing or lacks some of the pipeline's datasets."""
    storage = Storage.of(config.storage_root)
    stores = {}
    for spec in config.encoder_specs():
        store = FeatureStore(storage.features(spec.name))
        complete, lacking = store.is_complete(), store.incomplete(config.dataset_names())
        if not complete or lacking:
            what = f" (dataset(s) {', '.join(map(repr, lacking))})" if lacking and store.manifest() else ""
            raise ProbeError(f"probe: features of encoder {spec.name!r} are missing or incomplete at "
                             f"{store.root}{what}; run `sweep extract` first")
        stores[spec.name] = store
    return stores


def check_shards(config: PipelineConfig, stores: dict[str, FeatureStore], encoders: set[str]) -> None:
    """Raise ProbeError naming a shard of the stores of `encoders` that is gone or damaged, before any trial
    starts: every trial reads every shard, so each one failed with Tune's traceback (hundreds of lines on
    stderr) before the one-line cause."""
    for name in sorted(encoders):
        damaged = stores[name].damaged(config.dataset_names())
        if damaged:
            file, why = damaged[0]
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            raise ProbeError(f"probe: feature shard {stores[name].root}/{file} of encoder {name!r}: {why}{more}; "
                             f"run `sweep extract`, which extracts a damaged or missing shard again")


def plan_trials(config: PipelineConfig, stores: dict[str, FeatureStore] | None = None
                ) -> tuple[list[dict], dict[str, dict], dict[str, int]]:
    """Every (encoder, column) the pipeline asks for, from the complete feature stores (`complete_stores`):
    trial configs, column specs by trial key, and the number of classes of each encoder's store. Raises
    when an encoder's store is missing, incomplete or made under other settings (`asked_settings`: hashes
    each encoder's checkpoint, and builds the encoder where its layers are not listed by name)."""
    from sweep.stages.extract import asked_settings  # not at module level: trial workers import this module

    stores = complete_stores(config) if stores is None else stores
    trials, columns, num_classes = [], {}, {}
    for spec in config.encoder_specs():
        store = stores[spec.name]
        try:  # the columns these settings ask for: all of the store's, or some of a store made with more
            served = store.served_columns(asked_settings(config, spec, store.columns()))
        except FeatureStoreError as e:
            raise ProbeError(f"probe: encoder {spec.name!r}: {e}; run `sweep extract`, which names what to "
                             f"do") from None
        num_classes[spec.name] = len(store.manifest()["classes"])
        features = store.identity(config.dataset_names())
        for col in served:
            key = trial_key(spec.name, col["column"])
            columns[key] = {**col, "encoder": spec.name, "features": features}
            trials.append({"key": key, "encoder": spec.name, "store": store.root, "column": col["column"]})
    return trials, columns, num_classes


@contextlib.contextmanager
def _quiet_tune():
    """No per-trial CSV/JSON/TensorBoard files (MLflow is the record; 200+ trial folders of them cost time),
    Tune's experiment state saved every 10 minutes (and at the start and end) rather than every few seconds (a
    sweep resumes from MLflow, not from it, and each save serialises every trial: ~0.4 s of driver CPU per 200
    trials, taken from the trials' cores), nothing from Tune on stdout, and no warning from the result grid
    about the files it then cannot find. A user's own setting of any of these variables is kept."""
    settings = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_GLOBAL_CHECKPOINT_S": "600",
                # Tune's newer console output prints its experiment table and folder on stdout even at
                # verbose=0; the older one honours it (sweep prints its own progress, on stderr)
                "RAY_AIR_NEW_OUTPUT": "0"}
    before = {key: os.environ.get(key) for key in settings}
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    try:
        with errors_only("ray.tune.analysis.experiment_analysis"):
            yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Interrupt:
    """Ctrl-C during `Tuner.fit` as sweep's stages take it: the sweep ends (what finished is recorded) and the
    command exits 130 like any interrupted stage, instead of Tune's own handling, after which `fit` returned
    as if the sweep had failed and Tune's log pointed the user at `Tuner.restore` (a sweep resumes from
    MLflow by rerunning the command). Tune's SIGINT handler is switched off for the duration
    (`TUNE_DISABLE_SIGINT_HANDLER`); the first Ctrl-C sets `interrupted` and hands Tune its other stop signal,
    SIGUSR1, which ends the run as its Ctrl-C handling would; a second Ctrl-C interrupts at once. Both signals'
    handlers are the process's own again after the sweep (Tune's own SIGINT handling stays installed after
    `fit` and took the next Ctrl-C, in `sweep run`'s report stage, as a request to stop a finished sweep).
    Outside the main thread (no signal handlers there) Tune's handling stays."""

    def __init__(self):
        self.interrupted = False

    @contextlib.contextmanager
    def catching(self):
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
            yield
            return
        before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        # Tune leaves its SIGUSR1 handler installed after `fit`: the process's own comes back after the sweep
        handlers = signal.signal(signal.SIGINT, self._on_sigint), signal.getsignal(signal.SIGUSR1)
        try:
            # its lines about the stop (Tune's SIGUSR1 handler logs as for Ctrl-C) and about Tuner.restore
            with dropped_messages("ray.tune.tune", "Stop signal received", "Experiment has been interrupted"):
                yield
        finally:
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGUSR1, handlers[1])
            if before is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before

    def _on_sigint(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        say("probe: interrupted; ending the sweep (the trials finished so far are recorded; Ctrl-C again to stop "
            "at once)")
        os.kill(os.getpid(), signal.SIGUSR1)


@contextlib.contextmanager
def _plain_worker_env():
    """Tune gives its trainable actors a runtime_env holding one variable, PL_DISABLE_FORK=1 (a PyTorch
    Lightning workaround, ray-project/ray#28197; the probe does not use Lightning). Any runtime_env makes Ray
    launch each worker through its runtime-env setup script (a second interpreter that imports Ray) and rules
    out the workers Ray prestarted: ~1 s more per worker before its first trial on 2 cores. Without the
    variable the actors take plain workers (unless the driver's environment holds a variable that Tune
    forwards to its actors, such as AWS credentials for S3 storage: those keep a runtime_env). Ray internals:
    if they move, Tune's default stays in force."""
    try:
        from ray.tune.execution import class_cache

        defaults = class_cache.DEFAULT_ENV_VARS
        saved = defaults.pop("PL_DISABLE_FORK")
    except (ImportError, AttributeError, KeyError):
        yield
        return
    try:
        yield
    finally:
        defaults["PL_DISABLE_FORK"] = saved


@contextlib.contextmanager
def _cached_trainable_lookups():
    """Tune looks the trainable up in its registry, a key in Ray's GCS, five times per trial (three `contains`,
    two `get`s that unpickle the class again, two of them between a trial's end and the next one's start on
    the same actor): ~2.5 ms of driver CPU and ~1 ms of RPCs per trial. Within one `Tuner.fit` the
    registered class does not change, so the first lookup's answer serves the rest. Ray internals: if they
    move, Tune's own lookups stay in force."""
    try:
        from ray.tune import registry

        tune_registry, category = registry._global_registry, registry.TRAINABLE_CLASS
        get, contains = tune_registry.get, tune_registry.contains
    except (ImportError, AttributeError):
        yield
        return
    found: dict[str, object] = {}

    def cached_get(kind, key):
        if kind != category:
            return get(kind, key)
        if key not in found:
            found[key] = get(kind, key)
        return found[key]

    def cached_contains(kind, key):
        return (kind == category and key in found) or contains(kind, key)

    tune_registry.get, tune_registry.contains = cached_get, cached_contains  # shadow the methods ...
    try:
        yield
    finally:
        del tune_registry.get, tune_registry.contains  # ... and uncover them


def _asha(p):
    """Tune's ASHA over epochs (one step of a trial = one epoch) on the selection metric, or None."""
    if p.asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", metric=p.select, mode="max", max_t=p.epochs,
                         grace_period=p.asha.grace_period, reduction_factor=p.asha.reduction_factor)


def _asha_rungs(scheduler) -> list[int] | None:
    """The epochs at which Tune's ASHA can stop a trial: its rungs' milestones, rounded up (a trial
    reports once per epoch, and ASHA decides on the first result at or past a milestone). None where
    Ray's bracket internals are not as expected: trials then report their outcome at every epoch."""
    try:
        return sorted({math.ceil(milestone) for bracket in scheduler._brackets for milestone, _ in bracket._rungs})
    except (AttributeError, TypeError, ValueError):
        return None


def _shared_params(p) -> dict:
    """The probe settings logged as MLflow params of the parent run and of every child run alike (the grid
    itself is named differently in each): training, selection, and ASHA's settings when it is on."""
    asha = {} if p.asha is None else {"asha_grace_period": p.asha.grace_period,
                                      "asha_reduction_factor": p.asha.reduction_factor}
    return {"epochs": p.epochs, "batch_size": p.batch_size, "class_weights": p.class_weights, "select": p.select,
            "patience": p.patience, **asha}


def _pending_trials(config: PipelineConfig, trials: list[dict], columns: dict[str, dict]
                    ) -> tuple[set[str], list[dict], int, dict]:
    """MLflow's side of planning: the keys of trials already finished for this config, the trials left,
    how many unfinished child runs of those were deleted (an interrupted sweep's), and the finished runs of
    other configs that are results of some of those left (`tracking.reusable_trial_runs`: to be copied).
    Finished runs made on a feature store since made again from other images (the images changed and the
    store was deleted and extracted again) are deleted too, said, and their trials run again: kept, they
    were reported as results of today's features."""
    from sweep import tracking

    features = {col["encoder"]: col["features"] for col in columns.values()}
    done, other_features = tracking.finished_trials(config, features)
    if other_features:
        tracking.delete_runs(config, other_features)
        say(f"probe: {len(other_features)} finished run(s) of this config were made on feature stores made again "
            f"since from other images: moved to MLflow's deleted runs and probed again")
    todo = [t for t in trials if t["key"] not in done]
    stale = tracking.delete_unfinished_trial_runs(config, {t["key"] for t in todo}) if todo else 0
    reusable = tracking.reusable_trial_runs(config, {t["key"] for t in todo}, features)
    if not done and not other_features:
        tracking.explain_new_settings(config, copying=bool(reusable))
    return done, todo, stale, reusable


def _copy_runs(config: PipelineConfig, parent: str, reusable: dict) -> None:
    """The runs of other configs that are this one's results, copied under `parent` (a few ms each)."""
    from sweep import tracking

    try:
        tracking.copy_trial_runs(config, parent, reusable)
    except BaseException:
        tracking.finish_run(config, parent, "FAILED")
        raise
    hashes = sorted({r.data.tags.get(tracking.TAG_HASH) for r in reusable.values()})
    encoders = sorted({r.data.params.get("encoder") for r in reusable.values()})
    say(f"probe: {len(reusable)} trial(s) of {', '.join(encoders)} copied from finished runs of config "
        f"{', '.join(hashes[:3])}{', ...' if len(hashes) > 3 else ''}: the same data and probe settings on the same "
        f"feature stores (the configs differ only in settings these trials do not read), tag {tracking.TAG_COPIED_FROM}")


def _check_no_other_storage_probed(config: PipelineConfig, parent: str, columns: dict[str, dict],
                                   logged: int) -> None:
    """After the sweep, what planning checked before it (`tracking.finished_trials`): that no other storage's
    runs of this config on other feature stores share the experiment. Two storages of one config probing into
    one experiment at once both passed that check (neither had runs yet), each recorded every trial, and
    `sweep best` and `sweep report` then ranked both studies' runs together, saying nothing. ProbeError (the
    stage's run FAILED) naming the other storage."""
    from sweep import tracking
    from sweep.best import per_storage

    try:
        tracking.finished_trials(config, {col["encoder"]: col["features"] for col in columns.values()})
    except tracking.OtherStorageRuns as e:
        tracking.finish_run(config, parent, "FAILED")
        raise ProbeError(
            f"probe: {logged} trial run(s) recorded, but another storage probed this config into MLflow experiment "
            f"{config.experiment_name!r} meanwhile, on other feature stores ({per_storage(e.elsewhere)}; this one is "
            f"{Storage.of(config.storage_root).root}): `sweep best` ranks both studies' runs together. Give each "
            f"storage its own experiment (--set tracking.experiment=NAME) and probe again there") from None


def run(config: PipelineConfig) -> dict:
    from ray import tune

    from sweep import tracking

    t_start = time.perf_counter()
    stores = complete_stores(config)

    def plan():
        trials, columns, num_classes = plan_trials(config, stores)
        return trials, columns, num_classes, *_pending_trials(config, trials, columns)

    # Building the encoders (diffusers' import), MLflow's import and its store queries keep one core busy
    # for seconds while Ray's start mostly waits on the processes it launches: side by side they overlap
    # (~3 s less on 2 cores). A rerun with nothing left to do then starts Ray for nothing, once.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="probe-plan") as pool:
        planned = pool.submit(plan)
        init_ray(config)
        trials, columns, num_classes, done, todo, stale, reusable = planned.result()
    if not todo:
        say(f"probe: all {len(trials)} trials already in MLflow for config {config.config_hash()}, nothing to do")
        return {"trials": len(trials), "ran": 0}
    todo = [t for t in todo if t["key"] not in reusable]
    check_shards(config, stores, {t["encoder"] for t in todo})
    say(f"probe: {len(todo)} of {len(trials)} trials to run ({len(done)} already finished"
        f"{f', {len(reusable)} to copy' if reusable else ''}"
        f"{f', {stale} unfinished run(s) discarded' if stale else ''}), "
        f"{config.probe.heads_each()}")
    p = config.probe
    parent = tracking.start_stage_run(config, "probe", params={
        "lrs": p.lrs, "weight_decays": p.weight_decays, **_shared_params(p), "trials": len(trials),
        "cpus_per_trial": p.cpus_per_trial, "gpus_per_trial": p.gpus_per_trial,
        "max_concurrent_trials": p.max_concurrent_trials})
    if reusable:
        _copy_runs(config, parent, reusable)
        if not todo:
            tracking.log_batch(config, parent, metrics={"trials_run": 0, "trials_copied": len(reusable)})
            tracking.finish_run(config, parent)
            return {"trials": len(trials), "ran": 0, "copied": len(reusable)}
    writer = ChildRunWriter(config, parent, columns)
    callback = MlflowChildRuns(writer, len(todo))
    storage = Storage.of(config.storage_root)
    workers = concurrent_workers(config, len(todo))
    free = available_memory() if ray_address(config) is None else None  # a cluster's nodes': not known here
    if free:
        warning = memory_warning(largest_column_bytes(stores, todo, columns, config.dataset_names()), workers, free)
        if warning:
            say(f"probe: warning: {warning}")
    # one worker has no one to wait for
    meeting = f"probe-{uuid.uuid4().hex[:12]}" if workers > 1 else None
    run_cfg = {"probe": p.model_dump(mode="json"), "seed": config.seed, "num_classes": num_classes,
               "datasets": config.dataset_names(),
               "threads": max(1, int(p.cpus_per_trial)), "gpus": p.gpus_per_trial, "workers": workers,
               "rendezvous": meeting, "rendezvous_timeout_s": RENDEZVOUS_TIMEOUT_S}
    scheduler = _asha(p)
    run_cfg["asha_rungs"] = _asha_rungs(scheduler) if scheduler else None
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(ProbeTrial, trials={t["key"]: t for t in todo}, run=run_cfg),
                            {"cpu": p.cpus_per_trial, "gpu": p.gpus_per_trial}),
        param_space={"trial": tune.grid_search([t["key"] for t in todo])},
        tune_config=tune.TuneConfig(
            # a local machine's cap is fixed; a cluster may grow, so there only the user's limit applies
            reuse_actors=True, max_concurrent_trials=p.max_concurrent_trials if ray_address(config) else workers,
            scheduler=scheduler,
            trial_name_creator=lambda t: t.config["trial"],
            trial_dirname_creator=lambda t: t.trial_id),
        # one folder per attempt: a resumed sweep is a new, smaller Tune experiment (MLflow says what is done)
        run_config=tune.RunConfig(name=f"probe-{config.config_hash()}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=storage.tune, callbacks=[callback], verbose=0,
                                  stop=StopWhenTrackingLost(writer),
                                  # nothing to checkpoint: a trial is one step, MLflow holds the outcome
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
    )
    t0 = time.perf_counter()
    ctrl_c = _Interrupt()
    try:
        with _quiet_tune(), _plain_worker_env(), _cached_trainable_lookups(), ctrl_c.catching():
            results = tuner.fit()
        if ctrl_c.interrupted:
            raise KeyboardInterrupt
    except BaseException:
        writer.close()  # what finished is kept
        if writer.lost is None:
            tracking.finish_run(config, parent, "KILLED" if ctrl_c.interrupted else "FAILED")
        if ctrl_c.interrupted:
            say(f"probe: {writer.logged} of {len(todo)} trials recorded before the interruption")
        raise
    finally:
        if meeting is not None:
            rendezvous.clear(meeting)
    tune_seconds = time.perf_counter() - t0
    t_flush = time.perf_counter()
    writer.close()
    flush_seconds = time.perf_counter() - t_flush
    wall = time.perf_counter() - t_start
    errors = [r.error for r in results if r.error is not None]
    missing = len(todo) - writer.logged
    if writer.lost is not None:  # the parent run cannot be closed either: it stays RUNNING, a rerun goes on
        raise ProbeError(f"probe: the MLflow server stopped answering during the sweep ({writer.lost}); "
                         f"{writer.logged} of {len(todo)} trials were recorded before. Start the server again and "
                         f"rerun to do the {missing} left.")
    _check_no_other_storage_probed(config, parent, columns, writer.logged)
    tracking.log_batch(config, parent, metrics={
        "sweep_seconds": wall, "tune_seconds": tune_seconds, "trials_run": writer.logged,
        "trials_failed": missing, "logging_seconds": writer.seconds, "trials_copied": len(reusable)})
    if errors or missing:
        tracking.finish_run(config, parent, "FAILED")
        first = error_cause(errors[0]) if errors else (writer.errors[0] if writer.errors else "interrupted")
        raise ProbeError(f"probe: {missing} of {len(todo)} trials not recorded ({len(errors)} failed); first: "
                         f"{first}. Rerun to do only those.")
    tracking.finish_run(config, parent)
    stopped = f", {callback.stopped} stopped early by ASHA" if p.asha else ""
    if callback.recorded_early:
        say(f"probe: warning: {len(callback.recorded_early)} trial(s) stopped between ASHA's rungs are recorded as of "
            f"their last rung, not their last epoch (Ray's ASHA decided off its milestones), e.g. "
            f"{callback.recorded_early[0]}")
    batches = f"{writer.batches} batch" + "es" * (writer.batches != 1)
    say(f"probe: {len(todo)} trials{stopped} in {wall:.1f}s on {len(callback.workers)} worker(s) "
        f"(Tune {tune_seconds:.1f}s; MLflow writes {writer.seconds:.1f}s in {batches} in the background, "
        f"{flush_seconds:.1f}s after the last trial); see `sweep best`")
    return {"trials": len(trials), "ran": len(todo), "copied": len(reusable), "seconds": wall,
            "tune_seconds": tune_seconds,
            "logging_seconds": writer.seconds, "flush_seconds": flush_seconds, "workers": len(callback.workers),
            "max_workers": workers, "stopped_early": callback.stopped, "recorded_early": len(callback.recorded_early)}
