"""Clustering of image embeddings: k-means (scikit-learn, mini-batch, faiss), agglomerative, HDBSCAN,
and automatic choice of k. Estimators follow scikit-learn conventions; `cluster` is the one-call API.
"""

from __future__ import annotations

from itae.clustering.api import METHODS, ClusterResult, check_cluster_arguments, cluster
from itae.clustering.autok import AutoK
from itae.clustering.centroids import centroid_distances, centroids_from_labels, nearest_centroid
from itae.clustering.hierarchical import HDBSCAN_MAX_SAMPLES, AgglomerativeClusterer, HDBSCANClusterer
from itae.clustering.kmeans import SKLEARN_MAX_SAMPLES, KMeansClusterer, faiss_available, resolve_backend

__all__ = [
    "HDBSCAN_MAX_SAMPLES",
    "METHODS",
    "SKLEARN_MAX_SAMPLES",
    "AgglomerativeClusterer",
    "AutoK",
    "ClusterResult",
    "HDBSCANClusterer",
    "KMeansClusterer",
    "centroid_distances",
    "centroids_from_labels",
    "check_cluster_arguments",
    "cluster",
    "faiss_available",
    "nearest_centroid",
    "resolve_backend",
]
