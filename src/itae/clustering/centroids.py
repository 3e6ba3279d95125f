"""Centroids of a finished clustering, each row's distance to its own, and the nearest centroid of new rows
(``itae assign``)."""

from __future__ import annotations

import numpy as np

from itae.clustering import _arrays
from itae.errors import InputError


def centroids_from_labels(
    embeddings: np.ndarray, labels: np.ndarray, *, spherical: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The mean of each cluster's rows (unit norm when spherical), for a labelling whose centres were not kept.

    Returns (cluster_ids (k,) int64, centers (k, d) float32), one row per cluster present; noise (-1)
    has no centre.
    """
    x = _arrays.as_embeddings(embeddings)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise InputError(f"{labels.shape[0]} cluster labels for {x.shape[0]} embeddings")
    ids = np.unique(labels[labels >= 0]).astype(np.int64)
    if ids.size == 0:
        raise InputError("no cluster to take a centroid of: every row is noise (-1)")
    dense = np.searchsorted(ids, labels).astype(np.int64)
    dense[labels < 0] = -1
    return ids, _arrays.member_means(x, dense, len(ids), spherical=spherical)


def centroid_distances(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) float64 Euclidean distance of each row of ``embeddings`` (n, d) to the mean of its cluster's rows.

    For a labelling whose centres were not kept (a clusterer's own ``distances`` measure the same to its
    own centres). ``labels`` (n,) may be any sortable values; the noise label -1 has no centre, and its
    rows get NaN. The rows are read in chunks, so a memory-mapped store is never loaded whole.
    """
    x = _arrays.as_embeddings(embeddings)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise InputError(f"{labels.shape[0]} cluster labels for {x.shape[0]} embeddings")
    ids, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    if labels.dtype.kind in "iuf":
        codes[labels == -1] = -1  # noise: no centre, a NaN distance
    centers = _arrays.member_means(x, codes, len(ids), spherical=False)
    return _arrays.distances_to(x, codes, centers, spherical=False).astype(np.float64)


def nearest_centroid(
    embeddings: np.ndarray, centers: np.ndarray, *, spherical: bool = False, cluster_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster of each row of ``embeddings`` (n, d): the nearest of ``centers`` (k, d), and the distance to it.

    Distances are Euclidean, on L2-normalised rows when spherical (as k-means measured them). ``cluster_ids``
    names the centre rows (default 0..k-1). Returns (labels (n,) int64, distances (n,) float32).
    """
    x = _arrays.as_embeddings(embeddings)
    centers = np.asarray(centers, dtype=np.float32)
    if centers.ndim != 2 or centers.shape[0] == 0:
        raise InputError(f"centers must be a non-empty (k, d) array; got shape {centers.shape}")
    if centers.shape[1] != x.shape[1]:
        raise InputError(
            f"the embeddings have {x.shape[1]} dimensions but the centroids {centers.shape[1]}: they come from "
            "different models or features"
        )
    rows, dist, _ = _arrays.assign(x, centers, spherical=spherical)
    ids = np.arange(centers.shape[0], dtype=np.int64) if cluster_ids is None else np.asarray(cluster_ids, np.int64)
    return ids[rows], dist
