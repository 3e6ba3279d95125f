"""Agglomerative (hierarchical) and density-based (HDBSCAN) clusterers, scikit-learn style.

Both are deterministic (no seed) and need the data in memory with pairwise work that grows like n^2,
so they are meant for up to tens of thousands of images; use k-means beyond that. Each refuses inputs
above its ``max_samples`` (20,000 for agglomerative, 10,000 for HDBSCAN) instead of seeming to hang.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from itae.clustering import _arrays
from itae.errors import InputError

# scikit-learn's HDBSCAN on high-dimensional embeddings (384-1536 dims, where tree indexes do not prune)
# does about n^2 distance work: at this many 768-dim rows it takes a minute or two on a 2-core machine,
# and three to four times as long per doubling of n, so a million rows would appear to hang for days.
HDBSCAN_MAX_SAMPLES = 10_000


class AgglomerativeClusterer(ClusterMixin, BaseEstimator):
    """Bottom-up hierarchical clustering into `n_clusters` (:class:`sklearn.cluster.AgglomerativeClustering`).

    Parameters
    ----------
    n_clusters : number of clusters k (1 <= k <= n_samples); 2 by default, as scikit-learn's.
    linkage : "ward" (default), "complete", "average" or "single".
    metric : distance for non-ward linkages ("euclidean", "cosine", ...); ward needs "euclidean".
    spherical : L2-normalise the inputs first (then ward on unit vectors ranks pairs like cosine).
    max_samples : refuse larger inputs, because the merge tree needs O(n^2) memory and time.

    Attributes
    ----------
    labels_ : (n,) int64. cluster_centers_ : (k, d) float32 member means (unit norm when spherical).
    distances_ : (n,) float32 distance of each row to its cluster mean. n_clusters_ : k.
    """

    def __init__(
        self,
        n_clusters: int = 2,
        *,
        linkage: str = "ward",
        metric: str = "euclidean",
        spherical: bool = False,
        max_samples: int = 20_000,
    ) -> None:
        self.n_clusters = n_clusters
        self.linkage = linkage
        self.metric = metric
        self.spherical = spherical
        self.max_samples = max_samples

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # embeddings are dense; sparse input is refused
        return tags

    def check_params(self) -> None:
        """Check the parameters that need no data (``fit`` does it first); raise ValueError or TypeError."""
        _arrays.check_int(self.n_clusters, "n_clusters")
        _arrays.check_int(self.max_samples, "max_samples")
        if self.linkage not in ("ward", "complete", "average", "single"):
            raise InputError(
                f"linkage must be 'ward', 'complete', 'average' or 'single'; got {self.linkage!r}"
            )
        if self.linkage == "ward" and self.metric != "euclidean":
            raise InputError(
                f"ward linkage needs metric='euclidean', got {self.metric!r}; use spherical=True for cosine"
            )

    def fit(self, X: np.ndarray, y: object = None) -> AgglomerativeClusterer:
        """Cluster the rows of X, shape (n, d)."""
        from sklearn.cluster import AgglomerativeClustering

        self.check_params()
        x = _arrays.validate(self, X)
        n = x.shape[0]
        k = _arrays.check_n_clusters(self.n_clusters, n)
        if n > self.max_samples:
            raise InputError(
                f"agglomerative clustering of {n} samples needs O(n^2) memory (limit max_samples={self.max_samples}); "
                "use KMeansClusterer (method='kmeans') for large inputs, or raise max_samples"
            )
        _arrays.check_embeddings(x, spherical=self.spherical)
        data = _arrays.as_float32(x, spherical=self.spherical)
        if k == 1:  # scikit-learn needs at least two clusters to build a tree for
            labels = np.zeros(n, dtype=np.int64)
        else:
            model = AgglomerativeClustering(n_clusters=k, linkage=self.linkage, metric=self.metric)
            labels = model.fit_predict(data).astype(np.int64)
        self.labels_ = labels
        self.cluster_centers_ = _arrays.member_means(data, labels, k, spherical=self.spherical)
        self.distances_ = _arrays.distances_to(data, labels, self.cluster_centers_, spherical=self.spherical)
        self.n_clusters_ = k
        return self


class HDBSCANClusterer(ClusterMixin, BaseEstimator):
    """Density-based clustering that finds the number of clusters itself (:class:`sklearn.cluster.HDBSCAN`).

    Points in no dense region get the label **-1 (noise)**; it is kept in `labels_`, is not counted in
    `n_clusters_`, has no centre, and its distance is NaN. The metrics (``itae.metrics``) do not count
    -1 as a cluster: it is left out of ``n_clusters`` (reported as ``n_noise`` and ``noise_fraction``) and
    never matched to a class, so noise points count as wrong in ACC and as impure in purity; for NMI and
    ARI it is one more group.

    Parameters
    ----------
    min_cluster_size : smallest group that counts as a cluster.
    min_samples : neighbourhood size for core distances; None means min_cluster_size.
    cluster_selection_epsilon : merge clusters closer than this.
    metric : distance passed to scikit-learn.
    spherical : L2-normalise the inputs first.
    max_samples : refuse larger inputs, because the distance work grows like n^2 (the default,
        10,000, takes a minute or two with 768 dims on 2 cores; each doubling of n, three to four times as long).

    Attributes
    ----------
    labels_ : (n,) int64 in -1..k-1. cluster_centers_ : (k, d) float32 member means of clusters 0..k-1.
    distances_ : (n,) float32 (NaN for noise). n_clusters_ : k, noise excluded. noise_fraction_ : share of -1.
    """

    def __init__(
        self,
        min_cluster_size: int = 5,
        *,
        min_samples: int | None = None,
        cluster_selection_epsilon: float = 0.0,
        metric: str = "euclidean",
        spherical: bool = False,
        max_samples: int = HDBSCAN_MAX_SAMPLES,
    ) -> None:
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.cluster_selection_epsilon = cluster_selection_epsilon
        self.metric = metric
        self.spherical = spherical
        self.max_samples = max_samples

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # embeddings are dense; sparse input is refused
        return tags

    def check_params(self) -> None:
        """Check the parameters that need no data (``fit`` does it first); raise ValueError or TypeError."""
        _arrays.check_int(self.min_cluster_size, "min_cluster_size", low=2)
        _arrays.check_int(self.min_samples, "min_samples", none=True)
        _arrays.check_int(self.max_samples, "max_samples")

    def fit(self, X: np.ndarray, y: object = None) -> HDBSCANClusterer:
        """Cluster the rows of X, shape (n, d)."""
        from sklearn.cluster import HDBSCAN

        self.check_params()
        x = _arrays.validate(self, X)
        n = x.shape[0]
        if not 2 <= self.min_cluster_size <= n:
            raise InputError(
                f"min_cluster_size must be between 2 and the number of samples (n_samples={n}); got {self.min_cluster_size}"
            )
        if n > self.max_samples:
            raise InputError(
                f"HDBSCAN of {n} samples does O(n^2) distance work on embeddings and would run for a long time "
                f"(limit max_samples={self.max_samples}); use KMeansClusterer (method='kmeans') for large "
                "inputs, or raise max_samples"
            )
        _arrays.check_embeddings(x, spherical=self.spherical)
        data = _arrays.as_float32(x, spherical=self.spherical)
        model = HDBSCAN(
            min_cluster_size=int(self.min_cluster_size),
            min_samples=self.min_samples,
            cluster_selection_epsilon=self.cluster_selection_epsilon,
            metric=self.metric,
            copy=True,  # HDBSCAN may otherwise modify the array in place, and `data` can be the caller's
        )
        labels = model.fit_predict(data).astype(np.int64)
        k = int(labels.max()) + 1 if labels.size else 0
        self.labels_ = labels
        self.cluster_centers_ = _arrays.member_means(data, labels, k, spherical=self.spherical)
        self.distances_ = _arrays.distances_to(data, labels, self.cluster_centers_, spherical=self.spherical)
        self.n_clusters_ = k
        self.noise_fraction_ = float(np.mean(labels == -1))
        return self
