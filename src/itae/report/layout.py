"""2-D layouts of the embeddings for the report's map.

The layout is fitted on a uniform sample of at most ``fit_points`` points, with openTSNE's FFT-accelerated
t-SNE (``pip install 'itae[maps]'``), UMAP (``itae[umap]``) or scikit-learn's PCA (no extra). Every other
drawn point is then placed at the median position of its nearest fitted neighbours (in the 50-dimensional
PCA space that the fit also uses), openTSNE's own rule for placing new points before any optimisation.
That keeps the cost of a map nearly flat in the number of images: the fit is capped, the placement is one
nearest-neighbour query.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("itae")

MAP_METHODS = ("auto", "tsne", "umap", "pca")
PCA_DIMS = 50  # the space that t-SNE / UMAP fit in and that places the points not fitted
PLACE_NEIGHBOURS = 10


@dataclass(frozen=True)
class EmbeddingMap:
    """2-D coordinates ``coords`` (m, 2) of the rows ``index`` (m,) of the embeddings."""

    coords: np.ndarray
    index: np.ndarray
    method: str
    description: str


def _available(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def resolve_method(method: str) -> str:
    """"auto" -> "tsne" with openTSNE installed, else "umap" with umap-learn, else "pca"."""
    if method not in MAP_METHODS:
        raise ValueError(f"map method must be one of {', '.join(MAP_METHODS)}; got {method!r}")
    if method != "auto":
        return method
    if _available("openTSNE"):
        return "tsne"
    return "umap" if _available("umap") else "pca"


def embedding_map(
    embeddings: np.ndarray,
    *,
    max_points: int = 100_000,
    method: str = "auto",
    seed: int = 0,
    fit_points: int = 2_500,
) -> EmbeddingMap:
    """Project a uniform sample of at most ``max_points`` rows of the embeddings (n, D) to 2-D.

    The layout is fitted on at most ``fit_points`` of them; the others are placed by their nearest fitted
    neighbours (see the module docstring). A (n, 2) input is taken as a precomputed map and only sampled.
    """
    method = resolve_method(method)
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (n, D) array; got shape {x.shape}")
    if max_points < 1 or fit_points < 1:
        raise ValueError(f"max_points and fit_points must be >= 1; got {max_points}, {fit_points}")
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    m = index.shape[0]
    drawn = f"{m:,} of {n:,} points" + (f" (uniform random sample, seed {seed})" if m < n else "")
    if x.shape[1] == 2:
        return EmbeddingMap(x[index].astype(np.float64), index, "precomputed", f"Precomputed 2-D map; {drawn}.")

    if method == "tsne" and not _available("openTSNE"):
        raise ImportError("map method 'tsne' needs openTSNE: pip install 'itae[maps]'")
    if method == "umap" and not _available("umap"):
        raise ImportError("map method 'umap' needs umap-learn: pip install 'itae[umap]'")
    if method != "pca" and m < 10:
        method = "pca"  # too few points for a neighbourhood graph

    t0 = time.perf_counter()
    reduced = _pca(x[index], PCA_DIMS, seed)  # (m, <=50)
    fit = np.sort(rng.choice(m, size=fit_points, replace=False)) if m > fit_points else np.arange(m)
    if method != "pca":
        log.info("itae: map layout: %s on %s of %s points, then placing the rest", method, f"{fit.size:,}", f"{m:,}")
    if method == "pca":
        coords = np.zeros((m, 2))
        coords[:, : min(2, reduced.shape[1])] = reduced[:, :2]
        return EmbeddingMap(coords, index, "pca", f"PCA (first two components) of {drawn}.")

    if method == "tsne":
        fitted, how = _tsne(reduced[fit], seed)
    else:
        fitted, how = _umap(reduced[fit], seed)
    coords = np.empty((m, 2))
    coords[fit] = fitted
    rest = np.setdiff1d(np.arange(m), fit, assume_unique=True)
    placed = ""
    if rest.size:
        coords[rest] = _place(reduced[fit], fitted, reduced[rest])
        placed = (f" Fitted on {fit.size:,} of them; the other {rest.size:,} are placed at the median position "
                  f"of their {PLACE_NEIGHBOURS} nearest fitted points.")
    log.info("itae: map layout done in %.1f s", time.perf_counter() - t0)
    return EmbeddingMap(coords, index, method, f"{how} of {drawn}.{placed}")


def _pca(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(m, D) -> (m, min(k, D, m - 1)) principal components (zeros for a single point)."""
    from sklearn.decomposition import PCA

    k = min(k, x.shape[1], x.shape[0] - 1)
    if k < 1:
        return np.zeros((x.shape[0], 1))
    return PCA(n_components=k, random_state=seed).fit_transform(x.astype(np.float32)).astype(np.float32)


def _tsne(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    from openTSNE import TSNE

    perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
    # Shorter schedules than openTSNE's 250 + 500 iterations: a few thousand points settle well before that.
    tsne = TSNE(perplexity=perplexity, negative_gradient_method="fft", neighbors="exact",
                early_exaggeration_iter=125, n_iter=250, initialization="pca", random_state=seed, n_jobs=1,
                verbose=False)
    coords = np.asarray(tsne.fit(x), dtype=np.float64)
    return coords, f"t-SNE (openTSNE, FFT, perplexity {perplexity:g}, after PCA to {x.shape[1]} dimensions)"


def _umap(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    import umap

    coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    return np.asarray(coords, dtype=np.float64), f"UMAP (after PCA to {x.shape[1]} dimensions)"


def _place(fitted_x: np.ndarray, fitted_2d: np.ndarray, rest_x: np.ndarray) -> np.ndarray:
    """(r, 2) positions of the rows ``rest_x``: median 2-D position of their nearest fitted rows."""
    from sklearn.neighbors import NearestNeighbors

    k = min(PLACE_NEIGHBOURS, fitted_x.shape[0])
    nn = NearestNeighbors(n_neighbors=k).fit(fitted_x)
    out = np.empty((rest_x.shape[0], 2))
    for start in range(0, rest_x.shape[0], 8192):  # bounded memory for the distance blocks
        _, idx = nn.kneighbors(rest_x[start: start + 8192])
        out[start: start + idx.shape[0]] = np.median(fitted_2d[idx], axis=1)
    return out
