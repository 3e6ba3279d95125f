"""Clustering scores: Hungarian ACC, NMI, ARI, purity; mean and std over seeds; streaming accumulation.

A predicted label -1 is noise (HDBSCAN), not a cluster: it is not counted in ``n_clusters`` (the scores
report ``n_noise`` and ``noise_fraction`` when there is any), it is never matched to a class, so noise
points count as wrong in ACC and as impure in purity while staying in the denominator, and it is one more
group for NMI and ARI. Details in `itae.metrics.contingency`.
"""

from __future__ import annotations

from itae.metrics.contingency import (
    NOISE,
    ContingencyAccumulator,
    hungarian,
    is_noise,
    noise_index,
    scores_from_table,
)
from itae.metrics.matching import ClusterMatching, match_clusters
from itae.metrics.scores import SCORE_KEYS, ari, cluster_acc, confusion, evaluate, nmi, purity, summarize

__all__ = [
    "NOISE",
    "SCORE_KEYS",
    "ClusterMatching",
    "ContingencyAccumulator",
    "ari",
    "cluster_acc",
    "confusion",
    "evaluate",
    "hungarian",
    "is_noise",
    "match_clusters",
    "nmi",
    "noise_index",
    "purity",
    "scores_from_table",
    "summarize",
]
