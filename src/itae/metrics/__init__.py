"""Clustering scores: Hungarian ACC, NMI, ARI, purity; mean and std over seeds; streaming accumulation."""

from __future__ import annotations

from itae.metrics.contingency import ContingencyAccumulator, scores_from_table
from itae.metrics.scores import SCORE_KEYS, ari, cluster_acc, confusion, evaluate, nmi, purity, summarize

__all__ = [
    "SCORE_KEYS",
    "ContingencyAccumulator",
    "ari",
    "cluster_acc",
    "confusion",
    "evaluate",
    "nmi",
    "purity",
    "scores_from_table",
    "summarize",
]
