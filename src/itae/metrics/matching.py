"""Clusters matched one-to-one to classes: the matching behind ACC, kept whole for the pages that show it.

`cluster_acc` only needs the matched count; the report's confusion table and map colours need the pairs
themselves, on the same contingency table (`confusion`) and with the same noise rule (the noise cluster,
-1, is a row of the table but is never matched).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from itae.metrics.contingency import hungarian, noise_index
from itae.metrics.scores import confusion


@dataclass(frozen=True)
class ClusterMatching:
    """The (clusters, classes) contingency table and the one-to-one matching that maximises agreement.

    cluster_ids (k,) and class_ids (L,): the sorted distinct predicted and true labels; table (k, L) int64,
    row i counting cluster_ids[i]; rows, cols: the matched pairs, as indices into the table (rows
    ascending); noise_row: the row of the noise cluster (-1), which is never matched, or None.
    """

    cluster_ids: np.ndarray
    class_ids: np.ndarray
    table: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    noise_row: int | None = None

    @property
    def n_clusters(self) -> int:
        """Real clusters: the noise row not counted."""
        return len(self.cluster_ids) - (self.noise_row is not None)

    @property
    def accuracy(self) -> float:
        """Share of all points (noise included) in the class matched to their cluster: ``cluster_acc``."""
        return float(self.table[self.rows, self.cols].sum() / max(self.table.sum(), 1))

    def class_of(self) -> dict[int, int]:
        """{cluster row: matched class column}; unmatched clusters (and noise) are absent."""
        return dict(zip(self.rows.tolist(), self.cols.tolist(), strict=True))

    def cluster_of(self) -> dict[int, int]:
        """{class column: matched cluster row}; unmatched classes are absent."""
        return dict(zip(self.cols.tolist(), self.rows.tolist(), strict=True))


def match_clusters(y_true: object, y_pred: object) -> ClusterMatching:
    """Match the clusters of ``y_pred`` one-to-one to the classes of ``y_true`` (Hungarian, noise never matched).

    Labels may be ints or strings, as for `evaluate`; both must be non-empty and of equal length.
    """
    by_class, class_ids, cluster_ids = confusion(y_true, y_pred)  # (classes, clusters)
    table = np.ascontiguousarray(by_class.T)  # (clusters, classes): the report reads it cluster by cluster
    noise_row = noise_index(cluster_ids)
    real = np.ones(len(cluster_ids), dtype=bool)
    if noise_row is not None:
        real[noise_row] = False
    rows, cols = hungarian(table, row_ok=real)
    return ClusterMatching(cluster_ids, class_ids, table, rows, cols, noise_row)
