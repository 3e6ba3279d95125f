"""k-means with three backends behind one scikit-learn-style estimator.

- ``"sklearn"``: :class:`sklearn.cluster.KMeans` on all rows (exact Lloyd, k-means++ with ``n_init`` restarts).
- ``"minibatch"``: :class:`sklearn.cluster.MiniBatchKMeans` trained on a uniform row sample.
- ``"faiss"``: ``faiss.Kmeans`` (GPU when faiss sees one) trained on a uniform row sample.

The two sampled backends then assign every row to its nearest centre in chunks, so a memory-mapped
(n, d) array is read, never copied whole, and no (n, k) distance matrix exists. ``backend="auto"`` takes
``"sklearn"`` up to :data:`SKLEARN_MAX_SAMPLES` rows and ``"faiss"`` beyond when it is installed
(``pip install itae[faiss]``), else ``"minibatch"``.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from itae.clustering import _arrays

SKLEARN_MAX_SAMPLES = 50_000
"""Largest n that ``backend="auto"`` gives to full scikit-learn k-means."""

BACKENDS = ("auto", "sklearn", "minibatch", "faiss")
INITS = ("auto", "k-means++", "random")
_DEFAULT_MAX_ITER = {"sklearn": 300, "minibatch": 100, "faiss": 25}


def faiss_available() -> bool:
    """Whether faiss is importable (without importing it)."""
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str, n_samples: int) -> str:
    """The concrete backend that `backend` means for `n_samples` rows."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ValueError(
            "backend='faiss' needs faiss; install it with `pip install itae[faiss]` or use 'auto'"
        )
    if backend != "auto":
        return backend
    if n_samples <= SKLEARN_MAX_SAMPLES:
        return "sklearn"
    return "faiss" if faiss_available() else "minibatch"


class KMeansClusterer(ClusterMixin, BaseEstimator):
    """k-means with a choice of backend, optional spherical (cosine) variant, and streamed assignment.

    Parameters
    ----------
    n_clusters : number of clusters k (1 <= k <= n_samples).
    n_init : restarts; the run with the lowest objective is kept (faiss: ``nredo``).
    seed : seeds the initialisation and the training sample.
    spherical : L2-normalise the inputs and the centroids, so points go to the centroid of highest cosine.
        Exact spherical k-means on the sklearn and faiss backends; on "minibatch" the centroids are
        normalised after training (an approximation).
    backend : "auto", "sklearn", "minibatch" or "faiss" (see the module docstring).
    max_iter : iterations per run; None takes the backend's default (sklearn 300, minibatch 100, faiss 25).
    batch_size : mini-batch size for the "minibatch" backend.
    train_size : rows sampled to train the "minibatch" and "faiss" backends; None means
        ``max(max_points_per_centroid * k, 100_000)``, capped at n (faiss's own rule, with a floor for small k).
    max_points_per_centroid : see ``train_size``.
    chunk_size : at most this many rows per chunk (and at most ~64 MiB of them) when assigning all points.
    tol : relative tolerance for convergence on the "sklearn" backend.
    init : "auto" (default), "k-means++" or "random"; "afk-mc2" on "faiss" only. "auto" is k-means++ on
        the scikit-learn backends and AFK-MC2 (an MCMC approximation of k-means++) on faiss, whose exact
        k-means++ costs about ten Lloyd iterations and whose default, random, often merges separated
        clusters.

    Attributes
    ----------
    labels_ : (n,) int64 cluster of each training row.
    cluster_centers_ : (k, d) float32 centroids (unit norm when spherical).
    distances_ : (n,) float32 distance of each row to its own centroid (in normalised space when spherical).
    inertia_ : sum of squared distances to the own centroid.
    n_clusters_ : k.
    backend_ : the backend actually used.
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        n_init: int = 10,
        seed: int = 0,
        spherical: bool = False,
        backend: str = "auto",
        max_iter: int | None = None,
        batch_size: int = 4096,
        train_size: int | None = None,
        max_points_per_centroid: int = 256,
        chunk_size: int = 65536,
        tol: float = 1e-4,
        init: str = "auto",
    ) -> None:
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.seed = seed
        self.spherical = spherical
        self.backend = backend
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.train_size = train_size
        self.max_points_per_centroid = max_points_per_centroid
        self.chunk_size = chunk_size
        self.tol = tol
        self.init = init

    def fit(self, X: np.ndarray, y: object = None) -> KMeansClusterer:
        """Cluster the rows of X, shape (n, d); a memory-mapped array is read in chunks, never copied."""
        x = _arrays.as_embeddings(X)
        n = x.shape[0]
        k = _arrays.check_n_clusters(self.n_clusters, n)
        for name in ("n_init", "batch_size", "max_points_per_centroid", "chunk_size"):
            _check_positive_int(getattr(self, name), name)
        if self.max_iter is not None:
            _check_positive_int(self.max_iter, "max_iter")
        if self.train_size is not None:
            _check_positive_int(self.train_size, "train_size")
        backend = resolve_backend(self.backend, n)
        inits = INITS + ("afk-mc2",) if backend == "faiss" else INITS
        init = self.init
        if init == "auto":
            init = "afk-mc2" if backend == "faiss" else "k-means++"
        if self.init not in inits:
            raise ValueError(
                f"init must be one of {', '.join(inits)} for backend {backend!r}; got {self.init!r}"
            )
        _arrays.check_embeddings(x, spherical=self.spherical)
        max_iter = self.max_iter if self.max_iter is not None else _DEFAULT_MAX_ITER[backend]

        if backend == "sklearn":
            centers = self._fit_sklearn(x, k, max_iter, init)
        else:
            train_size = self.train_size or max(self.max_points_per_centroid * k, 100_000)
            sample = _arrays.sample_rows(
                x, max(k, min(n, train_size)), seed=self.seed, spherical=self.spherical
            )
            if backend == "minibatch":
                centers = self._fit_minibatch(sample, k, max_iter, init)
            else:
                centers = self._fit_faiss(sample, k, max_iter, init)
            del sample
        if self.spherical:
            centers = _arrays.normalize_rows(centers)

        self.cluster_centers_ = np.ascontiguousarray(centers, dtype=np.float32)
        self.labels_, self.distances_, self.inertia_ = _arrays.assign(
            x, self.cluster_centers_, spherical=self.spherical, chunk_size=self.chunk_size
        )
        self.n_clusters_ = k
        self.n_features_in_ = x.shape[1]
        self.backend_ = backend
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest learned centroid of each row of X, shape (m, d) -> (m,) int64."""
        if not hasattr(self, "cluster_centers_"):
            raise ValueError("this KMeansClusterer is not fitted yet; call fit(X) first")
        x = _arrays.as_embeddings(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {x.shape[1]} features but the clusterer was fitted on {self.n_features_in_}"
            )
        _arrays.check_embeddings(x, spherical=self.spherical)
        labels, _, _ = _arrays.assign(
            x, self.cluster_centers_, spherical=self.spherical, chunk_size=self.chunk_size
        )
        return labels

    def _fit_sklearn(self, x: np.ndarray, k: int, max_iter: int, init: str) -> np.ndarray:
        from sklearn.cluster import KMeans

        data = _arrays.as_float32(x, spherical=self.spherical)
        km = KMeans(
            n_clusters=k,
            init=init,
            n_init=self.n_init,
            max_iter=max_iter,
            tol=self.tol,
            random_state=self.seed,
        )
        km.fit(data)
        centers = km.cluster_centers_.astype(np.float32)
        if self.spherical:
            centers = _spherical_lloyd(data, centers, max_iter)
        return centers

    def _fit_minibatch(self, sample: np.ndarray, k: int, max_iter: int, init: str) -> np.ndarray:
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(
            n_clusters=k,
            init=init,
            n_init=self.n_init,
            max_iter=max_iter,
            batch_size=self.batch_size,
            random_state=self.seed,
        )
        km.fit(sample)
        return km.cluster_centers_.astype(np.float32)

    def _fit_faiss(self, sample: np.ndarray, k: int, max_iter: int, init: str) -> np.ndarray:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        km = faiss.Kmeans(
            sample.shape[1],
            k,
            niter=max_iter,
            nredo=self.n_init,
            seed=int(self.seed),
            spherical=bool(self.spherical),
            # The sample is already the training set: stop faiss from subsampling again or warning.
            max_points_per_centroid=math.ceil(sample.shape[0] / k) + 1,
            min_points_per_centroid=1,
            verbose=False,
            gpu=gpus > 0,
        )
        init_methods = {
            "k-means++": "ClusteringInitMethod_KMEANS_PLUS_PLUS",
            "afk-mc2": "ClusteringInitMethod_AFK_MC2",
        }
        if init in init_methods:
            if hasattr(faiss, init_methods[init]):
                km.cp.init_method = getattr(faiss, init_methods[init])
            elif self.init != "auto":
                raise ValueError(f"init={init!r} needs a newer faiss; upgrade it or pass init='random'")
            # else: an older faiss under init="auto" keeps its own random initialisation
        km.train(np.ascontiguousarray(sample, dtype=np.float32))
        return np.array(km.centroids, dtype=np.float32)


def _spherical_lloyd(x_unit: np.ndarray, centers: np.ndarray, max_iter: int) -> np.ndarray:
    """Spherical k-means iterations from `centers`: assign by cosine, centroid = normalised member sum.

    x_unit is (n, d) with unit rows. Empty clusters keep their previous centroid.
    """
    from scipy import sparse

    centers = _arrays.normalize_rows(centers.copy())
    n, k = x_unit.shape[0], centers.shape[0]
    labels = None
    for _ in range(max_iter):
        # With unit centroids, the nearest in Euclidean distance is the one of highest cosine.
        new_labels, _, _ = _arrays.assign(x_unit, centers, spherical=False)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        members = sparse.csr_array((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
        sums = np.asarray(members @ x_unit)  # (k, d)
        filled = np.linalg.norm(sums, axis=1) > 0
        centers[filled] = _arrays.normalize_rows(sums[filled])
    return centers


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
