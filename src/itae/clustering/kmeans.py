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
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from itae.clustering import _arrays
from itae.errors import InputError

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
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise InputError(
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
    n_clusters : number of clusters k (1 <= k <= n_samples); 8 by default, as scikit-learn's KMeans.
    n_init : restarts; the run with the lowest objective is kept (faiss: ``nredo``).
    random_state : seeds the initialisation and the training sample (an int, None or a RandomState,
        as in scikit-learn); 0 by default, so that runs repeat.
    seed : former name of ``random_state``, still accepted (it wins when given).
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
    n_clusters_ : the number of clusters found: ``n_clusters``, less any that no row joined (data with
        fewer distinct points than k); such centres are dropped, with a warning.
    n_iter_ : iterations of the kept run (faiss: the fixed number it runs).
    backend_ : the backend actually used.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        n_init: int = 10,
        random_state: object = 0,
        seed: int | None = None,
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
        self.random_state = random_state
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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # embeddings are dense; sparse input is refused
        tags.non_deterministic = self.random_state is None and self.seed is None
        return tags

    def check_params(self) -> None:
        """Check the parameters that need no data (``fit`` does it first); raise ValueError or TypeError."""
        _arrays.check_int(self.n_clusters, "n_clusters")
        for name in ("n_init", "batch_size", "max_points_per_centroid", "chunk_size"):
            _arrays.check_int(getattr(self, name), name)
        _arrays.check_int(self.max_iter, "max_iter", none=True)
        _arrays.check_int(self.train_size, "train_size", none=True)
        if self.backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.init not in INITS + ("afk-mc2",):
            raise InputError(f"init must be one of {', '.join(INITS + ('afk-mc2',))}; got {self.init!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or self.tol < 0:
            raise InputError(f"tol must be a number >= 0, got {self.tol!r}")

    def _seed(self) -> int:
        return _arrays.seed_of(self.random_state if self.seed is None else self.seed)

    def fit(self, X: np.ndarray, y: object = None) -> KMeansClusterer:
        """Cluster the rows of X, shape (n, d); a memory-mapped array is read in chunks, never copied."""
        self.check_params()
        x = _arrays.validate(self, X)
        n = x.shape[0]
        k = _arrays.check_n_clusters(self.n_clusters, n)
        backend = resolve_backend(self.backend, n)
        inits = INITS + ("afk-mc2",) if backend == "faiss" else INITS
        init = self.init
        if init == "auto":
            init = "afk-mc2" if backend == "faiss" else "k-means++"
        if self.init not in inits:
            raise InputError(
                f"init must be one of {', '.join(inits)} for backend {backend!r}; got {self.init!r}"
            )
        _arrays.check_embeddings(x, spherical=self.spherical)
        max_iter = self.max_iter if self.max_iter is not None else _DEFAULT_MAX_ITER[backend]
        seed = self._seed()

        # scikit-learn's ConvergenceWarning about fewer distinct points than k is said once, in our words,
        # by drop_empty below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if backend == "sklearn":
                centers, n_iter = self._fit_sklearn(x, k, max_iter, init, seed)
            else:
                train_size = self.train_size or max(self.max_points_per_centroid * k, 100_000)
                sample = _arrays.sample_rows(x, max(k, min(n, train_size)), seed=seed, spherical=self.spherical)
                if backend == "minibatch":
                    centers, n_iter = self._fit_minibatch(sample, k, max_iter, init, seed)
                else:
                    centers, n_iter = self._fit_faiss(sample, k, max_iter, init, seed)
                del sample
        if self.spherical:
            centers = _arrays.normalize_rows(centers)

        centers = np.ascontiguousarray(centers, dtype=np.float32)
        labels, _, _ = _arrays.assign(x, centers, spherical=self.spherical, chunk_size=self.chunk_size)
        labels, centers = _arrays.drop_empty(labels, centers, "k-means")
        self.cluster_centers_ = centers
        self.labels_, self.distances_, self.inertia_ = _arrays.assign(
            x, self.cluster_centers_, spherical=self.spherical, chunk_size=self.chunk_size
        )
        self.n_clusters_ = int(centers.shape[0])
        self.n_iter_ = int(n_iter)
        self.backend_ = backend
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest learned centroid of each row of X, shape (m, d) -> (m,) int64."""
        check_is_fitted(self, "cluster_centers_")
        x = _arrays.validate(self, X, reset=False)
        _arrays.check_embeddings(x, spherical=self.spherical)
        labels, _, _ = _arrays.assign(
            x, self.cluster_centers_, spherical=self.spherical, chunk_size=self.chunk_size
        )
        return labels

    def _fit_sklearn(self, x: np.ndarray, k: int, max_iter: int, init: str, seed: int) -> tuple[np.ndarray, int]:
        from sklearn.cluster import KMeans

        data = _arrays.as_float32(x, spherical=self.spherical)
        km = KMeans(
            n_clusters=k,
            init=init,
            n_init=self.n_init,
            max_iter=max_iter,
            tol=self.tol,
            random_state=seed,
        )
        km.fit(data)
        centers = km.cluster_centers_.astype(np.float32)
        n_iter = int(km.n_iter_)
        if self.spherical:
            centers, n_iter = _spherical_lloyd(data, centers, max_iter)
        return centers, n_iter

    def _fit_minibatch(self, sample: np.ndarray, k: int, max_iter: int, init: str, seed: int) -> tuple[np.ndarray, int]:
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(
            n_clusters=k,
            init=init,
            n_init=self.n_init,
            max_iter=max_iter,
            batch_size=self.batch_size,
            random_state=seed,
        )
        km.fit(sample)
        return km.cluster_centers_.astype(np.float32), int(km.n_iter_)

    def _fit_faiss(self, sample: np.ndarray, k: int, max_iter: int, init: str, seed: int) -> tuple[np.ndarray, int]:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        km = faiss.Kmeans(
            sample.shape[1],
            k,
            niter=max_iter,
            nredo=self.n_init,
            seed=seed,
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
                raise InputError(f"init={init!r} needs a newer faiss; upgrade it or pass init='random'")
            # else: an older faiss under init="auto" keeps its own random initialisation
        km.train(np.ascontiguousarray(sample, dtype=np.float32))
        return np.array(km.centroids, dtype=np.float32), max_iter  # faiss runs its iterations in full


def _spherical_lloyd(x_unit: np.ndarray, centers: np.ndarray, max_iter: int) -> tuple[np.ndarray, int]:
    """Spherical k-means iterations from `centers`: assign by cosine, centroid = normalised member sum.

    x_unit is (n, d) with unit rows. Empty clusters keep their previous centroid. Returns the centres and
    the number of iterations run.
    """
    from scipy import sparse

    centers = _arrays.normalize_rows(centers.copy())
    n, k = x_unit.shape[0], centers.shape[0]
    labels = None
    n_iter = 0
    for _ in range(max_iter):
        # With unit centroids, the nearest in Euclidean distance is the one of highest cosine.
        new_labels, _, _ = _arrays.assign(x_unit, centers, spherical=False)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        n_iter += 1
        labels = new_labels
        members = sparse.csr_array((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
        sums = np.asarray(members @ x_unit)  # (k, d)
        filled = np.linalg.norm(sums, axis=1) > 0
        centers[filled] = _arrays.normalize_rows(sums[filled])
    return centers, max(n_iter, 1)
