"""Chunked helpers shared by the clusterers: validation, row sampling, nearest-centroid assignment.

Everything here walks the embeddings in row chunks, so an (n, d) array that is memory-mapped from disk
is never copied whole, and no (n, k) distance matrix is ever held.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator

import numpy as np

from itae.errors import InputError, InputTypeError

log = logging.getLogger("itae")

# Bytes of input read per chunk when validating or copying rows (~64 MiB).
_CHUNK_BYTES = 64 * 2**20
# Elements of a (rows, k) score block during assignment (~64 MiB of float32).
_SCORE_ELEMENTS = 2**24


def as_embeddings(x: object, *, name: str = "embeddings") -> np.ndarray:
    """Return `x` as a 2-D numeric ndarray without copying (memory maps stay memory maps)."""
    if not isinstance(x, np.ndarray):
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; avoid importing torch
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (n_samples, dim), got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise InputTypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {x.shape}); pass at least one vector of dimension >= 1")
    return x


def validate(estimator: object, X: object, *, reset: bool = True) -> np.ndarray:
    """``X`` checked the scikit-learn way (``validate_data``: 2-D, numeric, dense, not empty; records or
    checks ``n_features_in_``), without copying a numeric array (memory maps stay memory maps).

    NaN and inf are left to ``check_embeddings``, which reads a memory map chunk by chunk.
    """
    from sklearn.utils.validation import validate_data

    if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor; avoid importing torch
        X = X.detach().cpu().numpy()
    if isinstance(X, np.ndarray):  # our own wording for the common mistakes
        if X.dtype.kind in "USV":
            raise InputTypeError(f"embeddings must hold real numbers, got dtype {X.dtype}")
        if X.ndim != 2:
            raise InputError(
                f"embeddings must be a 2-D array (n_samples, dim), got shape {X.shape}. Reshape your data, "
                "e.g. with x.reshape(1, -1) for one vector"
            )
    x = validate_data(estimator, X, reset=reset, accept_sparse=False, dtype="numeric", ensure_all_finite=False,
                      copy=False)
    if x.dtype.kind not in "fiub":
        raise InputTypeError(f"embeddings must hold real numbers, got dtype {x.dtype}")
    return x


def seed_of(random_state: object) -> int:
    """An integer seed from a scikit-learn ``random_state`` (an int is kept as it is)."""
    from sklearn.utils import check_random_state

    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def check_int(value: object, name: str, *, low: int = 1, none: bool = False) -> None:
    """Raise TypeError unless ``value`` is an integer (or None when allowed), ValueError when below ``low``."""
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an integer{' or None' if none else ''}, got {value!r}")
    if value < low:
        raise InputError(f"{name} must be >= {low}, got {value!r}")


def row_chunks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in steps of `rows`."""
    rows = max(1, int(rows))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def rows_per_chunk(x: np.ndarray) -> int:
    return max(1, _CHUNK_BYTES // max(1, x.shape[1] * x.dtype.itemsize))


def check_embeddings(x: np.ndarray, *, spherical: bool = False, name: str = "embeddings") -> None:
    """Raise ValueError on NaN/inf (and, for spherical clustering, zero vectors), one chunk at a time."""
    for start, stop in row_chunks(x.shape[0], rows_per_chunk(x)):
        block = x[start:stop]
        if block.dtype.kind == "f":
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                row = start + int(np.argmin(finite))
                raise InputError(
                    f"{name} contain NaN or inf (first at row {row}); drop or repair those rows before clustering"
                )
        if spherical:
            nonzero = np.any(block != 0, axis=1)
            if not nonzero.all():
                row = start + int(np.argmin(nonzero))
                raise InputError(
                    f"{name} row {row} is all zeros, which has no direction for spherical (cosine) clustering; "
                    "drop it or use spherical=False"
                )


def check_n_clusters(k: object, n_samples: int, *, name: str = "n_clusters") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise InputTypeError(f"{name} must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise InputError(f"{name} must be >= 1, got {k}")
    if k > n_samples:
        raise InputError(
            f"{name}={k} exceeds the number of samples (n_samples={n_samples}); pass a smaller {name}"
        )
    return k


def drop_empty(labels: np.ndarray, centers: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Drop the centres no row is assigned to, renumbering the labels 0..k'-1 in order, and say so.

    k-means can leave clusters empty when the data has fewer distinct points than k (duplicate images):
    a cluster with no member is no cluster, and every output must count the same ones.
    """
    used = np.unique(labels[labels >= 0])
    if used.size == centers.shape[0]:
        return labels, centers
    log.warning(
        "itae: %s asked for k=%d clusters, but only %d of them have members (the data has fewer distinct "
        "points than k, e.g. duplicate images); using k=%d", what, centers.shape[0], used.size, used.size,
    )
    return np.searchsorted(used, labels).astype(np.int64), np.ascontiguousarray(centers[used])


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of a float array in place and return it; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def load_rows(x: np.ndarray, start: int, stop: int, *, spherical: bool) -> np.ndarray:
    """A float32, C-contiguous copy of rows [start, stop), L2-normalised when spherical."""
    block = np.array(x[start:stop], dtype=np.float32, order="C", copy=True)
    return normalize_rows(block) if spherical else block


def as_float32(x: np.ndarray, *, spherical: bool) -> np.ndarray:
    """The whole array as float32 (a copy only when needed), L2-normalised when spherical."""
    if spherical or x.dtype != np.float32 or not x.flags.c_contiguous:
        return load_rows(x, 0, x.shape[0], spherical=spherical)
    return x


def sample_rows(x: np.ndarray, size: int, *, seed: int, spherical: bool) -> np.ndarray:
    """`size` distinct rows drawn uniformly (in file order, so a memory map is read forwards), float32."""
    n = x.shape[0]
    if size >= n:
        return as_float32(x, spherical=spherical)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    out = np.empty((size, x.shape[1]), dtype=np.float32)
    for start, stop in row_chunks(size, rows_per_chunk(x)):
        out[start:stop] = x[idx[start:stop]]
    return normalize_rows(out) if spherical else out


def assign(
    x: np.ndarray, centers: np.ndarray, *, spherical: bool, chunk_size: int = 65536
) -> tuple[np.ndarray, np.ndarray, float]:
    """Nearest centre of every row, in chunks.

    Returns labels (n,) int64, the Euclidean distance of each row to its own centre (n,) float32 (in the
    normalised space when spherical, where it equals sqrt(2 - 2 cos)), and the inertia (sum of squares).
    """
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    k = centers.shape[0]
    center_sq = np.einsum("kd,kd->k", centers, centers)
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    inertia = 0.0
    # Bound both the (rows, k) score block and the (rows, d) float32 copy of the input.
    rows = max(1, min(int(chunk_size), _SCORE_ELEMENTS // k, _CHUNK_BYTES // (4 * x.shape[1])))
    for start, stop in row_chunks(n, rows):
        block = load_rows(x, start, stop, spherical=spherical)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row, so it is left out of argmin.
        scores = block @ centers.T  # (rows, k)
        scores *= -2.0
        scores += center_sq
        own = np.argmin(scores, axis=1)
        labels[start:stop] = own
        # Recompute the winning distance directly: the expansion above loses precision for close points.
        diff = np.subtract(block, centers[own], out=block)  # the block is a private copy
        sq = np.einsum("nd,nd->n", diff, diff)
        dist[start:stop] = np.sqrt(sq)
        inertia += float(sq.sum(dtype=np.float64))
    return labels, dist, inertia


def member_means(x: np.ndarray, labels: np.ndarray, k: int, *, spherical: bool) -> np.ndarray:
    """(k, d) float32 mean of the rows of each cluster 0..k-1 (unit norm when spherical); label -1 is skipped."""
    from scipy import sparse

    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    counts = np.bincount(labels[labels >= 0], minlength=k).astype(np.float64)
    for start, stop in row_chunks(x.shape[0], rows_per_chunk(x)):
        block = load_rows(x, start, stop, spherical=spherical)
        lab = labels[start:stop]
        keep = lab >= 0
        # Sum rows per cluster as a (k, rows) one-hot sparse product; np.add.at is far slower.
        onehot = sparse.csr_array(
            (np.ones(int(keep.sum())), (lab[keep], np.arange(int(keep.sum())))), shape=(k, int(keep.sum()))
        )
        sums += onehot @ block[keep].astype(np.float64)
    means = sums / np.maximum(counts, 1)[:, None]
    means = means.astype(np.float32)
    return normalize_rows(means) if spherical else means


def distances_to(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, *, spherical: bool) -> np.ndarray:
    """(n,) float32 distance of each row to the centre of its own cluster; NaN for label -1 (noise)."""
    dist = np.full(x.shape[0], np.nan, dtype=np.float32)
    for start, stop in row_chunks(x.shape[0], rows_per_chunk(x)):
        block = load_rows(x, start, stop, spherical=spherical)
        lab = labels[start:stop]
        keep = lab >= 0
        diff = block[keep] - centers[lab[keep]]
        dist[start:stop][keep] = np.sqrt(np.einsum("nd,nd->n", diff, diff))
    return dist
