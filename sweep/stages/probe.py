"""`sweep probe`: one Ray Tune trial per (encoder, feature column); every trial is an MLflow child run.

A trial reads only its column (Parquet projection), trains the whole (lr, weight decay) grid at once as
independent heads (`sweep.probing`), keeps the head that is best on validation and reports its contract
metrics. MLflow is written from the driver only, by a Tune callback when a trial completes: one writer, no
SQLite lock contention, and the experiment is created once. A trial already finished in MLflow for this
config is not run again, so a rerun after an interruption does only what is left.
"""

from __future__ import annotations

import json
import time

import numpy as np

from sweep import tracking
from sweep.config import PipelineConfig
from sweep.features.store import FeatureStore
from sweep.stages.common import init_ray, say
from sweep.storage import Storage


class ProbeError(RuntimeError):
    pass


def trial_key(encoder: str, column: str) -> str:
    return f"{encoder}/{column}"


def probe_column(store_uri: str, column: str, classes: list[str], probe: dict, seed: int) -> dict:
    """One trial's computation, without Ray: read one column, probe it, return metrics and the choice."""
    from sweep.probing import ProbeConfig, Split, kmeans_scores, train_probe

    features, meta = FeatureStore(store_uri).read_column(column)
    split = np.asarray(meta.column("split").to_pylist(), dtype=object)
    domain = np.asarray(meta.column("domain").to_pylist(), dtype=object)
    labels = meta.column("label").to_numpy()

    def part(mask: np.ndarray) -> Split:
        return Split(X=features[mask], y=labels[mask])

    ood = {str(d): part((split == "ood") & (domain == d)) for d in dict.fromkeys(domain[split == "ood"])}
    test = part(split == "test") if (split == "test").any() else None
    cfg = ProbeConfig(lrs=probe["lrs"], weight_decays=probe["weight_decays"], epochs=probe["epochs"],
                      batch_size=probe["batch_size"], class_weights=probe["class_weights"],
                      select=probe["select"], patience=probe["patience"], seed=seed)
    t0 = time.perf_counter()
    result = train_probe(part(split == "train"), part(split == "val"), test, ood, len(classes), cfg)
    metrics = dict(result.metrics)
    if probe["kmeans"]:
        evaluated = split == ("test" if test is not None else "val")
        metrics.update(kmeans_scores(features[evaluated], labels[evaluated], k=len(classes), seed=seed))
    return {
        **metrics,
        "lr": result.lr, "weight_decay": result.weight_decay, "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "probe_seconds": time.perf_counter() - t0,
        "history": json.dumps(result.history),
    }


def _trainable(config: dict) -> None:
    from ray import tune

    trial = config["trial"]
    tune.report(probe_column(trial["store"], trial["column"], trial["classes"], config["probe"], config["seed"]))


def _mlflow_callback(pipeline: PipelineConfig, parent_run_id: str, columns: dict[str, dict]):
    """A Tune callback that writes one MLflow child run per completed trial, in one `log_batch`."""
    from ray.tune import Callback
    from mlflow.entities import Metric, Param, RunTag

    client = tracking.client_for(pipeline)
    exp_id = tracking.ensure_experiment(pipeline)
    tags = tracking.stage_tags(pipeline, "probe")

    class MlflowChildRuns(Callback):
        logged = 0
        seconds = 0.0

        def on_trial_complete(self, iteration, trials, trial, **info):
            t0 = time.perf_counter()
            result = trial.last_result or {}
            key = trial.config["trial"]["key"]
            col = columns[key]
            run = client.create_run(exp_id, tags={
                **tags, tracking.TAG_PARENT: parent_run_id, tracking.TAG_TRIAL: key,
                "mlflow.runName": key})
            now = int(time.time() * 1000)
            metric_names = [k for k, v in result.items() if _is_metric(k, v)]
            metrics = [Metric(k, float(result[k]), now, 0) for k in metric_names]
            for h in json.loads(result.get("history", "[]")):
                metrics += [Metric(f"history_{k}", float(v), now, int(h["epoch"]))
                            for k, v in h.items() if k != "epoch"]
            params = {"encoder": col["encoder"], "layer": col["layer"], "column": col["column"],
                      "timestep": "" if col["timestep"] is None else col["timestep"],
                      "resolution": col["resolution"], "dim": col["dim"], "lr": result.get("lr"),
                      "weight_decay": result.get("weight_decay"), "best_epoch": result.get("best_epoch"),
                      "lr_grid": pipeline.probe.lrs, "weight_decay_grid": pipeline.probe.weight_decays,
                      "epochs": pipeline.probe.epochs, "class_weights": pipeline.probe.class_weights,
                      "select": pipeline.probe.select}
            client.log_batch(run.info.run_id, metrics=metrics[:1000],
                             params=[Param(k, str(v)) for k, v in params.items()])
            for i in range(1000, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
                client.log_batch(run.info.run_id, metrics=metrics[i: i + 1000])
            client.set_terminated(run.info.run_id, "FINISHED")
            MlflowChildRuns.logged += 1
            MlflowChildRuns.seconds += time.perf_counter() - t0

    return MlflowChildRuns()


_NOT_METRICS = {"lr", "weight_decay", "best_epoch", "epochs_run", "probe_seconds", "training_iteration",
                "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
                "iterations_since_restore", "done", "date", "hostname", "node_ip", "trial_id",
                "experiment_tag", "checkpoint_dir_name", "should_checkpoint"}


def _is_metric(key: str, value) -> bool:
    return key not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)


def plan_trials(config: PipelineConfig) -> tuple[list[dict], dict[str, dict]]:
    """Every (encoder, column) of the complete feature stores; raises when an encoder has none."""
    storage = Storage.of(config.storage_root)
    trials, columns = [], {}
    for spec in config.encoder_specs():
        store = FeatureStore(storage.features(spec.name))
        if not store.is_complete():
            raise ProbeError(f"probe: features of encoder {spec.name!r} are missing or incomplete at "
                             f"{store.root}; run `sweep extract` first")
        manifest = store.manifest()
        for col in manifest["columns"]:
            key = trial_key(spec.name, col["column"])
            columns[key] = {**col, "encoder": spec.name}
            trials.append({"key": key, "store": store.root, "column": col["column"],
                           "classes": manifest["classes"]})
    return trials, columns


def run(config: PipelineConfig) -> dict:
    from ray import tune

    trials, columns = plan_trials(config)
    done = tracking.finished_trials(config)
    todo = [t for t in trials if t["key"] not in done]
    if not todo:
        say(f"probe: all {len(trials)} trials already in MLflow for config {config.config_hash()}, nothing to do")
        return {"trials": len(trials), "ran": 0}
    say(f"probe: {len(todo)} of {len(trials)} trials to run ({len(done)} already finished), "
        f"{len(config.probe.lrs) * len(config.probe.weight_decays)} heads each")
    init_ray(config)
    parent = tracking.start_stage_run(config, "probe")
    tracking.log_batch(config, parent, params={
        "lrs": config.probe.lrs, "weight_decays": config.probe.weight_decays, "epochs": config.probe.epochs,
        "class_weights": config.probe.class_weights, "select": config.probe.select, "trials": len(trials)})
    probe = config.probe.model_dump(mode="json")
    callback = _mlflow_callback(config, parent, columns)
    storage = Storage.of(config.storage_root)
    resources = {"cpu": config.probe.cpus_per_trial, "gpu": config.probe.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(_trainable, resources),
        param_space={"trial": tune.grid_search(todo), "probe": probe, "seed": config.seed},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=config.probe.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"probe-{config.config_hash()}", storage_path=storage.tune,
                                  callbacks=[callback], verbose=1),
    )
    t0 = time.perf_counter()
    try:
        results = tuner.fit()
    except BaseException:
        tracking.finish_run(config, parent, "FAILED")
        raise
    wall = time.perf_counter() - t0
    errors = [r.error for r in results if r.error is not None]
    tracking.log_batch(config, parent, metrics={"sweep_seconds": wall, "trials_run": len(todo),
                                                "trials_failed": len(errors)})
    if errors:
        tracking.finish_run(config, parent, "FAILED")
        raise ProbeError(f"probe: {len(errors)} of {len(todo)} trials failed; first: {errors[0]}")
    tracking.finish_run(config, parent)
    say(f"probe: {len(todo)} trials in {wall:.1f}s (MLflow logging {callback.seconds:.1f}s); "
        f"see `sweep best`")
    return {"trials": len(trials), "ran": len(todo), "seconds": wall, "logging_seconds": callback.seconds}
