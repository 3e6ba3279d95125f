"""`cluster`: one call from embeddings to labels, centres and per-seed runs."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from itae.clustering import _arrays
from itae.clustering.autok import AutoK
from itae.clustering.hierarchical import AgglomerativeClusterer, HDBSCANClusterer
from itae.clustering.kmeans import KMeansClusterer
from itae.errors import InputError, InputTypeError

METHODS = ("kmeans", "agglomerative", "hdbscan")


@dataclass(frozen=True)
class ClusterResult:
    """What `cluster` returns.

    labels : (n,) int64 cluster of each row for the first seed (-1 = noise, HDBSCAN only).
    centers : (k, d) float32 centroids of that run (unit norm when spherical).
    k : number of clusters (noise excluded).
    distances : (n,) float32 distance of each row to its own centre (NaN for noise).
    per_seed_labels : {seed: (n,) labels}, one entry per seed for k-means; the deterministic methods
        (agglomerative, HDBSCAN) run once and appear under the first seed.
    params : method, resolved k, seeds, spherical, the estimator's parameters and backend.
    k_scores : {k: criterion score} when k was chosen automatically, else None.
    """

    labels: np.ndarray
    centers: np.ndarray
    k: int
    distances: np.ndarray
    per_seed_labels: dict[int, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    k_scores: dict[int, float] | None = None


def check_cluster_arguments(
    k: int | None,
    *,
    method: str = "kmeans",
    seeds: Sequence[int] | int = (0,),
    spherical: bool = False,
    k_range: tuple[int, int] = (2, 20),
    criterion: str = "silhouette",
    **kw: Any,
) -> tuple[int, ...]:
    """Every check of `cluster`'s arguments that needs no data, so that a caller can make them before long
    work (``itae run`` makes them before it reads an image). Returns the seeds as a tuple of ints."""
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if isinstance(seeds, numbers.Integral):
        seeds = (seeds,)
    seeds = tuple(seeds)
    if not seeds or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds):
        raise InputError(f"seeds must be a non-empty sequence of integers; got {seeds!r}")
    seeds = tuple(int(s) for s in seeds)
    if len(set(seeds)) != len(seeds):
        raise InputError(f"seeds must be distinct; got {seeds!r}")
    if not isinstance(spherical, bool):
        raise InputTypeError(f"spherical must be True or False; got {spherical!r}")
    if method == "hdbscan" and k is not None:
        raise InputError(
            "method='hdbscan' chooses the number of clusters itself; pass k=None"
        )
    options = {key: v for key, v in kw.items() if key != "sample_size"}
    try:
        if method == "hdbscan":
            HDBSCANClusterer(spherical=spherical, **options).check_params()
        elif k is None:
            if "sample_size" in kw:
                _arrays.check_int(kw["sample_size"], "sample_size", low=3)
            AutoK(k_range, criterion=criterion, method=method, spherical=spherical, params=options).check_params()
        elif method == "agglomerative":
            AgglomerativeClusterer(k, spherical=spherical, **options).check_params()
        else:
            KMeansClusterer(k, spherical=spherical, **options).check_params()
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        name = str(e).rsplit(" ", 1)[-1]
        raise InputError(f"method={method!r} takes no option {name}") from None
    return seeds


def cluster(
    embeddings: np.ndarray,
    k: int | None = None,
    *,
    method: str = "kmeans",
    seeds: Sequence[int] = (0,),
    spherical: bool = False,
    k_range: tuple[int, int] = (2, 20),
    criterion: str = "silhouette",
    **kw: Any,
) -> ClusterResult:
    """Cluster the rows of `embeddings`, shape (n, d); a memory-mapped array is read in chunks.

    method : "kmeans" (:class:`KMeansClusterer`), "agglomerative" or "hdbscan" (which finds k itself).
    k : number of clusters; None chooses it in `k_range` by `criterion` (see :class:`AutoK`).
    seeds : one k-means run per seed; the first seed's run is the returned labelling.
    spherical : cosine clustering on L2-normalised rows.
    **kw : passed to the estimator (e.g. n_init, backend, linkage, min_cluster_size); `sample_size`
        goes to :class:`AutoK` when k is None.
    """
    seeds = check_cluster_arguments(
        k, method=method, seeds=seeds, spherical=spherical, k_range=k_range, criterion=criterion, **kw
    )
    x = _arrays.as_embeddings(embeddings)

    k_scores = None
    first = None
    if method == "hdbscan":
        if k is not None:
            raise InputError(
                "method='hdbscan' chooses the number of clusters itself; pass k=None"
            )
        first = HDBSCANClusterer(spherical=spherical, **kw).fit(x)
    elif k is None:
        sample_size = kw.pop("sample_size", 10_000)
        auto = AutoK(
            k_range,
            criterion=criterion,
            sample_size=sample_size,
            random_state=seeds[0],
            method=method,
            spherical=spherical,
            params=kw,
        ).fit(x)
        k, k_scores, first = auto.n_clusters_, auto.scores_, auto.estimator_
    elif method == "agglomerative":
        first = AgglomerativeClusterer(k, spherical=spherical, **kw).fit(x)

    if method == "kmeans":
        runs = {}
        for seed in seeds:
            if seed == seeds[0] and first is not None:
                runs[seed] = first
            else:
                runs[seed] = KMeansClusterer(k, random_state=seed, spherical=spherical, **kw).fit(x)
        first = runs[seeds[0]]
    else:
        runs = {seeds[0]: first}

    params: dict[str, Any] = {
        "method": method,
        "k": int(first.n_clusters_),
        # Where k came from: the caller, the automatic choice, or HDBSCAN's own density estimate.
        "k_source": "hdbscan" if method == "hdbscan" else ("auto" if k_scores is not None else "given"),
        "seeds": list(seeds),
        "spherical": bool(spherical),
        "backend": getattr(first, "backend_", None),
        "estimator": type(first).__name__,
        "estimator_params": first.get_params(),
    }
    if k_scores is not None:
        params["k_selection"] = {"criterion": criterion, "k_range": list(k_range)}
    return ClusterResult(
        labels=first.labels_,
        centers=first.cluster_centers_,
        k=int(first.n_clusters_),
        distances=first.distances_,
        per_seed_labels={seed: est.labels_ for seed, est in runs.items()},
        params=params,
        k_scores=k_scores,
    )
