"""`sweep probe` on real Ray, a real MLflow SQLite store and real features (the demo images through a small
U-Net, extracted by the real extract stage): parity with scikit-learn, the test split never choosing,
one child run per trial with every contract field, resume without duplicates, and `sweep best` against
MLflow's own query."""

from __future__ import annotations

import json
import re
import shutil
import time
from argparse import Namespace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_port, small_pipeline, start_mlflow_server, stop_mlflow_server
from mlflow.tracking import MlflowClient
from sklearn.linear_model import LogisticRegression

from sweep import cli, tracking
from sweep.best import best, records
from sweep.config import PROBE_REVISION, AshaConfig, PipelineConfig
from sweep.features.store import FeatureStore
from sweep.probing import ProbeConfig, Split, kmeans_scores, train_probe
from sweep.stages import extract, probe, report
from sweep.stages.probe import probe_column, read_probe_data
from sweep.storage import Storage, storage_lock

pytestmark = pytest.mark.ray

BLOCKS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
TIMESTEPS = [0, 100, 400]
N_TRIALS = len(BLOCKS) * len(TIMESTEPS)  # 15
CONTRACT_PARAMS = {"encoder", "layer", "timestep", "resolution", "dim", "lr", "weight_decay"}
CONTRACT_METRICS = {"val_acc", "val_macro_f1", "test_acc", "test_macro_f1", "test_balanced_acc",
                    "kmeans_nmi", "kmeans_ari"}


def _raw(storage: Path, checkpoint: Path, **probe_settings) -> dict:
    return small_pipeline(
        storage,
        extract={"encoders": [{"name": "diffusion", "checkpoint": str(checkpoint)}], "timesteps": TIMESTEPS,
                 "batch_size": 64, "shard_size": 64},
        probe={"epochs": 8, "lrs": [0.01, 0.1], "weight_decays": [0.0, 0.01], "kmeans": True,
               "cpus_per_trial": 1, "max_concurrent_trials": 2, **probe_settings},
    )


@pytest.fixture(scope="module")
def swept(ray_local, tiny_unet_checkpoint, tmp_path_factory) -> PipelineConfig:
    """Features of the 105 demo images (5 blocks x 3 timesteps), then one full probe sweep."""
    storage = tmp_path_factory.mktemp("probe") / "store"
    config = PipelineConfig.model_validate(_raw(storage, tiny_unet_checkpoint))
    extract.run(config)
    out = probe.run(config)
    assert out["ran"] == N_TRIALS
    assert out["workers"] == 2  # max_concurrent_trials, actually reached (see probe._wait_for_peers)
    return config


def _client(config: PipelineConfig) -> MlflowClient:
    return tracking.client_for(config)


def _children(config: PipelineConfig, run_view=mlflow.entities.ViewType.ACTIVE_ONLY) -> list:
    client = _client(config)
    exp = client.get_experiment_by_name(config.experiment_name)
    return client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_PARENT}` LIKE '%'",
                              run_view_type=run_view, max_results=1000)


# ------------------------------------------------------------------ the probe against scikit-learn


def _sklearn_choice(train: Split, val: Split, test: Split, wds: list[float], select: str):
    """LogisticRegression per C = 1 / (wd * N_train) on the probe's standardisation, C chosen on val by
    the probe's rule (best `select`, ties: lower val cross-entropy, then grid order)."""
    Xtr = train.X.astype(np.float64)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    best_key, chosen = None, None
    for i, wd in enumerate(wds):
        model = LogisticRegression(C=1 / (wd * len(Xtr)), tol=1e-10, max_iter=20000)
        model.fit((Xtr - mu) / sd, train.y)
        Xva = (val.X.astype(np.float64) - mu) / sd
        pred = model.predict(Xva)
        acc = (pred == val.y).mean()
        from sklearn.metrics import f1_score

        f1 = f1_score(val.y, pred, labels=range(6), average="macro", zero_division=0)
        proba = model.predict_proba(Xva)
        ce = -np.log(proba[np.arange(len(val.y)), val.y]).mean()
        key = (-(f1 if select == "val_macro_f1" else acc), ce, i)
        if best_key is None or key < best_key:
            test_acc = (model.predict((test.X.astype(np.float64) - mu) / sd) == test.y).mean()
            best_key, chosen = key, (wd, test_acc)
    return chosen


def test_probe_matches_sklearn_on_real_features(swept):
    import torch

    # 15,000 steps on 61 rows: one intra-op thread is 2-10x faster than two (which fight each other and
    # Ray's processes for the 2 cores), as in the probe stage's trials
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _probe_against_sklearn(swept)
    finally:
        torch.set_num_threads(threads)


def _probe_against_sklearn(swept):
    # Converged heads (full batch, many averaged steps) and sklearn at tight tolerance reach the same
    # minimiser, so with the same standardisation and the same choice rule they predict the same labels:
    # the test split has ~21 images, so a single different prediction would be a ~5 point gap.
    store = f"{swept.storage_root}/features/diffusion"
    wds = [1e-3, 1e-2, 1e-1]
    cfg = ProbeConfig(lrs=[0.03, 0.1], weight_decays=wds, epochs=1500, batch_size=4096, select="val_acc")
    gaps = []
    for column in ("down_blocks.1@t0", "mid_block@t100", "up_blocks.1@t400"):
        X, y, split, _ = read_probe_data(store, column)
        train, val, test = (Split(X[split == s], y[split == s]) for s in ("train", "val", "test"))
        res = train_probe(train, val, test, {}, 6, cfg)
        wd, sk_acc = _sklearn_choice(train, val, test, wds, cfg.select)
        gaps.append((column, res.metrics["test_acc"] - sk_acc, res.weight_decay, wd))
    print(gaps)
    for column, gap, wd_probe, wd_sk in gaps:
        assert wd_probe == wd_sk, column
        assert abs(gap) <= 0.005, column


# ------------------------------------------------------------------ the test split chooses nothing


def _store_with_test_labels_permuted(src: FeatureStore, dest: Path, seed: int = 0) -> FeatureStore:
    """A copy of a store, with the test rows' labels shuffled among themselves (written through the
    store's own API, so it is a complete, valid store)."""
    rng = np.random.default_rng(seed)
    out = FeatureStore(str(dest))
    manifest = src.manifest()
    out.open({k: v for k, v in manifest.items() if k not in ("key", "complete", "datasets", "rejected")},
             manifest["key"], {d: v["num_shards"] for d, v in manifest["datasets"].items()})
    for dataset, info in manifest["datasets"].items():
        for shard in info["shards"]:
            table = pq.read_table(f"{src.base}/{shard['file']}")
            labels = table.column("label").to_numpy().copy()
            is_test = np.asarray(table.column("split").to_pylist()) == "test"
            labels[is_test] = rng.permutation(labels[is_test])
            table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
            out.write_shard(dataset, shard["index"], table)
    out.mark_complete(manifest.get("summary", {}))
    return out


def test_test_labels_change_no_choice(swept, tmp_path):
    src = FeatureStore(f"{swept.storage_root}/features/diffusion")
    other = _store_with_test_labels_permuted(src, tmp_path / "permuted")
    settings = {**swept.probe.model_dump(mode="json"), "epochs": 15}
    changed = 0
    for column in ("down_blocks.0@t0", "mid_block@t100", "up_blocks.0@t400"):
        a = probe_column(src.root, column, 6, settings, seed=0, threads=1)
        b = probe_column(other.root, column, 6, settings, seed=0, threads=1)
        assert (a["lr"], a["weight_decay"], a["best_epoch"], a["epochs_run"]) == (
            b["lr"], b["weight_decay"], b["best_epoch"], b["epochs_run"])
        assert a["history"] == b["history"]
        assert {k: v for k, v in a["metrics"].items() if k.startswith("val_")} == {
            k: v for k, v in b["metrics"].items() if k.startswith("val_")}
        changed += a["metrics"]["test_acc"] != b["metrics"]["test_acc"]
    assert changed  # the permuted labels did reach the test metrics


# ------------------------------------------------------------------ MLflow records of the sweep


def test_one_child_run_per_trial_with_contract_fields(swept):
    client = _client(swept)
    exps = [e for e in client.search_experiments() if e.name == swept.experiment_name]
    assert len(exps) == 1
    parents = client.search_runs([exps[0].experiment_id],
                                 f"tags.`{tracking.TAG_STAGE}` = 'probe' and attributes.status = 'FINISHED'")
    parents = [r for r in parents if tracking.TAG_PARENT not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.metrics["trials_run"] == N_TRIALS and parent.data.metrics["trials_failed"] == 0

    runs = _children(swept)
    assert len(runs) == N_TRIALS
    manifest = FeatureStore(f"{swept.storage_root}/features/diffusion").manifest()
    expected = {c["column"]: c for c in manifest["columns"]}
    assert {r.data.params["column"] for r in runs} == set(expected)
    for r in runs:
        assert r.info.status == "FINISHED"
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        assert tags[tracking.TAG_PARENT] == parent.info.run_id
        assert tags[tracking.TAG_STAGE] == "probe" and tags[tracking.TAG_PIPELINE] == swept.name
        assert tags[tracking.TAG_HASH] == swept.config_hash()
        assert CONTRACT_PARAMS <= set(params)
        col = expected[params["column"]]
        assert params["encoder"] == "diffusion" and params["layer"] == col["layer"]
        assert int(params["timestep"]) == col["timestep"] and int(params["dim"]) == col["dim"]
        assert int(params["resolution"]) == col["resolution"]
        assert float(params["lr"]) in swept.probe.lrs
        assert float(params["weight_decay"]) in swept.probe.weight_decays
        assert CONTRACT_METRICS <= set(metrics)
        assert all(0.0 <= metrics[m] <= 1.0 for m in CONTRACT_METRICS - {"kmeans_ari"})
        # the validation curve: one point per epoch, steps 1..epochs
        curve = sorted(client.get_metric_history(r.info.run_id, "history_val_acc"), key=lambda m: m.step)
        assert [m.step for m in curve] == list(range(1, swept.probe.epochs + 1))
        assert curve[-1].value == pytest.approx(metrics["val_acc"], abs=0.05)  # the last epoch's head is kept
    # k-means: over the main dataset's images of every split (not the test split alone)
    r = runs[0]
    X, y, split, _ = read_probe_data(f"{swept.storage_root}/features/diffusion", r.data.params["column"])
    assert (split != "test").any() and (split != "ood").all()
    expected_km = kmeans_scores(X, y, k=len(set(y.tolist())), seed=swept.seed)
    assert {m: r.data.metrics[m] for m in expected_km} == pytest.approx(expected_km, abs=1e-12)


def test_best_orders_as_mlflow_search_runs(swept, capsys):
    for metric in ("val_macro_f1", "test_acc", "kmeans_nmi"):
        ours = [r["run_id"] for r in best(swept, metric=metric, top=None)]
        theirs = mlflow.search_runs(
            experiment_names=[swept.experiment_name],
            filter_string=(f"tags.`sweep.stage` = 'probe' and tags.`sweep.pipeline` = '{swept.name}' and "
                           f"tags.`mlflow.parentRunId` LIKE '%' and attributes.status = 'FINISHED' and "
                           f"tags.`sweep.config_hash` = '{swept.config_hash()}'"),
            order_by=[f"metrics.`{metric}` DESC"])
        assert ours == list(theirs["run_id"]) and len(ours) == N_TRIALS
        values = [r[metric] for r in best(swept, metric=metric, top=None)]
        assert values == sorted(values, reverse=True)

    base = ["best", str(_pipeline_file(swept)), "--set", f"storage={swept.storage_root}"]
    assert cli.main([*base, "--format", "json", "--top", "5", "--metric", "test_macro_f1"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 5
    for r in recs:
        assert isinstance(r["run_id"], str) and r["encoder"] == "diffusion" and isinstance(r["layer"], str)
        assert isinstance(r["timestep"], int) and isinstance(r["resolution"], int) and isinstance(r["dim"], int)
        assert isinstance(r["lr"], float) and isinstance(r["weight_decay"], float)
        assert r["config_hash"] == swept.config_hash()  # which settings made it (several with --any-config)
        for m in CONTRACT_METRICS:
            assert isinstance(r[m], float), m
    assert [r["test_macro_f1"] for r in recs] == sorted((r["test_macro_f1"] for r in recs), reverse=True)

    assert cli.main([*base, "--format", "json", "--top", "0", "--encoder", "diffusion"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == N_TRIALS
    # an encoder or OOD dataset the pipeline does not have: an invalid argument, named with what there is
    assert cli.main([*base, "--format", "json", "--encoder", "simclr-resnet18"]) == 2
    assert ("sweep: invalid argument: --encoder: 'simclr-resnet18' is not an encoder of this pipeline (diffusion)"
            in capsys.readouterr().err)
    assert cli.main([*base, "--metric", "ood_other_acc"]) == 2
    assert "--metric: unknown metric 'ood_other_acc': no OOD dataset 'other' in data.ood" in capsys.readouterr().err
    # ... unless runs of other settings are asked for (they may have had other encoders and OOD datasets)
    assert cli.main([*base, "--format", "json", "--encoder", "simclr-resnet18", "--any-config"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main([*base, "--top", "3", "--metric", "kmeans_ari"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["#", "encoder", "layer"] and len(table) == 4
    assert cli.main([*base, "--metric", "test_auc"]) == 2


def _pipeline_file(config: PipelineConfig) -> Path:
    import yaml

    path = Path(config.storage_root).parent / "pipeline.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def test_a_trial_the_tracking_database_refuses_names_the_store(write_pipeline):
    """A probe whose MLflow database stopped taking writes (a full disk) said 'first: KEY: MlflowException:
    (sqlite3.OperationalError) database or disk is full', naming no store (the disk audit). Here the SQLite
    file is overwritten in place: every later transaction fails."""
    config = PipelineConfig.model_validate(yaml.safe_load(write_pipeline().read_text()))
    parent = tracking.start_stage_run(config, "probe")
    writer = probe.ChildRunWriter(config, parent, {"k": {"encoder": "e", "layer": "l", "column": "l@t0",
                                                        "timestep": 0, "resolution": 4, "dim": 8}})
    outcome = {"lr": 0.1, "weight_decay": 0.0, "best_epoch": 1, "metrics": {"val_acc": 0.5}, "epochs_run": 1,
               "seconds": 0.1, "history": [dict.fromkeys(probe.CURVE_KEYS, 0.5)]}
    db = Path(config.storage_root) / "mlflow.db"
    assert writer.write([("k", outcome, time.time())]) == []  # the store takes it
    with open(db, "r+b") as f:
        f.write(b"not a database" * 512)
    errors = writer.write([("k", outcome, time.time())])
    writer.close()
    assert len(errors) == 1 and errors[0].startswith("k: DatabaseError: (sqlite3.DatabaseError)"), errors
    assert errors[0].endswith(f"(MLflow tracking store sqlite:///{db})") and "[SQL:" not in errors[0], errors


def test_the_table_of_several_settings_names_each_rows_config_hash():
    from sweep.best import format_table

    rec = {"encoder": "diffusion", "layer": "mid_block", "timestep": 0, "resolution": 4, "dim": 64, "lr": 0.1,
           "weight_decay": 0.0, "val_macro_f1": 0.5, "config_hash": "aaaaaaaaaaaa"}
    one = format_table([rec, {**rec, "timestep": 25}], "val_macro_f1").splitlines()
    assert "config_hash" not in one[0]
    # `--any-config`: the same trial under two settings read as a duplicated row
    two = format_table([rec, {**rec, "config_hash": "bbbbbbbbbbbb"}], "val_macro_f1").splitlines()
    assert two[0].split()[:2] == ["#", "config_hash"]
    assert [row.split()[1] for row in two[1:]] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]


def test_records_types_for_a_non_diffusion_encoder():
    import pandas as pd

    frame = pd.DataFrame([{"run_id": "r1", "params.encoder": "supervised-resnet18", "params.layer": "layer3",
                           "params.timestep": "", "params.resolution": "4", "params.dim": "256",
                           "params.lr": "0.01", "params.weight_decay": "0.0", "metrics.val_acc": 0.5,
                           "metrics.test_acc": float("nan"), "metrics.history_val_acc": 0.4}])
    (rec,) = records(frame, ("val_acc", "kmeans_nmi"))
    assert rec["kmeans_nmi"] is None and "kmeans_ari" not in rec  # asked for: there, null; not asked: absent
    assert rec["timestep"] is None and rec["resolution"] == 4 and rec["dim"] == 256
    assert rec["lr"] == 0.01 and rec["weight_decay"] == 0.0 and rec["val_acc"] == 0.5
    assert rec["test_acc"] is None and "history_val_acc" not in rec
    json.dumps(rec, allow_nan=False)
    # the metrics in one order whatever MLflow's columns' (probe_runs.csv's columns moved between two reports)
    more = frame.assign(**{"metrics.trial_seconds": 1.0, "metrics.ood_b_acc": 0.1, "metrics.epochs_run": 3.0,
                           "metrics.kmeans_ari": 0.2, "metrics.ood_a_acc": 0.3})
    orders = {tuple(records(more[list(columns)], ("val_acc", "kmeans_nmi"))[0])
              for columns in (more.columns, more.columns[::-1])}
    assert [list(o)[list(o).index("weight_decay") + 1:] for o in orders] == [
        ["val_acc", "test_acc", "ood_a_acc", "ood_b_acc", "kmeans_nmi", "kmeans_ari", "epochs_run", "trial_seconds"]]


def test_an_interrupted_report_leaves_the_last_one_whole(swept, monkeypatch):
    """Ctrl-C half-way through writing a report: report/ is still the last complete one, file for file (a
    new report is staged beside it and replaces it whole), and nothing staged is left behind."""
    folder = Path(report.run(swept)).parent
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in folder.iterdir()}
    assert {"report.md", "probe_runs.csv", "data.csv", "per_class.csv"} <= set(before)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # while the heat maps are drawn: the CSV tables are written already

    monkeypatch.setattr(report, "_heatmap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.run(swept)
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in folder.iterdir()} == before  # not rewritten
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("report")) == ["report"]


def _copy_of_the_sweep(swept, tmp_path):
    """The swept config on a copy of its storage and MLflow store, to change without touching the module's."""
    store = tmp_path / "store"
    shutil.copytree(swept.storage_root, store)
    db = tmp_path / "mlflow.db"
    shutil.copyfile(tracking.local_mlflow_db(swept), db)
    return swept.model_copy(update={"storage": str(store),
                                    "tracking": swept.tracking.model_copy(update={"uri": f"sqlite:///{db}"})})


def test_a_report_of_an_unfinished_sweep_says_so(swept, tmp_path, capsys):
    """A report made while some planned trials have no run (an interrupted or failed sweep) looked complete:
    '17 probe runs', another best table. It now says how many are missing, in report.md and on the console;
    the complete one says nothing of the kind."""
    config = _copy_of_the_sweep(swept, tmp_path)
    assert report.missing_trials(config, best(config, top=None)) == []
    assert "Incomplete" not in Path(report.run(config)).read_text()
    best_args = Namespace(metric="val_macro_f1", top=3, encoder=None, format="table", any_config=False)
    capsys.readouterr()
    cli.cmd_best(config, best_args)
    assert "no finished run" not in capsys.readouterr().err
    gone = sorted(_children(config), key=lambda r: r.data.tags[tracking.TAG_TRIAL])[:2]
    for r in gone:
        _client(config).delete_run(r.info.run_id)
    capsys.readouterr()
    text = Path(report.run(config)).read_text()
    first = gone[0].data.tags[tracking.TAG_TRIAL]
    assert f"**Incomplete: 2 of {N_TRIALS} planned probe trials have no run yet (e.g. `{first}`)" in text
    assert f"{N_TRIALS - 2} probe runs" in text
    assert f"report: warning: 2 planned probe trial(s) have no run yet (e.g. {first})" in capsys.readouterr().err
    cli.cmd_best(config, best_args)  # `sweep best` too: its ranking is of the trials that have a run
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"[sweep] 2 of the {N_TRIALS} trials planned by the last probe stage have no finished run (that stage's "
        f"run is FINISHED): the ranking leaves them out; `sweep probe` runs them"]
    assert len(out.out.splitlines()) == 4  # the header and the top 3
    # a probe killed mid-sweep leaves its run RUNNING: said so only while a command holds the storage
    (parent,) = [r for r in _client(config).search_runs([tracking.ensure_experiment(config)],
                                                        f"tags.`{tracking.TAG_STAGE}` = 'probe'")
                 if tracking.TAG_PARENT not in r.data.tags]
    _client(config).update_run(parent.info.run_id, status="RUNNING")
    _client(config).set_tag(parent.info.run_id, tracking.TAG_STORAGE, Storage.of(config.storage_root).root)
    cli.cmd_best(config, best_args)
    assert "(that stage's run is RUNNING in MLflow, but no sweep command on this machine is at work in this storage: " \
           "it was stopped without ending its run (killed), unless it runs on another machine sharing the storage)" \
           in capsys.readouterr().err
    with storage_lock(config.storage_root, "sweep probe"):
        cli.cmd_best(config, best_args)
    assert "(that stage's run is RUNNING: a sweep command is at work in this storage)" in capsys.readouterr().err


def test_a_report_that_fails_after_its_run_opened_ends_it_failed(swept, tmp_path, monkeypatch):
    """The report's run opens once its files are written; an error after (the artifacts' upload to a store
    that is full: raised here by the client as a full disk raises it) left that run RUNNING in MLflow; report/
    stays as it was."""
    import errno

    config = _copy_of_the_sweep(swept, tmp_path)

    def full(self, run_id, local_path, artifact_path=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    def new_report_runs(before=()):  # the module's store may hold report runs of earlier tests
        runs = _client(config).search_runs([tracking.ensure_experiment(config)],
                                           f"tags.`{tracking.TAG_STAGE}` = 'report'")
        return {r.info.run_id: r.info.status for r in runs if r.info.run_id not in before}

    earlier = new_report_runs()
    folder = Path(Storage.of(config.storage_root).report)
    old = {f.name: f.read_bytes() for f in folder.iterdir()} if folder.exists() else None  # an earlier test's
    monkeypatch.setattr(MlflowClient, "log_artifact", full)
    with pytest.raises(OSError, match="No space left on device"):
        report.run(config)
    assert list(new_report_runs(earlier).values()) == ["FAILED"]
    assert ({f.name: f.read_bytes() for f in folder.iterdir()} if folder.exists() else None) == old  # as it was
    monkeypatch.undo()
    assert Path(report.run(config)).is_file()  # the rerun: a new run, FINISHED
    assert sorted(new_report_runs(earlier).values()) == ["FAILED", "FINISHED"]


def test_best_after_a_probe_that_finished_no_trial_does_not_ask_for_the_overrides(swept, tmp_path, capsys):
    """A probe stage of these settings that ended before any trial finished, beside runs of other settings:
    `sweep best` said both that the trials have no run yet and that the user should "pass the same --set
    overrides", which they had. Only the first is said; without that stage's run, the second is."""
    config = _copy_of_the_sweep(swept, tmp_path)
    client = _client(config)
    for r in _children(config):  # every trial run now belongs to other settings of this pipeline
        client.set_tag(r.info.run_id, tracking.TAG_HASH, "0" * 12)
    best_args = Namespace(metric="val_macro_f1", top=3, encoder=None, format="table", any_config=False)
    capsys.readouterr()
    cli.cmd_best(config, best_args)
    assert capsys.readouterr().err.splitlines() == [
        f"[sweep] {N_TRIALS} of the {N_TRIALS} trials planned by the last probe stage have no finished run (that "
        f"stage's run is FINISHED): the ranking leaves them out; `sweep probe` runs them"]
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name(config.experiment_name).experiment_id],
                                               f"tags.`{tracking.TAG_STAGE}` = 'probe'")
                 if tracking.TAG_PARENT not in r.data.tags]
    client.delete_run(parent.info.run_id)  # no probe stage of these settings: the runs are of other settings only
    cli.cmd_best(config, best_args)
    assert capsys.readouterr().err.splitlines() == [
        f"[sweep] no probe runs for this config (hash {config.config_hash()}); runs exist for other settings of "
        f"{config.name!r}: pass the same --set overrides, or --any-config"]


def test_report_says_how_many_images_each_split_holds(swept):
    """report.md's Data section and data.csv: images, classes and the largest and smallest class of every
    (dataset, split), as counted from the feature store's shards."""
    from collections import Counter

    files = FeatureStore(f"{swept.storage_root}/features/diffusion").files()
    meta = pa.concat_tables([pq.read_table(f, columns=["label", "split", "domain"]) for f in files]).to_pylist()
    per_class = Counter((r["domain"], r["split"], r["label"]) for r in meta)
    md = Path(report.run(swept)).read_text()
    # k-means' NMI beside what random clusters score on the same images (it was the demo's, in every report)
    from sweep.probing.kmeans import chance_nmi

    labels = np.array([r["label"] for r in meta])
    assert f"random clusters score {chance_nmi(labels, len(set(labels)), swept.seed):.2f} on these images" in md
    table = pd.read_csv(Path(swept.storage_root, "report", "data.csv"))
    assert [(r.dataset, r.split) for r in table.itertuples()] == [("plankton", s) for s in ("train", "val", "test")]
    for r in table.itertuples():
        sizes = [n for (d, s, _), n in per_class.items() if (d, s) == (r.dataset, r.split)]
        assert (r.images, r.classes, r.largest_class, r.smallest_class) == (sum(sizes), len(sizes), max(sizes),
                                                                            min(sizes))
    assert table["images"].sum() == len(meta) == 105
    # per class, for the best column: its counts add up to the logged test accuracy and macro F1
    per_class = pd.read_csv(Path(swept.storage_root, "report", "per_class.csv"))
    top = best(swept, metric=swept.probe.select, top=1)[0]
    rows = per_class[(per_class["column"] == top["column"]) & (per_class["split"] == "test")]
    test_row = table[table["split"] == "test"].iloc[0]
    assert rows["images"].sum() == test_row["images"] and len(rows) == test_row["classes"]
    assert (rows["recall"] * rows["images"]).sum() / rows["images"].sum() == pytest.approx(top["test_acc"])
    assert rows["f1"].mean() == pytest.approx(top["test_macro_f1"])
    assert "## Per class" in md and "the refit differs" not in md
    # the probe settings the figures come from
    assert (f"Probe (revision {PROBE_REVISION}): lrs {swept.probe.lrs}, weight decays {swept.probe.weight_decays}, "
            f"{swept.probe.epochs} epochs") in md
    data = md.split("## Data")[1].split("```")[1].strip().splitlines()
    assert data[0].split() == list(table.columns) and len(data) == 4
    # one encoder: its best column on val, with the test accuracy's interval over the test images
    head, row = md.split("## Best column")[1].split("```")[1].strip().splitlines()
    assert head.split()[:7] == ["encoder", "searched", "column", "resolution", "val_macro_f1", "test_acc",
                                "test_acc_95ci"]
    assert int(row.split()[1]) == N_TRIALS  # chosen from every column
    n_test = int(table.loc[table["split"] == "test", "images"].iloc[0])
    acc = float(row.split()[5])
    assert row.split()[6] == "{:.2f}-{:.2f}".format(*report.accuracy_interval(round(acc * n_test) / n_test, n_test))
    # the training budgets: a given checkpoint, trained elsewhere
    budgets = md.split("## Training budgets")[1].split("```")[1].strip().splitlines()
    assert budgets[1].split()[:2] == ["diffusion", "given"] and budgets[1].split()[-1] == str(swept.data.image_size)


def _report_env_trainable():
    """A Tune trainable reporting the environment its actor was given (defined in a function: Ray pickles it
    by value, as workers cannot import this test module)."""
    import os

    import ray
    from ray import tune

    class ReportEnv(tune.Trainable):
        def step(self):
            return {"pl": os.environ.get("PL_DISABLE_FORK"), "done": True,
                    "env_vars": sorted(ray.get_runtime_context().runtime_env.get("env_vars", {}))}
    return ReportEnv


def test_trial_actors_get_no_runtime_env(ray_local, tmp_path):
    """Tune's default actor runtime_env (PL_DISABLE_FORK) costs each probe worker a second interpreter at
    start; `_plain_worker_env` leaves it out for the sweep's Tuner, and puts Tune's default back after."""
    from ray import tune
    from ray.tune.execution import class_cache

    def fit():
        tuner = tune.Tuner(_report_env_trainable(), run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
        return [(r.metrics["pl"], r.metrics["env_vars"]) for r in tuner.fit()]

    assert fit() == [("1", ["PL_DISABLE_FORK"])]  # Tune's default, as the docstring describes it
    with probe._plain_worker_env():
        assert "PL_DISABLE_FORK" not in class_cache.DEFAULT_ENV_VARS
        assert fit() == [(None, [])]
    assert class_cache.DEFAULT_ENV_VARS["PL_DISABLE_FORK"] == "1"


def test_a_stopped_trial_actor_ends_quietly_on_sigterm(ray_local):
    """Ray's worker turns SIGTERM into SystemExit, which printed "Exception ignored" when it landed in a
    garbage-collection callback as the raylet ended a worker that Tune had let go. Once Tune has stopped a
    probe actor (`stop` -> `cleanup`), SIGTERM takes the default action instead; until then it stays Ray's."""
    import signal

    import ray
    from ray import tune

    class Probe(probe.ProbeTrial):
        def sigterm(self) -> str:
            handler = signal.getsignal(signal.SIGTERM)
            return "default" if handler == signal.SIG_DFL else type(handler).__name__

    actor = ray.remote(num_cpus=0)(tune.with_parameters(Probe, trials={}, run={})).remote(config={"trial": "k"})
    assert ray.get(actor.sigterm.remote()) == "function"  # Ray's handler while trials may still come
    ray.get(actor.stop.remote())
    assert ray.get(actor.sigterm.remote()) == "default"
    ray.kill(actor)


def test_trainable_lookups_cached_only_inside_the_sweep(ray_local, monkeypatch):
    """Inside `_cached_trainable_lookups` Tune's registry answers repeated lookups of a trainable from the
    first one (its two GCS reads, then none); outside, every lookup reads the GCS twice again."""
    from ray.tune import registry

    registry.register_trainable("sweep-test-cached", _report_env_trainable())
    reads = []
    read = registry._internal_kv_get
    monkeypatch.setattr(registry, "_internal_kv_get", lambda key, **kw: reads.append(key) or read(key, **kw))

    def lookups(n: int) -> list:
        return [registry.get_trainable_cls("sweep-test-cached") for _ in range(n)]

    lookups(3)
    assert len(reads) == 6  # Tune's own: a `contains` and a `get` read per lookup
    reads.clear()
    with probe._cached_trainable_lookups():
        found = lookups(3)
        assert len(reads) == 2 and found[0].__name__ == "ReportEnv"
        assert registry._global_registry.contains(registry.TRAINABLE_CLASS, "sweep-test-cached")
        assert len(reads) == 2
        assert not registry._global_registry.contains(registry.TRAINABLE_CLASS, "sweep-test-never-registered")
        assert len(reads) == 3  # what is not cached is still asked
    assert "get" not in vars(registry._global_registry) and "contains" not in vars(registry._global_registry)
    reads.clear()
    lookups(1)
    assert len(reads) == 2


# ------------------------------------------------------------------ resume


def test_interrupted_sweep_resumes_without_duplicates(swept, tmp_path, monkeypatch):
    # The MLflow store of the finished sweep, copied; then made to look interrupted: 3 trials never ran,
    # one was interrupted while its run was written (RUNNING), the parent never finished.
    db = tmp_path / "mlflow.db"
    shutil.copyfile(tracking.local_mlflow_db(swept), db)
    config = swept.model_copy(update={"tracking": swept.tracking.model_copy(update={"uri": f"sqlite:///{db}"})})
    assert config.config_hash() == swept.config_hash()
    client = _client(config)
    runs = sorted(_children(config), key=lambda r: r.data.tags[tracking.TAG_TRIAL])
    keep = {r.data.tags[tracking.TAG_TRIAL]: r.info.run_id for r in runs[4:]}
    for r in runs[:4]:
        client.delete_run(r.info.run_id)
    stale_key = runs[0].data.tags[tracking.TAG_TRIAL]
    stale = client.create_run(runs[0].info.experiment_id, tags={
        **tracking.stage_tags(config, "probe"), tracking.TAG_TRIAL: stale_key,
        tracking.TAG_PARENT: runs[0].data.tags[tracking.TAG_PARENT]})
    parent_id = runs[0].data.tags[tracking.TAG_PARENT]
    client.update_run(parent_id, status="FAILED")

    # First rerun is interrupted again: one of the 4 remaining trials is never recorded.
    # The store fails that trial's run; the others of its batch are still written, each on its own.
    lost = runs[1].data.tags[tracking.TAG_TRIAL]
    real_write = tracking.log_finished_runs

    def flaky_write(client, experiment_id, finished):
        if any(r.tags[tracking.TAG_TRIAL] == lost for r in finished):
            raise RuntimeError("store went away")
        return real_write(client, experiment_id, finished)

    monkeypatch.setattr(tracking, "log_finished_runs", flaky_write)
    with pytest.raises(probe.ProbeError, match=f"1 of 4 trials not recorded.*{lost}: RuntimeError: store went away"):
        probe.run(config)
    assert client.get_run(parent_id).info.status == "FAILED"  # the same parent, resumed, failed again
    assert client.get_run(stale.info.run_id).info.lifecycle_stage == "deleted"
    assert len(_children(config)) == N_TRIALS - 1
    monkeypatch.setattr(tracking, "log_finished_runs", real_write)

    out = probe.run(config)
    assert out["ran"] == 1  # only the lost trial
    assert probe.run(config)["ran"] == 0  # and then nothing
    children = _children(config)
    by_key = {}
    for r in children:
        by_key.setdefault(r.data.tags[tracking.TAG_TRIAL], []).append(r)
    assert len(children) == N_TRIALS and all(len(v) == 1 for v in by_key.values())
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(by_key[k][0].info.run_id == run_id for k, run_id in keep.items())  # finished ones not redone
    assert {r.data.tags[tracking.TAG_PARENT] for r in children} == {parent_id}
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_runs_made_on_a_feature_store_made_again_from_other_images_are_probed_again(swept, tmp_path, capfd):
    """Every child run names the feature store it read (`FeatureStore.identity`: its settings, images
    included). Images changed, store deleted and extracted again (what `sweep extract` tells a user to do):
    the runs made on the old store were reported as results of the new one ("all trials already in MLflow").
    Simulated on a copy of the MLflow store by giving 3 runs another store's identity: they are deleted and
    their trials run again, the rest stays."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(tracking.local_mlflow_db(swept), db)
    config = swept.model_copy(update={"tracking": swept.tracking.model_copy(update={"uri": f"sqlite:///{db}"})})
    client = _client(config)
    identity = FeatureStore(Storage.of(swept.storage_root).features("diffusion")).identity()
    runs = sorted(_children(config), key=lambda r: r.data.tags[tracking.TAG_TRIAL])
    assert identity and {r.data.tags.get(tracking.TAG_FEATURES) for r in runs} == {identity}
    here = Storage.of(swept.storage_root).root
    assert {r.data.tags.get(tracking.TAG_STORAGE) for r in runs} == {here}
    for r in runs[:3]:
        client.set_tag(r.info.run_id, tracking.TAG_FEATURES, "0123456789ab")  # made on an earlier store
    # ...of another storage sharing this MLflow store: another study's results, not stale ones. Refused, and
    # nothing deleted (they were deleted, and that storage's `sweep best` then showed this one's runs)
    client.set_tag(runs[0].info.run_id, tracking.TAG_STORAGE, "s3://elsewhere/demo")
    with pytest.raises(tracking.OtherStorageRuns, match=re.escape(
            f"1 finished run(s) of this config in MLflow experiment {config.experiment_name!r} were made on other "
            f"feature stores in another storage (1 in s3://elsewhere/demo; this one is {here})")):
        probe.run(config)
    assert len(_children(config)) == N_TRIALS
    client.set_tag(runs[0].info.run_id, tracking.TAG_STORAGE, here)
    capfd.readouterr()
    assert probe.run(config)["ran"] == 3
    assert "3 finished run(s) of this config were made on feature stores made again since" in capfd.readouterr().err
    assert all(client.get_run(r.info.run_id).info.lifecycle_stage == "deleted" for r in runs[:3])
    children = _children(config)
    assert sorted(r.data.tags[tracking.TAG_TRIAL] for r in children) == sorted(r.data.tags[tracking.TAG_TRIAL]
                                                                               for r in runs)
    assert {r.data.tags[tracking.TAG_FEATURES] for r in children} == {identity}
    assert probe.run(config)["ran"] == 0


def test_a_config_that_adds_an_encoder_copies_the_others_runs_and_probes_its_own(swept, tmp_path, capfd):
    """Adding a baseline (any encoder) makes a new config hash; the trials of the encoders it did not touch,
    made on the same feature stores with the same data and probe settings, are the same results: copied
    under the new hash (adding one baseline probed the whole U-Net grid again, to identical numbers), the
    new encoder's probed; an encoder whose store changed since is probed again."""
    shutil.copytree(swept.storage_root, tmp_path / "store")
    root = Storage.of(str(tmp_path / "store"))
    # the same checkpoint extracted under the same settings gives the same store: copied, not extracted again
    shutil.copytree(root.features("diffusion"), root.features("unet-b"))
    one = swept.model_copy(update={"storage": str(tmp_path / "store")})
    spec = one.extract.encoders[0]
    two = one.model_copy(update={"extract": one.extract.model_copy(update={
        "encoders": [spec, spec.model_copy(update={"name": "unet-b"})]})})
    assert two.config_hash() != one.config_hash() and two.probe_hash() == one.probe_hash()
    capfd.readouterr()
    out = probe.run(two)
    assert (out["ran"], out["copied"]) == (N_TRIALS, N_TRIALS)  # unet-b's probed, diffusion's copied
    err = capfd.readouterr().err
    assert f"{N_TRIALS} of {2 * N_TRIALS} trials to run (0 already finished, {N_TRIALS} to copy" in err
    assert f"{N_TRIALS} trial(s) of diffusion copied from finished runs of config {one.config_hash()}" in err
    assert "probes every trial again" not in err  # it did not: said before the copy until 2026-11-24
    ones = {r["column"]: r for r in best(one, top=None)}
    twos = best(two, top=None)
    assert len(twos) == 2 * N_TRIALS and {r["config_hash"] for r in twos} == {two.config_hash()}
    client = _client(two)
    for r in twos:
        if r["encoder"] == "diffusion":  # the same numbers, the same curves, the original named
            made = ("run_id", "config_hash", "storage")  # the copy is this storage's
            assert {k: v for k, v in r.items() if k not in made} == \
                {k: v for k, v in ones[r["column"]].items() if k not in made}
            copy = client.get_run(r["run_id"]).data.tags
            assert copy[tracking.TAG_COPIED_FROM] == ones[r["column"]]["run_id"]
            assert [m.value for m in client.get_metric_history(r["run_id"], "history_val_loss")] == \
                [m.value for m in client.get_metric_history(ones[r["column"]]["run_id"], "history_val_loss")]
        else:  # unet-b: the same features as diffusion's, probed here: the same numbers
            assert r["val_macro_f1"] == ones[r["column"]]["val_macro_f1"]
    assert probe.run(two)["ran"] == 0
    # another config on unet-b alone: its runs of it are copied, unless its store was made again since
    other = two.model_copy(update={"extract": two.extract.model_copy(update={
        "encoders": [spec.model_copy(update={"name": "unet-b"})]})})
    runs = tracking.reusable_trial_runs(other, {f"unet-b/{c}" for c in ones}, {"unet-b": "0123456789ab"})
    assert runs == {}
    runs = tracking.reusable_trial_runs(other, {f"unet-b/{c}" for c in ones},
                                        {"unet-b": FeatureStore(root.features("unet-b")).identity()})
    assert len(runs) == N_TRIALS


def test_ctrl_c_ends_the_sweep_keeps_what_finished_and_a_rerun_does_the_rest(swept, tmp_path, monkeypatch, capfd):
    """Ctrl-C (SIGINT) during the sweep: the command exits 130 like every stage, the trials finished so far
    are in MLflow, the parent run is KILLED, and Tune's advice to use `Tuner.restore` is not shown; the same
    command then runs only the trials left, under the same parent."""
    import os
    import signal

    db = tmp_path / "mlflow.db"
    args = ["probe", str(_pipeline_file(swept)), "--set", f"storage={swept.storage_root}",
            "--set", f"tracking.uri=sqlite:///{db}"]
    config = swept.model_copy(update={"tracking": swept.tracking.model_copy(update={"uri": f"sqlite:///{db}"})})
    real = probe.MlflowChildRuns.on_trial_complete

    def ctrl_c_after_the_third(self, *a, **kw):  # as a terminal does, into the driver's main thread
        real(self, *a, **kw)
        if self.completed == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(probe.MlflowChildRuns, "on_trial_complete", ctrl_c_after_the_third)
    # Python's own handlers (a Tuner.fit of an earlier test left Tune's installed)
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    capfd.readouterr()
    try:
        assert cli.main(args) == 130
        # the process's own handlers again: a later Ctrl-C (a `sweep run`'s report stage) interrupts
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGUSR1, before[1])
    err = capfd.readouterr().err
    assert "probe: interrupted; ending the sweep" in err and "sweep: interrupted" in err
    assert "Tuner.restore" not in err and "Stop signal received" not in err
    children = _children(config)
    recorded = re.search(rf"probe: (\d+) of {N_TRIALS} trials recorded before the interruption", err)
    assert recorded and 3 <= len(children) < N_TRIALS and int(recorded.group(1)) == len(children)
    parent = {r.data.tags[tracking.TAG_PARENT] for r in children}
    assert len(parent) == 1 and _client(config).get_run(parent.pop()).info.status == "KILLED"

    monkeypatch.setattr(probe.MlflowChildRuns, "on_trial_complete", real)
    out = probe.run(config)
    assert out["ran"] == N_TRIALS - len(children)
    keys = [r.data.tags[tracking.TAG_TRIAL] for r in _children(config)]
    assert len(keys) == len(set(keys)) == N_TRIALS


def test_a_tracking_server_that_dies_mid_sweep_stops_it_at_once_and_a_rerun_does_the_rest(swept, tmp_path,
                                                                                          monkeypatch):
    """A real `mlflow server` killed after the third trial completes: MLflow's client retried each write to
    the dead server for ~4 minutes (a 12-trial sweep hung for most of an hour). The sweep now stops within
    seconds naming the server and what was recorded; with the server back, a rerun does only the rest."""
    port, db = free_port(), tmp_path / "server.db"
    uri = f"http://127.0.0.1:{port}"
    config = swept.model_copy(update={"tracking": swept.tracking.model_copy(update={"uri": uri})})
    server = start_mlflow_server(db, port)
    real = probe.MlflowChildRuns.on_trial_complete

    def server_dies_after_the_third(self, *a, **kw):
        real(self, *a, **kw)
        if self.completed == 3:
            stop_mlflow_server(server, hard=True)

    monkeypatch.setattr(probe.MlflowChildRuns, "on_trial_complete", server_dies_after_the_third)
    t0 = time.perf_counter()
    try:
        with pytest.raises(probe.ProbeError, match=rf"the MLflow server stopped answering during the sweep \(no "
                                                   rf"MLflow server answers at {re.escape(uri)} .*\); (\d+) of "
                                                   rf"{N_TRIALS} trials were recorded before") as e:
            probe.run(config)
        assert time.perf_counter() - t0 < 90, "the sweep waited on the dead server"
        recorded = int(re.search(r"; (\d+) of", str(e.value)).group(1))
        monkeypatch.setattr(probe.MlflowChildRuns, "on_trial_complete", real)
        server = start_mlflow_server(db, port)
        assert len(_children(config)) == recorded < N_TRIALS
        assert probe.run(config)["ran"] == N_TRIALS - recorded
        keys = [r.data.tags[tracking.TAG_TRIAL] for r in _children(config)]
        assert len(keys) == len(set(keys)) == N_TRIALS
    finally:
        stop_mlflow_server(server, hard=True)


# ------------------------------------------------------------------ ASHA


def test_asha_rungs_are_the_epochs_where_ray_asha_decides():
    """Trials report their whole outcome only at these epochs (and their last): they must be exactly
    where Ray's ASHA can stop a trial reporting once per epoch."""
    from ray.tune.schedulers import ASHAScheduler

    def rungs(**kw):
        return probe._asha_rungs(ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", **kw))

    assert rungs(max_t=15, grace_period=1, reduction_factor=3) == [1, 3, 9]
    assert rungs(max_t=30, grace_period=2, reduction_factor=2.5) == [2, 5, 13]  # 2, 5, 12.5 rounded up
    # where it decides: a trial below the cutoff stops on its first result at or past a milestone
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=30, grace_period=2,
                              reduction_factor=2.5)
    bracket = scheduler._brackets[0]
    good, bad = type("T", (), {"trial_id": "good"})(), type("T", (), {"trial_id": "bad"})()
    decisions = {}
    for epoch in range(1, 14):
        bracket.on_result(good, epoch, 1.0)
        decisions[epoch] = bracket.on_result(bad, epoch, 0.0)
    assert [e for e, d in decisions.items() if d == "STOP"] == [2, 5, 13]


def test_asha_stops_weak_columns_and_records_each_as_of_its_stop(swept, tmp_path, capfd):
    """`probe.asha`: weak columns stop at a rung, strong ones run all epochs; every trial still ends with
    exactly one finished child run, a stopped one tagged and recorded as of the epoch it stopped at (its
    metrics are those of the same column probed without Ray, taken at that epoch); a rerun runs nothing."""
    asha = AshaConfig(grace_period=1, reduction_factor=2)
    config = swept.model_copy(update={
        "probe": swept.probe.model_copy(update={"asha": asha, "kmeans": False}),
        "tracking": swept.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})})
    assert config.config_hash() != swept.config_hash()
    capfd.readouterr()
    out = probe.run(config)
    assert out["ran"] == N_TRIALS
    printed = capfd.readouterr()
    # sweep's progress on stderr; nothing from Tune on stdout (its experiment table and folder came even at
    # verbose=0)
    assert f"probe: {N_TRIALS}/{N_TRIALS} trials (0 failed)" in printed.err
    assert "Configuration for experiment" not in printed.out and "View detailed results" not in printed.out
    children = _children(config)
    assert sorted(r.data.tags[tracking.TAG_TRIAL] for r in children) == sorted(
        probe.trial_key("diffusion", c["column"]) for c in FeatureStore(f"{swept.storage_root}/features/diffusion").columns())
    assert all(r.info.status == "FINISHED" and CONTRACT_PARAMS <= set(r.data.params) for r in children)
    stopped = [r for r in children if r.data.tags.get(probe.TAG_STOPPED_BY) == "asha"]
    ran_out = [r for r in children if probe.TAG_STOPPED_BY not in r.data.tags]
    epochs = config.probe.epochs
    assert stopped and ran_out  # 15 trials over rungs at 1, 2 and 4 epochs: some stop, the leaders go on
    assert out["stopped_early"] == len(stopped) and out["recorded_early"] == 0
    assert all(r.data.metrics["epochs_run"] == epochs for r in ran_out)
    rungs = {1, 2, 4}
    assert all(r.data.metrics["epochs_run"] in rungs for r in stopped)
    assert {r.data.params["asha_grace_period"] for r in children} == {"1"}

    # A stopped trial's record, against the same column probed epoch by epoch in this process
    for run in (stopped[0], ran_out[0]):
        k = int(run.data.metrics["epochs_run"])
        column = run.data.params["column"]
        steps = probe.probe_column_epochs(f"{swept.storage_root}/features/diffusion", column, 6,
                                          config.probe.model_dump(mode="json"), config.seed, threads=1)
        for info, outcome in steps:
            if info["epoch"] == k:
                expected = outcome()
                break
        steps.close()
        assert expected["final"] == (k == epochs)
        for name, value in expected["metrics"].items():
            assert run.data.metrics[name] == pytest.approx(value, abs=1e-6), (column, name)
        assert float(run.data.params["lr"]) == expected["lr"]
        assert len(_client(config).get_metric_history(run.info.run_id, "history_val_acc")) == k

    assert probe.run(config)["ran"] == 0  # stopped trials count as done
    md = Path(report.run(config)).read_text()
    assert f"ASHA was on: {len(stopped)} of {N_TRIALS} columns ran fewer than {epochs} epochs" in md
    # the per-class table refits the best column as far as its trial ran, and matches its record
    assert "## Per class" in md and "the refit differs" not in md


@pytest.mark.ray
def test_rendezvous_releases_everyone_at_the_last_arrival_and_times_out_alone(ray_local):
    """Three Ray tasks arriving 0 / 0.6 / 1.2 s apart all leave together, once the third has checked in;
    a worker whose peers never come leaves after its timeout; `clear` removes a sweep's check-ins."""
    from ray.experimental import internal_kv

    from sweep.stages import rendezvous

    @ray_local.remote(num_cpus=0)
    def worker(prefix: str, delay: float, needed: int, timeout_s: float) -> tuple[float, float, int]:
        time.sleep(delay)
        arrived_at = time.time()
        count = rendezvous.arrive(prefix, needed, timeout_s)
        return arrived_at, time.time(), count

    out = ray_local.get([worker.remote("test-meet", d, 3, 30.0) for d in (0.0, 0.6, 1.2)])
    last_arrival = max(a for a, _, _ in out)
    assert [count for _, _, count in out] == [3, 3, 3]
    assert all(last_arrival <= left <= last_arrival + 1.0 for _, left, _ in out)
    assert all(left - arrived >= 0 for arrived, left, _ in out)
    assert out[0][1] - out[0][0] >= 1.0  # the first one waited for the last

    arrived, left, count = ray_local.get(worker.remote("test-alone", 0.0, 2, 0.5))
    assert count == 1 and 0.5 <= left - arrived < 5.0

    def listed(prefix: str) -> list[bytes]:
        return internal_kv._internal_kv_list(prefix + "/", namespace=rendezvous.NAMESPACE)

    assert len(listed("test-meet")) == 3
    rendezvous.clear("test-meet")
    assert listed("test-meet") == [] and len(listed("test-alone")) == 1
    rendezvous.clear("test-alone")


def test_a_damaged_shard_stops_the_sweep_before_any_trial_naming_it(swept, tmp_path, capfd):
    """Every trial reads every shard: a damaged one failed each trial with Tune's traceback (hundreds of
    lines on stderr) before the one-line cause. Now the stage checks the shards it will read first."""
    shutil.copytree(Path(swept.storage_root) / "features", tmp_path / "store" / "features")
    config = swept.model_copy(update={
        "storage": str(tmp_path / "store"),
        "tracking": swept.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})})
    shard = tmp_path / "store" / "features" / "diffusion" / "plankton" / "part-00001.parquet"
    whole = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: whole // 2])
    capfd.readouterr()
    with pytest.raises(probe.ProbeError, match=re.escape(
            f"feature shard {tmp_path / 'store' / 'features' / 'diffusion'}/plankton/part-00001.parquet of encoder "
            f"'diffusion': its file is damaged ({whole // 2} bytes, {whole} written)") + ".*run `sweep extract`"):
        probe.run(config)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Trial task failed" not in err, err[:2000]
    exp = _client(config).get_experiment_by_name(config.experiment_name)
    assert exp is None or _children(config) == []  # no trial ran


def _runs_of_another_storage(config, runs, elsewhere: str, **tags) -> None:
    """Each of `runs` again, as another storage of this config sharing its experiment made it (`tags` on top),
    with val_macro_f1 1.0 (each would rank first)."""
    client = _client(config)
    again = [tracking.FinishedRun(tags={**{k: v for k, v in r.data.tags.items()
                                           if not k.startswith("mlflow.") or k == tracking.TAG_PARENT},
                                        tracking.TAG_STORAGE: elsewhere, **tags},
                                  params=dict(r.data.params), metrics={**r.data.metrics, "val_macro_f1": 1.0})
             for r in runs]
    tracking.log_finished_runs(client, client.get_experiment_by_name(config.experiment_name).experiment_id, again)


def test_a_report_keeps_its_own_storages_run_of_a_trial_another_storage_also_made(swept, tmp_path, capsys):
    """Two storages of one config probing into one MLflow experiment at once each recorded every trial (neither
    found the other's runs when it planned): the report read '30 probe runs' for 15 trials, ranked the other
    storage's runs among its own (searched: twice the columns) and said nothing. It now keeps this storage's
    run of each trial and says how many it left out, where; `sweep best` lists every run and says why."""
    config = _copy_of_the_sweep(swept, tmp_path)
    here = Storage.of(config.storage_root).root
    client = _client(config)
    runs = _children(config)
    for r in runs:  # made here (the copy's runs name the module's storage)
        client.set_tag(r.info.run_id, tracking.TAG_STORAGE, here)
    _runs_of_another_storage(config, runs, "/elsewhere/store")
    assert len(best(config, top=None)) == 2 * N_TRIALS
    capsys.readouterr()
    text = Path(report.run(config)).read_text()
    assert f"; {N_TRIALS} probe runs;" in text
    assert (f"**{N_TRIALS} more finished run(s) of trials of this config, made in another storage sharing this "
            f"MLflow experiment ({N_TRIALS} in /elsewhere/store), are left out: one run per trial, this "
            f"storage's.") in text
    rows = pd.read_csv(Path(config.storage_root) / "report" / "probe_runs.csv")
    assert len(rows) == N_TRIALS and set(rows["storage"]) == {here} and rows["val_macro_f1"].max() < 1.0
    assert "report: warning: 15 more finished run(s)" in capsys.readouterr().err
    cli.cmd_best(config, Namespace(metric="val_macro_f1", top=3, encoder=None, format="table", any_config=False))
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"[sweep] {N_TRIALS} trial run(s) of this config are a second run of a trial, made in another storage "
        f"sharing this MLflow experiment (/elsewhere/store: {N_TRIALS}): the ranking lists each run; `sweep "
        f"report` keeps this storage's"]
    assert all("1.0000" in line for line in out.out.splitlines()[1:])  # the query's own ranking, unchanged


def test_a_probe_another_storage_ran_at_the_same_time_on_other_features_fails_naming_it(swept, tmp_path,
                                                                                       monkeypatch):
    """Planning refuses a storage whose config has runs of another storage on other feature stores in the same
    experiment (`tracking.OtherStorageRuns`); two storages probing at once both passed that check and the sweep
    ended FINISHED with both studies' runs ranked together. Here the other storage's runs of the 2 trials
    left to do arrive while the sweep runs: the stage now fails naming it, its run FAILED."""
    config = _copy_of_the_sweep(swept, tmp_path)
    here = Storage.of(config.storage_root).root
    client = _client(config)
    runs = sorted(_children(config), key=lambda r: r.data.tags[tracking.TAG_TRIAL])
    for r in runs:
        client.set_tag(r.info.run_id, tracking.TAG_STORAGE, here)
    for r in runs[:2]:
        client.delete_run(r.info.run_id)
    opened = []

    def start_then_the_other_storage_writes(*args, **kwargs):
        opened.append(real_start(*args, **kwargs))
        _runs_of_another_storage(config, runs[:2], "/elsewhere/store", **{tracking.TAG_FEATURES: "0123456789ab"})
        return opened[-1]

    real_start = tracking.start_stage_run
    monkeypatch.setattr(tracking, "start_stage_run", start_then_the_other_storage_writes)
    with pytest.raises(probe.ProbeError, match=re.escape(
            f"probe: 2 trial run(s) recorded, but another storage probed this config into MLflow experiment "
            f"{config.experiment_name!r} meanwhile, on other feature stores (2 in /elsewhere/store; this one is "
            f"{here})")):
        probe.run(config)
    assert client.get_run(opened[0]).info.status == "FAILED"


def test_fractional_cpus_per_trial_runs_no_more_trials_than_cores_on_a_local_ray(ray_local, tmp_path, monkeypatch):
    """A probe trial runs max(1, int(cpus_per_trial)) torch threads, so `cpus_per_trial: 0.5` on a local Ray
    started 2 trials a core: on the demo on 2 (shared, busy) cores, 4 workers took 14.3 s of Tune time against
    7.8-11.5 s with 2 in single runs (more workers to start, each trial still one busy thread). With `max_concurrent_trials` unset, a
    local machine runs at most as many trials as its cores hold trials' threads; the user's own cap stays."""
    monkeypatch.setattr(probe.os, "cpu_count", lambda: 2)  # the local Ray here declares 4 CPUs
    config = PipelineConfig.model_validate(small_pipeline(tmp_path / "s", probe={"cpus_per_trial": 0.5}))
    assert probe.concurrent_workers(config, 22) == 2
    config = PipelineConfig.model_validate(small_pipeline(tmp_path / "s", probe={"cpus_per_trial": 2}))
    assert probe.concurrent_workers(config, 22) == 1
    config = PipelineConfig.model_validate(small_pipeline(tmp_path / "s", probe={"cpus_per_trial": 0.5,
                                                                               "max_concurrent_trials": 3}))
    assert probe.concurrent_workers(config, 22) == 3  # asked for: Ray's CPUs hold 8 such trials


def test_a_sweep_whose_trials_would_not_fit_in_memory_is_warned_of(swept):
    """A trial holds ~5x its float16 column at its peak (a million images x 1,024 dimensions: ~10 GiB); Ray does
    not count it, and trials on a machine without the memory would be killed one by one."""
    stores = probe.complete_stores(swept)
    trials, columns, _ = probe.plan_trials(swept, stores)
    rows = sum(len(FeatureStore(stores[t["encoder"]].root).read(["image_id"])) for t in trials[:1])
    largest = probe.largest_column_bytes(stores, trials, columns, swept.dataset_names())
    assert largest == 2 * rows * max(int(c["dim"]) for c in columns.values())
    assert probe.memory_warning(largest, 2, 2**34) is None  # the demo's columns on any machine
    gib = 2**30
    assert probe.memory_warning(2 * gib, 4, 24 * gib) == (
        "each trial holds up to about 10.0 GiB at its peak (~5x its largest feature column, 2.00 GiB in float16), "
        "4 at once 40.0 GiB, and 24.0 GiB is free here: trials may be killed for memory. Run fewer at once: --set "
        "probe.max_concurrent_trials=1")
    assert probe.memory_warning(gib, 3, 24 * gib) is None  # 15 GiB: within 80 % of 24
    assert probe.memory_warning(gib, 4, 24 * gib).endswith("--set probe.max_concurrent_trials=3")
