"""Comparing two clusterings of the same images: clusters matched between runs, accuracy per class.

Both matchings are one to one and maximise agreement (Hungarian, `itae.metrics.hungarian` on a
contingency table). Noise (cluster -1) is never matched: between runs it corresponds only to noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from itae.errors import InputError
from itae.metrics import hungarian


def _table(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    a_ids, a_inv = np.unique(a, return_inverse=True)
    b_ids, b_inv = np.unique(b, return_inverse=True)
    table = np.zeros((len(a_ids), len(b_ids)), dtype=np.int64)
    np.add.at(table, (a_inv, b_inv), 1)
    return a_ids, a_inv, b_ids, b_inv, table


def _hungarian(table: np.ndarray, row_ok: np.ndarray, col_ok: np.ndarray) -> dict[int, int]:
    """{row: col} of the matching of the allowed rows and columns that maximises the matched counts."""
    rows, cols = hungarian(table, row_ok=row_ok, col_ok=col_ok)
    return dict(zip(rows.tolist(), cols.tolist(), strict=True))


@dataclass(frozen=True)
class RunMatching:
    """Clusters of run B matched to clusters of run A.

    b_to_a : {B cluster: matched A cluster} (-1 -> -1 for noise); a B cluster left unmatched (B has more
        clusters than A) is absent. changed : (n,) bool, the image's B cluster is not the match of its A cluster.
    """

    b_to_a: dict[int, int]
    changed: np.ndarray

    @property
    def agreement(self) -> float:
        return float(1.0 - self.changed.mean())


def match_runs(a: np.ndarray, b: np.ndarray) -> RunMatching:
    """Match the clusters of ``b`` to those of ``a`` (two (n,) labellings of the same images)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise InputError(f"the runs label {a.shape[0]} and {b.shape[0]} images; they must label the same ones")
    a_ids, a_inv, b_ids, b_inv, table = _table(a, b)
    pairs = _hungarian(table, a_ids >= 0, b_ids >= 0)  # noise is never matched to a cluster
    b_to_a = {int(b_ids[c]): int(a_ids[r]) for r, c in pairs.items()}
    if (b_ids < 0).any():
        b_to_a[-1] = -1
    mapped = np.array([b_to_a.get(int(v), np.iinfo(np.int64).min) for v in b_ids], dtype=np.int64)[b_inv]
    return RunMatching(b_to_a, mapped != a)


def matched_correct(labels: Sequence[str], clusters: np.ndarray) -> np.ndarray:
    """(n,) bool: the image's cluster is the one matched to its label (Hungarian, noise never matched)."""
    labels = np.asarray(labels, dtype=str)
    c_ids, c_inv, l_ids, l_inv, table = _table(np.asarray(clusters).reshape(-1), labels)
    pairs = _hungarian(table, c_ids >= 0, np.ones(len(l_ids), dtype=bool))
    label_of = np.full(len(c_ids), -1, dtype=np.int64)
    for r, c in pairs.items():
        label_of[r] = c
    return label_of[c_inv] == l_inv


def per_class_accuracy(labels: Sequence[str], correct: np.ndarray) -> dict[str, tuple[int, float]]:
    """{class: (images, share of them in the cluster matched to the class)}, classes in sorted order."""
    labels = np.asarray(labels, dtype=str)
    names, inv = np.unique(labels, return_inverse=True)
    count = np.bincount(inv, minlength=len(names))
    hits = np.bincount(inv, weights=np.asarray(correct, dtype=np.float64), minlength=len(names))
    return {str(name): (int(count[i]), float(hits[i] / count[i])) for i, name in enumerate(names)}
