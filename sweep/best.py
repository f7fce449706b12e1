"""`sweep best`: the probe runs of a pipeline from MLflow, best first, as a table or contract JSON."""

from __future__ import annotations

import json
import math
from collections import Counter

import pandas as pd

from sweep import tracking
from sweep.config import PROBE_METRICS, PipelineConfig
from sweep.storage import tagged_root


def _num(value, kind=float):
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def records(runs: pd.DataFrame, metrics: tuple[str, ...] = ()) -> list[dict]:
    """Contract objects: run_id, encoder, layer, timestep (null for non-diffusion), resolution, dim, lr,
    weight_decay, then every metric of the run as a number; each of `metrics` is there in every object,
    null where the run has none (k-means off, a trial from before an OOD dataset was added)."""
    logged = [c.removeprefix("metrics.") for c in runs.columns
              if c.startswith("metrics.") and not c.startswith("metrics.history_")]
    names = sorted(dict.fromkeys([*metrics, *logged]), key=_metric_order)
    out = []
    for _, r in runs.iterrows():
        rec = {
            "run_id": r["run_id"],
            "encoder": r.get("params.encoder"),
            "layer": r.get("params.layer"),
            "column": r.get("params.column"),
            # which settings made the run: several with --any-config
            "config_hash": r.get(f"tags.{tracking.TAG_HASH}"),
            # which storage's probe made it: two storages of one config may share an experiment
            "storage": tagged_root(r.get(f"tags.{tracking.TAG_STORAGE}")),
            "timestep": _num(r.get("params.timestep"), int),
            "resolution": _num(r.get("params.resolution"), int),
            "dim": _num(r.get("params.dim"), int),
            "lr": _num(r.get("params.lr")),
            "weight_decay": _num(r.get("params.weight_decay")),
        }
        rec.update({name: _num(r[f"metrics.{name}"]) if f"metrics.{name}" in runs.columns else None
                    for name in names})
        out.append(rec)
    return out


def _metric_order(name: str) -> tuple:
    """The contract's metrics in DESIGN.md's order (val, test, OOD by name, k-means), then the rest by name:
    in MLflow's order the columns of probe_runs.csv moved between two reports of the same runs."""
    if name in PROBE_METRICS:
        group = 2 if name.startswith("kmeans_") else 0
        return group, PROBE_METRICS.index(name), ""
    return (1, 0, name) if name.startswith("ood_") else (3, 0, name)


def best(config: PipelineConfig, metric: str = "val_macro_f1", top: int | None = 10, encoder: str | None = None,
         any_config: bool = False) -> list[dict]:
    runs = tracking.search_trial_runs(config, metric=metric, encoder=encoder, any_config=any_config)
    ood = tuple(f"ood_{d.name}_{m}" for d in config.data.ood for m in ("acc", "macro_f1"))
    recs = records(runs, PROBE_METRICS + ood)
    return recs[:top] if top else recs


def trial_of(rec: dict) -> tuple:
    """The trial a record is a result of (of its config: several with --any-config)."""
    return rec.get("config_hash"), rec.get("encoder"), rec.get("column")


def one_per_trial(recs: list[dict], storage_root: str) -> tuple[list[dict], dict[str, int]]:
    """`recs` with one record per trial, in their order: where a trial has several finished runs (two storages
    of one config probing into one MLflow experiment at once: each probed every trial, the other's runs not
    yet there to find), this storage's run, else the first. Also, the storage of each run left out -> how many.
    (`sweep best` lists every run, as MLflow's own query does; a report of this storage keeps its own.)"""
    chosen = {}
    for r in recs:
        key = trial_of(r)
        if key not in chosen or (r.get("storage") == storage_root and chosen[key].get("storage") != storage_root):
            chosen[key] = r
    kept = [r for r in recs if chosen[trial_of(r)] is r]
    return kept, dict(Counter(str(r.get("storage")) for r in recs if chosen[trial_of(r)] is not r))


def per_storage(counts: dict[str, int]) -> str:
    """'22 in /a/store, 3 in /b/store': runs by the storage whose probe made them."""
    return ", ".join(f"{n} in {s}" for s, n in sorted(counts.items()))


REFERENCE_METRICS = ("test_acc", "test_macro_f1", "test_balanced_acc", "val_acc", "val_macro_f1")


def references(config: PipelineConfig) -> list[dict]:
    """The supervised baselines' own end-to-end numbers (their classifier, not a probe), one per trained
    `supervised` baseline of this pipeline: the reference row the probes are read against."""
    from sweep.stages.baselines import baseline_key

    keys = {b.name: baseline_key(config, b) for b in config.baselines if b.kind == "supervised"}
    runs = tracking.search_baseline_runs(config, keys)
    out = []
    for _, r in runs.iterrows():
        rec = {"run_id": r["run_id"], "encoder": r.get(f"tags.{tracking.TAG_BASELINE}"),
               "arch": r.get("params.arch"),
               "best_epoch": _num(r.get("metrics.best_epoch"), int)}
        rec.update({m: _num(r.get(f"metrics.{m}")) for m in REFERENCE_METRICS})
        out.append(rec)
    return out


def format_references(refs: list[dict]) -> str:
    if not refs:
        return "(no supervised baseline trained)"
    header = ["encoder", "arch", "best_epoch", *REFERENCE_METRICS]
    if any("test_acc_95ci" in r for r in refs):  # the report's, beside the accuracy it bounds
        header.insert(header.index("test_acc") + 1, "test_acc_95ci")
    text = ("encoder", "arch", "best_epoch", "test_acc_95ci")
    rows = [[str(r.get(h, "-")) if h in text else ("-" if r.get(h) is None else f"{r[h]:.4f}") for h in header]
            for r in refs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def format_table(recs: list[dict], metric: str) -> str:
    if not recs:
        return "(no probe runs)"
    cols = ["encoder", "layer", "timestep", "resolution", "dim", "lr", "weight_decay"]
    if len({r.get("config_hash") for r in recs}) > 1:  # --any-config: runs of several settings, told apart
        cols.insert(0, "config_hash")
    metrics = [metric] + [m for m in ("val_acc", "val_macro_f1", "test_acc", "test_macro_f1") if m != metric]
    metrics += sorted(k for k in recs[0] if k.startswith("ood_") and k.endswith("_macro_f1"))
    header = ["#"] + cols + metrics
    rows = []
    for i, r in enumerate(recs, 1):
        row = [str(i)]
        for c in cols:
            v = r.get(c)
            row.append("-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v)))
        row += ["-" if r.get(m) is None else f"{r[m]:.4f}" for m in metrics]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def to_json(recs: list[dict]) -> str:
    return json.dumps(recs, indent=1)
