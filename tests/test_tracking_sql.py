"""Finished runs written many at a time (`sweep.tracking_sql`) against the same runs written through
`MlflowClient`, in a real MLflow SQLite store: every row of every table that refers to a run is the same,
MLflow reads them back the same, and a batch is written all or none."""

from __future__ import annotations

import math
import sqlite3

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import free_port, start_mlflow_server, stop_mlflow_server
from sweep import tracking, tracking_sql
from sweep.tracking import FinishedRun


@pytest.fixture()
def store(tmp_path):
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    experiment_id = client.create_experiment("bulk")
    parent = client.create_run(experiment_id).info.run_id
    return client, experiment_id, parent, db


def _run(parent: str, key: str, **changes) -> FinishedRun:
    run = FinishedRun(
        tags={tracking.TAG_PARENT: parent, tracking.TAG_STAGE: "probe", tracking.TAG_TRIAL: key,
              "mlflow.runName": key, "mlflow.user": "researcher"},
        params={"encoder": "diffusion", "layer": "mid_block", "timestep": 100, "dim": 64, "lr": 0.1,
                "lr_grid": [0.1, 0.3, 1.0], "timestep_none": ""},
        metrics={"val_acc": 0.625, "test_acc": 0.5, "kmeans_ari": -0.03, "big": 1e300},
        # NaN and infinities are stored as MLflow encodes them; the same value twice at one step is one row
        curves={"history_val_acc": [0.25, 0.5, 0.625], "history_val_loss": [math.nan, 2.0, math.inf],
                "history_train_loss": [3.0, -math.inf, 1.0]},
        start_time=1_700_000_000_000, end_time=1_700_000_004_321)
    for k, v in changes.items():
        setattr(run, k, v)
    return run


def _rows(db, run_id: str) -> dict[str, list[tuple]]:
    """Every row of every table with a run_uuid column for this run, run_uuid taken out (also from the
    artifact location)."""
    con = sqlite3.connect(db)
    tables = [r[0] for r in con.execute("select name from sqlite_master where type = 'table'")]
    out = {}
    for table in tables:
        cols = [c[1] for c in con.execute(f"pragma table_info({table})")]
        if "run_uuid" not in cols:
            continue
        rows = con.execute(f"select * from {table} where run_uuid = ?", (run_id,)).fetchall()
        out[table] = sorted(
            tuple(str(v).replace(run_id, "<run>") if isinstance(v, str) else v
                  for c, v in zip(cols, row) if c != "run_uuid") for row in rows)
    con.close()
    return out


def test_rows_equal_the_clients(store):
    client, experiment_id, parent, db = store
    reference = tracking.log_finished_run(client, experiment_id, _run(parent, "diffusion/a"))
    assert tracking_sql.sql_store(client) is not None
    (bulk,) = tracking_sql.insert_runs(tracking_sql.sql_store(client), experiment_id, [_run(parent, "diffusion/a")])
    ours, theirs = _rows(db, bulk), _rows(db, reference)
    assert ours == theirs
    assert len(ours["runs"]) == 1 and len(ours["params"]) == 7 and len(ours["tags"]) == 5
    assert len(ours["metrics"]) == 4 + 9 and len(ours["latest_metrics"]) == 4 + 3

    # and MLflow reads it back the same
    a, b = client.get_run(reference), client.get_run(bulk)
    assert a.data.params == b.data.params and a.data.tags == b.data.tags
    assert a.data.metrics == b.data.metrics and b.data.metrics["history_val_acc"] == 0.625
    assert (b.info.status, b.info.start_time, b.info.end_time, b.info.run_name, b.info.user_id) == (
        "FINISHED", 1_700_000_000_000, 1_700_000_004_321, "diffusion/a", "researcher")
    assert b.info.artifact_uri == a.info.artifact_uri.replace(reference, bulk)
    history = sorted((m.step, m.value) for m in client.get_metric_history(bulk, "history_val_loss"))
    assert history[0][0] == 1 and math.isnan(history[0][1])
    assert history[1:] == [(2, 2.0), (3, 1.7976931348623157e308)]  # MLflow stores inf as the largest float
    found = client.search_runs([experiment_id], f"tags.`{tracking.TAG_PARENT}` = '{parent}' and "
                                                f"attributes.status = 'FINISHED'", order_by=["metrics.val_acc DESC"])
    assert {r.info.run_id for r in found} == {reference, bulk}
    client.delete_run(bulk)
    assert client.get_run(bulk).info.lifecycle_stage == "deleted"


def test_a_run_without_a_name_or_times_gets_them_as_mlflow_gives_them(store):
    import time

    client, experiment_id, parent, db = store
    before = int(time.time() * 1000)
    run = FinishedRun(tags={tracking.TAG_PARENT: parent}, params={"lr": 0.1}, metrics={"val_acc": 0.5})
    (bulk,) = tracking_sql.insert_runs(tracking_sql.sql_store(client), experiment_id, [run])
    got = client.get_run(bulk)
    assert got.info.run_name and got.data.tags["mlflow.runName"] == got.info.run_name
    assert before <= got.info.start_time == got.info.end_time <= int(time.time() * 1000)
    assert got.data.metrics == {"val_acc": 0.5} and got.data.params == {"lr": "0.1"}


def test_a_batch_is_written_all_or_none(store):
    client, experiment_id, parent, db = store
    sql = tracking_sql.sql_store(client)
    good = [_run(parent, f"diffusion/{i}") for i in range(3)]
    bad = _run(parent, "diffusion/bad", metrics={"val acc!": 0.5})  # a name MLflow refuses
    with pytest.raises(MlflowException, match="val acc!"):
        tracking_sql.insert_runs(sql, experiment_id, [*good, bad])
    with pytest.raises(MlflowException):  # MLflow's own client refuses the same value
        tracking.log_finished_run(client, experiment_id, bad)
    children = client.search_runs([experiment_id], f"tags.`{tracking.TAG_PARENT}` = '{parent}'")
    assert [r.info.status for r in children] == ["RUNNING"]  # only the client's half-made run
    ids = tracking_sql.insert_runs(sql, experiment_id, good)
    assert len(set(ids)) == 3
    assert {client.get_run(i).data.tags[tracking.TAG_TRIAL] for i in ids} == {f"diffusion/{i}" for i in range(3)}


def test_an_inactive_experiment_is_refused(store):
    client, experiment_id, parent, db = store
    client.delete_experiment(experiment_id)
    with pytest.raises(MlflowException, match="active"):
        tracking_sql.insert_runs(tracking_sql.sql_store(client), experiment_id, [_run(parent, "diffusion/a")])


def test_a_server_store_is_not_written_directly():
    assert tracking_sql.sql_store(MlflowClient("http://127.0.0.1:1")) is None


def test_through_an_mlflow_server_the_client_writes_the_same_runs(tmp_path, capfd):
    """A real `mlflow server` on 127.0.0.1: runs go through the client there (the server does the SQL), and
    read back equal to a run inserted into the server's database directly."""
    port = free_port()
    db = tmp_path / "server.db"
    server = start_mlflow_server(db, port)
    try:
        tracking.check_server(f"http://127.0.0.1:{port}")  # a real server passes the reachability check
        client = MlflowClient(f"http://127.0.0.1:{port}")
        assert tracking_sql.sql_store(client) is None
        experiment_id = client.create_experiment("served")
        parent = client.create_run(experiment_id).info.run_id
        served = tracking.log_finished_runs(client, experiment_id,
                                            [_run(parent, "diffusion/a"), _run(parent, "diffusion/b")])
        direct = tracking_sql.insert_runs(tracking_sql.sql_store(MlflowClient(f"sqlite:///{db}")), experiment_id,
                                          [_run(parent, "diffusion/a")])
        assert _rows(db, served[0]) == _rows(db, direct[0])
        a, b = client.get_run(served[0]), client.get_run(direct[0])
        assert (a.data.params, a.data.metrics, a.data.tags) == (b.data.params, b.data.metrics, b.data.tags)
        assert client.get_run(served[1]).data.tags[tracking.TAG_TRIAL] == "diffusion/b"
        assert all(client.get_run(i).info.status == "FINISHED" for i in [*served, *direct])
        capfd.readouterr()
        client.set_terminated(parent)  # MLflow printed "View run ... at: URL" lines on stdout here
        assert "View run" not in capfd.readouterr().out
    finally:
        stop_mlflow_server(server)
