"""MLflow: the experiment, one parent run per stage, child runs per probe trial, and the `best` query.

Names are a contract (DESIGN.md "MLflow"): tags `sweep.stage`, `sweep.pipeline`, `sweep.config_hash`,
child runs linked by `mlflow.parentRunId`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sweep.config import PipelineConfig
from sweep.storage import Storage, tagged_root

TAG_STAGE = "sweep.stage"
TAG_PIPELINE = "sweep.pipeline"
TAG_HASH = "sweep.config_hash"
TAG_TRIAL = "sweep.trial"
TAG_FEATURES = "sweep.features"  # on a probe child run: the identity of the store it read (`FeatureStore.identity`)
TAG_PROBE_HASH = "sweep.probe_hash"  # on a probe child run: its config's `probe_hash` (what every run shares)
TAG_COPIED_FROM = "sweep.copied_from"  # on a probe child run copied from another config's: that run's id
TAG_STORAGE = "sweep.storage"  # on every stage run: the storage root (absolute) it worked in
TAG_PARENT = "mlflow.parentRunId"
TAG_BASELINE = "sweep.baseline"  # a baseline's training run: its name...
TAG_BASELINE_KEY = "sweep.baseline_key"  # ...and the fingerprint of what made its weights

# "Creating initial MLflow database tables..." and "Updating database tables" on every new store: routine. Its
# ERROR lines are a traceback of an SQL error it then raises (as MlflowException): sweep says that in one line
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

# read once: mlflow.set_tracking_uri() writes this variable, which must not leak one pipeline's store into the next
_ENV_URI = os.environ.get("MLFLOW_TRACKING_URI")
# MLflow prints two "View run/experiment at: URL" lines on stdout whenever a run on a server ends: 28 lines for
# a 14-trial sweep, and text in `sweep best --format json`'s stdout. The user's own setting stands.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "1")


def check_tracking(config: PipelineConfig, reach_server: bool = False) -> None:
    """Raise ConfigError when the pipeline has no tracking URI it can use (remote storage needs one; a file
    store needs MLflow's MLFLOW_ALLOW_FILE_STORE); with `reach_server`, TrackingServerUnreachable when its
    URI is an MLflow server that does not answer."""
    storage = Storage.of(config.storage_root)
    uri = configured_uri(config)
    if not uri and not storage.is_local:
        from sweep.config import ConfigError

        raise ConfigError(
            f"tracking.uri: needed when storage is remote ({storage.root}): the default SQLite store must be "
            f"on a local disk. Point it at an MLflow server (cluster.yaml runs one on the head node: "
            f"--set tracking.uri=http://HEAD:5000) or a local sqlite:///path/mlflow.db")
    if uri and uri.lower().startswith("file:"):
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

        if not MLFLOW_ALLOW_FILE_STORE.get():  # else MLflow's paragraph on migrating, at the first query (exit 1)
            from sweep.config import ConfigError

            key = "tracking.uri" if config.tracking.uri else "MLFLOW_TRACKING_URI"
            raise ConfigError(f"{key}: {uri} is MLflow's file store, which this MLflow refuses unless "
                              f"MLFLOW_ALLOW_FILE_STORE=true: use a SQLite file (sqlite:///PATH/mlflow.db) or a "
                              f"server")
    if reach_server and uri:
        check_server(uri)


def configured_uri(config: PipelineConfig) -> str | None:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else None (the default store under storage)."""
    return config.tracking.uri or _ENV_URI


class TrackingServerUnreachable(RuntimeError):
    """No MLflow server answers at the pipeline's tracking URI."""


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingServerUnreachable when nothing answers HTTP at an http(s) tracking URI: MLflow's own
    client retries a dead address with back-off for minutes before it fails. Any HTTP answer (even 401
    from an authenticating proxy, or 404) counts: only whether a server is there is checked."""
    import urllib.error
    import urllib.request

    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:  # refused, unknown host, timed out, malformed
        reason = getattr(e, "reason", e)
        raise TrackingServerUnreachable(
            f"tracking.uri: no MLflow server answers at {uri} ({reason}); start one (`mlflow server --host "
            f"127.0.0.1 --port 5000`, or the cluster head's) or fix the URI") from None


def lost_server(uri: str) -> str | None:
    """Why no MLflow server answers at an http(s) tracking URI (`check_server`'s reason, without the key's
    name), or None where one answers or the URI is no server."""
    try:
        check_server(uri)
    except TrackingServerUnreachable as e:
        return str(e).removeprefix("tracking.uri: ")
    return None


def tracking_uri(config: PipelineConfig) -> str:
    if uri := configured_uri(config):
        return uri
    check_tracking(config)  # the default SQLite store: local storage only
    path = Storage.of(config.storage_root).local("mlflow.db")
    path.parent.mkdir(parents=True, exist_ok=True)
    # SQLAlchemy reads the path as a URL's: a `?` in a folder name ended it (the rest read as a query) and a
    # `%20` became a space, so the store was made beside the storage, where no command found it. Only `%` and
    # `?` are encoded: MLflow makes the database's folder from the URI as written (an empty `My%20Studies`
    # beside `My Studies` where a space was encoded), and SQLAlchemy reads every other character as is
    return f"sqlite:///{str(path).replace('%', '%25').replace('?', '%3F')}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` tracking URI as SQLAlchemy (so MLflow) opens it: percent-decoded, up to a
    `?`; None for another URI or an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def store_exists(config: PipelineConfig) -> bool:
    """False only for a local SQLite store before any stage made it (the default one, or a configured
    `sqlite:///` file): a query then finds nothing and creates nothing (a mistyped pipeline name or URI
    leaves no empty runs/<name>/ or database behind)."""
    if configured_uri(config):
        db = local_mlflow_db(config)  # the configured URI's file: nothing made
        return db is None or db.is_file()
    storage = Storage.of(config.storage_root)
    return not storage.is_local or storage.local("mlflow.db").is_file()


def client_for(config: PipelineConfig) -> MlflowClient:
    uri = tracking_uri(config)
    if uri.startswith("sqlite:///"):
        _sqlite_store_created(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


_CREATED: set[Path] = set()  # SQLite stores this process has seen created


def _sqlite_store_created(uri: str) -> None:
    """Create (or migrate) the SQLite store at `uri` while holding a lock on a hidden file beside it
    (`.mlflow.db.lock`). MLflow's tracking store creates its tables unguarded: three sweep commands starting at
    once on a new shared store (two storages, one `tracking.uri`) failed ('duplicate column name: step', 'table
    _alembic_tmp_experiments already exists') and left the file half-migrated, refused by every later command.
    The lock waits for the other command's creation (seconds); after it the tables are there and nothing runs."""
    import fcntl

    db = sqlite_path(uri)
    if db is None:
        return
    db = db.resolve()
    if db in _CREATED and db.is_file():
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would
        lock = open(db.with_name(f".{db.name}.lock"), "a")
    except OSError:  # a folder this process cannot write: nor can it create a store there (MLflow says why)
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient(tracking_uri=uri)  # building its store creates the tables, or finds them there
    _CREATED.add(db)


# tracking stores that hold no files: MLflow would give their experiments `./mlruns` under the current folder
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def artifact_location(config: PipelineConfig) -> str | None:
    """Where an experiment created by this pipeline keeps its artifacts (samples, heatmaps, the report):
    `<storage>/mlartifacts` for a database-backed tracking store, local or in the bucket, so they stay with
    the study wherever the command ran from; None for an MLflow server or a file store (they decide)."""
    scheme = tracking_uri(config).split(":", 1)[0].split("+", 1)[0].lower()  # postgresql+psycopg2: postgresql
    if scheme not in _DATABASE_SCHEMES:
        return None
    storage = Storage.of(config.storage_root)
    return storage.local("mlartifacts").as_uri() if storage.is_local else storage.uri("mlartifacts")


def ensure_experiment(config: PipelineConfig) -> str:
    """Create the experiment once, on the driver (concurrent creation from trials races)."""
    client = client_for(config)
    exp = client.get_experiment_by_name(config.experiment_name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(config.experiment_name, artifact_location=artifact_location(config))
    except mlflow.exceptions.MlflowException:
        # someone else created it between our lookup and create
        return client.get_experiment_by_name(config.experiment_name).experiment_id


def stage_tags(config: PipelineConfig, stage: str) -> dict[str, str]:
    return {TAG_STAGE: stage, TAG_PIPELINE: config.name, TAG_HASH: config.config_hash(),
            TAG_STORAGE: Storage.of(config.storage_root).root}


def params_agree(run, params: dict | None) -> bool:
    """Whether `run` holds no other value for any of `params` (as `log_batch` writes them): MLflow refuses
    to change a logged param, so a resumed run must agree with the settings it is resumed with."""
    logged = run.data.params
    return all(logged.get(k, str(v)) == str(v) for k, v in (params or {}).items())


def same_storage(run, config: PipelineConfig) -> bool:
    """Whether `run` was made in this config's storage (a run from before sweep tagged it: taken as so)."""
    here = Storage.of(config.storage_root).root
    return tagged_root(run.data.tags.get(TAG_STORAGE, here)) == here


def start_stage_run(config: PipelineConfig, stage: str, resume_unfinished: bool = True,
                    params: dict | None = None) -> str:
    """The parent run of a stage, with `params` logged: an unfinished one of the same config is reused (a
    resumed stage keeps one parent), else a new one. Returns its run id. One logged with other values of
    `params` (a setting outside the config hash, say `pretrain.workers`, changed before the rerun) is not
    reused: logging them failed the stage with MLflow's "Changing param values is not allowed"."""
    client = client_for(config)
    exp_id = ensure_experiment(config)
    tags = stage_tags(config, stage)
    if resume_unfinished:
        runs = client.search_runs(
            [exp_id],
            filter_string=(
                f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_HASH}` = '{tags[TAG_HASH]}' "
                f"and attributes.status != 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        # a stage's own runs: not its children, nor (from before baselines had a parent) a baseline's run,
        # nor one of another storage sharing this MLflow store (its own command may be running it)
        runs = [r for r in runs if TAG_PARENT not in r.data.tags and TAG_BASELINE not in r.data.tags
                and params_agree(r, params) and same_storage(r, config)]
        if runs:
            client.update_run(runs[0].info.run_id, status="RUNNING")
            log_batch(config, runs[0].info.run_id, params=params, tags={TAG_STORAGE: tags[TAG_STORAGE]})
            return runs[0].info.run_id
    run_id = client.create_run(exp_id, tags={**tags, "mlflow.runName": f"{stage}"}).info.run_id
    log_batch(config, run_id, params=params)
    return run_id


@contextlib.contextmanager
def ended_on_error(config: PipelineConfig, run_id: str | Callable[[], str | None]):
    """Around a stage's work once its run is open (set-up and training): an error ends the run FAILED
    (Ctrl-C: KILLED), so that MLflow does not show a stage that stopped (a missing bucket, a bad image table,
    a failed fit) as still running. `run_id` may be a function that gives the run once the work has opened
    it (None until then: nothing to end)."""
    try:
        yield
    except (KeyboardInterrupt, Exception) as e:
        opened = run_id() if callable(run_id) else run_id
        if opened is not None:
            finish_run(config, opened, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def finish_run(config: PipelineConfig, run_id: str, status: str = "FINISHED") -> None:
    """End a stage's run. Where its MLflow server is gone (MLflow's client retried for ~4 minutes): FINISHED
    raises TrackingServerUnreachable at once; FAILED and KILLED, called while the stage's own error or Ctrl-C
    is on its way, say that the run stays RUNNING and let that error through (it is the one to read, and
    Ctrl-C keeps its exit 130)."""
    from sweep.stages.common import one_line, say

    problem = lost_server(tracking_uri(config))
    if problem and status == "FINISHED":
        raise TrackingServerUnreachable(f"tracking.uri: {problem}")
    if problem:
        say(f"MLflow run {run_id} stays RUNNING, not {status}: {problem}")
        return
    try:
        client_for(config).set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001
        if status == "FINISHED":
            raise
        # a store on the storage that just filled up (or went read-only) fails here too: its error replaced
        # the stage's, which named what failed ('database or disk is full' in a 100-line traceback instead)
        say(f"MLflow run {run_id} stays RUNNING, not {status}: {database_cause(e) or one_line(e)} "
            f"(MLflow tracking store {tracking_uri(config)})")


def database_cause(e: BaseException) -> str | None:
    """'OperationalError: (sqlite3.OperationalError) database or disk is full' for an SQL error under `e`
    (MLflow's client wraps it in an MlflowException whose first line can be SQLAlchemy's '(raised as a result
    of Query-invoked autoflush; ...)'), without the statement; None when `e` is no database error."""
    while e is not None and not type(e).__module__.startswith("sqlalchemy"):
        e = e.__cause__
    if e is None:
        return None
    lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith("(raised as a result of")]
    return f"{type(e).__name__}: {lines[0].split(' [SQL:')[0] if lines else ''}"


def log_batch(config: PipelineConfig, run_id: str, metrics: dict[str, float] | None = None,
              params: dict | None = None, tags: dict | None = None, step: int = 0) -> None:
    now = int(time.time() * 1000)
    client_for(config).log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    """Every run of the experiment that matches, page after page (MLflow returns at most 1000 at a time)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def earlier_probe_runs(config: PipelineConfig, client: MlflowClient | None = None,
                       experiment_id: str | None = None) -> dict[str, int]:
    """Finished probe trial runs of these settings made by an earlier sweep, under the config hashes these
    settings had then (`PipelineConfig.earlier_config_hashes`): what made them -> how many. They are kept,
    but are neither reused by the probe nor shown by `sweep best` (only with --any-config)."""
    if client is None:
        if not store_exists(config):
            return {}
        client = client_for(config)
        exp = client.get_experiment_by_name(config.experiment_name)
        if exp is None:
            return {}
        experiment_id = exp.experiment_id
    found = {}
    for old, what in config.earlier_config_hashes().items():
        runs = _all_runs(client, experiment_id, f"tags.`{TAG_STAGE}` = 'probe' and tags.`{TAG_PIPELINE}` = "
                                                f"'{config.name}' and tags.`{TAG_HASH}` = '{old}' and "
                                                f"tags.`{TAG_PARENT}` LIKE '%' and attributes.status = 'FINISHED'")
        if runs:
            found[what] = found.get(what, 0) + len(runs)
    return found


class OtherStorageRuns(RuntimeError):
    """Finished probe runs of this config made on other feature stores in another storage: two storages of
    one config share the MLflow experiment, and probing one would delete the other's results. `elsewhere`:
    storage -> how many."""

    def __init__(self, message: str, elsewhere: dict[str, int]):
        super().__init__(message)
        self.elsewhere = elsewhere


def finished_trials(config: PipelineConfig, features: dict[str, str | None] | None = None
                    ) -> tuple[set[str], list[str]]:
    """Trial keys (`encoder/column`) that already have a finished probe run for this config, and the ids of
    finished runs made on other features: their `TAG_FEATURES` is not the identity of their encoder's store
    now (`features`: encoder -> identity), made again since from other images. Runs without the tag (made
    before sweep wrote it) count as made on today's store. Raises OtherStorageRuns where runs made on other
    features were made in another storage (`TAG_STORAGE`): those are not stale, they are another study's."""
    client = client_for(config)
    exp = client.get_experiment_by_name(config.experiment_name)
    if exp is None:
        return set(), []
    runs = _all_runs(client, exp.experiment_id, f"tags.`{TAG_STAGE}` = 'probe' and tags.`{TAG_HASH}` = "
                                                f"'{config.config_hash()}' and attributes.status = 'FINISHED'")
    features = features or {}
    done, other_features, without_probe_hash, elsewhere = set(), [], [], {}
    here = Storage.of(config.storage_root).root
    for r in runs:
        made_on, now = r.data.tags.get(TAG_FEATURES), features.get(r.data.params.get("encoder"))
        if made_on and now and made_on != now:
            if not same_storage(r, config):
                elsewhere[r.data.tags[TAG_STORAGE]] = elsewhere.get(r.data.tags[TAG_STORAGE], 0) + 1
            other_features.append(r.info.run_id)
        elif TAG_TRIAL in r.data.tags:
            done.add(r.data.tags[TAG_TRIAL])
            if made_on and TAG_PROBE_HASH not in r.data.tags:
                without_probe_hash.append(r.info.run_id)
    if elsewhere:
        where, n = next(iter(elsewhere.items()))
        raise OtherStorageRuns(
            f"probe: {sum(elsewhere.values())} finished run(s) of this config in MLflow experiment "
            f"{config.experiment_name!r} were made on other feature stores in another storage ({n} in {where}; this "
            f"one is {here}): both storages share this experiment, and probing here would delete their results. "
            f"Give this storage its own experiment (--set tracking.experiment=NAME), or delete those runs", elsewhere)
    # made before sweep tagged it: known from the config hash, and another config may copy
    for run_id in without_probe_hash:
        client.set_tag(run_id, TAG_PROBE_HASH, config.probe_hash())
    return done, other_features


def explain_new_settings(config: PipelineConfig, copying: bool) -> None:
    """Say, on a config's first probe, why every trial is to run and where the runs of earlier settings are
    (`sweep best --any-config`). Where `copying` (runs of another config are this one's results: only encoders'
    own settings differ), the copy's own line says it instead of 'probes every trial again'."""
    from sweep.stages.common import say

    client = client_for(config)
    exp = client.get_experiment_by_name(config.experiment_name)
    if exp is None:
        return
    earlier = earlier_probe_runs(config, client, exp.experiment_id)
    for what, n in earlier.items():
        say(f"probe: {n} run(s) of these settings made by {what} are kept apart from this probe's "
            f"results and probed again (`sweep best --any-config` shows them)")
    if earlier or copying:
        return
    # a setting that changes results (data.ood, the probe grid, ...) makes a new config hash
    others = client.search_runs([exp.experiment_id], max_results=1000, filter_string=(
        f"tags.`{TAG_STAGE}` = 'probe' and tags.`{TAG_PIPELINE}` = '{config.name}' and "
        f"tags.`{TAG_HASH}` != '{config.config_hash()}' and tags.`{TAG_PARENT}` LIKE '%' and "
        f"attributes.status = 'FINISHED'"))
    if others:
        hashes = sorted({r.data.tags.get(TAG_HASH) for r in others})
        say(f"probe: no run of these settings yet (config hash {config.config_hash()}); "
            f"{len(others)}{'+' if len(others) == 1000 else ''} probe run(s) of other settings of "
            f"{config.name!r} (hash {', '.join(hashes[:3])}{', ...' if len(hashes) > 3 else ''}) stay in "
            f"MLflow (`sweep best --any-config`); a change to the data, the seed or the probe "
            f"(data.ood, the probe grid, ...) probes every trial again, one to an encoder's own settings "
            f"(pretrain, baselines, extract) that encoder's trials")


def reusable_trial_runs(config: PipelineConfig, keys: set[str], features: dict[str, str | None]) -> dict:
    """Finished trial runs of other configs of this pipeline that are this config's results for the trials
    `keys`: the same probe hash (data, seed, probe; only encoders' own settings differ) and made on the
    feature store the trial's encoder has now (`features`: encoder -> identity). Trial key -> run, the
    newest where several."""
    client = client_for(config)
    exp = client.get_experiment_by_name(config.experiment_name) if keys else None
    if exp is None:
        return {}
    runs = _all_runs(client, exp.experiment_id, f"tags.`{TAG_STAGE}` = 'probe' and tags.`{TAG_PIPELINE}` = "
                                                f"'{config.name}' and tags.`{TAG_PROBE_HASH}` = "
                                                f"'{config.probe_hash()}' and tags.`{TAG_HASH}` != "
                                                f"'{config.config_hash()}' and tags.`{TAG_PARENT}` LIKE '%' and "
                                                f"attributes.status = 'FINISHED'")
    found = {}
    for r in sorted(runs, key=lambda r: r.info.end_time or 0):  # the newest last, kept
        key, made_on = r.data.tags.get(TAG_TRIAL), r.data.tags.get(TAG_FEATURES)
        if key in keys and made_on and made_on == features.get(r.data.params.get("encoder")):
            found[key] = r
    return found


def copy_trial_runs(config: PipelineConfig, parent_run_id: str, runs: dict) -> list[str]:
    """Each run of `reusable_trial_runs` again as a child run of this config's probe run `parent_run_id`:
    its params, metrics, validation curves, tags and times, under this config's hash, with
    `sweep.copied_from` naming the original. Returns the new run ids."""
    client = client_for(config)
    experiment_id = client.get_experiment_by_name(config.experiment_name).experiment_id
    copies = []
    for r in runs.values():
        curves = {name: [m.value for m in sorted(client.get_metric_history(r.info.run_id, name),
                                                 key=lambda m: m.step)]
                  for name in r.data.metrics if name.startswith("history_")}
        tags = {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"}
        copies.append(FinishedRun(
            tags={**tags, **stage_tags(config, "probe"), TAG_PARENT: parent_run_id, TAG_COPIED_FROM: r.info.run_id},
            params=dict(r.data.params), curves=curves,
            metrics={k: v for k, v in r.data.metrics.items() if not k.startswith("history_")},
            start_time=r.info.start_time, end_time=r.info.end_time))
    return log_finished_runs(client, experiment_id, copies)


def delete_runs(config: PipelineConfig, run_ids: list[str]) -> None:
    """Move runs to MLflow's deleted runs (`mlflow gc` removes them for good; until then restorable)."""
    client = client_for(config)
    for run_id in run_ids:
        client.delete_run(run_id)


def local_mlflow_db(config: PipelineConfig) -> Path | None:
    return sqlite_path(tracking_uri(config))


def search_trial_runs(config: PipelineConfig, metric: str = "val_macro_f1", encoder: str | None = None,
                      any_config: bool = False, max_results: int = 100_000) -> pd.DataFrame:
    """The `sweep best` query: finished probe child runs of this pipeline, best first by `metric`, ties
    in MLflow's own order. Exactly this call in any MLflow client (same runs, same order):

        mlflow.search_runs(experiment_names=[EXP], filter_string="tags.`sweep.stage` = 'probe' and
            tags.`sweep.pipeline` = 'NAME' and tags.`mlflow.parentRunId` LIKE '%' and
            attributes.status = 'FINISHED' and tags.`sweep.config_hash` = 'HASH'",
            order_by=["metrics.`M` DESC"])

    (`and params.encoder = 'E'` for one encoder; the parent-run condition keeps the stage's parent run,
    which carries the same stage tag, out.)
    """
    if not store_exists(config):
        return pd.DataFrame()
    client_for(config)
    exp = mlflow.get_experiment_by_name(config.experiment_name)
    if exp is None:
        return pd.DataFrame()
    filters = [f"tags.`{TAG_STAGE}` = 'probe'", f"tags.`{TAG_PIPELINE}` = '{config.name}'",
               f"tags.`{TAG_PARENT}` LIKE '%'", "attributes.status = 'FINISHED'"]
    if not any_config:
        filters.append(f"tags.`{TAG_HASH}` = '{config.config_hash()}'")
    if encoder:
        filters.append(f"params.encoder = '{encoder}'")
    return mlflow.search_runs(experiment_names=[config.experiment_name], filter_string=" and ".join(filters),
                              order_by=[f"metrics.`{metric}` DESC"], max_results=max_results)


def last_probe_plan(config: PipelineConfig) -> tuple[int, str, str | None] | None:
    """How many trials the latest probe stage of this config planned (its parent run's `trials`), how that
    run ended (its status) and the storage it ran in; None where no probe stage ran."""
    client = client_for(config)
    exp = client.get_experiment_by_name(config.experiment_name)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{TAG_STAGE}` = 'probe' and tags.`{TAG_HASH}` = "
                                            f"'{config.config_hash()}' and tags.`{TAG_PARENT}` IS NULL")
    if not runs or "trials" not in runs[0].data.params:
        return None
    return int(runs[0].data.params["trials"]), runs[0].info.status, tagged_root(runs[0].data.tags.get(TAG_STORAGE))


def search_baseline_runs(config: PipelineConfig, keys: dict[str, str]) -> pd.DataFrame:
    """The finished `baselines` runs of these baselines (name -> baseline key), newest first. The key, not
    the config hash, ties a run to its baseline: changing the probe grid leaves a trained baseline (and its
    run) valid."""
    if not keys or not store_exists(config):
        return pd.DataFrame()
    client_for(config)
    if mlflow.get_experiment_by_name(config.experiment_name) is None:
        return pd.DataFrame()
    frames = []
    for name, key in keys.items():
        frames.append(mlflow.search_runs(
            experiment_names=[config.experiment_name],
            filter_string=(f"tags.`{TAG_STAGE}` = 'baselines' and tags.`{TAG_BASELINE}` = '{name}' and "
                           f"tags.`{TAG_BASELINE_KEY}` = '{key}' and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"], max_results=1))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def delete_unfinished_trial_runs(config: PipelineConfig, keys: set[str]) -> int:
    """Delete the probe child runs of this config's trials `keys` that never finished (a sweep interrupted
    while it wrote them), so that rerunning those trials leaves exactly one run per trial. Returns how many
    were deleted."""
    client = client_for(config)
    exp = client.get_experiment_by_name(config.experiment_name)
    if exp is None:
        return 0
    runs = _all_runs(client, exp.experiment_id, f"tags.`{TAG_STAGE}` = 'probe' and tags.`{TAG_HASH}` = "
                                                f"'{config.config_hash()}' and tags.`{TAG_TRIAL}` LIKE '%' "
                                                f"and attributes.status != 'FINISHED'")
    stale = [r.info.run_id for r in runs if r.data.tags.get(TAG_TRIAL) in keys]
    delete_runs(config, stale)
    return len(stale)


@dataclass
class FinishedRun:
    """A finished run to be written whole: its tags (the parent link included), params, metrics at step 0, and
    curves (`curves[name][i]` at step i + 1), all metrics stamped `end_time`; times in ms since the epoch."""

    tags: dict[str, str]
    params: dict
    metrics: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict)
    start_time: int | None = None  # default: end_time
    end_time: int | None = None  # default: now

    def __post_init__(self):
        self.end_time = int(time.time() * 1000) if self.end_time is None else self.end_time
        self.start_time = self.end_time if self.start_time is None else self.start_time

    def entities(self) -> tuple[list[Metric], list[Param], list[RunTag]]:
        metrics = [Metric(k, float(v), self.end_time, 0) for k, v in self.metrics.items()]
        for name, values in self.curves.items():
            metrics += [Metric(name, float(v), self.end_time, i + 1) for i, v in enumerate(values)]
        params = [Param(k, str(v)) for k, v in self.params.items()]
        return metrics, params, [RunTag(k, v) for k, v in self.tags.items()]


def log_finished_run(client: MlflowClient, experiment_id: str, run: FinishedRun) -> str:
    """One finished run through the client, in three store calls: create it with every tag, one
    `log_batch` of params and metrics (more batches only past MLflow's per-batch limits), terminate.
    Returns the run id. (A run interrupted between the calls is left RUNNING.)"""
    created = client.create_run(experiment_id, start_time=run.start_time, tags=run.tags)
    run_id = created.info.run_id
    entries, plist, _ = run.entities()
    while True:  # MLflow's batch limits: 100 params, 1000 metrics, 1000 entries in all
        params_now = plist[:100]
        metrics_now = entries[: 1000 - len(params_now)]
        client.log_batch(run_id, metrics=metrics_now, params=params_now)
        entries, plist = entries[len(metrics_now):], plist[len(params_now):]
        if not entries and not plist:
            break
    client.set_terminated(run_id, "FINISHED", end_time=run.end_time)
    return run_id


def log_finished_runs(client: MlflowClient, experiment_id: str, runs: list[FinishedRun]) -> list[str]:
    """Finished runs (child runs: `TAG_PARENT` among their tags). Into a SQL store in one transaction, all
    or none, at a few ms of CPU a run (`sweep.tracking_sql`); to an MLflow server through the client, one
    run after another. Returns the run ids."""
    tracking_sql = _sql_writer()
    store = tracking_sql.sql_store(client) if tracking_sql else None
    if store is not None:
        return tracking_sql.insert_runs(store, experiment_id, runs)
    return [log_finished_run(client, experiment_id, run) for run in runs]


@functools.cache
def _sql_writer():
    """`sweep.tracking_sql`, or None (said once) where an MLflow release moved the internals it uses: then
    runs go through the client, slower but the same."""
    try:
        from sweep import tracking_sql
    except ImportError as e:
        logging.getLogger(__name__).warning("MLflow runs are written one by one through the client: %s", e)
        return None
    return tracking_sql
