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
from sklearn.utils.validation import check_is_fitted

from itae.clustering import _arrays
from itae.clustering.hierarchical import AgglomerativeClusterer
from itae.clustering.kmeans import KMeansClusterer
from itae.errors import InputError, InputTypeError

log = logging.getLogger(__name__)

CRITERIA = {"silhouette": 1.0, "calinski_harabasz": 1.0, "davies_bouldin": -1.0}  # sign: higher is better


class AutoK(ClusterMixin, BaseEstimator):
    """Pick k in `k_range` (inclusive) by a label-free criterion on a sample, then cluster all rows with it.

    Parameters
    ----------
    k_range : (k_min, k_max), both included, k_min >= 2; k_max is capped at sample size - 1.
    criterion : "silhouette" (default), "calinski_harabasz" or "davies_bouldin".
    sample_size : rows used to fit and score each candidate k.
    random_state : seeds the sample and the clusterer (int, None or RandomState; 0 by default).
    seed : former name of ``random_state``, still accepted (it wins when given).
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
        random_state: object = 0,
        seed: int | None = None,
        method: str = "kmeans",
        spherical: bool = False,
        params: dict | None = None,
    ) -> None:
        self.k_range = k_range
        self.criterion = criterion
        self.sample_size = sample_size
        self.random_state = random_state
        self.seed = seed
        self.method = method
        self.spherical = spherical
        self.params = params

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # embeddings are dense; sparse input is refused
        tags.non_deterministic = self.random_state is None and self.seed is None
        return tags

    def _make(self, k: int, seed: int = 0) -> KMeansClusterer | AgglomerativeClusterer:
        params = dict(self.params or {})
        if self.method == "kmeans":
            return KMeansClusterer(k, random_state=seed, spherical=self.spherical, **params)
        return AgglomerativeClusterer(k, spherical=self.spherical, **params)

    def check_params(self) -> tuple[int, int]:
        """Check the parameters that need no data (``fit`` does it first); returns (k_min, k_max)."""
        if self.criterion not in CRITERIA:
            raise InputError(f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")
        if self.method not in ("kmeans", "agglomerative"):
            raise InputError(f"method must be 'kmeans' or 'agglomerative' to choose k; got {self.method!r}")
        try:
            k_min, k_max = (int(v) for v in self.k_range)
        except (TypeError, ValueError):
            raise InputError(
                f"k_range must be a pair of integers (k_min, k_max); got {self.k_range!r}"
            ) from None
        if k_min < 2 or k_max < k_min:
            raise InputError(f"k_range must satisfy 2 <= k_min <= k_max; got {self.k_range!r}")
        _arrays.check_int(self.sample_size, "sample_size", low=3)
        if self.params is not None and not isinstance(self.params, dict):
            raise InputTypeError(f"params must be a dict of clusterer options or None; got {self.params!r}")
        try:
            self._make(k_min).check_params()
        except TypeError as e:  # an option the clusterer does not take
            raise InputTypeError(f"method={self.method!r}: {e}") from None
        return k_min, k_max

    def fit(self, X: np.ndarray, y: object = None) -> AutoK:
        """Choose k on a sample of X, shape (n, d), then fit all of X with it."""
        from sklearn import metrics

        k_min, k_max = self.check_params()
        x = _arrays.validate(self, X)
        n = x.shape[0]
        if n < 3:
            raise InputError(f"choosing k needs at least 3 samples; got n_samples={n}")
        _arrays.check_embeddings(x, spherical=self.spherical)
        seed = _arrays.seed_of(self.random_state if self.seed is None else self.seed)

        whole = n <= self.sample_size
        # A sample in file order, so a memory map is read forwards; the whole input when it is small enough.
        sample = x if whole else _arrays.sample_rows(x, self.sample_size, seed=seed, spherical=False)
        m = sample.shape[0]
        if k_max > m - 1:  # the silhouette is defined for 2 <= k <= m - 1
            if k_min > m - 1:
                raise InputError(
                    f"k_range {self.k_range!r} needs more than {m} samples; give a k_range "
                    f"within 2 to {m - 1}"
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
            est = self._make(k, seed).fit(sample)
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
            raise InputError(
                f"no k in {self.k_range!r} gave two or more non-empty clusters; the data may be degenerate"
            )
        best = max(finite, key=lambda k: (sign * finite[k], -k))
        self.scores_ = scores
        # When the sample was the whole input, the candidate fit already is the final one.
        self.estimator_ = fits[best] if whole else self._make(best, seed).fit(x)
        self.n_clusters_ = self.estimator_.n_clusters_  # less than best if k-means left clusters empty
        self.labels_ = self.estimator_.labels_
        self.cluster_centers_ = self.estimator_.cluster_centers_
        self.distances_ = self.estimator_.distances_
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest centroid of each row (k-means only)."""
        check_is_fitted(self, "estimator_")
        if not hasattr(self.estimator_, "predict"):
            raise InputError(f"predict is not available for method={self.method!r}; use fit_predict")
        _arrays.validate(self, X, reset=False)
        return self.estimator_.predict(X)
