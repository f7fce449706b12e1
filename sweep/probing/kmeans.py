"""Training-free class separability: k-means on standardised features, scored against labels."""

from __future__ import annotations

import numpy as np


MAX_ROWS = 10_000  # k-means on at most this many rows (a seeded sample): its cost grows with rows x k x dim


def kmeans_scores(X, y, k: int, seed: int = 0, n_init: int = 3, max_rows: int = MAX_ROWS,
                  rows: np.ndarray | None = None) -> dict[str, float]:
    """``{"kmeans_nmi", "kmeans_ari"}`` of KMeans(k) clusters against labels ``y``, on all rows or a seeded
    sample of ``max_rows`` of them. ``rows``: the indices of the rows of ``X`` and ``y`` to score (default:
    all); the same scores as ``X[rows], y[rows]``, without copying those rows beyond the sample.

    Features are standardised per dimension (zero-variance dimensions left at 0) so that no single
    high-variance channel dominates the Euclidean distance. ``n_init`` is small and fixed: the score
    is a diagnostic, and a fixed seed keeps it reproducible. NMI is not corrected for chance (random
    clusters score about 0.33 on 22 rows in 6 classes, 0.08 on 105, 0.01 on 500); ARI is (0 = chance).
    """
    # imported here: only sweeps with k-means on pay scikit-learn's import (~2.5 s) in their workers
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    X = np.asarray(X)
    y = np.asarray(y).ravel()
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X must be (N, D) with N == len(y); got X {X.shape}, y {y.shape}")
    rows = np.arange(len(X)) if rows is None else np.asarray(rows)
    if not 1 <= k <= len(rows):
        raise ValueError(f"k must be in [1, {len(rows)}] (number of samples); got {k}")
    if len(rows) > max_rows:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))]
    # the sample's rows alone, in float64: cast before the sample, a 1M x 1024 float16 column took 8 GiB
    X, y = X[rows].astype(np.float64), y[rows]
    std = X.std(axis=0)
    Xs = (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(Xs)
    return {
        "kmeans_nmi": float(normalized_mutual_info_score(y, clusters)),
        "kmeans_ari": float(adjusted_rand_score(y, clusters)),
    }


def chance_nmi(y, k: int, seed: int = 0, draws: int = 5, max_rows: int = MAX_ROWS) -> float:
    """The NMI of random clusters (each row in one of ``k`` at random) against labels ``y``, on the rows
    `kmeans_scores` uses, averaged over ``draws``: what an NMI of no class information scores on this data
    (about 0.33 on 22 rows in 6 classes, 0.08 on 105, under 0.01 on thousands)."""
    from sklearn.metrics import normalized_mutual_info_score

    y = np.asarray(y).ravel()
    if len(y) > max_rows:
        y = y[np.sort(np.random.default_rng(seed).choice(len(y), max_rows, replace=False))]
    rng = np.random.default_rng(seed + 1)
    return float(np.mean([normalized_mutual_info_score(y, rng.integers(0, k, len(y))) for _ in range(draws)]))
