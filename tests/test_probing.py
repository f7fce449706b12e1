"""Tests of sweep.probing: metrics, the many-heads linear probe, k-means scores."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from threadpoolctl import threadpool_limits

from sweep.probing import ProbeConfig, Split, classification_metrics, kmeans_scores, probe_epochs, train_probe
from sweep.probing.linear import _acc_f1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # One thread for torch, BLAS and sklearn's OpenMP: on a small shared machine, spinning
    # threads make these runs ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(n)


def _splits(X, y, sizes):
    """Consecutive train / val / test splits with float16 features, like the feature store."""
    X = X.astype(np.float16)
    edges = np.cumsum([0, *sizes])
    return [Split(X[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]


@pytest.fixture(scope="module")
def medium():
    """Non-trivial 5-class problem (~80-90% linear accuracy), offset and scaled features."""
    X, y = make_classification(
        n_samples=18000, n_features=64, n_informative=24, n_redundant=8, n_classes=5,
        n_clusters_per_class=2, class_sep=2.0, flip_y=0.01, random_state=0,
    )
    return _splits(X * 2 + 0.5, y, [6000, 6000, 6000])


@pytest.fixture(scope="module")
def small():
    X, y = make_classification(
        n_samples=3000, n_features=32, n_informative=12, n_classes=4, n_clusters_per_class=1,
        class_sep=1.0, random_state=1,
    )
    return _splits(X * 3 - 1, y, [1500, 750, 750])


SMALL_CFG = ProbeConfig(lrs=[1e-2, 1e-1], weight_decays=[1e-4, 1e-2], epochs=10, batch_size=128)


# ---------------------------------------------------------------- metrics


def test_metrics_match_hand_computation():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 2])
    m = classification_metrics(y_true, y_pred, "test", balanced=True)
    assert set(m) == {"test_acc", "test_macro_f1", "test_balanced_acc"}
    assert m["test_acc"] == pytest.approx(5 / 7)
    # F1 per class: 0 -> 2*1/(2+1+1), 1 -> 4/5, 2 -> 4/5; averaged over the split's classes
    assert m["test_macro_f1"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert m["test_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro"))
    assert m["test_balanced_acc"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert set(classification_metrics(y_true, y_pred, "ood_x")) == {"ood_x_acc", "ood_x_macro_f1"}
    empty = classification_metrics([], [], "ood_y")
    assert all(np.isnan(v) for v in empty.values())
    # an OOD set of 2 of the training classes, predicted perfectly: 1, not 2/6
    assert classification_metrics([0, 0, 1, 1, 1], [0, 0, 1, 1, 1], "ood_z")["ood_z_macro_f1"] == 1.0
    # predicting a class the set does not have is an error of the true class (its recall), not a 0 added to
    # the average: the label set is the split's, whichever head predicts
    assert classification_metrics([0, 0, 1, 1], [0, 0, 1, 5], "ood_z")["ood_z_macro_f1"] == pytest.approx(
        (1 + 2 / 3) / 2)


@pytest.mark.parametrize("case", range(6))
def test_metrics_equal_sklearn(case):
    # The contract metrics are counted with numpy; they must equal scikit-learn's on random labels,
    # with classes absent from y_true or y_pred, and with non-contiguous labels.
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    rng = np.random.default_rng(case)
    C, n = [2, 5, 10, 10, 7, 3][case], int(rng.integers(1, 300))
    y_true = rng.integers(0, max(1, C - case % 3), n)  # the top classes absent from y_true for some cases
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, C, n))
    if case == 5:  # arbitrary label values
        y_true, y_pred = y_true * 7 + 3, y_pred * 7 + 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_bal = balanced_accuracy_score(y_true, y_pred)
    m = classification_metrics(y_true, y_pred, "x", balanced=True)
    assert m["x_acc"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert m["x_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro"),
                                            abs=1e-12)
    assert m["x_balanced_acc"] == pytest.approx(ref_bal, abs=1e-12)


def test_vectorised_head_metrics_match_sklearn():
    # The probe scores every head from confusion matrices; they must equal the sklearn metrics.
    rng = np.random.default_rng(0)
    C, n = 6, 500
    y = rng.integers(0, C - 1, n)  # class C-1 absent from the labels
    preds = [rng.integers(0, C, n), np.where(rng.random(n) < 0.7, y, 0)]

    conf = torch.zeros(len(preds), C, C, dtype=torch.long)
    for h, p in enumerate(preds):
        np.add.at(conf[h].numpy(), (y, p), 1)
    acc, f1 = _acc_f1(conf)
    for h, p in enumerate(preds):
        ref = classification_metrics(y, p, "val")
        assert acc[h] == pytest.approx(ref["val_acc"])
        assert f1[h] == pytest.approx(ref["val_macro_f1"])


# ---------------------------------------------------------------- linear probe


def test_probe_matches_sklearn_logistic_regression(medium):
    train, val, test = medium
    wds = [1e-4, 1e-3, 1e-2]
    cfg = ProbeConfig(lrs=[1e-3, 1e-2, 1e-1], weight_decays=wds, epochs=30, batch_size=256, select="val_acc")
    res = train_probe(train, val, test, {}, 5, cfg)

    # sklearn on the same train-standardised features, C chosen on the same val split from the
    # grid equivalent to the probe's weight decays: C = 1 / (wd * N_train).
    Xtr = train.X.astype(np.float64)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    best = None
    for wd in wds:
        lr = LogisticRegression(C=1 / (wd * len(Xtr)), max_iter=5000, tol=1e-8)
        lr.fit((Xtr - mu) / sd, train.y)
        val_acc = (lr.predict((val.X - mu) / sd) == val.y).mean()
        if best is None or val_acc > best[0]:
            best = (val_acc, (lr.predict((test.X - mu) / sd) == test.y).mean())
    gap = res.metrics["test_acc"] - best[1]
    print(f"probe test_acc {res.metrics['test_acc']:.4f} sklearn {best[1]:.4f} gap {100 * gap:+.2f} points")
    assert 0.75 < best[1] < 0.97  # non-trivial problem
    assert abs(gap) <= 0.005
    assert set(res.metrics) == {"val_acc", "val_macro_f1", "test_acc", "test_macro_f1", "test_balanced_acc"}
    assert len(res.head_scores) == 9 and res.epochs_run == 30
    # Without early stopping a head is its converged final weights: the reported val metrics are
    # the chosen head's at the last epoch.
    assert res.best_epoch == res.epochs_run == 30
    assert res.metrics["val_acc"] == pytest.approx(res.history[-1]["val_acc"], abs=2 / 6000)


def _objective(weight, bias, Z, y, wd):
    """A head's regularised objective on standardised training features Z (module docstring of linear.py)."""
    logits = Z @ weight.astype(np.float64) + bias
    top = logits.max(1, keepdims=True)
    nll = np.log(np.exp(logits - top).sum(1)) + top[:, 0] - logits[np.arange(len(y)), y]
    return nll.mean() + wd / 2 * (weight.astype(np.float64) ** 2).sum()


def test_fewer_rows_than_dimensions_reaches_the_optimum_and_stays_in_their_span():
    """60 training rows of 256 correlated dimensions (a ResNet block on a small study): the rows span at
    most 59 directions after centring. A head has no weight in the others (its gradient there is zero;
    rounding noise there, scaled up by the whitening and Adam, once made the wd = 0 heads near chance),
    and with few rows an epoch is several steps, so the 30 epochs reach the optimum scikit-learn finds."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 120)
    X = (rng.standard_normal((120, 16)) + 2.0 * np.eye(4, 16)[y]) @ rng.standard_normal((16, 256))
    train, val = _splits(X + 0.3 * rng.standard_normal((120, 256)), y, [60, 60])
    for wd in (0.0, 1e-2):
        res = train_probe(train, val, None, {}, 4, ProbeConfig(lrs=[0.3], weight_decays=[wd], epochs=30,
                                                              batch_size=1024))
        Z = (train.X.astype(np.float64) - res.mean) / res.std
        _, S, Vt = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
        span = Vt[S > 1e-6 * S[0]]  # the directions the rows reach
        outside = res.weight - span.T @ (span @ res.weight)
        assert len(span) == 59 and np.linalg.norm(outside) < 1e-3 * np.linalg.norm(res.weight), wd
        if wd:  # scikit-learn's optimum on the same standardised rows
            sk = LogisticRegression(C=1 / (wd * len(Z)), tol=1e-10, max_iter=20000).fit(Z, train.y)
            ours, best = (_objective(w, b, Z, train.y, wd) for w, b in ((res.weight, res.bias),
                                                                       (sk.coef_.T, sk.intercept_)))
            assert ours <= best * 1.01, (ours, best)


def test_a_short_last_minibatch_weighs_its_rows_as_the_others():
    """1,030 rows at batch 1,024: the last minibatch holds 6. Each row must weigh the same in the objective
    (its rows once weighed 1024 / 6 times the others), so the head is scikit-learn's optimum."""
    X, y = make_classification(n_samples=1530, n_features=20, n_informative=10, n_classes=4, random_state=3)
    train, val = _splits(X, y, [1030, 500])
    wd = 1e-2
    res = train_probe(train, val, None, {}, 4, ProbeConfig(lrs=[0.3], weight_decays=[wd], epochs=30,
                                                          batch_size=1024))
    Z = (train.X.astype(np.float64) - res.mean) / res.std
    sk = LogisticRegression(C=1 / (wd * len(Z)), tol=1e-10, max_iter=20000).fit(Z, train.y)
    ours, best = (_objective(w, b, Z, train.y, wd) for w, b in ((res.weight, res.bias), (sk.coef_.T, sk.intercept_)))
    assert ours <= best + 1e-3, (ours, best)
    assert (res.predict(val.X) == sk.predict((val.X.astype(np.float64) - res.mean) / res.std)).mean() >= 0.99


def test_heads_are_independent(small):
    train, val, test = small
    grid = train_probe(train, val, test, {}, 4, SMALL_CFG)
    for j in (0, 3):  # the chosen head and another one must match their solo runs
        h = grid.head_scores[j]
        solo = train_probe(
            train, val, test, {}, 4,
            dataclasses.replace(SMALL_CFG, lrs=[h["lr"]], weight_decays=[h["weight_decay"]]),
        )
        assert solo.head_scores[0] == pytest.approx(h, rel=1e-6, abs=1e-6)
        if (h["lr"], h["weight_decay"]) == (grid.lr, grid.weight_decay):
            assert solo.best_epoch == grid.best_epoch
            np.testing.assert_allclose(solo.weight, grid.weight, atol=1e-5)
            np.testing.assert_allclose(solo.bias, grid.bias, atol=1e-5)
            np.testing.assert_array_equal(solo.predict(test.X), grid.predict(test.X))
            assert [e["val_acc"] for e in solo.history] == [e["val_acc"] for e in grid.history]


def test_test_and_ood_never_influence_choices(small):
    train, val, test = small
    rng = np.random.default_rng(0)
    ref = train_probe(train, val, test, {"a": test}, 4, SMALL_CFG)
    other_test = Split(test.X[::-1] + np.float16(0.5), rng.permutation(test.y))
    other_ood = Split(val.X[:100], val.y[:100])
    alt = train_probe(train, val, other_test, {"a": other_ood}, 4, SMALL_CFG)
    none = train_probe(train, val, None, {}, 4, SMALL_CFG)
    for r in (alt, none):
        assert (r.lr, r.weight_decay, r.best_epoch, r.epochs_run) == (
            ref.lr, ref.weight_decay, ref.best_epoch, ref.epochs_run)
        assert r.history == ref.history and r.head_scores == ref.head_scores
        np.testing.assert_array_equal(r.weight, ref.weight)
        assert {k: v for k, v in r.metrics.items() if k.startswith("val_")} == {
            k: v for k, v in ref.metrics.items() if k.startswith("val_")}
    assert alt.metrics["test_acc"] != ref.metrics["test_acc"]
    assert alt.metrics["ood_a_acc"] != ref.metrics["ood_a_acc"]
    assert ref.metrics["ood_a_acc"] == ref.metrics["test_acc"]  # same data scored the same way
    assert set(none.metrics) == {"val_acc", "val_macro_f1"}


def test_deterministic_for_a_seed(small):
    train, val, test = small
    a = train_probe(train, val, test, {}, 4, SMALL_CFG)
    b = train_probe(train, val, test, {}, 4, SMALL_CFG)
    assert a.metrics == b.metrics and a.history == b.history and a.head_scores == b.head_scores
    np.testing.assert_array_equal(a.weight, b.weight)
    c = train_probe(train, val, test, {}, 4, dataclasses.replace(SMALL_CFG, seed=1))
    assert c.history != a.history  # the seed drives the minibatch order


def test_balanced_class_weights_help_on_long_tail():
    X, y = make_classification(
        n_samples=8000, n_features=32, n_informative=8, n_classes=3, n_clusters_per_class=1,
        weights=[0.85, 0.12, 0.03], class_sep=0.8, random_state=3,
    )
    train, val, test = _splits(X, y, [4000, 2000, 2000])
    cfg = ProbeConfig(lrs=[1e-2, 1e-1], weight_decays=[1e-4, 1e-3], epochs=15, batch_size=256)
    plain = train_probe(train, val, test, {}, 3, cfg)
    bal = train_probe(train, val, test, {}, 3, dataclasses.replace(cfg, class_weights="balanced"))
    assert not np.allclose(plain.weight, bal.weight)
    assert bal.metrics["test_balanced_acc"] > plain.metrics["test_balanced_acc"] + 0.05
    # Same weighting as sklearn's class_weight="balanced" at the equivalent C.
    Xtr = train.X.astype(np.float64)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sk = LogisticRegression(C=1 / (bal.weight_decay * len(Xtr)), class_weight="balanced", max_iter=5000)
    sk.fit((Xtr - mu) / sd, train.y)
    agree = (sk.predict((test.X - mu) / sd) == bal.predict(test.X)).mean()
    assert agree > 0.97


def test_balanced_weights_with_class_missing_from_train(small):
    train, val, test = small
    keep = train.y != 3
    res = train_probe(Split(train.X[keep], train.y[keep]), val, test, {}, 4,
                      dataclasses.replace(SMALL_CFG, class_weights="balanced"))
    assert all(np.isfinite(v) for v in res.metrics.values())
    assert np.isfinite(res.weight).all()


def test_early_stopping_keeps_best_epoch():
    X, y = make_blobs(n_samples=3000, centers=4, n_features=16, cluster_std=1.0, random_state=0)
    train, val, test = _splits(X, y, [1500, 750, 750])
    cfg = ProbeConfig(lrs=[1e-2, 1e-1], weight_decays=[1e-4], epochs=60, batch_size=256, patience=3)
    es = train_probe(train, val, test, {}, 4, cfg)
    full = train_probe(train, val, test, {}, 4, dataclasses.replace(cfg, patience=None))
    assert es.epochs_run < cfg.epochs and len(es.history) == es.epochs_run
    # It stopped because the selection metric did not improve in the last `patience` epochs.
    metric = [e["val_macro_f1"] for e in es.history]
    assert max(metric[: -cfg.patience]) >= max(metric[-cfg.patience :])
    # Stopping changes nothing before it: the history is a prefix of the full run's.
    assert es.history == full.history[: es.epochs_run]
    # The kept weights are those of the best epoch, which is the max of the history.
    best_val = max(e["val_macro_f1"] for e in es.history)
    assert es.history[es.best_epoch - 1]["val_macro_f1"] == best_val
    assert classification_metrics(val.y, es.predict(val.X), "val") == pytest.approx(
        {k: v for k, v in es.metrics.items() if k.startswith("val_")})
    assert es.metrics["val_macro_f1"] == pytest.approx(best_val)

    # Epoch by epoch (what an ASHA trial reports): the same epochs, the last one flagged final, and its
    # result exactly train_probe's.
    seen = [(info, result_now()) for info, result_now in probe_epochs(train, val, test, {}, 4, cfg)]
    assert [info["epoch"] for info, _ in seen] == list(range(1, es.epochs_run + 1))
    assert [info["final"] for info, _ in seen] == [False] * (es.epochs_run - 1) + [True]
    assert {"val_acc", "val_macro_f1", "lr", "weight_decay", "train_loss", "best_epoch"} <= set(seen[-1][0])
    assert seen[-1][0]["val_macro_f1"] == pytest.approx(es.metrics["val_macro_f1"])
    assert seen[-1][1].metrics == es.metrics and np.array_equal(seen[-1][1].weight, es.weight)


def test_probe_epochs_results_are_the_state_of_their_epoch(small):
    """A result taken after epoch k (a trial stopped there) is that epoch's: its history is the first k
    epochs, its kept weights are not overwritten by later epochs, and its val metrics are those weights'."""
    train, val, test = small
    cfg = dataclasses.replace(SMALL_CFG, epochs=6)
    seen = [(info, result_now()) for info, result_now in probe_epochs(train, val, test, {"a": test}, 4, cfg)]
    full = train_probe(train, val, test, {"a": test}, 4, cfg)
    assert len(seen) == 6 and seen[-1][0]["final"] and not any(info["final"] for info, _ in seen[:-1])
    for k, (info, res) in enumerate(seen, 1):
        assert res.epochs_run == len(res.history) == k
        if (res.lr, res.weight_decay) == (full.lr, full.weight_decay):  # the same head: the same epochs
            assert res.history == full.history[:k]
        assert classification_metrics(val.y, res.predict(val.X), "val") == pytest.approx(
            {m: v for m, v in res.metrics.items() if m.startswith("val_")})
        assert {"test_acc", "ood_a_acc"} <= set(res.metrics)
        assert (info["lr"], info["weight_decay"]) == (res.lr, res.weight_decay)
    assert not np.array_equal(seen[0][1].weight, seen[-1][1].weight)  # epoch 1's weights kept as they were
    assert seen[-1][1].metrics == full.metrics and np.array_equal(seen[-1][1].weight, full.weight)


def test_standardisation_uses_train_statistics(small):
    train, val, test = small
    X = train.X.astype(np.float64)
    X[:, 0] = 7.0  # a constant dimension must not produce NaN
    res = train_probe(Split(X.astype(np.float16), train.y), val, test, {}, 4, SMALL_CFG)
    np.testing.assert_allclose(res.mean, X.mean(0), rtol=1e-6)
    assert res.std[0] == 1.0 and np.isfinite(res.weight).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda tr, va, cfg: (Split(tr.X[:0], tr.y[:0]), va, cfg), "train split is empty"),
        (lambda tr, va, cfg: (tr, Split(va.X, np.where(va.y == 0, 4, va.y)), cfg), "outside"),
        (lambda tr, va, cfg: (tr, Split(va.X[:, :-1], va.y), cfg), "feature dim"),
        (lambda tr, va, cfg: (tr, va, dataclasses.replace(cfg, select="val_auc")), "unknown select"),
        (lambda tr, va, cfg: (tr, va, dataclasses.replace(cfg, lrs=[])), "grid is empty"),
        (lambda tr, va, cfg: (tr, va, dataclasses.replace(cfg, class_weights="inverse")), "class_weights"),
    ],
)
def test_invalid_inputs_raise(small, change, match):
    train, val, test = small
    tr, va, cfg = change(train, val, SMALL_CFG)
    with pytest.raises(ValueError, match=match):
        train_probe(tr, va, test, {}, 4, cfg)


# ---------------------------------------------------------------- k-means


def test_kmeans_scores():
    X, y = make_blobs(n_samples=600, centers=4, n_features=8, cluster_std=0.5, random_state=0)
    good = kmeans_scores(X.astype(np.float16), y, k=4, seed=0)
    assert set(good) == {"kmeans_nmi", "kmeans_ari"}
    assert good["kmeans_nmi"] > 0.95 and good["kmeans_ari"] > 0.95
    bad = kmeans_scores(X, np.random.default_rng(0).permutation(y), k=4, seed=0)
    assert abs(bad["kmeans_nmi"]) < 0.05 and abs(bad["kmeans_ari"]) < 0.05
    assert kmeans_scores(X, y, k=4, seed=0) == kmeans_scores(X, y, k=4, seed=0)
    # a large set: a seeded sample of max_rows rows, which still finds the blobs
    sampled = kmeans_scores(X, y, k=4, seed=0, max_rows=200)
    assert sampled == kmeans_scores(X, y, k=4, seed=0, max_rows=200) != good
    assert sampled["kmeans_nmi"] > 0.9
    # some rows by index (the probe's main-dataset images): the scores of those rows copied out, sampled or not
    rows = np.flatnonzero(np.arange(600) % 3 != 0)
    for max_rows in (10_000, 150):
        assert kmeans_scores(X, y, k=4, seed=0, max_rows=max_rows, rows=rows) == \
               kmeans_scores(X[rows], y[rows], k=4, seed=0, max_rows=max_rows)


def test_chance_nmi_is_what_clusters_without_class_information_score():
    from sklearn.metrics import normalized_mutual_info_score

    from sweep.probing.kmeans import chance_nmi

    rng = np.random.default_rng(1)
    few = rng.integers(0, 6, 22)  # the demo's test split: NMI far from 0 with no information at all
    by_hand = np.mean([normalized_mutual_info_score(few, rng.integers(0, 6, 22)) for _ in range(400)])
    assert abs(chance_nmi(few, 6, draws=50) - by_hand) < 0.03 and chance_nmi(few, 6) > 0.2
    X, y = make_blobs(n_samples=600, centers=4, n_features=8, cluster_std=0.5, random_state=0)
    blind = kmeans_scores(X, np.random.default_rng(0).permutation(y), k=4, seed=0)["kmeans_nmi"]
    assert chance_nmi(y, 4) < 0.02 and abs(blind - chance_nmi(y, 4)) < 0.02


_PEAK_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from sweep.probing import ProbeConfig, Split, train_probe
rng = np.random.default_rng(0)
N, D = 260_000, 128
y = rng.integers(0, 4, N)
X = (rng.standard_normal((N, D), dtype=np.float32) + y[:, None] * 0.05).astype(np.float16)
train, val = Split(X[:250_000], y[:250_000]), Split(X[250_000:], y[250_000:])
cfg = ProbeConfig(lrs=[0.1], weight_decays=[0.0], epochs=1, batch_size=4096)
train_probe(Split(X[:2000], y[:2000]), val, None, None, 4, cfg)  # warm-up: torch's own allocations
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS, to the RSS now
before = kib("VmRSS")
train_probe(train, val, None, None, 4, cfg)
print((kib("VmHWM") - before) * 1024 / (250_000 * (D + 1) * 4))
"""


def test_peak_memory_holds_the_training_rows_in_float32_about_once():
    # The shuffled rows were gathered from a float32 copy of the training rows (both held at once), and
    # whitened by one matmul over all rows (a third): a 1M x 1024 column needed ~7x its float16 size
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True)
    peak = float(out.stdout.split()[-1])  # peak RSS growth in units of the float32 training rows
    assert peak < 1.7, f"training held {peak:.2f}x its float32 training rows at its peak"


def test_kmeans_casts_only_its_sample_to_float64():
    # all rows were cast to float64 before the 10,000-row sample was drawn: 4x a float16 column, at the end
    # of a trial whose training tensors are still held
    import tracemalloc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200_000)
    X = (rng.standard_normal((200_000, 32)) + y[:, None]).astype(np.float16)
    scores = kmeans_scores(X, y, k=3, seed=0, n_init=1)
    tracemalloc.start()
    try:
        assert kmeans_scores(X, y, k=3, seed=0, n_init=1) == scores
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < X.nbytes, f"k-means on a 10,000-row sample allocated {peak / X.nbytes:.1f}x the float16 rows"


def test_whitening_in_chunks_gives_the_whole_products_values():
    # The training rows are whitened in chunks of 65,536 (one (N, D) array, not two) for the same values as
    # one product of them all: a short last chunk (here one row, a matrix-vector product) took another BLAS
    # kernel and its rows differed in the last bit, so a study's heads were no longer the same bit for bit
    from sweep.probing.linear import _whiten_rows

    g = torch.Generator().manual_seed(0)
    R = torch.randn(96, 96, generator=g)
    for N in (65_537, 65_543):
        X = torch.randn(N, 97, generator=g)
        X[:, -1] = 1.0
        whole = X[:, :-1] @ R
        assert torch.equal(_whiten_rows(X.clone(), R)[:, :-1], whole)  # every direction kept: in place
        fewer = _whiten_rows(X, R[:, :40])  # directions left out: a new array, its ones column set
        assert torch.equal(fewer[:, :-1], X[:, :-1] @ R[:, :40]) and bool((fewer[:, -1] == 1).all())
