"""One-shot clustering scores, their summary over seeds, and the confusion table.

See `itae.metrics.contingency` for the conventions (Hungarian ACC, arithmetic NMI) and for the noise rule:
a predicted label -1 (HDBSCAN noise) is not a cluster. It is left out of ``n_clusters`` (``evaluate``
reports ``n_noise`` and ``noise_fraction`` instead), is never matched to a class, so noise points never
count as correct in ACC nor as pure in purity (they stay in the denominator), and is one more group for
NMI and ARI. `nmi` and `ari` call scikit-learn directly; `evaluate` computes all scores from one
contingency table, and the tests hold the two paths equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from itae.errors import InputError
from itae.metrics.contingency import (
    NOISE,
    ContingencyAccumulator,
    check_pair,
    is_noise,
    matched_and_majority,
    noise_index,
    scores_from_table,
)

SCORE_KEYS = ("acc", "nmi", "ari", "purity")


def _check_nonempty(y_true: object, y_pred: object) -> tuple[np.ndarray, np.ndarray]:
    t, p = check_pair(y_true, y_pred)
    if t.size == 0:
        raise InputError("y_true and y_pred are empty; there is nothing to score")
    return t, p


def confusion(y_true: object, y_pred: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of (class, cluster) pairs.

    Returns (table, classes, clusters): table is (n_classes, n_clusters) int64 with rows in the sorted
    order of `classes` and columns in the sorted order of `clusters`. The noise label -1, when present,
    is a column like the others (the first, as it sorts first); see `noise_index`.
    """
    t, p = _check_nonempty(y_true, y_pred)
    classes, rows = np.unique(t, return_inverse=True)
    clusters, cols = np.unique(p, return_inverse=True)
    table = np.zeros((classes.size, clusters.size), dtype=np.int64)
    np.add.at(table, (rows.ravel(), cols.ravel()), 1)
    return table, classes, clusters


def cluster_acc(y_true: object, y_pred: object) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian).

    With more clusters than classes (or the reverse) the matching is rectangular and points of unmatched
    clusters count as wrong. Noise points (label -1) are never matched, so they always count as wrong.
    """
    table, _, clusters = confusion(y_true, y_pred)
    matched, _ = matched_and_majority(table, noise_index(clusters))
    return matched / float(table.sum())


def purity(y_true: object, y_pred: object) -> float:
    """Share of points whose cluster's majority class is their class (noise points, label -1, never are)."""
    table, _, clusters = confusion(y_true, y_pred)
    _, majority = matched_and_majority(table, noise_index(clusters))
    return majority / float(table.sum())


def nmi(y_true: object, y_pred: object) -> float:
    """Normalised mutual information, arithmetic normalisation (scikit-learn); noise (-1) is one more group."""
    from sklearn.metrics import normalized_mutual_info_score

    t, p = _check_nonempty(y_true, y_pred)
    return float(normalized_mutual_info_score(t, p, average_method="arithmetic"))


def ari(y_true: object, y_pred: object) -> float:
    """Adjusted Rand index (scikit-learn); noise (-1) is one more group."""
    from sklearn.metrics import adjusted_rand_score

    t, p = _check_nonempty(y_true, y_pred)
    return float(adjusted_rand_score(t, p))


def evaluate(y_true: object, y_pred: object, *, chunk_size: int = 1_000_000) -> dict[str, float | int]:
    """acc, nmi, ari, purity, n_images, n_clusters, n_classes of a labelling against ground truth.

    Labels may be ints or strings. A predicted -1 is noise (see `itae.metrics.contingency`): it is not
    counted in n_clusters, never matched to a class (noise points count as wrong in acc and impure in
    purity) and is one more group for nmi and ari; with any noise the result also has n_noise and
    noise_fraction. Computed from one contingency table, built `chunk_size` labels at a time.
    """
    t, p = _check_nonempty(y_true, y_pred)
    acc = ContingencyAccumulator()
    for start in range(0, t.shape[0], chunk_size):
        acc.update(t[start : start + chunk_size], p[start : start + chunk_size])
    return acc.result()


def summarize(runs: Sequence[Mapping[str, object]], *, ddof: int = 1) -> dict[str, object]:
    """Mean and standard deviation of every numeric key over runs (e.g. one `evaluate` dict per seed).

    Returns {"n_runs": r, key: {"mean": m, "std": s}, ...} for the keys that every run has with a number.
    The std is the sample standard deviation (ddof=1) by default, because the seeds are a sample of the
    initialisations one could draw; a single run has std 0.0.
    """
    runs = list(runs)
    if not runs:
        raise InputError("summarize needs at least one run")
    keys = [
        key
        for key in runs[0]
        if all(
            key in run
            and isinstance(run[key], (int, float, np.integer, np.floating))
            and not isinstance(run[key], bool)
            for run in runs
        )
    ]
    out: dict[str, object] = {"n_runs": len(runs)}
    for key in keys:
        values = np.array([float(run[key]) for run in runs], dtype=np.float64)
        std = float(np.std(values, ddof=ddof)) if len(values) > ddof else 0.0
        out[key] = {"mean": float(values.mean()), "std": 0.0 if math.isnan(std) else std}
    return out


__all__ = [
    "NOISE",
    "SCORE_KEYS",
    "ari",
    "cluster_acc",
    "confusion",
    "evaluate",
    "is_noise",
    "nmi",
    "noise_index",
    "purity",
    "scores_from_table",
    "summarize",
]
