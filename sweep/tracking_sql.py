"""Finished MLflow runs written many at a time, in one transaction, into MLflow's SQL tracking store.

Why: through `MlflowClient` a finished child run takes three store calls (create, `log_batch`, terminate)
and about 30 SQL statements through SQLAlchemy's ORM: ~40 ms of driver CPU per run. In a 210-trial probe
sweep on a 2-core machine that was 8.4 s of the driver's 17 s of CPU, taken from the cores the trials
run on. MLflow has no call that writes many runs; this module inserts exactly the rows those three calls
write (MLflow's own table models, its validation and metric sanitising, its "latest metric" rule) for
a whole batch of runs in one transaction. A run is thus in the store finished and whole, or not at all.
`tests/test_tracking_sql.py` checks, table by table, that the rows equal what the client writes.

Only for SQL stores (`sqlite:///`, `postgresql://`, ...), where this process owns the database; for an
MLflow server (`http://`) the caller writes through the client, and the SQL work is the server's. It uses
MLflow's internal modules: `sweep.tracking` imports it only when it writes, and falls back to the client
(with a warning) if an MLflow release moved them.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from mlflow.entities import LifecycleStage, RunStatus, SourceType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
from mlflow.utils.name_utils import _generate_random_name
from mlflow.utils.uri import append_to_uri_path
from mlflow.utils.validation import _validate_batch_log_data
from sqlalchemy import insert

if TYPE_CHECKING:
    from sweep.tracking import FinishedRun


def sql_store(client) -> SqlAlchemyStore | None:
    """The client's store when it is a SQL database this process writes itself, else None."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return store if isinstance(store, SqlAlchemyStore) else None


def insert_runs(store: SqlAlchemyStore, experiment_id: str, runs: list[FinishedRun]) -> list[str]:
    """Write `runs` into `experiment_id` in one transaction (all or none); returns their run ids.

    The rows are those of `create_run(tags=...)`, `log_batch(metrics, params)` and `set_terminated(status)`:
    same validation (MLflow's error for a bad key or value, tag values truncated as MLflow does), same NaN
    and infinity encoding, the same latest-metric choice (highest step, then timestamp, then value)."""
    experiment = store.get_experiment(experiment_id)
    if experiment.lifecycle_stage != LifecycleStage.ACTIVE:
        raise MlflowException(f"The experiment {experiment_id} must be in the 'active' state. Current state is "
                              f"{experiment.lifecycle_stage}.", INVALID_PARAMETER_VALUE)
    ids: list[str] = []
    rows: dict[type, list[dict]] = {SqlRun: [], SqlTag: [], SqlParam: [], SqlMetric: [], SqlLatestMetric: []}
    for run in runs:
        run_id = uuid.uuid4().hex
        metrics, params, tags = _validate_batch_log_data(*run.entities())
        by_key = {t.key: t.value for t in tags}
        if MLFLOW_RUN_NAME not in by_key:  # as create_run: every run has a name, and its tag
            by_key[MLFLOW_RUN_NAME] = _generate_random_name()
        rows[SqlRun].append({
            "run_uuid": run_id, "name": by_key[MLFLOW_RUN_NAME],
            "source_type": SourceType.to_string(SourceType.UNKNOWN), "source_name": "", "entry_point_name": "",
            "user_id": by_key.get(MLFLOW_USER, "unknown"), "status": RunStatus.to_string(RunStatus.FINISHED),
            "start_time": run.start_time, "end_time": run.end_time, "deleted_time": None, "source_version": "",
            "lifecycle_stage": LifecycleStage.ACTIVE, "experiment_id": int(experiment_id),
            "artifact_uri": append_to_uri_path(experiment.artifact_location, run_id,
                                               SqlAlchemyStore.ARTIFACTS_FOLDER_NAME)})
        rows[SqlTag] += [{"key": k, "value": v, "run_uuid": run_id} for k, v in by_key.items()]
        rows[SqlParam] += [{"key": p.key, "value": p.value, "run_uuid": run_id} for p in params]
        latest: dict[str, dict] = {}
        for m in dict.fromkeys(metrics):  # identical entries once, as MLflow's log_batch does
            is_nan, value = store.sanitize_metric_value(m.value)
            row = {"key": m.key, "value": value, "timestamp": m.timestamp, "step": m.step, "is_nan": is_nan,
                   "run_uuid": run_id}
            rows[SqlMetric].append(row)
            best = latest.get(m.key)
            if best is None or (m.step, m.timestamp, value) > (best["step"], best["timestamp"], best["value"]):
                latest[m.key] = row
        rows[SqlLatestMetric] += [dict(r) for r in latest.values()]
        ids.append(run_id)
    with store.ManagedSessionMaker(read_only=False) as session:
        for model, table_rows in rows.items():  # runs first: the other tables refer to them
            if table_rows:
                session.execute(insert(model.__table__), table_rows)
    return ids
