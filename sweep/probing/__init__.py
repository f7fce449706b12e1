"""Linear probes (many heads at once), metrics and k-means analysis. Pure torch/numpy/sklearn, no Ray."""

from .kmeans import kmeans_scores
from .linear import ProbeConfig, ProbeResult, Split, probe_epochs, train_probe
from .metrics import classification_metrics

__all__ = ["ProbeConfig", "ProbeResult", "Split", "probe_epochs", "train_probe", "classification_metrics",
           "kmeans_scores"]
