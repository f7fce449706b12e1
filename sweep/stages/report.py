"""`sweep report`: heatmaps (layer x timestep) per encoder, a CSV of every probe run, and report.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sweep import tracking
from sweep.best import best, format_references, format_table, one_per_trial, per_storage, references
from sweep.config import PROBE_REVISION, PipelineConfig
from sweep.features.store import FeatureStore
from sweep.probing.kmeans import MAX_ROWS as KMEANS_MAX_ROWS
from sweep.probing.kmeans import chance_nmi
from sweep.stages.common import say
from sweep.storage import Storage, staged_dir


_TOP = {"conv_in": 0, "time_proj": 0, "time_embedding": 0, "class_embedding": 0, "down_blocks": 1, "mid_block": 2,
        "up_blocks": 3}  # anything else (conv_norm_out, conv_out) comes after the up blocks
_PART = {"resnets": 0, "attentions": 1}  # a diffusers block runs resnets[i], attentions[i], ..., then its samplers


def network_order(layer: str) -> tuple:
    """Sort key of a U-Net module path in execution order: the heat map's rows are the network's depth.
    Sorting the names (within down/mid/up) put conv_in after mid_block, attentions.0 before resnets.0,
    down_blocks.10 before down_blocks.2, and a block before its own sub-modules."""
    parts = layer.split(".")
    key = [(_TOP.get(parts[0], 4), parts[0])]
    i = 1
    while i < len(parts):
        p, nxt = parts[i], parts[i + 1] if i + 1 < len(parts) else None
        if p.isdigit():
            key.append((0, int(p), 0, ""))
        elif nxt is not None and nxt.isdigit() and p in _PART:  # resnets.1 / attentions.1: interleaved
            key.append((0, int(nxt), _PART[p], ""))
            i += 1
        else:
            key.append((1, 0, 0, p))
        i += 1
    return (*key, (2, 0, 0, ""))  # a module's output comes after its sub-modules'


HEATMAP_LABELLED_TIMESTEPS = 24  # a heat map's cells show their values up to this many timesteps


def _heatmap(frame: pd.DataFrame, metric: str, title: str, path, epochs: int | None = None) -> None:
    """``epochs``: the planned epochs of a sweep with ASHA; a cell that ran fewer shows how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = frame.pivot_table(index="layer", columns="timestep", values=metric, aggfunc="max")
    # network order (down, mid, up), each row labelled with its feature-map side
    order = sorted(grid.index, key=network_order)
    grid = grid.loc[order]
    side = frame.groupby("layer")["resolution"].first()
    labels = [f"{layer} ({side[layer]}x{side[layer]})" for layer in grid.index]
    # Values in the cells up to HEATMAP_LABELLED_TIMESTEPS columns; more, and the cells narrow to colour alone
    # (100 timesteps made a 9,500 px wide image of 2,100 labels, unreadable at any page width)
    labelled = grid.shape[1] <= HEATMAP_LABELLED_TIMESTEPS
    # at least 6 inches wide: with two or three timesteps the title, the values and the colour bar overlapped
    width = 1.2 + (0.9 if labelled else 0.22) * grid.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, width), 1.0 + 0.45 * grid.shape[0]))
    values = grid.to_numpy()
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    middle = (im.norm.vmin + im.norm.vmax) / 2
    ax.set_xticks(range(grid.shape[1]), [str(int(t)) for t in grid.columns], rotation=0 if labelled else 90)
    ax.set_yticks(range(grid.shape[0]), labels)
    ax.set_xlabel("timestep")
    ran = None
    if epochs is not None and "epochs_run" in frame:
        ran = frame.pivot_table(index="layer", columns="timestep", values="epochs_run", aggfunc="max")
        ran = ran.reindex(index=grid.index, columns=grid.columns)
    digits = cell_digits(values)
    for i in range(grid.shape[0] if labelled else 0):
        for j in range(grid.shape[1]):
            v = grid.iat[i, j]
            if v == v:
                text = f"{v:.{digits}f}"
                if ran is not None and ran.iat[i, j] < epochs:  # stopped early: a result of fewer epochs
                    text += f"\n{int(ran.iat[i, j])} ep"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if v > middle else "white")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(title)
    fig.tight_layout()
    # tight_layout alone left the colour bar's label (the metric's name) cut off at the right edge when long
    # layer names and few timesteps squeezed the axes: the saved image is grown to hold every label
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def cell_digits(values) -> int:
    """Decimals of a heat map's cell labels: 2, or more (up to 4) where the cells span less than 0.1, so that
    cells of visibly different colour read differently. With 200 classes every macro F1 lay within
    0.02-0.04 and most cells read "0.04"."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    spread = float(finite.max() - finite.min()) if finite.size else 0.0
    return 2 if spread <= 0 else int(min(4, max(2, 1 - np.floor(np.log10(spread)))))


def accuracy_interval(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on `n` images: where the accuracy on the population the
    split was drawn from may lie, given the sampling of that split alone (the probe held fixed). NaN bounds
    when `n` is 0 or the accuracy is missing."""
    if not n or accuracy is None or accuracy != accuracy:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(round(accuracy * n), n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


PER_CLASS_SHOWN = 15  # classes shown per end of each per-class table in report.md (all in per_class.csv)


def head_and_tail(per_class: pd.DataFrame, shown: int = PER_CLASS_SHOWN) -> pd.DataFrame:
    """`per_class_results` as report.md shows it: per encoder its test split, then each OOD dataset, the
    classes by training images, most first; of more than 2 x `shown` classes only the `shown` largest and
    smallest (the CSV has all)."""
    ordered = per_class.sort_values(["encoder", "split", "dataset", "train_images"],  # test before ood
                                    ascending=[True, False, True, False], kind="stable")
    groups = ordered.groupby(["encoder", "dataset"], sort=False)
    rank, size = groups.cumcount(), groups["class"].transform("size")
    return ordered[(size <= 2 * shown) | (rank < shown) | (rank >= size - shown)]


def probe_settings(config: PipelineConfig) -> str:
    """The probe settings that shape the numbers, in a line: which runs a report's figures come from."""
    p = config.probe
    return (f"lrs {p.lrs}, weight decays {p.weight_decays}, {p.epochs} epochs, batch {p.batch_size}, class "
            f"weights {p.class_weights}, patience {p.patience}, ASHA {'on' if p.asha else 'off'}, k-means "
            f"{'on' if p.kmeans else 'off'}")


def interval_text(accuracy: float, n: int) -> str:
    """`accuracy_interval` as the report's tables show it: `0.43-0.80`, or `-` where there is none."""
    lo, hi = accuracy_interval(accuracy, n)
    return "-" if lo != lo else f"{lo:.2f}-{hi:.2f}"


def data_summary(config: PipelineConfig, table=None) -> pd.DataFrame | None:
    """Images per dataset and split as the probes saw them (the feature store's rows), with how many classes
    each holds and its largest and smallest class: what every number of the report is measured on; and the
    images of that split left out of them: `unreadable` (rejected by extraction) and `unknown_class` (of a
    class the train split does not have, from the image `table`, built here if not given). From the first
    encoder's complete store (every encoder's store holds the same images); None when there is none."""
    from sweep.data.table import build_table

    storage = Storage.of(config.storage_root)
    for spec in config.encoder_specs():
        store = FeatureStore(storage.features(spec.name))
        if store.is_complete():
            break
    else:
        return None
    meta = store.read().select(["label", "split", "domain"]).to_pandas()
    datasets = config.dataset_names()
    meta = meta[meta["domain"].isin(datasets)]  # a store also keeps datasets of earlier settings, unread
    table = table if table is not None else build_table(config)
    split_of = table.frame.set_index(["domain", "image_id"])["split"]
    rejected = pd.DataFrame([{"domain": r["domain"], "split": split_of.get((r["domain"], r["image_id"]))}
                             for r in store.manifest().get("rejected", []) if r.get("domain") in datasets],
                            columns=["domain", "split"])
    unreadable = rejected.groupby(["domain", "split"]).size()
    unknown = table.left_out.groupby(["domain", "split"]).size()
    rows = []
    for (domain, split), group in meta.groupby(["domain", "split"]):
        per_class = group["label"].value_counts()
        missing = [c for i, c in enumerate(table.classes) if i not in per_class.index]
        rows.append({"dataset": domain, "split": split, "images": len(group), "classes": len(per_class),
                     "largest_class": int(per_class.max()), "smallest_class": int(per_class.min()),
                     # all of them (data.csv); report.md shows `missing_shown`
                     "classes_missing": ", ".join(missing) or "-",
                     "missing_shown": ", ".join(missing[:5]) + (f" (+{len(missing) - 5})" if len(missing) > 5
                                                                else "") if missing else "-",
                     "unreadable": int(unreadable.get((domain, split), 0)),
                     "unknown_class": int(unknown.get((domain, split), 0))})

    def order(row):  # the pipeline's datasets in its order, each train, val, test, then ood
        return datasets.index(row["dataset"]), {"train": 0, "val": 1, "test": 2}.get(row["split"], 3)

    out = pd.DataFrame(sorted(rows, key=order))
    # with hundreds of classes a split can lack dozens: data.csv names every one (the only place that does),
    # report.md's table the first 5 and how many more
    out.attrs["missing_shown"] = out.pop("missing_shown").tolist()
    main = meta.loc[meta["domain"] == config.data.train.name, "label"].to_numpy()
    out.attrs["chance_nmi"] = chance_nmi(main, len(table.classes), config.seed) if len(main) else None
    return out


def per_class_results(config: PipelineConfig, best_rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per class, for each encoder's best column (`best_rows`: one `sweep best` record per encoder): the
    test split's and each OOD dataset's images, recall, precision and F1 of the chosen head, beside the
    class's training images (the long tail's view that the averages hide). The head is fitted again here
    from the same features, settings and seed (a probe trial keeps no weights; stopped where the trial
    stopped, for ASHA); notes say where the refit differs from the logged run (`refit_differences`)."""
    from sklearn.metrics import precision_recall_fscore_support

    from sweep.stages.probe import probe_column_epochs

    storage = Storage.of(config.storage_root)
    probe = {**config.probe.model_dump(mode="json"), "kmeans": False}
    threads, datasets = max(1, int(config.probe.cpus_per_trial)), config.dataset_names()
    rows, notes = [], []
    for r in best_rows.to_dict("records"):
        store_uri = storage.features(r["encoder"])
        classes = FeatureStore(store_uri).manifest()["classes"]
        stop = r.get("epochs_run")
        for info, outcome in probe_column_epochs(store_uri, r["column"], len(classes), probe, config.seed, threads,
                                                 datasets=datasets, keep_head=True):
            if info["final"] or (stop and info["epoch"] >= stop):
                refit = outcome()
                break
        differs = refit_differences(r, refit)
        if differs:
            notes.append(f"{r['encoder']} {r['column']}: the refit differs from the logged run ({'; '.join(differs)}: "
                         f"another device or thread count, or runs of another sweep build); the table is the refit's")
        head, (X, y, split, domain) = refit["head"], refit["data"]
        train_images = np.bincount(y[split == "train"], minlength=len(classes))
        parts = [(config.data.train.name, "test", split == "test")]
        parts += [(d, "ood", (split == "ood") & (domain == d)) for d in datasets[1:]]
        for dataset, part, mask in parts:
            if not mask.any():
                continue
            truth = y[mask]
            precision, recall, f1, support = precision_recall_fscore_support(
                truth, head.predict(X[mask]), labels=list(range(len(classes))), zero_division=0)
            for c in np.flatnonzero(support):  # the classes this split has
                rows.append({"encoder": r["encoder"], "column": r["column"], "dataset": dataset, "split": part,
                             "class": classes[c], "train_images": int(train_images[c]), "images": int(support[c]),
                             "recall": float(recall[c]), "precision": float(precision[c]), "f1": float(f1[c])})
    return pd.DataFrame(rows), notes


def refit_differences(logged: dict, refit: dict) -> list[str]:
    """What of the logged run (a `sweep best` record) the refit (`probe_column`'s outcome) does not reproduce:
    the chosen head (lr, weight decay) and every test and OOD metric both hold, as `name refit (logged X)`.
    Test accuracy alone let a refit that chose another head, or scored the same images correct but spread
    over other classes, show its per-class figures as the logged run's."""
    out = [f"{k} {refit[k]:g} (logged {logged[k]:g})" for k in ("lr", "weight_decay")
           if logged.get(k) is not None and abs(refit[k] - logged[k]) > 1e-12 * max(1.0, abs(logged[k]))]
    for k, again in refit["metrics"].items():
        was = logged.get(k)
        if k.startswith(("test_", "ood_")) and was is not None and again == again and abs(again - was) > 1e-9:
            out.append(f"{k} {again:.4f} (logged {was:.4f})")
    return out


def encoder_comparison(frame: pd.DataFrame, select: str, images: pd.DataFrame | None = None,
                       main: str | None = None) -> pd.DataFrame:
    """One row per encoder: its best column on validation (`select`), with that column's test, OOD and k-means
    numbers: the study's comparison, chosen without looking at test. `frame` is ordered best first on `select`
    (as `sweep best` returns it), so an encoder's first row is its best, ties in MLflow's order. With `images`
    (`data_summary`) and the main dataset's name, each accuracy on test and OOD is followed by its 95 % Wilson
    interval over that split's images (`<metric>_95ci`)."""
    firsts = frame.groupby("encoder", sort=False).head(1)
    metrics = [select] + [m for m in ("test_acc", "test_macro_f1", "test_balanced_acc") if m != select]
    metrics += sorted(c for c in frame.columns if c.startswith("ood_") and c.endswith(("_acc", "_macro_f1")))
    # not measured (`probe.kmeans: false`): no column of empty cells, and no note explaining it
    metrics += [m for m in ("kmeans_nmi", "kmeans_ari") if m in frame.columns and frame[m].notna().any()]
    out = firsts[["encoder", "column", "resolution", *[m for m in metrics if m in frame.columns]]].copy()
    # the validation figure is the best of this many: the more columns, the more it flatters
    out.insert(1, "searched", out["encoder"].map(frame.groupby("encoder").size()).astype(int))
    if images is None:
        return out
    sizes = {(r.dataset, r.split): r.images for r in images.itertuples()}
    for metric in [m for m in out.columns if m == "test_acc" or (m.startswith("ood_") and m.endswith("_acc"))]:
        n = sizes.get((main, "test") if metric == "test_acc" else (metric[len("ood_"):-len("_acc")], "ood"), 0)
        out.insert(out.columns.get_loc(metric) + 1, f"{metric}_95ci", [interval_text(v, n) for v in out[metric]])
    return out


BUDGET_RATIO_NOTED = 2.0  # trained encoders whose images seen in training differ more than this are flagged


def training_budgets(config: PipelineConfig, images: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per encoder of the pipeline: how it was trained, as its finished weights record it. `steps`:
    optimizer steps; `images_seen`: training images drawn in all (for the U-Net as its workers counted them,
    at most steps x global batch: each worker's epoch ends in a short batch, `pretrain.images_drawn`; epochs
    x training images for a baseline; SimCLR makes two views of each); `input_px`: the side of the images it
    is given here. Weights trained elsewhere (a pretrained baseline, a given U-Net checkpoint) have no
    budget here. Empty cells where an encoder is not trained yet. `images` (`data_summary`): the train
    split's unreadable images, which the weights' record counts (it fingerprints the listed files) but
    training skipped, are taken off `train_images`, as the Data section and the training stages count."""
    from sweep.stages.baselines import META_FILE
    from sweep.stages.pretrain import images_drawn
    from sweep.storage import PRETRAIN_MARKER, read_json

    storage = Storage.of(config.storage_root)
    baselines = {b.name: b for b in config.baselines}
    skipped = 0
    if images is not None:
        train = images[(images["dataset"] == config.data.train.name) & (images["split"] == "train")]
        skipped = int(train["unreadable"].sum())
    rows = []
    for spec in config.encoder_specs():
        row = {"encoder": spec.name, "trained": None, "train_images": None, "epochs": None, "steps": None,
               "images_seen": None, "input_px": config.data.image_size}
        b = baselines.get(spec.name)
        if spec.kind == "diffusion" and spec.checkpoint:
            row["trained"] = "given checkpoint (trained elsewhere)"
        elif spec.kind == "diffusion":
            marker = read_json(f"{storage.pretrain_final}/{PRETRAIN_MARKER}") or {}
            row["trained"] = "DDPM denoising" + (f", from {config.pretrain.init_from}" if config.pretrain.init_from
                                                 else "")
            if marker:
                n = (marker.get("training_images") or {}).get("images")
                n = n - skipped if n else n
                # the images its workers drew, counted (recorded since 2026-11-25); before: worked out from the
                # global batch of the run that made it (recorded since 2026-11-24; before: as configured).
                # Not steps x global batch: that counted the short last batch of each epoch as a full one
                # (the demo's U-Net: 6,400 for the 6,200 it drew; at a batch over a worker's images, 2x and more)
                batch = marker.get("global_batch") or config.pretrain.batch_size * config.pretrain.workers
                seen = marker.get("images_seen")
                if seen is None:  # pretrain.batch_size is one of its settings: the workers are batch / it
                    workers = max(1, batch // config.pretrain.batch_size)
                    seen = images_drawn(marker["steps"], batch // workers, workers, n) if n else \
                        marker["steps"] * batch
                row.update(train_images=n, steps=marker["steps"], images_seen=seen,
                           epochs=round(seen / n, 1) if n else None)
        elif b is not None and b.kind == "pretrained":
            row.update(trained="weights given (trained elsewhere)", input_px=b.input_size or config.data.image_size)
        elif b is not None:
            meta = read_json(f"{storage.baseline_final(b.name)}/{META_FILE}") or {}
            row["trained"] = {"supervised": "supervised (labels)", "simclr": "SimCLR (two views per image)"}[b.kind]
            if meta:
                n = (meta.get("training_images") or {}).get("images")
                n = n - skipped if n else n
                history = meta.get("history") or []
                row.update(train_images=n, epochs=meta.get("epochs"),
                           steps=history[-1]["step"] if history else None,
                           images_seen=meta["epochs"] * n if n and meta.get("epochs") else None)
        rows.append(row)
    return pd.DataFrame(rows).astype({c: "Int64" for c in ("train_images", "steps", "images_seen")})


def planned_budgets(config: PipelineConfig, train_images: int) -> pd.DataFrame:
    """`training_budgets`' `images_seen` as the pipeline's settings plan them, before anything is trained
    (`train_images`: the train split's size): what `sweep validate` compares."""
    from sweep.stages.pretrain import images_drawn

    baselines = {b.name: b for b in config.baselines}
    rows = []
    for spec in config.encoder_specs():
        b = baselines.get(spec.name)
        if spec.kind == "diffusion" and not spec.checkpoint:
            p = config.pretrain
            seen = images_drawn(p.steps, p.batch_size, p.workers, train_images)
            short = seen < p.steps * p.batch_size * p.workers  # each worker's epoch ends in a short batch
            rows.append({"encoder": spec.name,
                         "plan": f"{p.steps} steps x {'at most ' if short else ''}{p.batch_size * p.workers}",
                         "images_seen": seen})
        elif b is not None and b.kind != "pretrained":
            rows.append({"encoder": spec.name, "plan": f"{b.epochs} epochs x {train_images}",
                         "images_seen": b.epochs * train_images})
    return pd.DataFrame(rows, columns=["encoder", "plan", "images_seen"])


def budget_gap(budgets: pd.DataFrame, saw: str = "saw") -> str | None:
    """A sentence when the encoders trained here saw training images in amounts that differ by more than
    `BUDGET_RATIO_NOTED`: the comparison is then not one at comparable budgets. None otherwise."""
    seen = budgets.dropna(subset=["images_seen"])
    seen = seen[seen["images_seen"] > 0]
    if len(seen) < 2:
        return None
    most, least = seen.loc[seen["images_seen"].idxmax()], seen.loc[seen["images_seen"].idxmin()]
    ratio = most["images_seen"] / least["images_seen"]
    if ratio <= BUDGET_RATIO_NOTED:
        return None
    # as many decimals as show it over the threshold: 960 vs 471 (2.04) read "differ 2.0x", flagged as over 2x
    shown = next(f"{ratio:.{d}f}" for d in (1, 2, 3, 4, 6, 9, 12) if float(f"{ratio:.{d}f}") > BUDGET_RATIO_NOTED)
    return (f"training budgets differ {shown}x: {most['encoder']} {saw} {most['images_seen']:,} training images, "
            f"{least['encoder']} {least['images_seen']:,}; differences between them mix the method with the "
            f"training time (a baseline's `epochs` sets its budget: epochs x training images)")


def run(config: PipelineConfig) -> str:
    storage = Storage.of(config.storage_root)
    recs = best(config, metric=config.probe.select, top=None)
    if not recs:
        earlier = "".join(f"; {n} run(s) of these settings made by {what} are kept apart (their results differ)"
                          for what, n in tracking.earlier_probe_runs(config).items())
        raise RuntimeError(f"report: no probe runs for this config in MLflow{earlier}; run `sweep probe` first")
    recs, others = one_per_trial(recs, storage.root)
    if others:
        say(f"report: warning: {duplicates_line(others)}")
    missing = missing_trials(config, recs)
    if missing:
        say(f"report: warning: {len(missing)} planned probe trial(s) have no run yet (e.g. {missing[0]}): the report "
            f"leaves them out; `sweep probe` runs them")
    # Written into a staging folder that replaces report/ whole when done: a report interrupted half-way left
    # some of the new settings' tables beside the old settings' report.md and heat maps, nothing saying so.
    # The run opens once the files are written; an error after (its artifacts' upload, the folder's
    # publishing on a full disk) ends it FAILED, not RUNNING.
    opened = []
    with tracking.ended_on_error(config, lambda: opened[0] if opened else None):
        with staged_dir(storage.report, "report.md") as out:
            _write(config, recs, out, missing, others)
            opened.append(tracking.start_stage_run(config, "report", resume_unfinished=False))
            client = tracking.client_for(config)
            for f in out.iterdir():
                client.log_artifact(opened[0], str(f))
    tracking.finish_run(config, opened[0])
    say(f"report: {storage.report}/report.md")
    return f"{storage.report}/report.md"


def missing_trials(config: PipelineConfig, recs: list[dict]) -> list[str]:
    """The trial keys the pipeline plans (`probe.plan_trials`) that have no finished run among `recs`: an
    interrupted or failed sweep's; [] where the plan cannot be made (the feature stores changed since)."""
    from sweep.stages.probe import ProbeError, plan_trials, trial_key

    try:
        planned, _, _ = plan_trials(config)
    except (ProbeError, OSError, ValueError):
        return []
    have = {trial_key(r["encoder"], r["column"]) for r in recs}
    return [t["key"] for t in planned if t["key"] not in have]


def duplicates_line(others: dict[str, int]) -> str:
    """What a report says of the runs `best.one_per_trial` left out (storage -> how many)."""
    return (f"{sum(others.values())} more finished run(s) of trials of this config, made in another storage "
            f"sharing this MLflow experiment ({per_storage(others)}), are left out: one run per trial, this "
            f"storage's. Two storages probed this config at once; give each its own experiment (--set "
            f"tracking.experiment=NAME)")


def _write(config: PipelineConfig, recs: list[dict], out: Path, missing: list[str] = (),
           others: dict[str, int] | None = None) -> None:
    """Every file of the report into the folder `out`, report.md last; `missing`: planned trials without a run;
    `others`: the runs of other storages left out (`best.one_per_trial`)."""
    metric = config.report.metric
    frame = pd.DataFrame(recs)
    # whole numbers as such (`0`, not `0.0`): a column with a gap (no timestep for a baseline) is float in pandas
    counts = {c: "Int64" for c in ("timestep", "resolution", "dim", "epochs_run") if c in frame}
    frame.astype(counts).to_csv(out / "probe_runs.csv", index=False)
    lines = [f"# {config.name}: probe report", "",
             f"Config hash `{config.config_hash()}`; {len(frame)} probe runs; best chosen on "
             f"`{config.probe.select}` (validation), `{metric}` shown.", "",
             *([f"**Incomplete: {len(missing)} of {len(frame) + len(missing)} planned probe trials have no run yet "
                f"(e.g. `{missing[0]}`): every table and heat map below leaves them out. `sweep probe` runs them, "
                f"then `sweep report` again.**", ""] if missing else []),
             *([f"**{duplicates_line(others)}.**", ""] if others else []),
             f"Probe (revision {PROBE_REVISION}): {probe_settings(config)}. This folder holds the report of the "
             f"settings last reported; another setting's runs stay in MLflow (`sweep report` with its `--set`).",
             "",
             "## Best configurations", "", "```", format_table(recs[:10], config.probe.select), "```", ""]
    images = data_summary(config)
    if images is not None:
        images.to_csv(out / "data.csv", index=False)
        lines += ["## Data", "",
                  "Images each split holds in the feature store (what the probes were trained, chosen and scored "
                  "on), with the number of classes, the sizes of the largest and smallest class and the training "
                  "classes it lacks (not scored there: macro F1 and balanced accuracy average over the classes a "
                  "split has); and the images of that split left out: unreadable (listed in each feature "
                  "manifest's `rejected`), or of a class the train split does not have (`unknown_class`; OOD "
                  "accuracy is over the OOD images of training classes). `data.csv` names every missing class.",
                  "", "```",
                  images.assign(classes_missing=images.attrs["missing_shown"]).to_string(index=False), "```", ""]
    compared = encoder_comparison(frame, config.probe.select, images, config.data.train.name)
    several = frame["encoder"].nunique() > 1
    chance = images.attrs.get("chance_nmi") if images is not None else None
    kmeans_note = (f" `kmeans_*`: k-means (k = classes, no label used) on the {config.data.train.name} images of "
                   f"every split (a sample of {KMEANS_MAX_ROWS:,} where more), against their labels: NMI is not "
                   f"corrected for chance"
                   + (f" (random clusters score {chance:.2f} on these images)" if chance is not None else "")
                   + ", ARI is (0 = chance).")
    lines += ["## Encoders compared" if several else "## Best column", "",
              f"{'Each encoder' if several else 'The encoder'}'s best column on validation "
              f"(`{config.probe.select}`) and that column's test and OOD numbers. `searched`: the columns that best "
              f"was chosen from: its `{config.probe.select}` is the highest of that many on the same validation "
              f"images, optimistic"
              f"{', the more so the more columns an encoder has: compare encoders on test and OOD' if several else ''}"
              f". `_95ci`: the 95 % Wilson interval of the accuracy before it over that split's images"
              f"{'; a difference between encoders well inside it is not resolved by this test set' if several else ''}"
              f".{kmeans_note if 'kmeans_nmi' in compared else ''}", "",
              "```", compared.to_string(index=False, float_format=lambda v: f"{v:.4f}"), "```", ""]
    budgets = training_budgets(config, images)
    budgets = budgets[budgets["encoder"].isin(frame["encoder"])]
    budgets.to_csv(out / "training_budgets.csv", index=False)
    gap = budget_gap(budgets)
    if gap:
        say(f"report: note: the {gap}")
    lines += ["## Training budgets", "",
              "How each encoder was trained, from its finished weights: `steps` optimizer steps, `images_seen` "
              "training images drawn in all (as the U-Net's workers counted them, at most steps x global batch: "
              "each worker's pass over its images ends in a short batch; epochs x training images for a "
              "baseline, whose SimCLR views are two per image), and `input_px` the side of the images each is "
              "given here."
              + (" Weights trained elsewhere have no budget here; ImageNet-style weights, trained at about 224 px, "
                 "see these images at `input_px` (`baselines[].input_size`: e.g. 224 resizes them to the "
                 "scale such weights learned)."
                 if budgets["trained"].str.contains("elsewhere", na=False).any() else "")
              + (f" **The {gap}.**" if gap else ""), "", "```",
              budgets.astype(object).where(budgets.notna(), "-").to_string(index=False), "```", ""]
    if config.probe.asha is not None and "epochs_run" in frame:
        short = int((frame["epochs_run"] < config.probe.epochs).sum())
        lines[4:4] = [f"ASHA was on: {short} of {len(frame)} columns ran fewer than {config.probe.epochs} epochs "
                      "(stopped at a rung, or by `patience`); their cells are results of fewer epochs, marked with "
                      "them in the heat maps (`epochs_run` in probe_runs.csv).", ""]
    per_class, notes = per_class_results(config, frame.groupby("encoder", sort=False).head(1))
    if not per_class.empty:
        per_class.to_csv(out / "per_class.csv", index=False)
        shown = head_and_tail(per_class)
        lines += ["## Per class", "",
                  "Each encoder's best column again, class by class on test (and each OOD dataset), the classes "
                  "with most training images first: what the averages above hide on a long tail (`per_class.csv`;"
                  f" with more than {2 * PER_CLASS_SHOWN} classes the {PER_CLASS_SHOWN} largest and smallest are "
                  "shown here). A class with few images moves its recall in big steps.", "", "```",
                  shown.drop(columns=["precision"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"),
                  "```", "", *[f"- {n}" for n in notes], *([""] if notes else [])]
    refs = references(config)
    if refs:
        n_test = 0 if images is None else int(images[(images["dataset"] == config.data.train.name)
                                                     & (images["split"] == "test")]["images"].sum())
        for r in refs:  # read against the probes' intervals: the same test images
            r["test_acc_95ci"] = interval_text(r.get("test_acc"), n_test)
        frame_refs = pd.DataFrame(refs)
        frame_refs.to_csv(out / "supervised_reference.csv", index=False)
        lines += ["## Supervised reference (end to end)", "",
                  "Each supervised baseline's own classifier, chosen on validation and scored once on test: "
                  "what a fully supervised network reaches on these images, for reading the probes against "
                  f"(`test_acc_95ci` over the same {n_test} test images; its training under Training budgets)."
                  + (" It is trained with unweighted cross-entropy, while the probes here weigh classes "
                     "(`probe.class_weights: balanced`): on long-tailed data its macro F1 and balanced accuracy "
                     "are not the probes' like for like." if config.probe.class_weights == "balanced" else ""),
                  "", "```", format_references(refs), "```", ""]
    for encoder, group in frame.groupby("encoder", sort=True):
        lines += [f"## {encoder}", ""]
        if group["timestep"].notna().any():
            for m in dict.fromkeys([config.probe.select, metric]):
                if m not in group or not group[m].notna().any():  # say, no test image of a training class
                    lines += [f"({m}: not measured on any column)", ""]
                    continue
                name = f"heatmap_{encoder}_{m}.png"
                _heatmap(group, m, f"{encoder}: {m} by block and timestep", out / name,
                         epochs=config.probe.epochs if config.probe.asha else None)
                lines += [f"![{encoder} {m}]({name})", ""]
        else:  # a baseline: one row per layer, in network order (finest feature map first)
            shown = ["layer", "resolution", "dim", *dict.fromkeys([config.probe.select, metric])]
            rows = group.sort_values(["resolution", "column"], ascending=[False, True])[shown]
            lines += ["```", rows.drop_duplicates().to_string(index=False, float_format=lambda v: f"{v:.4f}"),
                      "```", ""]
        top = group.sort_values(config.probe.select, ascending=False).iloc[0]
        lines += [f"- best {encoder}: `{top['column']}` (resolution {top['resolution']}): "
                  f"{metric} {top.get(metric, float('nan')):.4f}", ""]
    (out / "report.md").write_text("\n".join(lines))
