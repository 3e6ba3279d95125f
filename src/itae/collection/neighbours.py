"""Collection checks on embeddings, fastdup-style: near-duplicate groups, outliers, likely mislabels.

All three start from the exact k nearest neighbours of every row under cosine distance (1 - cosine
similarity, in [0, 2]) on L2-normalised rows: scikit-learn's brute-force ``NearestNeighbors`` by default,
or faiss ``IndexFlatIP``. Both are exact, so the results do not depend on which ran. scikit-learn is the
default because it measured faster on a 2-core CPU (10,000 x 768: 11 s against 17-20 s for the faiss-cpu
wheel, ``benchmarks/bench_check.py``); faiss is there for machines where its BLAS is the faster one.

- Near-duplicates: an edge joins two images when one is among the other's k nearest at cosine distance
  <= ``threshold``; groups are the connected components with two or more images. Default threshold 0.04,
  cosine similarity 0.96: the connected-component threshold of fastdup's own examples (on ImageNet).
  Exact copies sit at about 1e-7. The best value for DINOv2 features has not been measured here (no
  pretrained weights were available), and other models' features sit at other distances (the offline demo
  models put distinct images within 0.02 of each other), so ``summary["nn_distance_quantiles"]`` of
  ``itae check`` shows the collection's nearest-neighbour distances to set it by.
- Outliers: the score of an image is its mean cosine distance to its k nearest neighbours; an image is an
  outlier when the robust z-score of its score, (s - median) / (1.4826 * MAD), is at least ``z`` (default
  3.5, Iglewicz and Hoaglin's cut-off). Duplicates of an image count as its neighbours.
- Mislabels (with labels): the k neighbours vote. An image is suspect when the most common other label
  among its neighbours outnumbers its own label; its margin is (votes for that label - votes for its own)
  / k. With clusters, the cluster votes too: the share of its cluster holding the cluster's majority label
  minus the share holding the image's label (0 when its label is the majority). Suspects are ranked by the
  mean of the margins available, largest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from itae.errors import InputError, MissingDependencyError

DUP_THRESHOLD = 0.04
OUTLIER_Z = 3.5
NEIGHBOURS = 10
_MAD_SCALE = 1.4826  # MAD of a normal distribution times this is its standard deviation


def _unit_rows(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], chunk):
        block = np.asarray(x[start : start + chunk], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + chunk] = np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)
    return out


def knn_backend(backend: str = "auto") -> str:
    """"faiss" or "sklearn": the one ``backend`` means here ("auto": scikit-learn, see the module docstring)."""
    if backend not in ("auto", "faiss", "sklearn"):
        raise InputError(f"backend must be 'auto', 'faiss' or 'sklearn'; got {backend!r}")
    if backend in ("auto", "sklearn"):
        return "sklearn"
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise MissingDependencyError("the faiss kNN backend needs faiss; install it with `pip install itae[faiss]`") from None
    return "faiss"


def cosine_knn(
    embeddings: np.ndarray, k: int = NEIGHBOURS, *, backend: str = "auto", progress=None, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row among the other rows, by cosine distance.

    Returns (indices (n, k) int64, distances (n, k) float32), nearest first; k is capped at n - 1.
    ``progress`` is called with the number of rows done after each chunk of queries.
    """
    x = _unit_rows(np.asarray(embeddings))
    n = x.shape[0]
    if n < 2:
        raise InputError(f"neighbour checks need at least 2 images; got {n}")
    k = min(int(k), n - 1)
    if k < 1:
        raise InputError(f"the number of neighbours must be at least 1; got {k}")
    which = knn_backend(backend)
    # k + 1: a row finds itself (or an identical row, which ties with it) among its nearest.
    if which == "faiss":
        import faiss

        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        search = lambda q: index.search(q, k + 1)  # noqa: E731
    else:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="euclidean").fit(x)

        def search(q):
            d, i = nn.kneighbors(q)
            return 1.0 - d.astype(np.float32) ** 2 / 2.0, i  # unit rows: |a - b|^2 = 2 - 2 cos

    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sim, nbr = search(x[start:stop])  # (rows, k + 1) each
        keep = nbr != np.arange(start, stop)[:, None]
        keep[keep.all(axis=1), -1] = False  # itself fell outside (ties with identical rows): drop the farthest
        idx[start:stop] = nbr[keep].reshape(-1, k)
        dist[start:stop] = np.clip(1.0 - sim[keep].reshape(-1, k), 0.0, 2.0)
        if progress is not None:
            progress(stop - start)
    return idx, dist


@dataclass(frozen=True)
class DuplicateGroups:
    """group (n,) int64: the group of each row, -1 when it has no near-duplicate; nearest (n,) int64 and
    distance (n,) float32: each grouped row's closest neighbour within the threshold (-1 / NaN otherwise)."""

    group: np.ndarray
    nearest: np.ndarray
    distance: np.ndarray

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if self.group.size else 0


def duplicate_groups(knn_idx: np.ndarray, knn_dist: np.ndarray, threshold: float = DUP_THRESHOLD) -> DuplicateGroups:
    """Connected components of the kNN edges no longer than ``threshold`` (cosine distance); groups of at
    least two rows are numbered 0.. by size, largest first, then by their first row."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not (0.0 <= threshold <= 2.0):
        raise InputError(f"the duplicate threshold is a cosine distance in [0, 2]; got {threshold}")
    n = knn_idx.shape[0]
    close = knn_dist <= threshold
    rows = np.repeat(np.arange(n), knn_idx.shape[1])[close.ravel()]
    cols = knn_idx.ravel()[close.ravel()]
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    grouped = sizes[comp] >= 2
    _, first = np.unique(comp, return_index=True)  # the first row of each component
    multi = np.flatnonzero(sizes >= 2)
    order = multi[np.lexsort((first[multi], -sizes[multi]))]
    renumber = np.full(len(sizes), -1, dtype=np.int64)
    renumber[order] = np.arange(len(order))
    group = renumber[comp]
    nearest = np.where(grouped, knn_idx[:, 0], -1)
    distance = np.where(grouped, knn_dist[:, 0], np.nan).astype(np.float32)
    return DuplicateGroups(group, nearest, distance)


def outlier_scores(knn_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, z) per row: mean cosine distance to the k nearest, and its robust z-score."""
    score = knn_dist.mean(axis=1).astype(np.float64)
    median = float(np.median(score))
    mad = float(np.median(np.abs(score - median))) * _MAD_SCALE
    if mad <= 0:  # more than half the scores equal: scale by the mean absolute deviation instead
        mad = float(np.mean(np.abs(score - median))) or 1.0
    return score, (score - median) / mad


@dataclass(frozen=True)
class LabelDisagreement:
    """Per row: ``suggested`` label (the neighbours' or the cluster's majority when it is not the row's own,
    else the row's label), ``knn_agreement`` (share of the k neighbours with the row's label),
    ``knn_margin``, ``cluster_majority``, ``cluster_agreement`` (share of its cluster with its label) and
    ``cluster_margin`` (NaN without clusters), ``score`` (mean of the margins), ``suspect``."""

    suggested: list[str]
    knn_agreement: np.ndarray
    knn_margin: np.ndarray
    cluster_majority: list[str]
    cluster_agreement: np.ndarray
    cluster_margin: np.ndarray
    score: np.ndarray
    suspect: np.ndarray


def label_disagreement(
    knn_idx: np.ndarray, labels: Sequence[str], clusters: np.ndarray | None = None
) -> LabelDisagreement:
    """How much each row's label disagrees with its neighbours' (and its cluster's) labels; see the module
    docstring. Rows with an empty label take no part (score 0, never suspect) and cast no vote."""
    n, k = knn_idx.shape
    names, lab = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    known = names[lab] != ""
    n_lab = len(names)
    votes = np.zeros((n, n_lab), dtype=np.int64)
    nbr_lab = lab[knn_idx]
    nbr_known = known[knn_idx]
    np.add.at(votes, (np.repeat(np.arange(n), k)[nbr_known.ravel()], nbr_lab.ravel()[nbr_known.ravel()]), 1)
    own = votes[np.arange(n), lab]
    others = votes.copy()
    others[np.arange(n), lab] = -1
    best_other = others.argmax(axis=1)
    knn_margin = (others[np.arange(n), best_other] - own) / k
    knn_agreement = own / k
    suggested_idx = np.where(knn_margin > 0, best_other, lab)

    cluster_majority = [""] * n
    cluster_agreement = np.full(n, np.nan)
    cluster_margin = np.full(n, np.nan)
    if clusters is not None:
        clusters = np.asarray(clusters).reshape(-1)
        if clusters.shape[0] != n:
            raise InputError(f"{clusters.shape[0]} clusters for {n} images")
        ids, c_inv = np.unique(clusters, return_inverse=True)
        table = np.zeros((len(ids), n_lab), dtype=np.int64)
        np.add.at(table, (c_inv[known], lab[known]), 1)
        size = np.maximum(table.sum(axis=1), 1)
        majority = table.argmax(axis=1)
        in_cluster = np.array([not (isinstance(c, (int, np.integer)) and c < 0) for c in ids])[c_inv]  # noise: none
        cluster_agreement = np.where(in_cluster, table[c_inv, lab] / size[c_inv], np.nan)
        cluster_margin = np.where(in_cluster, (table[c_inv, majority[c_inv]] - table[c_inv, lab]) / size[c_inv],
                                  np.nan)
        cluster_majority = [str(names[majority[c]]) if in_cluster[i] else "" for i, c in enumerate(c_inv)]
        take_cluster = (knn_margin <= 0) & (np.nan_to_num(cluster_margin) > 0)
        suggested_idx = np.where(take_cluster, majority[c_inv], suggested_idx)
    margins = np.stack([knn_margin, cluster_margin]) if clusters is not None else knn_margin[None]
    score = np.nanmean(margins, axis=0)  # the kNN margin is always there, so no column is all NaN
    score = np.where(known, score, 0.0)
    suspect = known & ((knn_margin > 0) | (np.nan_to_num(cluster_margin) > 0))
    return LabelDisagreement(
        suggested=[str(names[i]) for i in suggested_idx], knn_agreement=knn_agreement, knn_margin=knn_margin,
        cluster_majority=cluster_majority, cluster_agreement=cluster_agreement, cluster_margin=cluster_margin,
        score=score, suspect=suspect,
    )
