"""The walking skeleton end to end through the CLI: pretrain -> extract -> probe -> report -> best,
then a rerun that must duplicate nothing."""

from __future__ import annotations

import json

import mlflow
import pyarrow.parquet as pq
import pytest

from sweep.cli import main
from sweep.config import load_config
from sweep.tracking import tracking_uri

pytestmark = pytest.mark.ray

CONTRACT = ["run_id", "encoder", "layer", "timestep", "resolution", "dim", "lr", "weight_decay",
            "val_acc", "val_macro_f1", "test_acc", "test_macro_f1", "test_balanced_acc"]


def _probe_runs(cfg):
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return mlflow.search_runs(experiment_names=[cfg.experiment_name],
                              filter_string="tags.`sweep.stage` = 'probe' and tags.`mlflow.parentRunId` LIKE '%'")


def test_run_then_best_then_rerun(ray_local, write_pipeline, capsys):
    path = write_pipeline(extract={"timesteps": [0, 50, 100], "batch_size": 32, "shard_size": 40})
    cfg = load_config(path)
    assert main(["run", str(path)]) == 0

    store = cfg.storage_root
    manifest = json.load(open(f"{store}/features/diffusion/_manifest.json"))
    assert manifest["complete"] and len(manifest["columns"]) == 15  # 5 blocks x 3 timesteps
    rows = sum(pq.read_metadata(f"{store}/features/diffusion/{s['file']}").num_rows
               for d in manifest["datasets"].values() for s in d["shards"])
    assert rows == 105

    capsys.readouterr()
    assert main(["best", str(path), "--format", "json", "--top", "0"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 15
    for r in recs:
        assert all(r.get(k) is not None for k in CONTRACT), r
        assert isinstance(r["timestep"], int) and isinstance(r["resolution"], int) and isinstance(r["dim"], int)
        assert 0.0 <= r["test_acc"] <= 1.0
    assert {(r["layer"], r["timestep"]) for r in recs} == {
        (c["layer"], c["timestep"]) for c in manifest["columns"]}
    assert [r["val_macro_f1"] for r in recs] == sorted((r["val_macro_f1"] for r in recs), reverse=True)

    # the report stage wrote its files
    assert (cfg.storage_root and __import__("pathlib").Path(store, "report", "report.md").is_file())

    # rerun on finished work: no new feature rows, no new MLflow probe runs
    n_runs = len(_probe_runs(cfg))
    assert n_runs == 15
    assert main(["run", str(path)]) == 0
    assert len(_probe_runs(cfg)) == n_runs
    manifest2 = json.load(open(f"{store}/features/diffusion/_manifest.json"))
    assert manifest2["datasets"] == manifest["datasets"]

    # the table format names the columns a user looks for
    assert main(["best", str(path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "timestep" in out and len(out.strip().splitlines()) == 4
