"""Many-heads linear probe (the DINOv2 linear-eval technique), pure torch.

Every (lr, weight_decay) pair of the grid is an independent linear head. All heads share one weight
tensor laid out (H, C, D + 1) (the last column is the bias, fed by a column of ones), so one minibatch
is read once and fed to every head with a single matmul. The loss is the SUM of the per-head losses,
so each head's gradient is exactly its own (written out in closed form, no autograd), and a
hand-written Adam update applies a per-head lr.

Objective of a head with weight decay ``wd`` (N = number of training rows, s_n = class weight of row
n, 1 without class weights; "balanced" weights average to 1 over the training rows)::

    (1/N) * sum_n s_n * CE(W x_n + b, y_n)  +  (wd / 2) * ||W||^2        (the bias is not penalised)

scikit-learn's ``LogisticRegression`` (multinomial, lbfgs) minimises 0.5||W||^2 + C * sum_n s_n CE
without penalising the intercept; divided by C*N that is the objective above, so both have the same
minimiser when::

    C = 1 / (wd * N_train)        (wd = 0  <->  C = inf, no penalty)

on features standardised with the training mean/std. Minibatches estimate the first term without
bias (every row weighs B / N, B minibatches a pass, a short last one included) and the penalty is added
at every step, so Adam optimises exactly this objective. Each head keeps
its lr constant and its result is the AVERAGE of its iterates over the second half of the steps
(Polyak-Ruppert tail averaging): the average sits at the optimum while the last iterate hovers in the
minibatch noise. Measured on 12 Fashion-MNIST feature columns against scikit-learn with C chosen on the
same val split (benchmarks/probe_sweep.py, 51,000 train rows, batch 2048): a cosine decay to 0 left the
chosen heads 0.23 / 0.17 test points below scikit-learn at 5 / 7 epochs and needed 20 to match it;
constant lr + tail averaging is at +0.02 / -0.00 / +0.00 points at 5 / 7 / 10 epochs.
Weights start at zero (the problem is convex, and a zero start makes a head's trajectory independent
of which other heads share the grid).

Conditioning: the heads do not train on the standardised features x themselves but on whitened ones,
z = R^T x with R = Q diag(s) from the eigendecomposition Q diag(lam) Q^T of their training covariance and
s = 1 / sqrt(lam) (tiny eigenvalues floored), over the directions the training rows can span (with fewer
rows than dimensions the rest are left out, see `_whitening`: a penalised head's optimum has no weight
there, as the gradient is zero). A head's parameters V act as W = V R^T, and its penalty is written in
those terms, (wd / 2) ||V R^T||^2 = (wd / 2) sum_i s_i^2 ||V_:,i||^2 (Q is orthogonal), so the objective,
and so its minimiser, are the ones above; only the optimiser's coordinates change.
Feature blocks of a network are strongly correlated; Adam's per-coordinate scaling cannot undo a
correlation, and on such columns 30 epochs on the raw standardised features stopped 0.01-0.06 nats
above scikit-learn's optimum (1-3 test points lower), while in whitened coordinates 10 epochs reach it.
The returned weights are mapped back: ``weight`` acts on the standardised features. In these
coordinates every direction has unit variance, so Adam's per-coordinate step ``lr`` is a step in units
of the features' spread, and useful lrs are around 0.1-1 (the default grid is 0.1, 0.3, 1): a head
with lr 1e-3 moves each weight by at most ~1e-3 per step and is still far from its optimum after tens
of epochs.

What is kept: each head's averaged weights after the last epoch (near the minimiser above: within about 1e-3
nats at weight decay 1e-2, up to ~1e-2 at small weight decays, whose optima lie far out and are reached
slowly), so a head is close to the regularised logistic regression of its weight decay and the choice of head
(mostly of weight decay; of lr only as far as the heads have not converged) is made on validation, as when
scikit-learn's C is chosen on a validation split. Not always at the grid's largest lr: on a 100:1 long-tailed
Fashion-MNIST study (636 training rows, 10 classes, 2 of them with 2 rows) lr 1 heads ended 0.08-0.68 nats
above scikit-learn's optimum with ``class_weights="balanced"`` (rows of a 2-row class weigh 32; after 100
epochs 5 of those 6 heads were still 0.03-0.54 above) and 0.16 on a 512-d column without, while lr 0.1 and 0.3
stayed within 9e-3 at the default 30 epochs. Such a head is still chosen where it scores best on val (3 of 10
columns balanced, 2 of 10 not): against a grid without lr 1, the chosen heads' mean val macro F1 rose by 0.017
/ 0.005 and mean test accuracy moved by +0.001 / -0.012 (one column's unpenalised lr 1 head: 0.715 against
0.832), and the choice became sensitive to rounding (another thread count chose another head in 2 of 20
columns). With early stopping (``patience``) each head instead keeps the weights of the first epoch that
reaches its best validation metric, and training stops when no head has improved it for ``patience`` epochs.
(Keeping every head's best epoch, as DINOv2 does, picks the maximum of heads x epochs noisy validation scores:
on 5-class synthetic sets with 2,000 val images that cost 0.3-1.5 test points against scikit-learn, while
final weights stayed within 0.15 points in 9 of 10 cases.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .metrics import classification_metrics

SELECT_METRICS = ("val_macro_f1", "val_acc")
_EVAL_CHUNK = 8192
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8
_WHITEN_FLOOR = 1e-4  # eigenvalues of the standardised covariance below this x their mean count as this
_AVERAGE_FROM = 0.5  # share of the steps after which a head's iterates are averaged
# An epoch is one pass over the training rows, or this many minibatch steps where a pass has fewer (small
# training sets: the demo's 61 rows are one step a pass, and 30 such steps left heads far from their
# optimum; several passes an epoch then).
MIN_STEPS_PER_EPOCH = 10


@dataclass
class ProbeConfig:
    lrs: list[float]
    weight_decays: list[float]
    epochs: int = 30
    batch_size: int = 1024
    class_weights: str = "none"  # "none" | "balanced"
    select: str = "val_macro_f1"  # "val_macro_f1" | "val_acc"
    patience: int | None = None  # stop when no head improved its val metric for this many epochs
    seed: int = 0


@dataclass
class Split:
    X: np.ndarray  # (N, D), any float dtype (the feature store holds float16)
    y: np.ndarray  # (N,) int labels in [0, num_classes)


@dataclass
class ProbeResult:
    metrics: dict[str, float]
    lr: float
    weight_decay: float
    best_epoch: int  # 1-based epoch whose weights were kept for the chosen head
    epochs_run: int
    history: list[dict]  # per epoch, chosen head: epoch, val_acc, val_macro_f1, val_loss, train_loss
    head_scores: list[dict]  # per head, grid order: lr, weight_decay, <select>, val_loss, best_epoch
    # Chosen head, acting on standardised features: logits = ((X - mean) / std) @ weight + bias.
    weight: np.ndarray = field(repr=False, default=None)  # (D, C) float32
    bias: np.ndarray = field(repr=False, default=None)  # (C,) float32
    mean: np.ndarray = field(repr=False, default=None)  # (D,) float64
    std: np.ndarray = field(repr=False, default=None)  # (D,) float64, 1 for constant dimensions

    def decision_function(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.weight.shape[0]:
            raise ValueError(f"expected features of shape (N, {self.weight.shape[0]}), got {X.shape}")
        return _standardise(X, self.mean, self.std) @ self.weight + self.bias  # float32

    def predict(self, X) -> np.ndarray:
        return self.decision_function(X).argmax(axis=1)


def _standardise(X: np.ndarray, mean: np.ndarray, std: np.ndarray, ones: bool = False,
                 rows: np.ndarray | None = None) -> np.ndarray:
    """float32 (X - mean) / std, with a trailing column of ones (the bias input) when ``ones``; of the rows
    ``rows`` in that order where given (X[rows], elementwise the same values, without copying X whole).
    Chunked, in float32 (exact for float16 input), so a large store is never copied whole."""
    D = X.shape[1]
    n = len(X) if rows is None else len(rows)
    out = np.empty((n, D + ones), dtype=np.float32)
    mean32, inv32 = mean.astype(np.float32), (1.0 / std).astype(np.float32)
    for i in range(0, n, 65536):
        chunk = out[i : i + 65536, :D]
        np.subtract(X[i : i + 65536] if rows is None else X[rows[i : i + 65536]], mean32, out=chunk,
                    dtype=np.float32)
        chunk *= inv32
    if ones:
        out[:, D] = 1.0
    return out


def _train_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0, dtype=np.float64)
    var = np.zeros_like(mean)
    buffer = np.empty((min(len(X), 65536), X.shape[1]))  # one float64 chunk, worked on in place (three before)
    for i in range(0, len(X), 65536):
        chunk = buffer[: len(X[i : i + 65536])]
        chunk[...] = X[i : i + 65536]
        chunk -= mean
        chunk *= chunk
        var += chunk.sum(axis=0)
    std = np.sqrt(var / len(X))
    return mean, np.where(std > 1e-8, std, 1.0)  # constant dimensions stay 0 instead of NaN


def _check_inputs(train, val, test, ood, num_classes, config) -> None:
    if not config.lrs or not config.weight_decays:
        raise ValueError("probe grid is empty: config.lrs and config.weight_decays need >= 1 value each")
    if any(lr <= 0 for lr in config.lrs) or any(wd < 0 for wd in config.weight_decays):
        raise ValueError("probe grid: learning rates must be > 0 and weight decays >= 0")
    if config.select not in SELECT_METRICS:
        raise ValueError(f"unknown select metric {config.select!r}; expected one of {SELECT_METRICS}")
    if config.class_weights not in ("none", "balanced"):
        raise ValueError(f"unknown class_weights {config.class_weights!r}; expected 'none' or 'balanced'")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    if config.patience is not None and config.patience < 1:
        raise ValueError("patience must be None or >= 1")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    splits.update({f"ood '{k}'": v for k, v in ood.items()})
    dim = np.asarray(train.X).shape[-1] if np.ndim(train.X) == 2 else None
    for name, s in splits.items():
        X, y = np.asarray(s.X), np.asarray(s.y)
        if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
            raise ValueError(f"{name} split: X must be (N, D) and y (N,); got X {X.shape}, y {y.shape}")
        if X.shape[1] != dim:
            raise ValueError(f"{name} split has feature dim {X.shape[1]}, train has {dim}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} split: labels must be integers, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name} split: label {int(y.min() if y.min() < 0 else y.max())} outside "
                f"[0, {num_classes})"
            )
    if len(train.y) == 0:
        raise ValueError("train split is empty")
    if len(val.y) == 0:
        raise ValueError("val split is empty: it is needed to select the head")


def _whitening(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R = Q diag(s) (D, r) from the eigendecomposition Q diag(lam) Q^T of the (standardised, centred)
    training features' covariance, s = 1 / sqrt(lam) with lam floored at _WHITEN_FLOOR * mean(lam), over
    the r = min(D, N - 1) largest directions; and s^2.

    N centred rows span at most N - 1 directions. With fewer rows than dimensions the others are left
    out: their exact gradient is zero and every penalised head's optimum has no weight there. Kept (as
    before probe revision 2), their rounding noise (float32 sums, in an order that depends on the thread
    count and the row order) was scaled up by s and then by Adam's per-coordinate normalisation into
    full-size steps, which val and test rows (which do reach those directions) turned into noise in the
    logits. Directions that are merely small are kept, floored: on Fashion-MNIST's conv_in columns,
    dropping those below the floor instead cost up to 0.8 test points."""
    N = len(X)
    cov = (X.T @ X).double().cpu().numpy() / N
    lam, Q = np.linalg.eigh((cov + cov.T) / 2)  # ascending
    r = min(len(lam), max(N - 1, 0))
    lam, Q = lam[len(lam) - r:], Q[:, len(lam) - r:]
    lam = np.maximum(lam, _WHITEN_FLOOR * max(lam.mean() if r else 0.0, 1e-12))
    s = 1.0 / np.sqrt(lam)
    R = torch.from_numpy((Q * s).astype(np.float32)).to(X.device)
    return R, torch.from_numpy((s * s).astype(np.float32)).to(X.device)


def _whiten_rows(X: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """[x R | 1] for the rows [x | 1] of X: in place where R keeps every direction, on the CPU in chunks of
    65,536 to 131,071 rows (a row's product there does not depend on the chunk it is in: the same values as
    X[:, :-1] @ R whole, without a second (N, D) array). On a GPU whole, as before: cuBLAS may pick another
    kernel by shape."""
    D, r = R.shape
    out = X if r == D else torch.empty(len(X), r + 1, device=X.device)
    step = 65536 if X.device.type == "cpu" else max(len(X), 1)
    # a short last chunk joins the one before: a product of a few rows takes another BLAS kernel (one row a
    # matrix-vector product), whose sums differ from the whole product's in the last bit
    ends = [*range(step, len(X) - step + 1, step), len(X)]
    for i, end in zip([0, *ends[:-1]], ends):
        out[i:end, :-1] = X[i:end, :-1] @ R
    if out is not X:  # directions left out: fewer coordinates
        out[:, -1] = 1.0
    return out


def _forward(W, xb, yb):
    """All heads at once: logits (H, C, n) from one matmul (the bias is the weight of the ones
    column), exp(logits - max) and its class sum (for the softmax), and the cross-entropy (H, n).

    Classes sit on dim 1 with rows contiguous: softmax/argmax over a tiny last dim is very slow on
    CPU, reductions across dim 1 are plain vectorised elementwise passes.
    """
    H, C, D1 = W.shape
    n = len(xb)
    logits = (W.view(H * C, D1) @ xb.T).view(H, C, n)
    m = logits.amax(1, keepdim=True)
    e = (logits - m).exp_()
    s = e.sum(1, keepdim=True)
    nll = (s.log() + m).squeeze(1) - logits.gather(1, yb.view(1, 1, n).expand(H, 1, n)).squeeze(1)
    return logits, e, s, nll


@torch.no_grad()
def _evaluate(X, y, W):
    """Confusion matrices (H, C_true, C_pred) and summed CE (H,) of every head, in chunks."""
    H, C, _ = W.shape
    conf = torch.zeros(H * C * C, dtype=torch.long, device=X.device)
    loss = torch.zeros(H, dtype=torch.float64, device=X.device)
    offs = torch.arange(H, device=X.device).view(H, 1) * C * C
    for i in range(0, len(X), _EVAL_CHUNK):
        xb, yb = X[i : i + _EVAL_CHUNK], y[i : i + _EVAL_CHUNK]
        logits, _, _, nll = _forward(W, xb, yb)
        loss += nll.sum(1, dtype=torch.float64)
        pred = logits.max(1).indices  # 5x faster than argmax(1) over a non-last dim on CPU
        conf += torch.bincount((offs + yb * C + pred).ravel(), minlength=H * C * C)
    return conf.view(H, C, C), loss


def _acc_f1(conf: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro F1 per head, as `classification_metrics` counts them: F1 averaged over the
    classes the split has (the same for every head)."""
    conf = conf.double()
    tp = conf.diagonal(dim1=1, dim2=2)
    true_n = conf.sum(2)
    denom = true_n + conf.sum(1)  # 2TP + FP + FN
    present = true_n > 0
    f1 = torch.where(present, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    acc = tp.sum(1) / conf.sum((1, 2))
    return acc.cpu().numpy(), (f1.sum(1) / present.sum(1)).cpu().numpy()


def train_probe(
    train: Split,
    val: Split,
    test: Split | None,
    ood: dict[str, Split] | None,
    num_classes: int,
    config: ProbeConfig,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Train every (lr, weight_decay) head at once; keep the head that is best on validation.

    Every head is scored on val after each epoch. A head's kept weights are its final ones, or with
    ``config.patience`` those of the first epoch reaching its best ``config.select`` (see the module
    docstring for why). Across heads the best kept weights by ``config.select`` win (ties: lower val
    loss, then grid order, lrs outer). Test and OOD sets are scored only for the chosen head, after
    all choices are made.
    """
    for _, result_now in probe_epochs(train, val, test, ood, num_classes, config, device):
        pass
    return result_now()


def probe_epochs(
    train: Split,
    val: Split,
    test: Split | None,
    ood: dict[str, Split] | None,
    num_classes: int,
    config: ProbeConfig,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[dict, Callable[[], ProbeResult]]]:
    """`train_probe` one epoch at a time, for a scheduler that may stop it between epochs (ASHA).

    Yields ``(info, result_now)`` after each epoch: ``info`` holds the ``epoch`` (1-based), the current
    leader's best-so-far ``val_acc``, ``val_macro_f1``, ``val_loss``, its ``lr``, ``weight_decay``,
    ``best_epoch``, this epoch's ``train_loss``, and ``final`` (no epoch follows: the last one, or early
    stopping's). ``result_now()`` is the `ProbeResult` as of that epoch, as if training ended there (the
    leader and its kept weights; test and OOD scored for it): call it before advancing. The last one is
    exactly what `train_probe` returns. Epochs run against the planned ``config.epochs`` (the tail
    average starts halfway through those), so stopping after k epochs differs from planning k.
    """
    ood = ood or {}
    _check_inputs(train, val, test, ood, num_classes, config)
    C, dev = num_classes, torch.device(device)
    mean, std = _train_moments(np.asarray(train.X))

    def to_dev(s: Split):
        X = torch.from_numpy(_standardise(np.asarray(s.X), mean, std, ones=True)).to(dev)
        return X, torch.from_numpy(np.asarray(s.y, dtype=np.int64)).to(dev)

    Xtr, ytr = to_dev(train)
    N = len(Xtr)
    # The heads train in whitened coordinates z = R^T x (see the module docstring): same objective, with
    # the penalty on W = V R^T written as sum_i s_i^2 ||V_:,i||^2.
    R, s2 = _whitening(Xtr[:, :-1])
    gen = torch.Generator().manual_seed(config.seed)  # CPU generator: same order on any device
    # Rows are shuffled once (minibatches are then views) and every epoch visits the minibatches in a fresh
    # random order: reshuffling all rows each epoch cost ~8% of a trial in gathers for no measurable gain in
    # the averaged result. The shuffled rows are standardised again from the float16 input rather than
    # gathered from Xtr (an index_select held two float32 copies of the training rows at once), and whitened
    # in chunks in place (`X @ R` whole held another): the same values; the trial's peak memory fell from
    # 2.0x to 1.4x the float32 training rows (tests/test_probing.py, 250,000 x 128).
    perm = torch.randperm(N, generator=gen)
    del Xtr
    Xtr = torch.from_numpy(_standardise(np.asarray(train.X), mean, std, ones=True, rows=perm.numpy())).to(dev)
    ytr = ytr.index_select(0, perm.to(dev))
    Xva, yva = to_dev(val)
    Xtr, Xva = _whiten_rows(Xtr, R), _whiten_rows(Xva, R)
    D1 = R.shape[1] + 1  # the kept directions + the ones column

    # Heads in grid order, lrs outer: head h = (lrs[h // n_wd], weight_decays[h % n_wd]).
    grid = [(float(lr), float(wd)) for lr in config.lrs for wd in config.weight_decays]
    H = len(grid)
    lr_h = torch.tensor([g[0] for g in grid], device=dev).view(H, 1, 1)
    wd_h = torch.tensor([g[1] for g in grid], device=dev).view(H, 1, 1)
    wd_hw = wd_h * torch.cat([s2, s2.new_zeros(1)])  # (H, 1, D1): the penalty's curvature; none on the bias

    sample_w = None
    if config.class_weights == "balanced":
        # N / (K * count_c) over the K classes present in train (absent classes: 0, never seen
        # anyway). The weights average to 1 over the training rows, so the wd <-> C mapping holds
        # and it matches sklearn's class_weight="balanced".
        counts = torch.bincount(ytr, minlength=C).float()
        present = counts > 0
        sample_w = torch.where(present, N / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))

    # Head h owns W[h] = [weights | bias] (C, D + 1); Adam moments m, v; lr per head.
    W = torch.zeros(H, C, D1, device=dev)
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    b1, b2 = _ADAM_BETAS

    best_metric = np.full(H, -np.inf)
    best_loss = np.full(H, np.inf)
    best_epoch = np.zeros(H, dtype=int)
    early_stopping = config.patience is not None
    best_W = W.clone() if early_stopping else None  # with early stopping: each head's best epoch
    W_avg, n_avg = torch.zeros_like(W), 0  # tail average of the iterates: what a head is
    per_epoch = []  # per epoch: dict of (H,) arrays
    batch_starts = list(range(0, N, config.batch_size))
    steps_per_epoch = max(len(batch_starts), MIN_STEPS_PER_EPOCH)
    row_scale = len(batch_starts) / N
    total_steps = config.epochs * steps_per_epoch
    step, last_improved = 0, 0
    sel = 1 if config.select == "val_macro_f1" else 0

    def result_now() -> ProbeResult:
        # Without early stopping a head is its latest (tail-averaged) weights; with it, its best epoch's.
        return _finish_probe(val, test, ood, grid, config.select, leader, best_W if early_stopping else head_W,
                             R, mean, std, per_epoch, best_metric, best_loss, best_epoch)

    # one-hot targets, (C, N): subtracting a slice is ~10x cheaper than a scatter per step
    onehot = torch.zeros(C, N, device=dev).scatter_(0, ytr.view(1, N), 1.0)
    for epoch in range(1, config.epochs + 1):
        data_loss = torch.zeros(H, device=dev)
        order = []  # the minibatches in a fresh random order, once or (few of them) several times
        while len(order) < steps_per_epoch:
            order += torch.randperm(len(batch_starts), generator=gen).tolist()
        for b in order[:steps_per_epoch]:
            i = batch_starts[b]
            xb, yb = Xtr[i : i + config.batch_size], ytr[i : i + config.batch_size]
            n = len(yb)
            # Loss_h = (B/N) sum_rows s_y * CE_h + (wd_h / 2) ||W_h||^2. The gradient of the summed
            # loss is written out, (softmax - onehot) * s_y * B/N, which is exactly each head's own
            # gradient and skips autograd overhead; the two matmuls serve all heads at once.
            _, e, s, nll = _forward(W, xb, yb)
            # every row weighs B / N (B minibatches a pass), also in a short last minibatch: a step's
            # gradient is then an unbiased estimate of the objective's whatever its minibatch (1 / n
            # weighed the rows of a short last minibatch up to N / B / n times the others)
            row_w = torch.full((n,), row_scale, device=dev) if sample_w is None else sample_w[yb] * row_scale
            data_loss += nll @ row_w / steps_per_epoch
            G = e.div_(s).sub_(onehot[:, i : i + n]).mul_(row_w)  # (softmax - onehot) * row weight
            grad = (G.view(H * C, n) @ xb).view(H, C, D1).addcmul_(wd_hw, W)

            # Adam, constant lr per head; the iterates of the second half of the steps are averaged.
            step += 1
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = v.sqrt().add_(_ADAM_EPS * math.sqrt(1 - b2**step))
            W.sub_((m / denom).mul_(lr_h * (math.sqrt(1 - b2**step) / (1 - b1**step))))
            if step > _AVERAGE_FROM * total_steps:
                n_avg += 1
                W_avg.lerp_(W, 1.0 / n_avg)

        head_W = W_avg if n_avg else W  # a head is its average once averaging has begun
        conf, vloss = _evaluate(Xva, yva, head_W)
        acc, f1 = _acc_f1(conf)
        vloss = (vloss / len(yva)).cpu().numpy()
        metric = (acc, f1)[sel]
        # train_loss: epoch mean of the data term + the penalty at the end of the epoch.
        train_loss = data_loss + 0.5 * (wd_hw * head_W.square()).sum((1, 2))
        per_epoch.append({"val_acc": acc, "val_macro_f1": f1, "val_loss": vloss,
                          "train_loss": train_loss.cpu().numpy()})

        # Without early stopping a head is its latest (finally: converged) weights. With it, a head keeps
        # the first epoch reaching its best metric, and training stops after `patience` epochs in which
        # no head improved.
        better = metric > best_metric if early_stopping else np.ones(H, dtype=bool)
        if better.any():
            last_improved = epoch
            if early_stopping:
                mask = torch.from_numpy(better).to(dev)
                best_W[mask] = head_W[mask]
            best_metric[better], best_loss[better], best_epoch[better] = metric[better], vloss[better], epoch

        leader = min(range(H), key=lambda h: (-best_metric[h], best_loss[h], h))
        e = per_epoch[best_epoch[leader] - 1]
        final = epoch == config.epochs or (early_stopping and epoch - last_improved >= config.patience)
        yield {
            "epoch": epoch,
            "val_acc": float(e["val_acc"][leader]),
            "val_macro_f1": float(e["val_macro_f1"][leader]),
            "val_loss": float(e["val_loss"][leader]),
            "train_loss": float(per_epoch[-1]["train_loss"][leader]),
            "lr": grid[leader][0],
            "weight_decay": grid[leader][1],
            "best_epoch": int(best_epoch[leader]),
            "final": final,
        }, result_now
        if final:
            break


def _finish_probe(val: Split, test: Split | None, ood: dict[str, Split], grid, select: str,
                  leader: int, kept_W: torch.Tensor, R: torch.Tensor, mean: np.ndarray, std: np.ndarray,
                  per_epoch: list[dict], best_metric, best_loss, best_epoch) -> ProbeResult:
    """The chosen head's result: its kept weights mapped back to standardised features, its history and
    its metrics. The choice (``leader``) is made on validation only; test and OOD are touched here, after."""
    h = leader
    Wh = kept_W[h].cpu().double().numpy()
    Wh = np.concatenate([Wh[:, :-1] @ R.cpu().double().numpy().T, Wh[:, -1:]], axis=1).astype(np.float32)
    result = ProbeResult(
        metrics={},
        lr=grid[h][0],
        weight_decay=grid[h][1],
        best_epoch=int(best_epoch[h]),
        epochs_run=len(per_epoch),
        history=[
            {"epoch": i + 1, **{k: float(v[h]) for k, v in e.items()}} for i, e in enumerate(per_epoch)
        ],
        head_scores=[
            {"lr": lr, "weight_decay": wd, select: float(best_metric[j]),
             "val_loss": float(best_loss[j]), "best_epoch": int(best_epoch[j])}
            for j, (lr, wd) in enumerate(grid)
        ],
        weight=Wh[:, :-1].T.copy(),
        bias=Wh[:, -1].copy(),
        mean=mean,
        std=std,
    )
    metrics = classification_metrics(val.y, result.predict(val.X), "val")
    if test is not None:
        metrics.update(classification_metrics(test.y, result.predict(test.X), "test", balanced=True))
    for name, s in ood.items():
        metrics.update(classification_metrics(s.y, result.predict(s.X), f"ood_{name}"))
    result.metrics = metrics
    return result
