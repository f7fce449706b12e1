"""The report's statistics that need no Ray: accuracy intervals, the encoder comparison built on them, and the
Data section's counts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import DEMO_IMAGES, image_folder

from sweep.config import load_config
from sweep.data.table import build_table
from sweep.features.store import FeatureStore, to_table
from sweep.stages.report import (accuracy_interval, budget_gap, data_summary, encoder_comparison,
                                 head_and_tail, network_order)
from sweep.storage import Storage


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out (Wilson 1927; Agresti & Coull 1998, eq. 2)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(16, 22), (0, 22), (22, 22), (1, 1), (7890, 10000)])
def test_accuracy_interval_is_wilsons(k, n):
    low, high = accuracy_interval(k / n, n)
    assert (low, high) == pytest.approx(_wilson(k, n), abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_accuracy_interval_without_images_or_accuracy_is_nan():
    assert all(math.isnan(v) for v in accuracy_interval(0.5, 0))
    assert all(math.isnan(v) for v in accuracy_interval(float("nan"), 10))
    assert all(math.isnan(v) for v in accuracy_interval(None, 10))


def test_encoder_comparison_puts_each_accuracys_interval_after_it():
    frame = pd.DataFrame([  # best first on val_macro_f1, as `sweep best` returns it
        {"encoder": "diffusion", "column": "mid_block@t100", "resolution": 4, "val_macro_f1": 0.9,
         "test_acc": 0.75, "test_macro_f1": 0.7, "ood_other_site_acc": 0.5, "ood_other_site_macro_f1": 0.4},
        {"encoder": "sup", "column": "layer3", "resolution": 8, "val_macro_f1": 0.8,
         "test_acc": 0.5, "test_macro_f1": 0.45, "ood_other_site_acc": float("nan"), "ood_other_site_macro_f1": 0.3},
        {"encoder": "diffusion", "column": "mid_block@t0", "resolution": 4, "val_macro_f1": 0.7,
         "test_acc": 1.0, "test_macro_f1": 1.0, "ood_other_site_acc": 1.0, "ood_other_site_macro_f1": 1.0},
    ])
    images = pd.DataFrame([{"dataset": "main", "split": "test", "images": 40},
                           {"dataset": "other_site", "split": "ood", "images": 10},
                           {"dataset": "main", "split": "val", "images": 999}])
    out = encoder_comparison(frame, "val_macro_f1", images, "main")
    assert list(out.columns) == ["encoder", "searched", "column", "resolution", "val_macro_f1", "test_acc",
                                 "test_acc_95ci", "test_macro_f1", "ood_other_site_acc", "ood_other_site_acc_95ci",
                                 "ood_other_site_macro_f1"]
    assert list(out["column"]) == ["mid_block@t100", "layer3"]  # each encoder's best on validation
    assert list(out["searched"]) == [2, 1]  # ...of this many columns
    assert list(out["test_acc_95ci"]) == ["{:.2f}-{:.2f}".format(*_wilson(30, 40)),
                                          "{:.2f}-{:.2f}".format(*_wilson(20, 40))]
    assert list(out["ood_other_site_acc_95ci"]) == ["{:.2f}-{:.2f}".format(*_wilson(5, 10)), "-"]
    # without the images: the comparison as before, no interval columns
    assert not any(c.endswith("_95ci") for c in encoder_comparison(frame, "val_macro_f1").columns)


def test_encoder_comparison_leaves_out_kmeans_where_no_run_measured_it():
    """`probe.kmeans: false`: no run has kmeans_nmi/ari (`sweep best` gives them as None); the report's
    comparison showed two columns of `None` and explained them as k-means scores."""
    rows = [{"encoder": "diffusion", "column": "mid_block@t0", "resolution": 4, "val_macro_f1": 0.9,
             "test_acc": 0.75, "kmeans_nmi": None, "kmeans_ari": None},
            {"encoder": "sup", "column": "layer3", "resolution": 8, "val_macro_f1": 0.8,
             "test_acc": 0.5, "kmeans_nmi": None, "kmeans_ari": None}]
    out = encoder_comparison(pd.DataFrame(rows), "val_macro_f1")
    assert list(out.columns) == ["encoder", "searched", "column", "resolution", "val_macro_f1", "test_acc"]
    # measured for one encoder: kept, the other's cell empty
    rows[1].update(kmeans_nmi=0.25, kmeans_ari=0.0)
    out = encoder_comparison(pd.DataFrame(rows), "val_macro_f1")
    assert list(out["kmeans_ari"].isna()) == [True, False] and out["kmeans_ari"].iloc[1] == 0.0


def test_data_summary_counts_what_each_split_left_out(tmp_path, write_pipeline):
    """Per (dataset, split): the store's images, and beside them the images extraction rejected (the manifest's
    `rejected`) and those of a class the train split does not have (an OOD class unknown to training)."""
    ood = tmp_path / "ood"
    for cls, n in [("Tripos", 3), ("Ciliophora", 2), ("Unheard_of", 4)]:
        (ood / cls).mkdir(parents=True)
        for src in sorted((DEMO_IMAGES / ("Tripos" if cls == "Unheard_of" else cls)).glob("*.jpg"))[:n]:
            (ood / cls / src.name).write_bytes(src.read_bytes())
    config = load_config(write_pipeline(
        data={"image_size": 16, "channels": 1, "train": {"name": "plankton", "source": "demo"},
              "ood": [{"name": "shifted", "source": "imagefolder", "path": str(ood)}]}))
    table = build_table(config)
    frame = table.frame
    # a feature store as extraction leaves it: two test images and one OOD image rejected as unreadable
    bad = list(frame[frame["split"] == "test"].index[:2]) + list(frame[frame["split"] == "ood"].index[:1])
    columns = [{"column": "mid_block@t0", "layer": "mid_block", "timestep": 0, "dim": 2, "resolution": 4}]
    store = FeatureStore(Storage.of(config.storage_root).features("diffusion"))
    datasets = {d: 1 for d in frame["domain"].unique()}
    store.open({"encoder": "diffusion", "columns": columns}, "k", datasets)
    for domain, rows in frame.groupby("domain"):
        kept = rows.drop(index=[i for i in bad if i in rows.index])
        store.write_shard(domain, 0, to_table(kept.to_dict("list"), {"mid_block@t0": np.zeros((len(kept), 2))},
                                              columns),
                          rejected=[{"image_id": frame.at[i, "image_id"], "reason": "broken"}
                                    for i in bad if i in rows.index])
    store.mark_complete({})

    got = data_summary(config, table).set_index(["dataset", "split"])
    expected_unreadable = {("plankton", "test"): 2, ("shifted", "ood"): 1}
    for (dataset, split), row in got.iterrows():
        listed = int(((frame["domain"] == dataset) & (frame["split"] == split)).sum())
        unreadable = expected_unreadable.get((dataset, split), 0)
        assert row["images"] == listed - unreadable, (dataset, split)
        assert row["unreadable"] == unreadable, (dataset, split)
        assert row["unknown_class"] == (4 if dataset == "shifted" else 0), (dataset, split)
    assert list(got.index) == [("plankton", "train"), ("plankton", "val"), ("plankton", "test"), ("shifted", "ood")]
    assert got.loc[("shifted", "ood"), "images"] == 4  # 3 Tripos + 2 Ciliophora, one of them unreadable
    # the training classes a split lacks (of the images the store holds): the other four in the OOD set
    stored = frame.drop(index=bad)
    for (dataset, split), row in got.iterrows():
        held = set(stored.loc[(stored["domain"] == dataset) & (stored["split"] == split), "label"])
        assert row["classes_missing"] == (", ".join(c for i, c in enumerate(table.classes) if i not in held)
                                          or "-"), (dataset, split)
    assert got.loc[("shifted", "ood"), "classes_missing"] == ", ".join(
        c for c in table.classes if c not in ("Tripos", "Ciliophora"))


def test_data_csv_names_every_class_a_split_lacks(tmp_path, write_pipeline):
    """A long tail of many classes: 8 of 12 classes have 1 image (train only). data.csv named 5 of the 8 a
    split lacks and '(+3)', and nothing else in the report or the store names the other 3; it now names all
    8, while report.md's table keeps the 5 and the count."""
    sizes = {**{f"rare {i} ü": 1 for i in range(8)}, **{f"common {i}": 10 for i in range(4)}}
    root = image_folder(tmp_path / "folder", sizes)
    config = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "imagefolder", "path": str(root), "splits": {"val": 0.2, "test": 0.2}}}))
    table = build_table(config)
    columns = [{"column": "mid_block@t0", "layer": "mid_block", "timestep": 0, "dim": 2, "resolution": 4}]
    store = FeatureStore(Storage.of(config.storage_root).features("diffusion"))
    store.open({"encoder": "diffusion", "columns": columns}, "k", {"main": 1})
    store.write_shard("main", 0, to_table(table.frame.to_dict("list"),
                                          {"mid_block@t0": np.zeros((len(table.frame), 2))}, columns))
    store.mark_complete({})
    got = data_summary(config, table).set_index("split")
    rare = sorted(c for c, n in sizes.items() if n == 1)
    assert got.loc["val", "classes_missing"] == ", ".join(rare) == got.loc["test", "classes_missing"]
    assert got.loc["train", "classes_missing"] == "-"
    shown = dict(zip(got.index, got.attrs["missing_shown"]))
    assert shown == {"train": "-", "val": ", ".join(rare[:5]) + " (+3)", "test": ", ".join(rare[:5]) + " (+3)"}


def test_per_class_tables_show_the_head_and_tail_of_many_classes():
    rows = [{"encoder": "e", "dataset": "d", "split": "test", "class": f"c{i}", "train_images": (i * 7) % 40}
            for i in range(40)]
    rows += [{"encoder": "a", "dataset": name, "split": split, "class": f"k{i}", "train_images": i}
             for name, split in (("blur", "ood"), ("d", "test")) for i in range(5)]
    shown = head_and_tail(pd.DataFrame(rows), shown=3)
    # per encoder its test split first, then OOD; a few classes: all of them
    assert list(zip(shown["encoder"], shown["dataset"])) == [("a", "d")] * 5 + [("a", "blur")] * 5 + [("e", "d")] * 6
    assert list(shown["train_images"]) == [4, 3, 2, 1, 0] * 2 + [39, 38, 37, 2, 1, 0]


def test_budget_gap_names_the_encoders_furthest_apart_beyond_twice():
    budgets = pd.DataFrame([
        {"encoder": "diffusion", "images_seen": 6400}, {"encoder": "sup", "images_seen": 610},
        {"encoder": "simclr", "images_seen": 3300}, {"encoder": "imagenet", "images_seen": None},  # trained elsewhere
    ]).astype({"images_seen": "Int64"})
    gap = budget_gap(budgets)
    assert gap.startswith("training budgets differ 10.5x: diffusion saw 6,400 training images, sup 610")
    assert budget_gap(budgets[budgets["encoder"] != "sup"]) is None  # 6,400 vs 3,300: within 2x
    assert budget_gap(budgets[budgets["encoder"].isin(["sup", "imagenet"])]) is None  # one trained here


def test_budget_gap_just_over_twice_does_not_read_as_twice():
    """960 vs 471 images (2.04x, an audit's study) is flagged as over 2x: it must not read "differ 2.0x"."""
    budgets = pd.DataFrame([{"encoder": "diffusion", "images_seen": 960}, {"encoder": "simclr", "images_seen": 471}])
    assert budget_gap(budgets.astype({"images_seen": "Int64"})).startswith("training budgets differ 2.04x:")


def test_training_budgets_count_the_training_images_trained_on(tmp_path, write_pipeline):
    """The weights' record counts the train split's listed files; an unreadable one (skipped by training,
    rejected by extraction) is not a training image: the budget's `train_images` and `epochs` agree with the
    Data section's train row (an audit's 1 corrupt file of 241: train_images 241, the Data section 240)."""
    import json
    from pathlib import Path

    from sweep.stages.report import training_budgets
    from sweep.storage import PRETRAIN_MARKER

    config = load_config(write_pipeline(data={"image_size": 16, "channels": 1,
                                              "train": {"name": "plankton", "source": "demo"}}))
    table = build_table(config)
    frame = table.frame
    listed = int((frame["split"] == "train").sum())
    bad = frame[frame["split"] == "train"].index[0]
    columns = [{"column": "mid_block@t0", "layer": "mid_block", "timestep": 0, "dim": 2, "resolution": 4}]
    storage = Storage.of(config.storage_root)
    store = FeatureStore(storage.features("diffusion"))
    store.open({"encoder": "diffusion", "columns": columns}, "k", {"plankton": 1})
    kept = frame.drop(index=[bad])
    store.write_shard("plankton", 0, to_table(kept.to_dict("list"), {"mid_block@t0": np.zeros((len(kept), 2))},
                                              columns),
                      rejected=[{"image_id": frame.at[bad, "image_id"], "reason": "broken"}])
    store.mark_complete({})
    # the finished U-Net's record as the pretrain stage writes it: the listed files' fingerprint and count
    Path(storage.pretrain_final).mkdir(parents=True)
    Path(storage.pretrain_final, PRETRAIN_MARKER).write_text(json.dumps(
        {"key": "k", "steps": 10, "global_batch": 16, "training_images": {"images": listed, "ids": "i", "labels": "l"}}))

    images = data_summary(config, table)
    assert images.set_index(["dataset", "split"]).loc[("plankton", "train"), "images"] == listed - 1
    row = training_budgets(config, images).set_index("encoder").loc["diffusion"]
    assert row["train_images"] == listed - 1
    # a U-Net finished before its marker counted its images: the images its 2 workers of 8 drew from the 74
    # trained on (37 each, epochs of 8 + 8 + 8 + 8 + 5), not 10 steps x 16 = 160
    assert listed - 1 == 74 and row["images_seen"] == 2 * (37 + 37) == 148
    assert row["epochs"] == round(148 / 74, 1)


def test_training_budgets_give_the_images_a_unet_drew_not_steps_times_the_batch(tmp_path, write_pipeline):
    """The U-Net's `images_seen` is what its workers counted (the marker's `images_seen`): each worker's pass
    over its images ends in a short batch, so steps x global batch overstated it (the demo: 6,400 for 6,200;
    with a batch over a worker's images, 25,600 for 12,400 at 64 per worker), and the budget gap with it."""
    import json
    from pathlib import Path

    from sweep.stages.report import planned_budgets, training_budgets
    from sweep.storage import PRETRAIN_MARKER

    config = load_config(write_pipeline(pretrain={"steps": 200, "batch_size": 64, "workers": 2},
                                        baselines=[{"name": "sup", "kind": "supervised", "epochs": 200}]))
    listed = int((build_table(config).frame["split"] == "train").sum())
    assert listed == 61
    storage = Storage.of(config.storage_root)
    Path(storage.pretrain_final).mkdir(parents=True)
    Path(storage.pretrain_final, PRETRAIN_MARKER).write_text(json.dumps(
        {"key": "k", "steps": 200, "global_batch": 128, "images_seen": 12_400,
         "training_images": {"images": listed, "ids": "i", "labels": "l"}}))
    row = training_budgets(config).set_index("encoder").loc["diffusion"]
    assert row["images_seen"] == 12_400 and row["epochs"] == round(12_400 / 61, 1)
    planned = planned_budgets(config, listed).set_index("encoder")
    assert planned.loc["diffusion", "images_seen"] == 12_400  # 31 images a worker and step, not 64
    assert planned.loc["diffusion", "plan"] == "200 steps x at most 128"
    assert planned.loc["sup", "images_seen"] == 200 * 61


def test_heatmap_rows_follow_the_network_not_the_alphabet():
    """`extract.layers` may name any module: the heat map's rows (its depth axis) run in execution order.
    Sorted by name, conv_in sat between mid_block and the up blocks and attentions.0 above resnets.0."""
    layers = ["up_blocks.0", "conv_out", "mid_block", "down_blocks.1", "down_blocks.1.downsamplers.0",
              "down_blocks.1.attentions.0", "down_blocks.1.resnets.1", "down_blocks.1.resnets.0", "down_blocks.0",
              "conv_in", "down_blocks.10", "down_blocks.2", "mid_block.attentions.0", "mid_block.resnets.0"]
    assert sorted(layers, key=network_order) == [
        "conv_in", "down_blocks.0", "down_blocks.1.resnets.0", "down_blocks.1.attentions.0", "down_blocks.1.resnets.1",
        "down_blocks.1.downsamplers.0", "down_blocks.1", "down_blocks.2", "down_blocks.10", "mid_block.resnets.0",
        "mid_block.attentions.0", "mid_block", "up_blocks.0", "conv_out"]


def test_heatmap_keeps_every_label_inside_the_image(tmp_path):
    """Ten blocks with a long sub-module name and three timesteps: tight_layout cut the colour bar's label
    (the metric's name) off at the right edge. Nothing may touch the image's border."""
    import matplotlib.image as mpimg

    from sweep.stages.report import _heatmap

    layers = ["conv_in", *(f"down_blocks.{i}" for i in range(3)), "mid_block", *(f"up_blocks.{i}" for i in range(3)),
              "down_blocks.1.attentions.0", "down_blocks.1.resnets.0"]
    frame = pd.DataFrame([{"layer": layer, "timestep": t, "resolution": 16, "test_macro_f1": v}
                          for layer in layers for t, v in [(0, 0.2), (50, 0.5), (200, 0.9)]])
    _heatmap(frame, "test_macro_f1", "diffusion: test_macro_f1 by block and timestep", tmp_path / "h.png")
    ink = mpimg.imread(tmp_path / "h.png")[..., :3].min(axis=2) < 0.9
    assert not (ink[:, :2].any() or ink[:, -2:].any() or ink[:2].any() or ink[-2:].any())


def test_a_heatmap_of_a_hundred_timesteps_fits_a_page(tmp_path):
    """21 layers x 100 timesteps (the scale audit's study) made a 9,469 x 1,241 px image with 2,100 cell
    labels: past HEATMAP_LABELLED_TIMESTEPS the cells are colour alone, narrower; fewer keep their values."""
    import matplotlib.image as mpimg

    from sweep.stages.report import HEATMAP_LABELLED_TIMESTEPS, _heatmap

    for timesteps in (100, HEATMAP_LABELLED_TIMESTEPS):
        frame = pd.DataFrame([{"layer": f"down_blocks.{i}", "timestep": 10 * t, "resolution": 8,
                               "test_macro_f1": 0.5 + 0.01 * i - 0.001 * t}
                              for i in range(21) for t in range(timesteps)])
        _heatmap(frame, "test_macro_f1", "diffusion: test_macro_f1 by block", tmp_path / f"{timesteps}.png")
    wide, labelled = (mpimg.imread(tmp_path / f"{n}.png") for n in (100, HEATMAP_LABELLED_TIMESTEPS))
    assert wide.shape[1] < 3300, wide.shape  # 0.22 in a timestep at 120 dpi, and the labels
    assert labelled.shape[1] > 0.75 * 120 * HEATMAP_LABELLED_TIMESTEPS  # 0.9 in a timestep (cropped): room for a value


def test_heatmap_cells_of_low_close_scores_read_differently(tmp_path):
    """200 classes on a long tail: every test macro F1 of the U-Net's 10 columns lay in 0.024-0.041, and the
    cells, plainly of different colours, were labelled 0.02, 0.03 or 0.04 (0.0362, 0.0385 and 0.0412 all
    "0.04"). Labels get the decimals the spread needs; a usual spread keeps 2."""
    from sweep.stages.report import _heatmap, cell_digits

    # the study's cells, rows down_blocks.0 .. up_blocks.1, timesteps 0 and 100
    low = [0.0241, 0.0207, 0.0344, 0.0216, 0.0408, 0.0288, 0.0362, 0.0385, 0.0412, 0.0278]
    assert cell_digits(low) == 3 and len({f"{v:.3f}" for v in low}) == 9  # 0.041 twice: 0.0408, 0.0412
    assert len({f"{v:.2f}" for v in low}) == 3
    assert cell_digits([0.2, 0.5, 0.9]) == 2 and cell_digits([0.5, float("nan")]) == 2
    assert cell_digits([0.8012, 0.8031, 0.8054]) == 4  # a spread under 0.01 between good columns
    frame = pd.DataFrame([{"layer": layer, "timestep": t, "resolution": 8, "test_macro_f1": low[2 * i + j]}
                          for i, layer in enumerate(["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
                                                     "up_blocks.1"]) for j, t in enumerate([0, 100])])
    _heatmap(frame, "test_macro_f1", "diffusion: test_macro_f1 by block and timestep", tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_per_class_refit_is_compared_with_the_logged_head_and_every_test_metric(tmp_path, write_pipeline):
    """The per-class table refits each encoder's best column; the report must say when the refit is not the
    logged run. It compared test accuracy alone: a refit that chose another head (another device or thread
    count flips near-tied heads) with the same test accuracy, or the same accuracy spread over other classes
    (another macro F1), was shown as the logged run's without a word."""
    from sweep.stages.probe import probe_column
    from sweep.stages.report import per_class_results

    config = load_config(write_pipeline(
        data={"image_size": 16, "channels": 1, "train": {"name": "plankton", "source": "demo"}},
        probe={"epochs": 5, "lrs": [0.1, 0.3], "weight_decays": [0.0, 0.01], "kmeans": False}))
    table = build_table(config)
    frame = table.frame
    columns = [{"column": "mid_block@t0", "layer": "mid_block", "timestep": 0, "dim": 4, "resolution": 4}]
    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (6, 4))[frame["label"]] + rng.normal(0, 1.5, (len(frame), 4))  # informative
    store_uri = Storage.of(config.storage_root).features("diffusion")
    store = FeatureStore(store_uri)
    store.open({"encoder": "diffusion", "columns": columns, "classes": table.classes},
               "k", {"plankton": 1})
    store.write_shard("plankton", 0, to_table(frame.to_dict("list"), {"mid_block@t0": features}, columns))
    store.mark_complete({})
    logged = probe_column(store_uri, "mid_block@t0", 6, {**config.probe.model_dump(mode="json"), "kmeans": False},
                          config.seed, threads=1)
    record = {"encoder": "diffusion", "column": "mid_block@t0", "lr": logged["lr"],
              "weight_decay": logged["weight_decay"], "epochs_run": logged["epochs_run"], **logged["metrics"]}

    def notes(**changed):
        return per_class_results(config, pd.DataFrame([{**record, **changed}]))[1]

    assert notes() == []  # the refit is the logged run
    other_lr = next(lr for lr in config.probe.lrs if lr != logged["lr"])
    (note,) = notes(lr=other_lr)  # the same test accuracy, another head
    assert f"lr {logged['lr']:g} (logged {other_lr:g})" in note and "the table is the refit's" in note
    (note,) = notes(test_macro_f1=logged["metrics"]["test_macro_f1"] - 0.1)
    assert "test_macro_f1" in note and "test_acc" not in note
