"""Datasets: sources, splits and the one `preprocess` every stage feeds a model."""

from sweep.data.preprocess import preprocess
from sweep.data.sources import demo_root, load_image
from sweep.data.table import ImageTable, build_table

__all__ = ["preprocess", "load_image", "demo_root", "build_table", "ImageTable"]
