"""Data layer: preprocess, sources, stratified splits, the balanced regime, OOD label matching."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sweep.config import ConfigError, load_config
from sweep.data import build_table, preprocess
from sweep.data.preprocess import decode_rows
from sweep.data.table import (over_limit_warning, stratified_split, unbalanced_classes, unbalanced_warning,
                              unscored_classes, unscored_warning)
from tests.conftest import DEMO_IMAGES, image_folder


def _bar_image(w: int, h: int, mode: str) -> Image.Image:
    """White canvas with a black rectangle covering the middle half of each axis."""
    a = np.full((h, w, 3), 255, np.uint8)
    a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 0
    return Image.fromarray(a).convert(mode)


def _wide_image(gray: np.ndarray, mode: str) -> Image.Image:
    """An 8-bit greyscale array as the same picture in a mode of more bits, on that mode's range."""
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / 255)
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 257)
    if mode == "I;16B":
        return Image.frombytes(mode, gray.shape[::-1], (gray.astype(">u2") * 257).tobytes())
    return Image.fromarray(gray.astype(np.uint16) * 257)  # "I;16"


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("RGB", 1), ("L", 1), ("L", 3), ("RGBA", 3), ("I;16", 1),
                                            ("I;16", 3), ("F", 1)])
def test_preprocess_shape_range_and_modes(mode, channels):
    img = _bar_image(64, 32, mode if mode not in ("I;16", "F") else "L")
    if mode in ("I;16", "F"):
        img = _wide_image(np.asarray(img), mode)
    x = preprocess(img, 16, channels)
    assert x.shape == (channels, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() < -0.9 and x.max() > 0.9  # the full range is used: black bar, white background


@pytest.mark.parametrize("w, h", [(120, 40), (40, 120), (90, 90)])
def test_preprocess_keeps_aspect_ratio(w, h):
    x = preprocess(_bar_image(w, h, "L"), 60, 1)[0].numpy()
    dark = x < 0
    rows, cols = np.where(dark)
    bar_h, bar_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    # the bar is half of each side of the original: its aspect ratio must survive padding + resizing
    assert bar_w / bar_h == pytest.approx(w / h, rel=0.1)
    # padding uses the background colour: the corners are white, not black
    assert x[0, 0] > 0.9 and x[-1, -1] > 0.9


def test_preprocess_matches_independent_computation_on_real_image():
    path = next(iter(sorted((DEMO_IMAGES / "Tripos").glob("*.jpg"))))
    img = Image.open(path)
    x = preprocess(img, 32, 1)
    # independent: pad greyscale to a square with the border median, resize bicubic, scale to [-1, 1]
    g = np.asarray(img.convert("L"))
    h, w = g.shape
    fill = int(np.median(np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])))
    side = max(h, w)
    sq = np.full((side, side), fill, np.uint8)
    sq[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = g
    ref = np.asarray(Image.fromarray(sq).resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1
    np.testing.assert_allclose(x[0].numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("mode, suffix", [("I;16", "png"), ("I;16", "tif"), ("I;16B", "tif"), ("I", "tif"),
                                          ("F", "tif")])
def test_preprocess_reads_images_of_more_bits_on_their_type_range(tmp_path, mode, suffix):
    """A real demo image saved as 16-bit PNG/TIFF (values v * 257), 32-bit integer TIFF or float TIFF in
    [0, 1] gives the 8-bit image's tensor (up to the 8-bit image's rounding in padding and resizing):
    Pillow's own conversion made every 16-bit image white and the float one black."""
    path = next(iter(sorted((DEMO_IMAGES / "Tripos").glob("*.jpg"))))
    gray = np.asarray(Image.open(path).convert("L"))
    wide = tmp_path / f"wide.{suffix}"
    _wide_image(gray, mode).save(wide)
    with Image.open(wide) as reread:
        assert reread.mode == mode or (mode == "I;16B" and reread.mode.startswith("I;16"))
    for channels in (1, 3):
        x = preprocess(Image.open(wide), 32, channels)
        ref = preprocess(Image.fromarray(gray), 32, channels)
        assert x.shape == ref.shape
        assert (x - ref).abs().max() < 0.03 and (x - ref).abs().mean() < 0.005


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16"])
def test_transparent_pixels_are_white(tmp_path, mode):
    """A real demo image cut out on a transparent background whose pixels are black underneath (as
    segmentation exports write them), saved as PNG: it preprocesses as the cut-out on white. Dropping
    the alpha, the background was black. A 16-bit grey PNG with one transparent value (a tRNS chunk)
    was composited through Pillow's RGBA conversion, which clips 16-bit values: nearly all white."""
    path = next(iter(sorted((DEMO_IMAGES / "Tripos").glob("*.jpg"))))
    gray = np.asarray(Image.open(path).convert("L"))
    keep = gray < np.median(gray)  # the darker half: the organism, roughly
    cut = np.where(keep, gray, 0).astype(np.uint8)
    alpha = np.where(keep, 255, 0).astype(np.uint8)
    if mode == "P":  # a palette image with one transparent index
        img = Image.fromarray(np.where(keep, gray // 2 * 2, 1).astype(np.uint8), mode="L").convert("P")
        img.info["transparency"] = 1
        white = Image.fromarray(np.where(keep, gray // 2 * 2, 255).astype(np.uint8))
    elif mode == "I;16":  # the 8-bit values v as 257 v; 1 (no 8-bit value's) is the transparent one
        img = Image.fromarray(np.where(keep, gray.astype(np.uint16) * 257, 1).astype(np.uint16))
        img.info["transparency"] = 1
        white = Image.fromarray(np.where(keep, gray, 255).astype(np.uint8))
    else:
        img = Image.merge(mode, [Image.fromarray(cut)] * (3 if mode == "RGBA" else 1) + [Image.fromarray(alpha)])
        white = Image.fromarray(np.where(keep, gray, 255).astype(np.uint8))
    img.save(tmp_path / "cut.png")
    for channels in (1, 3):
        x = preprocess(Image.open(tmp_path / "cut.png"), 32, channels)
        # a 16-bit image is resized unrounded, the 8-bit one in whole values (as in the test above)
        np.testing.assert_allclose(x.numpy(), preprocess(white, 32, channels).numpy(),
                                   atol=0.03 if mode == "I;16" else 1e-6)
        assert x[:, 0, 0].min() == 1.0  # the corner: background, white


def test_a_float_image_with_nan_pixels_is_an_unreadable_image(tmp_path):
    """A float TIFF with NaN pixels (masked pixels of a processed image) is a bad image that decode_rows
    reports, naming the NaN: it decoded to a tensor holding NaN (16 of 1,024 values for 1 NaN pixel of 40 x
    40, spread by resizing), which trains a U-Net to NaN and gives NaN features. Infinite values are out of
    range and clipped, as other values outside [0, 1] are."""
    a = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    nan = a.copy()
    nan[5, 5] = np.nan
    inf = a.copy()
    inf[5, 5], inf[6, 6] = np.inf, -np.inf
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    Image.fromarray(inf).save(tmp_path / "inf.tif")
    images, errors = decode_rows([str(tmp_path / "nan.tif"), str(tmp_path / "inf.tif")], [-1, -1], 32, 1)
    assert "NaN" in errors[0] and not images[0].any()
    assert errors[1] == "" and np.isfinite(images[1]).all()
    clipped = np.clip(inf, 0, 1)
    np.testing.assert_allclose(images[1], preprocess(Image.fromarray(clipped), 32, 1).numpy(), atol=1e-6)


def test_decode_rows_reports_bad_images(tmp_path):
    good = next(iter(sorted((DEMO_IMAGES / "Tripos").glob("*.jpg"))))
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is not a jpeg")
    empty = tmp_path / "empty.jpg"  # a copy that never finished: Pillow's error alone does not say so
    empty.write_bytes(b"")
    images, errors = decode_rows([str(good), str(truncated), str(fake), str(tmp_path / "gone.jpg"), str(empty)],
                                 [-1] * 5, 16, 1)
    assert errors[0] == "" and all(errors[1:])
    assert "FileNotFoundError" in errors[3]
    assert errors[4].startswith("empty file (0 bytes): UnidentifiedImageError") and "empty" not in errors[2]
    assert np.abs(images[0]).sum() > 0 and not images[1:].any()


def test_demo_table_split_is_stratified_and_disjoint(write_pipeline):
    cfg = load_config(write_pipeline())
    t = build_table(cfg)
    f = t.frame
    assert len(f) == 105 and f["image_id"].is_unique
    assert t.classes == sorted(p.name for p in DEMO_IMAGES.iterdir())
    assert set(f["split"]) == {"train", "val", "test"}
    counts = f.groupby(["class_name" if "class_name" in f else "label", "split"]).size().unstack(fill_value=0)
    sizes = counts.sum(axis=1)
    # every class contributes round(20%) of its images to val and to test
    for label, row in counts.iterrows():
        assert row["test"] == round(sizes[label] * 0.2)
        assert row["val"] == round(sizes[label] * 0.2)
    assert f["label"].dtype == np.int32 and set(f["domain"]) == {"plankton"}
    # same seed -> same split; another seed -> another split
    assert build_table(cfg).frame["split"].tolist() == f["split"].tolist()
    other = build_table(load_config(write_pipeline(seed=1))).frame
    assert other["split"].tolist() != f["split"].tolist()


def test_stratified_split_gives_every_class_a_training_image():
    labels = pd.Series(["a"] * 1 + ["b"] * 2 + ["c"] * 50)
    split = stratified_split(labels, 0.3, 0.3, seed=0)
    for c in "abc":
        assert (split[labels == c] == "train").sum() >= 1
    assert (split[labels == "c"] == "test").sum() == 15


def test_split_files_are_used(write_pipeline):
    splits = DEMO_IMAGES.parent / "splits"
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "demo", "splits": {"train": str(splits / "train.txt"), "val": str(splits / "val.txt"),
                                     "test": str(splits / "test.txt")}}}))
    f = build_table(cfg).frame
    assert f["split"].value_counts().to_dict() == {"train": 82, "val": 15, "test": 8}
    listed = [line.split()[0] for line in (splits / "val.txt").read_text().splitlines() if line.strip()]
    assert set(f.loc[f["split"] == "val", "image_id"]) == set(listed)


@pytest.mark.parametrize("form", ["absolute", "file name", "no suffix", "made up"])
def test_split_file_ids_of_another_form_are_explained(tmp_path, write_pipeline, form):
    """A split file that names images otherwise than the dataset does (absolute paths, bare file names, no
    suffix) is a config error that shows the dataset's id for the first one, or what ids look like."""
    splits = DEMO_IMAGES.parent / "splits"
    lines = (splits / "val.txt").read_text().splitlines()
    first = lines[0].split()[0]
    wrong = {"absolute": str(DEMO_IMAGES / first), "file name": first.rsplit("/", 1)[1],
             "no suffix": first.rsplit(".", 1)[0], "made up": "no/such/image.png"}[form]
    (tmp_path / "val.txt").write_text("\n".join([wrong, *lines[1:]]) + "\n")
    cfg = write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "demo", "splits": {"train": str(splits / "train.txt"), "val": str(tmp_path / "val.txt"),
                                     "test": str(splits / "test.txt")}}})
    hint = "the dataset's ids look like '" if form == "made up" else f"the dataset's id for it is probably {first!r}"
    with pytest.raises(ConfigError, match=rf"1 listed image\(s\) are not in the dataset, e.g. '{re.escape(wrong)}' "
                                          rf"\({re.escape(hint)}"):
        build_table(load_config(cfg))


def test_balanced_regime_caps_each_class(write_pipeline):
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "demo", "regime": "balanced", "per_class": 14}}))
    table = build_table(cfg)
    per_class = table.frame.groupby("label").size()
    assert per_class.max() == 14 and per_class.min() == 13  # Tripos has only 13
    # said by validate and extract, with the per_class that would balance them
    assert unbalanced_classes(cfg, table) == {"Tripos": 13}
    assert "1 class(es) have fewer images (Tripos 13)" in unbalanced_warning(cfg, table)
    assert "lower data.train.per_class to 13" in unbalanced_warning(cfg, table)
    at_13 = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "demo", "regime": "balanced", "per_class": 13}}))
    assert unbalanced_warning(at_13, build_table(at_13)) is None
    natural = load_config(write_pipeline())
    assert unbalanced_classes(natural, build_table(natural)) == {}


def test_balanced_regime_advice_keeps_val_and_test(tmp_path, write_pipeline):
    """A class of 2 images under regime balanced: capping every class at 2 would leave no val or test image
    (round(2 x 0.2) = 0), so the warning does not advise it (it did, and validate then failed with it)."""
    import shutil

    from sweep.data.table import _fewest_per_class

    images = tmp_path / "images"
    shutil.copytree(DEMO_IMAGES, images)
    small = sorted(p for p in images.iterdir() if p.is_dir())[0]
    for extra in sorted(small.iterdir())[2:]:
        extra.unlink()
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "imagefolder", "path": str(images), "regime": "balanced", "per_class": 10,
        "splits": {"val": 0.2, "test": 0.2}}}))
    warning = unbalanced_warning(cfg, build_table(cfg))
    assert f"({small.name} 2)" in warning and "lower data.train.per_class" not in warning
    assert "equal classes of 2 would leave val or test empty: the split fractions need 3 per class" in warning
    assert _fewest_per_class(cfg.data.train.splits) == 3  # round(3 x 0.2) = 1 val, 1 test, 1 train
    assert [s for s in stratified_split(pd.Series(["c"] * 3), 0.2, 0.2, 0)].count("val") == 1


def test_ood_unknown_classes_counted_and_excluded(tmp_path, write_pipeline):
    ood = tmp_path / "ood"
    for cls, n in [("Tripos", 3), ("Ciliophora", 2), ("Unheard_of", 4)]:
        (ood / cls).mkdir(parents=True)
        for src in sorted((DEMO_IMAGES / ("Tripos" if cls == "Unheard_of" else cls)).glob("*.jpg"))[:n]:
            (ood / cls / src.name).write_bytes(src.read_bytes())
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1,
                                           "train": {"name": "plankton", "source": "demo"},
                                           "ood": [{"name": "shifted", "source": "imagefolder", "path": str(ood)}]}))
    t = build_table(cfg)
    o = t.frame[t.frame["domain"] == "shifted"]
    assert len(o) == 5 and set(o["split"]) == {"ood"}
    assert t.excluded == {"shifted": {"Unheard_of": 4}}
    # labels are matched by name to the training classes
    assert sorted(o["label"].tolist()) == sorted([t.classes.index("Tripos")] * 3 + [t.classes.index("Ciliophora")] * 2)
    assert "4 image(s) of 1 class(es) unknown to training left out: Unheard_of 4" in t.summary()
    assert "match exactly" not in t.summary()
    # a folder named as a training class but for its case is left out, and the summary says why
    (ood / "Tripos").rename(ood / "tripos")
    t = build_table(cfg)
    assert t.excluded == {"shifted": {"Unheard_of": 4, "tripos": 3}}
    assert "7 image(s) of 2 class(es) unknown to training left out: Unheard_of 4, tripos 3 (class names match " \
           "exactly: 'tripos' is not 'Tripos')" in t.summary()
    (ood / "Ciliophora").rename(ood / "CILIOPHORA")
    with pytest.raises(ConfigError, match="no image of 'shifted' belongs to a training class.*'tripos' is not"):
        build_table(cfg)


def test_manifest_source(tmp_path, write_pipeline):
    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))
    pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files]}).to_csv(
        tmp_path / "m.csv", index=False)
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1,
                                           "train": {"source": "manifest", "path": str(tmp_path / "m.csv")}}))
    t = build_table(cfg)
    assert len(t.frame) == 105 and len(t.classes) == 6


def test_parquet_manifest_with_a_pandas_index_keeps_each_path_with_its_label(tmp_path, write_pipeline):
    """A Parquet manifest written by pandas from a shuffled or filtered frame stores its index, which
    read_parquet restores: the scan paired the paths, in file order, with the ids and labels by index
    label, so every image was read under another image's id and label (filtered: a ValueError)."""
    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))
    frame = pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files]})
    for name, manifest in (("shuffled", frame.sample(frac=1, random_state=0)), ("filtered", frame.iloc[5:])):
        manifest.to_parquet(tmp_path / f"{name}.parquet")  # index stored with the rows
        t = build_table(load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
            "source": "manifest", "path": str(tmp_path / f"{name}.parquet")}})))
        assert len(t.frame) == len(manifest)
        assert (t.frame["path"] == t.frame["image_id"]).all()  # absolute paths: the id is the path itself
        assert [t.classes[label] for label in t.frame["label"]] == [Path(p).parent.name for p in t.frame["path"]]


def test_integer_labels_stored_as_floats_in_parquet_are_the_same_classes(tmp_path, write_pipeline):
    """pandas stores an integer column with a gap as floats: a Parquet manifest's label 3 read '3.0', another
    class than an integer manifest's '3', so an OOD set's images matched no training class."""
    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))
    number = {name: i for i, name in enumerate(sorted({p.parent.name for p in files}))}
    frame = pd.DataFrame({"path": [str(p) for p in files], "label": [number[p.parent.name] for p in files]})
    frame.iloc[::2].to_parquet(tmp_path / "train.parquet")  # int64 labels
    ood = frame.iloc[1::2].astype({"label": "float64"})
    ood.loc[ood.index[0], "label"] = np.nan  # the gap that makes pandas write floats (that row is left out)
    ood.iloc[1:].to_parquet(tmp_path / "ood.parquet")
    t = build_table(load_config(write_pipeline(data={
        "image_size": 16, "channels": 1, "train": {"name": "main", "source": "manifest",
                                                   "path": str(tmp_path / "train.parquet")},
        "ood": [{"name": "other", "source": "manifest", "path": str(tmp_path / "ood.parquet")}]})))
    assert t.classes == [str(i) for i in range(6)]
    other = t.frame[t.frame["domain"] == "other"]
    assert len(other) == len(ood) - 1
    assert [t.classes[label] for label in other["label"]] == [str(number[Path(p).parent.name]) for p in other["path"]]


def test_manifest_paths_written_on_windows_are_read(tmp_path, write_pipeline):
    """A manifest made on Windows names its files with backslashes ('images\\Tripos\\a.jpg'): each is read
    as the file of that path with '/' (every one was missing: 'FileNotFoundError'); its image id stays as
    written. A file whose name holds a backslash is still read as named."""
    import shutil

    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))
    for f in files:
        (tmp_path / "images" / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "images" / f.parent.name / f.name)
    odd = tmp_path / "images" / "Tripos" / "odd\\name.jpg"  # a backslash in a Linux file name
    shutil.copy(files[0], odd)
    rows = [(f"images\\{f.parent.name}\\{f.name}", f.parent.name) for f in files] + [
        ("images/Tripos/odd\\name.jpg", "Tripos")]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "m.csv", index=False)
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1,
                                           "train": {"source": "manifest", "path": str(tmp_path / "m.csv")}}))
    t = build_table(cfg)
    assert len(t.frame) == 106
    assert all(Path(p).is_file() for p in t.frame["path"]), t.frame["path"].head()
    by_id = dict(zip(t.frame["image_id"], t.frame["path"]))
    assert by_id[rows[0][0]] == str(tmp_path / "images" / files[0].parent.name / files[0].name)
    assert by_id["images/Tripos/odd\\name.jpg"] == str(odd)


def test_manifest_split_column(tmp_path, write_pipeline):
    """A manifest's `split` column: train/val/test kept row by row; train/test keeps the test set and draws
    val from train; anything else is a config error naming the file and the values."""
    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))
    given = np.array(["train", "val", "test"] * 35, dtype=object)
    manifest = pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files],
                             "split": given})

    def table(frame):
        frame.to_csv(tmp_path / "m.csv", index=False)
        return build_table(load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
            "source": "manifest", "path": str(tmp_path / "m.csv"), "splits": {"val": 0.25, "test": 0.25}}})))

    t = table(manifest)
    assert dict(zip(t.frame["image_id"], t.frame["split"])) == dict(zip(manifest["path"], given))
    t = table(manifest.assign(split=np.where(given == "test", "test", "train")))
    split = dict(zip(t.frame["image_id"], t.frame["split"]))
    assert [split[p] for p in manifest["path"][given == "test"]] == ["test"] * 35
    assert {split[p] for p in manifest["path"][given != "test"]} == {"train", "val"}
    # a class whose rows are all val or test cannot be predicted: left out, and the summary names it
    only_val = manifest.assign(split=np.where(manifest["label"] == "Tripos", "val", given))
    t = table(only_val)
    assert "Tripos" not in t.classes and t.excluded == {"main": {"Tripos": 13}}
    assert "main: 13 image(s) of 1 class(es) unknown to training left out: Tripos 13" in t.summary()
    for bad, why in [(np.where(given == "val", "validation", given), "column split holds ['validation']"),
                     (np.where(given == "train", None, given), "column split holds ['(empty)']"),
                     (np.where(given == "train", "val", given), "names no train image")]:
        with pytest.raises(ConfigError, match=re.escape(why)):
            table(manifest.assign(split=bad))


def test_manifest_with_train_and_val_splits_draws_test_from_train(tmp_path, write_pipeline):
    """A split column of train and val keeps val and draws test from train (as train/test draws val): the
    study had an empty test split, its report failed at the end."""
    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))
    given = np.array(["train", "train", "val"] * 35, dtype=object)
    pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files],
                  "split": given}).to_csv(tmp_path / "m.csv", index=False)
    t = build_table(load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "manifest", "path": str(tmp_path / "m.csv"), "splits": {"val": 0.25, "test": 0.25}}})))
    split = dict(zip(t.frame["image_id"], t.frame["split"]))
    assert [split[str(p)] for p, g in zip(files, given) if g == "val"] == ["val"] * 35
    drawn = pd.Series([split[str(p)] for p, g in zip(files, given) if g == "train"]).value_counts()
    assert set(drawn.index) == {"train", "test"} and 15 <= drawn["test"] <= 21  # ~ a quarter of 70, per class


def test_an_empty_test_split_is_a_config_error(write_pipeline):
    """Without test images a study ran to its end and its report failed on the empty test columns."""
    with pytest.raises(ConfigError, match=re.escape("data.train: the test split is empty (105 images)")):
        build_table(load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
            "source": "demo", "splits": {"val": 0.2, "test": 0.0}}})))


def _manifest(tmp_path, write_pipeline, text: str | bytes, name: str = "m.csv"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return build_table(load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "manifest", "path": str(path), "splits": {"val": 0.2, "test": 0.2}}})))


def test_class_names_that_differ_only_in_case_are_warned_about(tmp_path, write_pipeline):
    """'Tripos' and 'tripos' stay two classes (they may be), and validate and extract say so."""
    from sweep.data.table import data_warnings

    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))
    rows = [f"{p},{p.parent.name.lower() if i % 2 and p.parent.name == 'Tripos' else p.parent.name}"
            for i, p in enumerate(files)]
    t = _manifest(tmp_path, write_pipeline, "path,label\n" + "\n".join(rows) + "\n")
    assert "Tripos" in t.classes and "tripos" in t.classes and len(t.classes) == 7
    config = load_config(tmp_path / "pipeline.yaml")
    assert ["data.train: 1 group(s) of class names differ only in case ('Tripos' / 'tripos'): each is a class of "
            "its own; if they are one, spell them alike"] == data_warnings(config, t)
    assert not [w for w in data_warnings(config, build_table(load_config(write_pipeline()))) if "case" in w]


def test_manifest_labels_are_trimmed_and_unicode_normalised(tmp_path, write_pipeline):
    """' Tripos', 'Tripos ' and 'Tripos' are one class (a spreadsheet's spaces made three), as are a
    decomposed and a composed 'Ciliés' (macOS writes the first); `Path,Label` headers are read too."""
    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))
    pads = ["", " ", "  "]
    names = {"Ciliophora": "Cilie\u0301s", "Tripos": "Ciliés"}  # decomposed and composed: one class
    rows = [f'"{p}","{pads[i % 3]}{names.get(p.parent.name, p.parent.name)}{pads[(i + 1) % 3]}"'
            for i, p in enumerate(files)]
    t = _manifest(tmp_path, write_pipeline, "Path, Label\n" + "\n".join(rows) + "\n")
    assert t.classes == ["Actinoptychus", "Bacillariophyceae", "Ciliés", "Dinoflagellata", "Noctilucales"]
    assert len(t.frame) == 105


@pytest.mark.parametrize("case, message", [
    ("empty_label", "row(s) 3 (counting data rows from 1) have no label"),
    ("empty_row", "row(s) 2 (counting data rows from 1) have no path"),
    ("same_image_twice", "lists 1 image(s) more than once, e.g. '{p0}' (rows 1, 4)"),
    ("latin1", "is not UTF-8 text (byte 0xe9"),
    ("semicolons", "lacks column(s) ['label', 'path']: its columns are ['path;label']; the file seems separated "
                   "by ';'"),
])
def test_manifest_mistakes_are_config_errors_naming_the_rows(tmp_path, write_pipeline, case, message):
    files = sorted(DEMO_IMAGES.glob("*/*.jpg"))[:3]
    p0 = files[0]
    text = {
        "empty_label": f"path,label\n{files[0]},A\n{files[1]},B\n{files[2]},\n",
        "empty_row": f"path,label\n{files[0]},A\n,\n{files[2]},B\n",
        # the same file, once spelled through its folder's parent: one image in train and in test
        "same_image_twice": f"path,label,split\n{p0},A,train\n{files[1]},B,val\n{files[2]},B,train\n"
                            f"{p0.parent}/../{p0.parent.name}/{p0.name},A,test\n",
        "latin1": f"path,label\n{files[0]},Cilié\n{files[1]},B\n".encode("latin-1"),
        "semicolons": f"path;label\n{files[0]};A\n{files[1]};B\n",
    }[case]
    with pytest.raises(ConfigError, match=re.escape(message.format(p0=p0))):
        _manifest(tmp_path, write_pipeline, text)


def test_split_files_hold_ids_with_spaces(tmp_path, write_pipeline):
    """Ids of files and class folders with spaces ('Chaetoceros spp/img 01.png') are whole lines, or lines
    with a label after them; a byte-order mark is not part of the first id."""
    root = tmp_path / "images"
    ids = []
    for c, cls in enumerate(["Chaetoceros spp", "Tripos"]):
        (root / cls).mkdir(parents=True)
        for i, f in enumerate(sorted((DEMO_IMAGES / "Tripos").glob("*.jpg"))[:9]):
            (root / cls / f"img {i:02d}.jpg").write_bytes(f.read_bytes())
            ids.append((f"{cls}/img {i:02d}.jpg", cls))
    lists = {"train": ids[0:6] + ids[9:15], "val": ids[6:8] + ids[15:17], "test": ids[8:9] + ids[17:18]}
    splits = {}
    for name, members in lists.items():
        lines = [f"{i} {label}" if k % 2 else i for k, (i, label) in enumerate(members)]
        (tmp_path / f"{name}.txt").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
        splits[name] = str(tmp_path / f"{name}.txt")
    t = build_table(load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "imagefolder", "path": str(root), "splits": splits}})))
    assert dict(zip(t.frame["image_id"], t.frame["split"])) == {i: name for name, m in lists.items() for i, _ in m}


def test_imagefolder_scan_skips_what_is_not_an_image_and_says_so(tmp_path, write_pipeline):
    """Hidden and NAS metadata folders (Synology's @eaDir thumbnails: near-duplicates) are not entered, a
    linked folder inside a class is, PGM, JFIF and JPEG 2000 files are images; files without an image suffix, broken
    links, class folders without images and loose files are passed over and counted in `ignored` and the
    data warnings."""
    from sweep.data.table import data_warnings

    src = sorted((DEMO_IMAGES / "Tripos").glob("*.jpg"))
    root, elsewhere = tmp_path / "images", tmp_path / "more"
    for cls in ("Tripos", "Ciliophora"):
        (root / cls).mkdir(parents=True)
        for i, f in enumerate(src[:4]):
            (root / cls / f"{i}.jpg").write_bytes(f.read_bytes())
    for hidden in (".thumbnails", "@eaDir/0.jpg"):
        (root / "Tripos" / hidden).mkdir(parents=True)
        (root / "Tripos" / hidden / "thumb.jpg").write_bytes(src[0].read_bytes())
    elsewhere.mkdir()
    for i, f in enumerate(src[4:7]):
        (elsewhere / f"{i}.jpg").write_bytes(f.read_bytes())
    (root / "Tripos" / "linked").symlink_to(elsewhere, target_is_directory=True)
    Image.open(src[0]).convert("L").save(root / "Ciliophora" / "gray.pgm")
    (root / "Ciliophora" / "photo.jfif").write_bytes(src[1].read_bytes())
    Image.open(src[0]).convert("L").save(root / "Ciliophora" / "scan.jp2")  # JPEG 2000 (lossless): was passed over
    (root / "Ciliophora" / "notes.txt").write_text("not an image")
    (root / "Ciliophora" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "Empty").mkdir()
    (root / "loose.jpg").write_bytes(src[0].read_bytes())
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "name": "main", "source": "imagefolder", "path": str(root)}}))
    t = build_table(cfg)
    assert sorted(t.frame["image_id"]) == sorted(
        [f"{c}/{i}.jpg" for c in ("Tripos", "Ciliophora") for i in range(4)]
        + [f"Tripos/linked/{i}.jpg" for i in range(3)] + ["Ciliophora/gray.pgm", "Ciliophora/photo.jfif",
                                                           "Ciliophora/scan.jp2"])
    pgm, jp2 = decode_rows([str(root / "Ciliophora" / n) for n in ("gray.pgm", "scan.jp2")], [-1, -1], 16, 1)[0]
    np.testing.assert_array_equal(pgm, jp2)
    assert sorted((reason, count) for reason, count, _ in t.ignored["main"]) == [
        ("broken link(s)", 1), ("file(s) beside the class folders", 1), ("file(s) without an image suffix", 1),
        ("folder(s) without images", 1), ("hidden or metadata folder(s)", 2)]
    warning = next(w for w in data_warnings(cfg, t) if w.startswith("not read as images"))
    assert "1 file(s) without an image suffix (e.g. 'Ciliophora/notes.txt')" in warning


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_source(tmp_path, write_pipeline):
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 40), ("t10k", 10)]:
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 4)
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "fashion-mnist", "path": str(tmp_path), "splits": {"val": 0.25, "test": 0.0}}}))
    t = build_table(cfg)
    f = t.frame
    assert f["split"].value_counts().to_dict() == {"train": 32, "val": 8, "test": 10}
    assert t.classes == sorted(["T-shirt/top", "Trouser", "Pullover", "Dress"])
    row = f[f["image_id"] == "train/00005"].iloc[0]
    images, errors = decode_rows([row["path"]], [row["index"]], 28, 1)
    raw = np.frombuffer(gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()[16:], np.uint8).reshape(40, 28, 28)
    np.testing.assert_allclose(images[0, 0], raw[5] / 127.5 - 1, atol=1e-6)


def test_classes_too_small_for_a_val_or_test_image_are_named(write_pipeline):
    """At 3 % val and test a class needs 17 images for one of each (round(n * 0.03) >= 1): the smaller demo
    classes are trained on but have none; validate and extract name them."""
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "demo", "splits": {"val": 0.03, "test": 0.03}}}))
    table = build_table(cfg)
    counts = {c: len(list((DEMO_IMAGES / c).glob("*.jpg"))) for c in table.classes}
    small = {c: n for c, n in counts.items() if round(n * 0.03) == 0}
    assert small and len(small) < len(counts)
    assert unscored_classes(cfg, table) == {"val": small, "test": small}
    warning = unscored_warning(cfg, table)
    assert warning.startswith("data.train: no val image for ") and "; no test image for " in warning
    assert all(f"{c} ({n} image{'' if n == 1 else 's'})" in warning for c, n in small.items())
    assert unscored_warning(load_config(write_pipeline()), build_table(load_config(write_pipeline()))) is None


def test_unscored_warning_counts_the_classes_when_it_names_only_some(write_pipeline, tmp_path):
    """Hundreds of classes on a long tail: the warning names 5 classes; it must also say how many lack a val
    or test image (it said "A, B, C, D, E, ..." whether 6 or 150 of them did)."""
    sizes = {**{f"rare {i:02d} é": 1 for i in range(12)}, "common": 10}
    root = image_folder(tmp_path / "folder", sizes)
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
        "source": "imagefolder", "path": str(root), "splits": {"val": 0.15, "test": 0.15}}}))
    table = build_table(cfg)
    assert set(unscored_classes(cfg, table)["val"]) == {c for c, n in sizes.items() if n == 1}
    warning = unscored_warning(cfg, table)
    assert "no val image for 12 of 13 classes: rare 00 é (1 image), " in warning
    assert "; no test image for 12 of 13 classes: " in warning and ", ..." in warning


def test_a_limit_kept_well_over_is_warned_of(write_pipeline, tmp_path):
    """Each class keeps at least one image under `data.train.limit`: 30 classes of 2 images and one of 40 at
    limit 20 keep 8 + 30 = 38 images: said (200 small classes turned a limit of 300 into 374, said nowhere)."""
    root = image_folder(tmp_path / "folder", {**{f"rare {i:02d}": 2 for i in range(30)}, "common": 40})

    def config(limit):
        return load_config(write_pipeline(data={"image_size": 16, "channels": 1, "train": {
            "source": "imagefolder", "path": str(root), "limit": limit}}))

    table = build_table(config(20))
    assert len(table.frame) == 38
    assert over_limit_warning(config(20), table) == (
        "data.train.limit=20 keeps 38 images: each of the 31 classes keeps at least one image, so the total exceeds "
        "the limit by up to one image per class")
    assert over_limit_warning(config(35), table) is None  # within 10 % of it


def test_ood_set_of_no_training_class_names_a_few_of_each_side(write_pipeline, tmp_path):
    """With 200 training classes the error listed all 200 (4 kB on one line) and none of the OOD set's own
    names; it now gives counts and up to 10 names of each."""
    root, ood = image_folder(tmp_path / "train", {f"class {k:02d} ß": 4 for k in range(40)}), tmp_path / "ood"
    for name in ("Mystère", "Other"):
        (ood / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(ood / name / "x.png")
    cfg = load_config(write_pipeline(data={"image_size": 16, "channels": 1,
                                           "train": {"source": "imagefolder", "path": str(root)},
                                           "ood": [{"name": "far", "source": "imagefolder", "path": str(ood)}]}))
    with pytest.raises(ConfigError) as err:
        build_table(cfg)
    message = str(err.value)
    assert ("no image of 'far' belongs to a training class (its 2 class(es): 'Mystère', 'Other'; training's 40 "
            "class(es): 'class 00 ß', ") in message and "'class 09 ß', ...)" in message
    assert "class 10" not in message and len(message) < 400
