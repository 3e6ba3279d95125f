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
- Labels are compared by value (ints or strings).

Noise. A predicted label equal to the integer -1 (HDBSCAN's noise: points in no cluster) is not a cluster:
- ``n_clusters`` counts the real clusters only (the distinct predicted labels other than -1); when any
  point is noise the result also has ``n_noise`` (how many points) and ``noise_fraction`` (n_noise /
  n_images). Without noise these two keys are absent, and every number is what it would be without this rule.
- ACC: the Hungarian matching is between the classes and the real clusters only; noise points are never
  counted correct, and they stay in the denominator (n_images).
- Purity: noise is never anyone's majority; its points count as impure (and stay in the denominator).
- NMI and ARI: the noise points form one more group, as if -1 were a cluster label (so these two equal
  scikit-learn's scores on the raw labels). A large noise group of mixed classes lowers them.
- -1 among the true labels (y_true) is an ordinary class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import sparse

from itae.errors import InputError

NOISE = -1
"""The predicted label of a point in no cluster (HDBSCAN); see the module docstring for how it is scored."""


def is_noise(label: object) -> bool:
    """Whether a predicted label is the noise label: a number (not a bool or string) equal to -1."""
    return (
        isinstance(label, (int, float, np.integer, np.floating))
        and not isinstance(label, (bool, np.bool_))
        and label == NOISE
    )


def noise_index(labels: Sequence[object] | np.ndarray) -> int | None:
    """Position of the noise label in a sequence of distinct cluster labels, or None when absent."""
    for i, label in enumerate(labels):
        if is_noise(label.item() if isinstance(label, np.generic) else label):
            return i
    return None


def _as_labels(y: object, name: str) -> np.ndarray:
    if y is None:
        if name == "y_true":
            raise InputError("no labels to score against (embed with labels=..., e.g. labels='from-folders')")
        raise InputError(f"{name} is None; give one cluster label per image")
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise InputError(f"{name} must be a 1-D sequence of labels, got shape {arr.shape}")
    return arr


def check_pair(y_true: object, y_pred: object) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays as 1-D arrays of equal length."""
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise InputError(
            f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}; they must match one to one"
        )
    return t, p


def _entropy(counts: np.ndarray, n: int) -> float:
    if counts.size <= 1:
        return 0.0
    p = counts.astype(np.float64)
    return float(-np.sum((p / n) * (np.log(p) - math.log(n))))


def hungarian(
    table: np.ndarray, *, row_ok: np.ndarray | None = None, col_ok: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching of the rows of a dense count table to its columns that maximises the matched
    counts (Hungarian algorithm; rectangular when the numbers differ, so min(rows, columns) pairs).

    Only the rows and columns marked True in the bool masks ``row_ok`` / ``col_ok`` (default: all) take
    part, e.g. to leave the noise cluster out. Returns (rows, cols): int64 indices into the whole table,
    one matched pair per position, rows ascending.
    """
    from scipy.optimize import linear_sum_assignment

    table = np.asarray(table)
    rows = np.arange(table.shape[0]) if row_ok is None else np.flatnonzero(row_ok)
    cols = np.arange(table.shape[1]) if col_ok is None else np.flatnonzero(col_ok)
    if rows.size == 0 or cols.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r, c = linear_sum_assignment(table[np.ix_(rows, cols)], maximize=True)
    return rows[r].astype(np.int64), cols[c].astype(np.int64)


def matched_and_majority(dense: np.ndarray, noise_column: int | None = None) -> tuple[int, int]:
    """(points correct under the Hungarian matching, points in their cluster's majority class) of a dense
    (classes, clusters) table, leaving the noise column (if any) out of both."""
    if noise_column is not None:
        dense = np.delete(dense, noise_column, axis=1)
    if dense.size == 0:  # no real clusters (all noise) or no classes
        return 0, 0
    r, c = hungarian(dense)
    return int(dense[r, c].sum()), int(dense.max(axis=0).sum())


def scores_from_table(
    table: sparse.sparray | np.ndarray, *, noise_column: int | None = None
) -> dict[str, float | int]:
    """acc, nmi, ari, purity, n_images, n_classes, n_clusters from a (classes, clusters) count table.

    Rows and columns must be non-empty (every class and cluster present at least once). ``noise_column``:
    the column holding the noise points (predicted label -1), if any; it is scored as the module docstring
    says (never matched, never pure, one more group for NMI and ARI; ``n_noise`` and ``noise_fraction``
    are added).
    """
    csr = sparse.csr_array(table, dtype=np.int64)
    n = int(csr.sum())
    if n == 0:
        raise InputError("the contingency table is empty; there are no labels to score")
    n_classes, n_groups = csr.shape
    if noise_column is not None and not -n_groups <= noise_column < n_groups:
        raise InputError(f"noise_column {noise_column} is out of range for a table of {n_groups} clusters")
    rows = np.asarray(csr.sum(axis=1)).ravel().astype(np.int64)  # class sizes
    cols = np.asarray(csr.sum(axis=0)).ravel().astype(np.int64)  # cluster sizes (noise group included)
    coo = csr.tocoo()
    nz = coo.data.astype(np.int64)

    # ACC and purity over the real clusters only (dense: classes x clusters, small).
    matched, majority = matched_and_majority(csr.toarray(), noise_column)
    acc = matched / n
    purity = majority / n

    # NMI, following scikit-learn's special cases so the two agree exactly; noise is one more group here.
    if n_classes == n_groups == 1:
        nmi = 1.0
    elif n_classes == 1 or n_groups == 1:
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

    out: dict[str, float | int] = {
        "acc": acc,
        "nmi": float(nmi),
        "ari": float(ari),
        "purity": purity,
        "n_images": n,
        "n_clusters": int(n_groups) - (noise_column is not None),
        "n_classes": int(n_classes),
    }
    if noise_column is not None:
        n_noise = int(cols[noise_column])
        out["n_noise"] = n_noise
        out["noise_fraction"] = n_noise / n
    return out


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

    @property
    def noise_column(self) -> int | None:
        """Column of the noise label (-1) in the table, or None when no point so far is noise."""
        return noise_index(self._cluster_index)

    def result(self) -> dict[str, float | int]:
        """acc, nmi, ari, purity, n_images, n_clusters, n_classes (and n_noise, noise_fraction when some
        prediction is -1) of everything added so far."""
        if self.n_samples == 0:
            raise InputError("no labels were added; call update(y_true, y_pred) before result()")
        return scores_from_table(self._table, noise_column=self.noise_column)
