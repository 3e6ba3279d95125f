"""Clustering of image embeddings: k-means (scikit-learn, mini-batch, faiss), agglomerative, HDBSCAN,
and automatic choice of k. Estimators follow scikit-learn conventions; `cluster` is the one-call API.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from itae.cluster.api import METHODS, ClusterResult, cluster
from itae.cluster.autok import AutoK
from itae.cluster.hierarchical import AgglomerativeClusterer, HDBSCANClusterer
from itae.cluster.kmeans import SKLEARN_MAX_SAMPLES, KMeansClusterer, faiss_available, resolve_backend

__all__ = [
    "METHODS",
    "SKLEARN_MAX_SAMPLES",
    "AgglomerativeClusterer",
    "AutoK",
    "ClusterResult",
    "HDBSCANClusterer",
    "KMeansClusterer",
    "cluster",
    "faiss_available",
    "resolve_backend",
]


class _CallableModule(types.ModuleType):
    # `itae.cluster` names both this package and the function `cluster`. Once any code has imported the
    # package (e.g. `from itae.cluster import AutoK`), the attribute `itae.cluster` is the module, so calling
    # the module forwards to the function and `itae.cluster(x, k)` works whatever the import order.
    def __call__(self, *args: Any, **kwargs: Any) -> ClusterResult:
        return cluster(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
