"""Image sources: scan a dataset into a table of (image_id, path, index, class) without decoding images.

Decoding happens later, in parallel (Ray Data tasks), through `load_image`. A table row points at its
pixels either by a file `path` (index -1) or by a `path` to an idx `.gz` file and a record `index`.
"""

from __future__ import annotations

import functools
import gzip
import struct
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from sweep.config import ConfigError, DatasetSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}

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


def scan(spec: DatasetSpec, where: str) -> pd.DataFrame:
    """Rows of COLUMNS for every image of a dataset; `official_split` is set where the source defines
    one (Fashion-MNIST's train/test), else None. `where` names the config key for error messages."""
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


def _scan_imagefolder(root: Path, where: str) -> pd.DataFrame:
    if not root.is_dir():
        raise ConfigError(f"{where}.path: not a folder: {root}")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                rows.append((f.relative_to(root).as_posix(), str(f), -1, class_dir.name, None))
    if not rows:
        raise ConfigError(
            f"{where}.path: no class folders with images in {root} "
            f"(expected {root}/<class>/<image>{{{','.join(sorted(IMAGE_SUFFIXES))}}})"
        )
    return pd.DataFrame(rows, columns=COLUMNS)


MANIFEST_SPLITS = ("train", "val", "test")


def _scan_manifest(path: Path, where: str) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        raise ConfigError(f"{where}.path: a manifest must be .csv, .tsv or .parquet, got {path.name}")
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ConfigError(f"{where}.path: manifest {path} lacks column(s) {sorted(missing)}")
    if table.empty:
        raise ConfigError(f"{where}.path: manifest {path} has no rows")
    base = path.parent
    rel = table["path"].astype(str)
    full = [p if Path(p).is_absolute() else str(base / p) for p in rel]
    split = [None] * len(table)
    if "split" in table.columns:
        given = table["split"]
        bad = sorted({"(empty)" if pd.isna(v) else str(v) for v in given
                      if not isinstance(v, str) or v not in MANIFEST_SPLITS})
        if bad:
            raise ConfigError(f"{where}.path: manifest {path}: column split holds {bad[:5]}; each row's split must be "
                              f"one of {', '.join(MANIFEST_SPLITS)} (or leave the column out: then the splits are "
                              f"drawn by {where}.splits)")
        if not (given == "train").any():
            raise ConfigError(f"{where}.path: manifest {path}: column split names no train image")
        split = given.astype(str)
    return pd.DataFrame({
        "image_id": rel, "path": full, "index": -1,
        "class_name": table["label"].astype(str), "official_split": split,
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
