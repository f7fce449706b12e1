"""The whole study end to end through the CLI: pretrain + a supervised baseline -> extract every encoder -> one
probe sweep over all of them -> report -> best, then a rerun that must duplicate nothing. (A SimCLR baseline
goes through the same stages; it has its own test in test_baselines.py, and a third Ray Train run here would
add ~40 s to the suite for no path this test does not already take.)"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sweep.cli import main
from sweep.config import load_config
from sweep.data.table import build_table
from sweep.tracking import tracking_uri

pytestmark = pytest.mark.ray

CONTRACT = ["run_id", "encoder", "layer", "timestep", "resolution", "dim", "lr", "weight_decay",
            "val_acc", "val_macro_f1", "test_acc", "test_macro_f1", "test_balanced_acc"]


def _probe_runs(cfg):
    mlflow.set_tracking_uri(tracking_uri(cfg))
    return mlflow.search_runs(experiment_names=[cfg.experiment_name],
                              filter_string="tags.`sweep.stage` = 'probe' and tags.`mlflow.parentRunId` LIKE '%'")


BASELINES = [{"name": "sup", "kind": "supervised", "arch": "resnet18", "epochs": 2, "batch_size": 16, "lr": 2.0e-3}]


def test_run_then_best_then_rerun(ray_local, write_pipeline, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the pipeline's own store, whatever ran before
    path = write_pipeline(extract={"timesteps": [0, 50, 100], "batch_size": 32, "shard_size": 40},
                          baselines=BASELINES)
    cfg = load_config(path)
    assert main(["run", str(path)]) == 0

    store = cfg.storage_root
    manifests = {e: json.load(open(f"{store}/features/{e}/_manifest.json")) for e in ("diffusion", "sup")}
    assert len(manifests["diffusion"]["columns"]) == 15  # 5 blocks x 3 timesteps
    for encoder, manifest in manifests.items():
        assert manifest["complete"], encoder
        rows = sum(pq.read_metadata(f"{store}/features/{encoder}/{s['file']}").num_rows
                   for d in manifest["datasets"].values() for s in d["shards"])
        assert rows == 105, encoder
    for encoder in ("sup",):  # every layer of a baseline, no timestep
        assert [(c["layer"], c["timestep"]) for c in manifests[encoder]["columns"]] == [
            (layer, None) for layer in ("layer1", "layer2", "layer3", "layer4")]

    capsys.readouterr()
    assert main(["best", str(path), "--format", "json", "--top", "0"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 19  # one probe run per encoder x column, all in one sweep
    for r in recs:
        assert all(r.get(k) is not None for k in CONTRACT if k != "timestep"), r
        assert isinstance(r["resolution"], int) and isinstance(r["dim"], int)
        assert isinstance(r["timestep"], int) if r["encoder"] == "diffusion" else r["timestep"] is None
        assert 0.0 <= r["test_acc"] <= 1.0
    assert {(r["encoder"], r["layer"], r["timestep"]) for r in recs} == {
        (e, c["layer"], c["timestep"]) for e, m in manifests.items() for c in m["columns"]}
    assert [r["val_macro_f1"] for r in recs] == sorted((r["val_macro_f1"] for r in recs), reverse=True)
    assert main(["best", str(path), "--format", "json", "--top", "0", "--encoder", "sup"]) == 0
    sup = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in sup] == [r["run_id"] for r in recs if r["encoder"] == "sup"]

    # the supervised baseline's own end-to-end numbers: in MLflow and in the report
    meta = json.load(open(f"{store}/baselines/sup/final/baseline.json"))
    mlflow.set_tracking_uri(tracking_uri(cfg))
    reference = mlflow.search_runs(experiment_names=[cfg.experiment_name],
                                   filter_string="tags.`sweep.stage` = 'baselines' and tags.`sweep.baseline` = 'sup'")
    assert len(reference) == 1
    for m in ("test_acc", "test_macro_f1", "test_balanced_acc"):
        assert reference.iloc[0][f"metrics.{m}"] == pytest.approx(meta["metrics"][m])
    report = Path(store, "report", "report.md").read_text()
    assert "## Supervised reference (end to end)" in report
    # each encoder's best column on val (from `sweep best`'s own records), in the comparison section
    compared = report.split("## Encoders compared")[1].split("```")[1].strip().splitlines()
    assert compared[0].split()[:7] == ["encoder", "searched", "column", "resolution", "val_macro_f1", "test_acc",
                                       "test_acc_95ci"]
    best_of = {e: max((r for r in recs if r["encoder"] == e), key=lambda r: r["val_macro_f1"]) for e in ("diffusion", "sup")}
    assert sorted((row.split()[0], row.split()[2], float(row.split()[4])) for row in compared[1:]) == sorted(
        (e, r["column"], round(r["val_macro_f1"], 4)) for e, r in best_of.items())
    # how many columns each best was chosen from: 5 blocks x 3 timesteps, 4 layers
    assert {row.split()[0]: int(row.split()[1]) for row in compared[1:]} == {"diffusion": 15, "sup": 4}
    # each encoder's training: 6 steps x 8 images x 2 workers; 2 epochs over the 61 training images
    train_images = int((build_table(cfg).frame["split"] == "train").sum())
    budgets = pd.read_csv(Path(store, "report", "training_budgets.csv")).set_index("encoder")
    marker = json.load(open(f"{store}/pretrain/final/sweep_pretrain.json"))
    assert marker["global_batch"] == 16
    # 31 images a worker: epochs of 8 + 8 + 8 + 7, so 6 steps draw 2 x (31 + 16) = 94 (not 6 x 16 = 96)
    assert budgets.loc["diffusion", ["train_images", "steps", "images_seen"]].tolist() == [train_images, 6, 94]
    assert marker["images_seen"] == 94
    assert budgets.loc["sup", ["train_images", "epochs", "images_seen"]].tolist() == [train_images, 2, 2 * train_images]
    assert budgets.loc["sup", "steps"] == meta["history"][-1]["step"] >= 2  # the optimizer's steps, as recorded
    assert "## Training budgets" in report and "budgets differ" not in report  # 122 vs 96 images: comparable
    assert f"{meta['metrics']['test_macro_f1']:.4f}" in report
    assert {"## diffusion", "## sup"} <= set(report.splitlines())
    assert Path(store, "report", "heatmap_diffusion_val_macro_f1.png").is_file()

    # rerun on finished work: no new feature rows, no new MLflow runs, baselines untouched
    n_runs = len(_probe_runs(cfg))
    assert n_runs == 19
    weights = Path(store, "baselines", "sup", "final", "model.safetensors").read_bytes()
    assert main(["run", str(path)]) == 0
    assert len(_probe_runs(cfg)) == n_runs
    for encoder, manifest in manifests.items():
        assert json.load(open(f"{store}/features/{encoder}/_manifest.json"))["datasets"] == manifest["datasets"]
    assert Path(store, "baselines", "sup", "final", "model.safetensors").read_bytes() == weights
    # the extract stage's run: one, from the first run (the rerun had nothing to encode), with its counts
    extract_runs = mlflow.search_runs(experiment_names=[cfg.experiment_name],
                                      filter_string="tags.`sweep.stage` = 'extract'")
    assert len(extract_runs) == 1 and extract_runs.iloc[0]["status"] == "FINISHED"
    assert {e: extract_runs.iloc[0][f"metrics.{e}_rows"] for e in ("diffusion", "sup")} == {"diffusion": 105, "sup": 105}

    # the table format names the columns a user looks for
    assert main(["best", str(path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "timestep" in out and len(out.strip().splitlines()) == 4
