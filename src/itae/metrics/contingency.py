"""Clustering scores computed exactly from a contingency table, and a chunk-by-chunk accumulator.

Every score here is a function of the (classes x clusters) table of counts alone, so a table built from
chunks gives the same numbers as the full label arrays: that is how scores for millions of images are
computed without holding pairwise or one-hot data.

Conventions (shared with `itae.metrics.scores`):
- ACC: the best one-to-one matching of clusters to classes (Hungarian algorithm on the table); when the
  numbers differ the matching is rectangular, and points in unmatched clusters (or classes) count as wrong.
- NMI: mutual information over the arithmetic mean of the two entropies (scikit-learn's default and the
  usual choice in deep-clustering papers), natural logarithm.
- ARI: Hubert and Arabie's adjusted Rand index.
- Purity: each cluster votes for its majority class.
- Labels are compared by value; a noise label (-1 from HDBSCAN) is simply one more cluster.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse


def _as_labels(y: object, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of labels, got shape {arr.shape}")
    return arr


def check_pair(y_true: object, y_pred: object) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays as 1-D arrays of equal length."""
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(
            f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}; they must match one to one"
        )
    return t, p


def _entropy(counts: np.ndarray, n: int) -> float:
    if counts.size <= 1:
        return 0.0
    p = counts.astype(np.float64)
    return float(-np.sum((p / n) * (np.log(p) - math.log(n))))


def scores_from_table(table: sparse.sparray | np.ndarray) -> dict[str, float | int]:
    """acc, nmi, ari, purity, n_images, n_classes, n_clusters from a (classes, clusters) count table.

    Rows and columns must be non-empty (every class and cluster present at least once).
    """
    csr = sparse.csr_array(table, dtype=np.int64)
    n = int(csr.sum())
    if n == 0:
        raise ValueError("the contingency table is empty; there are no labels to score")
    n_classes, n_clusters = csr.shape
    rows = np.asarray(csr.sum(axis=1)).ravel().astype(np.int64)  # class sizes
    cols = np.asarray(csr.sum(axis=0)).ravel().astype(np.int64)  # cluster sizes
    coo = csr.tocoo()
    nz = coo.data.astype(np.int64)

    from scipy.optimize import linear_sum_assignment

    # Hungarian matching on the dense table (classes x clusters); rectangular when the numbers differ.
    dense = csr.toarray()
    r, c = linear_sum_assignment(dense, maximize=True)
    acc = float(dense[r, c].sum()) / n
    purity = float(dense.max(axis=0).sum()) / n

    # NMI, following scikit-learn's special cases so the two agree exactly.
    if n_classes == n_clusters == 1:
        nmi = 1.0
    elif n_classes == 1 or n_clusters == 1:
        nmi = 0.0
    else:
        p = nz / n
        outer = rows[coo.row].astype(np.float64) * cols[coo.col].astype(np.float64)
        terms = p * (np.log(nz) - math.log(n)) + p * (-np.log(outer) + 2 * math.log(n))
        terms[np.abs(terms) < np.finfo(np.float64).eps] = 0.0
        mi = max(float(terms.sum()), 0.0)
        if mi == 0.0:
            nmi = 0.0
        else:
            nmi = mi / ((_entropy(rows, n) + _entropy(cols, n)) / 2)

    # ARI from pair counts over ordered pairs; Python ints, because products overflow int64 at ~10^5 images.
    sum_sq = int(np.sum(nz * nz))
    tp = sum_sq - n
    fp = int(np.sum(cols * cols)) - sum_sq
    fn = int(np.sum(rows * rows)) - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        ari = 1.0
    else:
        ari = 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))

    return {
        "acc": acc,
        "nmi": float(nmi),
        "ari": float(ari),
        "purity": purity,
        "n_images": n,
        "n_clusters": int(n_clusters),
        "n_classes": int(n_classes),
    }


class ContingencyAccumulator:
    """Build the contingency table chunk by chunk, then score it exactly.

    >>> acc = ContingencyAccumulator()
    >>> for t, p in chunks:            # doctest: +SKIP
    ...     acc.update(t, p)
    >>> acc.result()["nmi"]             # doctest: +SKIP

    Labels may be any hashable scalars (ints, strings); rows and columns follow order of first appearance.
    Memory is one sparse table of at most (number of classes x number of clusters) non-zeros.
    """

    def __init__(self) -> None:
        self._class_index: dict[object, int] = {}
        self._cluster_index: dict[object, int] = {}
        self._table = sparse.csr_array((0, 0), dtype=np.int64)

    @staticmethod
    def _global_codes(values: np.ndarray, index: dict[object, int]) -> np.ndarray:
        uniques, codes = np.unique(values, return_inverse=True)
        ids = np.array([index.setdefault(u.item(), len(index)) for u in uniques], dtype=np.int64)
        return ids[codes.ravel()]

    def update(self, y_true: object, y_pred: object) -> ContingencyAccumulator:
        """Add one chunk of paired labels; returns self."""
        t, p = check_pair(y_true, y_pred)
        if t.size == 0:
            return self
        rows = self._global_codes(t, self._class_index)
        cols = self._global_codes(p, self._cluster_index)
        shape = (len(self._class_index), len(self._cluster_index))
        chunk = sparse.coo_array((np.ones(rows.size, dtype=np.int64), (rows, cols)), shape=shape).tocsr()
        if self._table.shape != shape:
            self._table.resize(shape)  # new labels appeared: grow with empty rows/columns
        self._table = self._table + chunk  # stays sparse
        return self

    @property
    def n_samples(self) -> int:
        return int(self._table.sum())

    @property
    def classes(self) -> list[object]:
        """Class labels in row order."""
        return list(self._class_index)

    @property
    def clusters(self) -> list[object]:
        """Cluster labels in column order."""
        return list(self._cluster_index)

    @property
    def table(self) -> sparse.csr_array:
        """(n_classes, n_clusters) sparse int64 counts."""
        return self._table

    def result(self) -> dict[str, float | int]:
        """acc, nmi, ari, purity, n_images, n_clusters, n_classes of everything added so far."""
        if self.n_samples == 0:
            raise ValueError("no labels were added; call update(y_true, y_pred) before result()")
        return scores_from_table(self._table)
