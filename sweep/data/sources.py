"""Image sources: scan a dataset into a table of (image_id, path, index, class) without decoding images.

Decoding happens later, in parallel (Ray Data tasks), through `load_image`. A table row points at its
pixels either by a file `path` (index -1) or by a `path` to an idx `.gz` file and a record `index`.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import unicodedata
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from sweep.config import ConfigError, DatasetSpec, not_utf8

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm",
                  ".ppm", ".pbm", ".pnm", ".jp2", ".j2k"}  # JPEG 2000: some microscopes and archives write it
# Folders an image folder's scan never enters (besides hidden ones): thumbnails and metadata that NAS and
# operating systems write beside images (Synology's @eaDir holds a near-duplicate JPEG of every image)
METADATA_DIRS = {"@eaDir", "__MACOSX", "$RECYCLE.BIN", "System Volume Information", "#recycle", "#snapshot"}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

COLUMNS = ["image_id", "path", "index", "class_name", "official_split"]


def demo_root() -> Path:
    """The vendored FlowCam plankton demo set (105 images, 6 classes, Apache-2.0; see its README)."""
    return Path(str(resources.files("sweep.data") / "demo" / "plankton-flowcam-demo"))


def class_name(name) -> str:
    """A class name as sources compare it: without surrounding spaces (spreadsheets leave them) and in
    Unicode NFC (macOS writes folder names decomposed: 'Cilie\u0301s' and 'Ciliés' print alike)."""
    return unicodedata.normalize("NFC", str(name).strip())


def scan(spec: DatasetSpec, where: str) -> pd.DataFrame:
    """Rows of COLUMNS for every image of a dataset; `official_split` is set where the source defines
    one (Fashion-MNIST's train/test), else None. `where` names the config key for error messages.
    What an image folder's scan passed over is in the frame's ``attrs["ignored"]``: (reason, count,
    example) tuples."""
    if spec.source == "demo":
        root = Path(spec.path) if spec.path else demo_root() / "images"
        return _scan_imagefolder(root, where)
    if spec.source == "imagefolder":
        return _scan_imagefolder(Path(spec.path), where)
    if spec.source == "manifest":
        return _scan_manifest(Path(spec.path), where)
    if spec.source == "fashion-mnist":
        return _scan_fashion_mnist(Path(spec.path), where)
    raise ConfigError(f"{where}.source: unknown source {spec.source!r}")


def _walk_files(folder: Path):
    """Every file below `folder`, following symbolic links to folders (each real folder once), leaving out
    hidden files and folders and METADATA_DIRS; yields (path, skipped_dir) where skipped_dir is set for the
    folders left out (path None)."""
    seen = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        for d in sorted(dirs):
            if d.startswith(".") or d in METADATA_DIRS:
                yield None, Path(top, d)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in METADATA_DIRS)
        for f in sorted(files):
            if not f.startswith("."):
                yield Path(top, f), None


def _scan_imagefolder(root: Path, where: str) -> pd.DataFrame:
    if not root.is_dir():
        raise ConfigError(f"{where}.path: not a folder: {root}")
    rows, ignored = [], {}

    def ignore(reason: str, path: Path) -> None:
        count, example = ignored.get(reason, (0, path.relative_to(root).as_posix()))
        ignored[reason] = (count + 1, example)

    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in METADATA_DIRS:
            continue
        if not entry.is_dir():
            ignore("file(s) beside the class folders", entry)
            continue
        name, found = class_name(entry.name), 0
        for f, skipped_dir in _walk_files(entry):
            if skipped_dir is not None:
                ignore("hidden or metadata folder(s)", skipped_dir)
            elif f.suffix.lower() not in IMAGE_SUFFIXES:
                ignore("file(s) without an image suffix", f)
            elif not f.is_file():
                ignore("broken link(s)", f)
            else:
                rows.append((f.relative_to(root).as_posix(), str(f), -1, name, None))
                found += 1
        if not found:
            ignore("folder(s) without images", entry)
    if not rows:
        raise ConfigError(
            f"{where}.path: no class folders with images in {root} "
            f"(expected {root}/<class>/<image>{{{','.join(sorted(IMAGE_SUFFIXES))}}})"
        )
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs["ignored"] = [(reason, count, example) for reason, (count, example) in ignored.items()]
    return frame


MANIFEST_SPLITS = ("train", "val", "test")


def _read_manifest(path: Path, where: str) -> pd.DataFrame:
    """The manifest as text columns (an empty cell: ""), column names stripped and lower-cased."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors: not a Parquet file, truncated, ...
            raise ConfigError(f"{where}.path: manifest {path} is not a readable Parquet file: {e}") from None
        # row positions, not the index pandas stores with a frame it wrote (a shuffled or filtered one's
        # labels are out of order): the scan pairs columns it derives by position
        for column in table.columns:  # pandas stores integer labels with a gap as floats: 3.0 is class '3'
            values = table[column]
            if values.dtype.kind == "f" and values.notna().any() and (values.dropna() % 1 == 0).all():
                table[column] = values.astype("Int64")
        table = table.astype(object).where(table.notna(), "").astype(str).reset_index(drop=True)
    elif suffix in (".csv", ".tsv"):
        try:
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                                encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}.path: manifest {not_utf8(path, e)}") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise ConfigError(f"{where}.path: manifest {path} is not a readable {suffix[1:].upper()} table: "
                              f"{str(e).strip()}") from None
    else:
        raise ConfigError(f"{where}.path: a manifest must be .csv, .tsv or .parquet, got {path.name}")
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = {"path", "label"} - set(table.columns)
    if missing:
        found = list(table.columns)
        hint = (f"; the file seems separated by {sep!r}" if len(found) == 1 and
                (sep := next((c for c in (";", "\t", ",", "|") if c in found[0]), None)) else "")
        raise ConfigError(f"{where}.path: manifest {path} lacks column(s) {sorted(missing)}: its columns are "
                          f"{found}{hint} (a .csv is comma-separated, a .tsv tab-separated)")
    if table.empty:
        raise ConfigError(f"{where}.path: manifest {path} has no rows")
    return table


def _rows(mask) -> str:
    rows = [str(i + 1) for i in np.flatnonzero(mask)]
    return ", ".join(rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def _windows_path(rel: str, base: Path) -> str:
    """The file a manifest row names with backslashes, as a manifest made on Windows writes them
    ('images\\Tripos\\a.jpg'): the path with '/' where no file has the name as written (a backslash
    is a character of a file name here)."""
    as_written = rel if Path(rel).is_absolute() else str(base / rel)
    if os.sep == "\\" or os.path.lexists(as_written):
        return as_written
    slashed = rel.replace("\\", "/")
    return slashed if Path(slashed).is_absolute() else str(base / slashed)


def _scan_manifest(path: Path, where: str) -> pd.DataFrame:
    table = _read_manifest(path, where)
    rel = table["path"].str.strip()
    labels = table["label"].map(class_name)
    for column, values in (("path", rel), ("label", labels)):
        if (values == "").any():
            raise ConfigError(f"{where}.path: manifest {path}: row(s) {_rows(values == '')} (counting data rows "
                              f"from 1) have no {column}")
    base = path.parent  # relative paths are relative to the manifest's folder
    full = pd.Series([_windows_path(p, base) if "\\" in p else p if Path(p).is_absolute() else str(base / p)
                      for p in rel])
    resolved = full.map(os.path.normpath)
    repeated = resolved.duplicated(keep=False)
    if repeated.any():
        first = resolved[repeated].iloc[0]
        rows = _rows(resolved == first)
        raise ConfigError(
            f"{where}.path: manifest {path} lists {resolved[repeated].nunique()} image(s) more than once, e.g. "
            f"{rel[resolved == first].iloc[0]!r} (rows {rows}); each image may have one row (one label, one split)")
    split = [None] * len(table)
    if "split" in table.columns:
        given = table["split"].str.strip().str.lower()
        bad = sorted({v or "(empty)" for v in given if v not in MANIFEST_SPLITS})
        if bad:
            raise ConfigError(f"{where}.path: manifest {path}: column split holds {bad[:5]}; each row's split must be "
                              f"one of {', '.join(MANIFEST_SPLITS)} (or leave the column out: then the splits are "
                              f"drawn by {where}.splits)")
        if not (given == "train").any():
            raise ConfigError(f"{where}.path: manifest {path}: column split names no train image")
        split = given
    return pd.DataFrame({
        "image_id": rel, "path": full, "index": -1, "class_name": labels, "official_split": split,
    })[COLUMNS]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, ndim = struct.unpack(">HxB", data[:4])[0], data[3]
    if magic != 0:
        raise ValueError(f"{path}: not an idx file")
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=4)
def _idx_images(path: str) -> np.ndarray:
    # one decompression per worker process, then every image is a slice
    return _read_idx(Path(path))


def _scan_fashion_mnist(root: Path, where: str) -> pd.DataFrame:
    frames = []
    for split, (images, labels) in FASHION_MNIST_FILES.items():
        img_path, lab_path = root / images, root / labels
        for p in (img_path, lab_path):
            if not p.is_file():
                raise ConfigError(
                    f"{where}.path: {p} not found (install it with `apt-get install dataset-fashion-mnist` "
                    f"or point path at a folder holding the standard idx .gz files)"
                )
        y = _read_idx(lab_path)
        frames.append(pd.DataFrame({
            "image_id": [f"{split}/{i:05d}" for i in range(len(y))], "path": str(img_path),
            "index": np.arange(len(y)), "class_name": [FASHION_MNIST_CLASSES[v] for v in y],
            "official_split": split,
        }))
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def load_image(path: str, index: int) -> Image.Image:
    """Decode one image of a table row (fully, so truncated files fail here and not later)."""
    if index >= 0:
        return Image.fromarray(_idx_images(path)[index], mode="L")
    with Image.open(path) as im:
        im.load()
        return im.copy()
