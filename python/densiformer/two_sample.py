"""Classifier two-sample test (C2ST): can a classifier tell two sets of samples apart?

Accuracy near 0.5 means the two sets are indistinguishable to the classifier; 1.0
means fully separable. Following Lopez-Paz & Oquab 2017, with the small MLP that the
simulation-based-inference literature uses for this (two hidden layers of 10 x dim).
"""
from __future__ import annotations

import numpy as np


def c2st(a: np.ndarray, b: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Mean cross-validated accuracy of an MLP classifying rows of `a` against rows of `b`.

    a, b: (n, dim) arrays (rows may include conditioning features, which makes it a test
    of the conditional distributions). Features are z-scored on the pooled data.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (n, dim) with the same dim; got {a.shape}, {b.shape}")
    X = np.concatenate([a, b])
    if not np.isfinite(X).all():
        raise ValueError("a and b must be finite")
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    dim = X.shape[1]
    clf = MLPClassifier(hidden_layer_sizes=(10 * dim, 10 * dim), max_iter=1000, random_state=seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, X, y, cv=cv, scoring="accuracy").mean())
