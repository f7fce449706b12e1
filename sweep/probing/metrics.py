"""Classification metrics under the contract names (``<prefix>_acc``, ``<prefix>_macro_f1``, ...).

Counted here with numpy, equal to scikit-learn's `accuracy_score`, `f1_score(labels=np.unique(y_true),
average="macro")` and `balanced_accuracy_score` (tests/test_probing.py checks that on random and edge
cases). Importing `sklearn.metrics` pulls in scipy.stats and pandas: ~2.5 s of CPU in every probe
trial worker on a 2-core machine, for three counts over a confusion matrix.
"""

from __future__ import annotations

import numpy as np


def _counts(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How many of `values` equal each of the sorted `labels` (values not among them are not counted)."""
    idx = np.minimum(np.searchsorted(labels, values), len(labels) - 1)
    return np.bincount(idx[labels[idx] == values], minlength=len(labels))


def classification_metrics(y_true, y_pred, prefix: str, balanced: bool = False) -> dict[str, float]:
    """Accuracy and macro F1 (plus balanced accuracy when ``balanced``) as ``{prefix}_<name>``.

    Macro F1 averages over the classes present in ``y_true``: the split's own classes, the same label set
    whichever head predicts (scikit-learn's ``f1_score(labels=np.unique(y_true), average="macro")``). A
    prediction of a class the split does not have is an error that lowers the recall of the image's true
    class. (Averaging over every training class, as sweep did before probe revision 2, scored a perfect
    prediction on 2 of 6 classes 0.33; over the classes true or predicted, one stray prediction of an
    absent class added a 0 to one head's average and not to another's.) Balanced accuracy is the recall
    averaged over the same classes. An empty split gives NaN (e.g. an OOD set with no matching class)
    instead of failing.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    names = ["acc", "macro_f1"] + (["balanced_acc"] if balanced else [])
    if y_true.size == 0:
        return {f"{prefix}_{n}": float("nan") for n in names}
    labels = np.unique(y_true)
    hit = y_true == y_pred
    true_n, pred_n, tp = _counts(y_true, labels), _counts(y_pred, labels), _counts(y_true[hit], labels)
    f1 = 2.0 * tp / (true_n + pred_n)  # 2 TP / (2 TP + FP + FN); every label here has true images
    out = {f"{prefix}_acc": float(hit.mean()), f"{prefix}_macro_f1": float(f1.mean())}
    if balanced:
        out[f"{prefix}_balanced_acc"] = float((tp / true_n).mean())
    return out
