"""Choosing the number of clusters k when none is given.

Criterion (default: silhouette). For every k in `k_range` the clusterer is fitted on a uniform sample of
`sample_size` rows and the partition is scored there; the k with the best score is then fitted on all rows.

Why silhouette: it needs no labels, compares each point's distance to its own cluster with its distance
to the nearest other cluster, and, unlike the k-means objective (inertia), does not improve just because k
grows, so its maximum is a usable choice. Its cost is O(m^2) in the number of scored points, hence the
sample; fitting on the same sample keeps the search cheap for millions of rows. Calinski-Harabasz (higher is
better) and Davies-Bouldin (lower is better) are offered as cheaper alternatives. Ties go to the smaller k.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from itae.clustering import _arrays
from itae.clustering.hierarchical import AgglomerativeClusterer
from itae.clustering.kmeans import KMeansClusterer

log = logging.getLogger(__name__)

CRITERIA = {"silhouette": 1.0, "calinski_harabasz": 1.0, "davies_bouldin": -1.0}  # sign: higher is better


class AutoK(ClusterMixin, BaseEstimator):
    """Pick k in `k_range` (inclusive) by a label-free criterion on a sample, then cluster all rows with it.

    Parameters
    ----------
    k_range : (k_min, k_max), both included, k_min >= 2; k_max is capped at sample size - 1.
    criterion : "silhouette" (default), "calinski_harabasz" or "davies_bouldin".
    sample_size : rows used to fit and score each candidate k.
    seed : seeds the sample and the clusterer.
    method : "kmeans" or "agglomerative".
    spherical : cosine clustering (and cosine silhouette) on L2-normalised inputs.
    params : further keyword arguments for the clusterer (e.g. n_init, backend, linkage).

    Attributes
    ----------
    scores_ : {k: score} for every candidate. n_clusters_ : the chosen k. estimator_ : the final fit.
    labels_, cluster_centers_, distances_ : those of `estimator_`.
    """

    def __init__(
        self,
        k_range: tuple[int, int] = (2, 20),
        *,
        criterion: str = "silhouette",
        sample_size: int = 10_000,
        seed: int = 0,
        method: str = "kmeans",
        spherical: bool = False,
        params: dict | None = None,
    ) -> None:
        self.k_range = k_range
        self.criterion = criterion
        self.sample_size = sample_size
        self.seed = seed
        self.method = method
        self.spherical = spherical
        self.params = params

    def _make(self, k: int) -> KMeansClusterer | AgglomerativeClusterer:
        params = dict(self.params or {})
        if self.method == "kmeans":
            return KMeansClusterer(k, seed=self.seed, spherical=self.spherical, **params)
        return AgglomerativeClusterer(k, spherical=self.spherical, **params)

    def fit(self, X: np.ndarray, y: object = None) -> AutoK:
        """Choose k on a sample of X, shape (n, d), then fit all of X with it."""
        from sklearn import metrics

        x = _arrays.as_embeddings(X)
        n = x.shape[0]
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")
        if self.method not in ("kmeans", "agglomerative"):
            raise ValueError(f"method must be 'kmeans' or 'agglomerative' to choose k; got {self.method!r}")
        try:
            k_min, k_max = (int(v) for v in self.k_range)
        except (TypeError, ValueError):
            raise ValueError(
                f"k_range must be a pair of integers (k_min, k_max); got {self.k_range!r}"
            ) from None
        if k_min < 2 or k_max < k_min:
            raise ValueError(f"k_range must satisfy 2 <= k_min <= k_max; got {self.k_range!r}")
        if self.sample_size < 3:
            raise ValueError(f"sample_size must be >= 3, got {self.sample_size}")
        _arrays.check_embeddings(x, spherical=self.spherical)

        whole = n <= self.sample_size
        # A sample in file order, so a memory map is read forwards; the whole input when it is small enough.
        sample = x if whole else _arrays.sample_rows(x, self.sample_size, seed=self.seed, spherical=False)
        m = sample.shape[0]
        if k_max > m - 1:  # the silhouette is defined for 2 <= k <= m - 1
            if k_min > m - 1:
                raise ValueError(
                    f"k_range {self.k_range!r} needs more than {m} samples; pass a smaller k_min "
                    f"(on the command line: --k-range 2:{m - 1})"
                )
            log.warning(
                "k range %d:%d capped to %d:%d: choosing k on %d %s allows at most %d clusters",
                k_min, k_max, k_min, m - 1, m, "rows" if whole else "sampled rows", m - 1,
            )
            k_max = m - 1

        scored = _arrays.as_float32(sample, spherical=self.spherical)
        sign = CRITERIA[self.criterion]
        scores: dict[int, float] = {}
        fits = {}
        for k in range(k_min, k_max + 1):
            est = self._make(k).fit(sample)
            labels = est.labels_
            if np.unique(labels).size < 2:  # the criterion is undefined for one non-empty cluster
                scores[k] = float("nan")
                continue
            if self.criterion == "silhouette":
                metric = "cosine" if self.spherical else "euclidean"
                score = metrics.silhouette_score(scored, labels, metric=metric)
            elif self.criterion == "calinski_harabasz":
                score = metrics.calinski_harabasz_score(scored, labels)
            else:
                score = metrics.davies_bouldin_score(scored, labels)
            scores[k] = float(score)
            if whole:
                fits[k] = est
        finite = {k: s for k, s in scores.items() if np.isfinite(s)}
        if not finite:
            raise ValueError(
                f"no k in {self.k_range!r} gave two or more non-empty clusters; the data may be degenerate"
            )
        best = max(finite, key=lambda k: (sign * finite[k], -k))
        self.scores_ = scores
        # When the sample was the whole input, the candidate fit already is the final one.
        self.estimator_ = fits[best] if whole else self._make(best).fit(x)
        self.n_clusters_ = best
        self.labels_ = self.estimator_.labels_
        self.cluster_centers_ = self.estimator_.cluster_centers_
        self.distances_ = self.estimator_.distances_
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest centroid of each row (k-means only)."""
        if not hasattr(self, "estimator_"):
            raise ValueError("this AutoK is not fitted yet; call fit(X) first")
        if not hasattr(self.estimator_, "predict"):
            raise ValueError(f"predict is not available for method={self.method!r}; use fit_predict")
        return self.estimator_.predict(X)
