"""Classification metrics under the contract names (``<prefix>_acc``, ``<prefix>_macro_f1``, ...)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def classification_metrics(
    y_true,
    y_pred,
    prefix: str,
    num_classes: int | None = None,
    balanced: bool = False,
) -> dict[str, float]:
    """Accuracy and macro F1 (plus balanced accuracy when ``balanced``) as ``{prefix}_<name>``.

    Macro F1 averages over ``range(num_classes)`` (the training classes) with ``zero_division=0``, so a
    split that lacks a class is scored on the same label set as every other split; a class that is
    neither present nor predicted counts as F1 = 0. Without ``num_classes`` the labels seen in either
    array are used. An empty split gives NaN (e.g. an OOD set with no matching class) instead of failing.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    names = ["acc", "macro_f1"] + (["balanced_acc"] if balanced else [])
    if y_true.size == 0:
        return {f"{prefix}_{n}": float("nan") for n in names}
    labels = (
        list(range(num_classes))
        if num_classes is not None
        else sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    )
    out = {
        f"{prefix}_acc": float(accuracy_score(y_true, y_pred)),
        f"{prefix}_macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
    }
    if balanced:
        # Recall averaged over the classes present in y_true (absent classes have no recall); sklearn
        # warns when y_pred holds other classes, which is expected here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out[f"{prefix}_balanced_acc"] = float(balanced_accuracy_score(y_true, y_pred))
    return out
