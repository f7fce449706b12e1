"""`sweep.tracking`'s choices about where MLflow keeps things (no Ray)."""

from __future__ import annotations

import pytest
import yaml

from conftest import small_pipeline
from sweep import tracking
from sweep.config import load_config


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.setattr(tracking, "_ENV_URI", None)  # as in a shell without MLFLOW_TRACKING_URI


@pytest.mark.parametrize("uri, storage, expected", [
    (None, "local", "local"),  # the default store, runs/<name>/mlflow.db
    ("sqlite:///{tmp}/elsewhere/mlflow.db", "local", "local"),
    ("postgresql+psycopg2://me@db.example/mlflow", "local", "local"),
    ("sqlite:///{tmp}/mlflow.db", "s3://bucket/study", "s3://bucket/study/mlartifacts"),
    ("http://127.0.0.1:5000", "local", None),  # a server has its own artifact root
    ("http://head:5000", "s3://bucket/study", None),
])
def test_artifact_location_of_a_new_experiment(tmp_path, uri, storage, expected):
    raw = small_pipeline(tmp_path / "store" if storage == "local" else storage)
    if uri:
        raw["tracking"] = {"uri": uri.format(tmp=tmp_path)}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    if expected == "local":
        expected = (tmp_path / "store" / "mlartifacts").as_uri()
    assert tracking.artifact_location(config) == expected


def test_artifacts_stay_with_the_study_wherever_the_command_ran(write_pipeline, tmp_path, monkeypatch):
    """With an explicit SQLite store, MLflow by itself would write the artifacts into ./mlruns of whatever
    folder the command ran from."""
    (tmp_path / "db").mkdir()
    config = load_config(write_pipeline(tracking={"uri": f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    experiment_id = tracking.ensure_experiment(config)
    client = tracking.client_for(config)
    run_id = client.create_run(experiment_id).info.run_id
    note = tmp_path / "note.txt"
    note.write_text("kept")
    client.log_artifact(run_id, str(note))

    stored = tmp_path / "store" / "mlartifacts" / run_id / "artifacts" / "note.txt"
    assert stored.read_text() == "kept"
    assert list(elsewhere.iterdir()) == []
    assert tracking.ensure_experiment(config) == experiment_id  # found, not made again
