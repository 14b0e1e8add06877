"""Multinomial logistic regression fitted by L-BFGS: the trainer of the classifier's linear head.

Written out (about 30 lines over scipy) rather than taken from scikit-learn because it is exact
about what is minimised, draws no random numbers, handles sparse n-gram features directly, and was
several times faster here than sklearn's lbfgs on the same (sparse, 65k-column) problem.
Minimises  sum_i s_i * CE(softmax(W x_i + b), y_i) + ||W||^2 / (2 C),  with ``s`` balancing the
classes (each class weighs the same in total), so a rare class is not drowned by routine prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_ITER = 1000


def fit_logistic(x: Any, y: np.ndarray, c: float, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit on x (n, f), dense or scipy-sparse, and label indices y (n,); returns W (k, f) and b (k,).

    Columns that are zero in every row get weight exactly 0 (the penalty is their only gradient), so
    they are left out of the optimisation: most of the 65,536 n-gram buckets, and most of the time.
    """
    from scipy.sparse import issparse

    used = np.flatnonzero(x.getnnz(axis=0) if issparse(x) else np.any(x != 0, axis=0))
    weights, bias = _fit_dense_columns(x[:, used], y, c, n_classes)
    full = np.zeros((n_classes, x.shape[1]))
    full[:, used] = weights
    return full, bias


def _fit_dense_columns(x: Any, y: np.ndarray, c: float, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import minimize  # dev-only dependency: training, never serving

    n, f = x.shape
    assert y.shape == (n,), y.shape
    counts = np.bincount(y, minlength=n_classes)
    if np.any(counts == 0):
        raise ValueError(f"every class needs an example; counts {counts.tolist()}")
    s = (n / (n_classes * counts))[y]  # (n,)
    onehot = np.eye(n_classes)[y]  # (n, k)

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: n_classes * f].reshape(n_classes, f), theta[n_classes * f :]
        z = np.asarray(x @ w.T) + b  # (n, k)
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = -float((s * (onehot * log_p).sum(axis=1)).sum()) + float((w * w).sum()) / (2 * c)
        g = (np.exp(log_p) - onehot) * s[:, None]  # (n, k): d loss / d z
        grad_w = np.asarray(x.T @ g).T + w / c  # (k, f)
        return loss, np.concatenate([grad_w.ravel(), g.sum(axis=0)])

    result = minimize(
        loss_and_grad,
        np.zeros(n_classes * (f + 1)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": MAX_ITER, "gtol": 1e-6},
    )
    theta = result.x
    return theta[: n_classes * f].reshape(n_classes, f), theta[n_classes * f :]
