"""Label-free threshold calibration: split the pooled patch norms at the valley of their histogram.

Method (default ``"otsu"``): take log norms (the artifact mode sits decades away from the bulk, and
the log makes both modes roughly symmetric), find Otsu's cut (maximal between-class variance of a
256-bin histogram), then move the cut to the lowest point of the smoothed histogram between the two
class peaks: with a rare artifact mode every cut inside an empty gap has the same Otsu score, and
the valley's centre is the cut least sensitive to sampling.
``"gmm"``: a 2-component Gaussian mixture on log norms; the cut is where the two weighted densities
are equal between the means.

Both need a valley: if the smoothed histogram has no dip between the two sides (a unimodal
distribution, as in models trained with registers), there is no artifact mode, and the calibrated
threshold flags nothing (``bimodal=False``). Artifacts are also rare (about 0.5 to 5% of patches in
DINOv2): a split that would flag more than ``MAX_FLAGGED_FRACTION`` of the patches separates
something else (for instance whole images of different brightness), so it flags nothing either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..config import ITAEConfig
from ..models.adapters import adapt
from ..models.base import Backbone
from .capture import HookSet, QKVCapture
from .functional import patch_norms

log = logging.getLogger(__name__)

_BINS = 256
_VALLEY_RATIO = 0.5  # the dip must fall below this fraction of the smaller peak
MAX_FLAGGED_FRACTION = 0.25


@dataclass
class Split:
    threshold: float
    flagged_fraction: float
    bimodal: bool


@dataclass
class Calibration:
    """Thresholds found for a model and a data set.

    config: the input config with numeric thresholds, ready for ``attenuate``.
    thresholds, flagged_fraction, bimodal: per engineered block (non-negative index).
    norms: the pooled patch norms per block (1-D float32 arrays), for histograms.
    """

    config: ITAEConfig
    thresholds: dict[int, float]
    flagged_fraction: dict[int, float]
    bimodal: dict[int, bool]
    norms: dict[int, np.ndarray] = field(repr=False)
    num_images: int = 0

    def summary(self) -> str:
        parts = [
            f"block {layer}: threshold {self.thresholds[layer]:.4g}, {100 * self.flagged_fraction[layer]:.2f}% "
            f"of patches flagged{'' if self.bimodal[layer] else ' (no valley: nothing flagged)'}"
            for layer in self.thresholds
        ]
        return f"calibrated on {self.num_images} images; " + "; ".join(parts)


def _smooth(hist: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    radius = int(3 * sigma)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return np.convolve(hist, kernel / kernel.sum(), mode="same")


def _otsu_bin(hist: np.ndarray) -> int:
    """Index of the last bin of the lower class under Otsu's criterion."""
    p = hist / hist.sum()
    centers = np.arange(len(hist))
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centers)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between[:-1]))


def _gmm_cut(logs: np.ndarray, seed: int = 0) -> float | None:
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=2, random_state=seed).fit(logs.reshape(-1, 1))
    means = gmm.means_.ravel()
    lo, hi = np.sort(means)
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, 2048).reshape(-1, 1)
    post = gmm.predict_proba(grid)
    lo_comp = int(np.argmin(means))
    # first point between the means where the upper component becomes the more probable one
    crossing = np.nonzero(post[:, lo_comp] < 0.5)[0]
    return float(grid[crossing[0], 0]) if len(crossing) else None


def find_threshold(norms: np.ndarray, config: ITAEConfig) -> Split:
    """Split 1-D patch norms at the valley of their log-histogram (see the module docstring)."""
    norms = np.asarray(norms, dtype=np.float64).ravel()
    norms = norms[np.isfinite(norms)]
    if norms.size < 2:
        raise ValueError(f"calibration needs at least 2 finite patch norms; got {norms.size}")
    logs = np.log(np.maximum(norms, 1e-12))
    lo, hi = float(logs.min()), float(logs.max())
    nothing = (lo - 1.0) if config.side == "low" else (hi + 1.0)  # a log-threshold that flags nothing
    if hi - lo < 1e-9:
        return Split(float(math.exp(nothing)), 0.0, False)
    hist, edges = np.histogram(logs, bins=_BINS, range=(lo, hi))
    hist = hist.astype(np.float64)
    centers = 0.5 * (edges[:-1] + edges[1:])
    smooth = _smooth(hist)

    if config.calibration == "gmm":
        cut = _gmm_cut(logs)
        cut_bin = None if cut is None else int(np.clip(np.searchsorted(centers, cut), 1, _BINS - 1)) - 1
    else:
        cut_bin = _otsu_bin(hist)
    if cut_bin is None:
        return Split(float(math.exp(nothing)), 0.0, False)

    # the two class peaks of the smoothed histogram, and the lowest point between them
    left_peak = int(np.argmax(smooth[: cut_bin + 1]))
    right_peak = cut_bin + 1 + int(np.argmax(smooth[cut_bin + 1 :]))
    between = smooth[left_peak : right_peak + 1]
    valley_value = float(between.min())
    bimodal = valley_value <= _VALLEY_RATIO * min(smooth[left_peak], smooth[right_peak])
    if not bimodal:
        return Split(float(math.exp(nothing)), 0.0, False)
    flat = np.nonzero(between <= valley_value + 1e-12 * max(1.0, valley_value))[0]
    valley_bin = left_peak + int(flat[len(flat) // 2])
    if config.calibration == "gmm" and cut is not None:
        log_cut = cut
    else:
        # cut at the middle of the valley, but always strictly between the two observed classes
        log_cut = float(centers[valley_bin])
    low_side = logs[logs <= log_cut]
    high_side = logs[logs > log_cut]
    if low_side.size == 0 or high_side.size == 0:
        return Split(float(math.exp(nothing)), 0.0, False)
    if config.calibration != "gmm":
        log_cut = float(np.clip(log_cut, low_side.max(), np.nextafter(high_side.min(), -np.inf)))
    threshold = float(math.exp(log_cut))
    flagged = norms <= threshold if config.side == "low" else norms >= threshold
    if flagged.mean() > MAX_FLAGGED_FRACTION:
        log.warning(
            "itae: the norm split at %.4g would flag %.1f%% of patches, too many for artifacts; flagging none",
            threshold, 100 * flagged.mean(),
        )
        return Split(float(math.exp(nothing)), 0.0, False)
    return Split(threshold, float(flagged.mean()), True)


def _batches(images: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor or an iterable of them; got shape {tuple(images.shape)}")
        yield images
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):  # (pixel_values, ...) from a DataLoader
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise ValueError("images must yield (B, 3, H, W) tensors")
        yield batch


@torch.no_grad()
def collect_norms(
    backbone: Backbone, images: torch.Tensor | Iterable[torch.Tensor], config: ITAEConfig,
    layers: list[int], max_batches: int | None = None,
) -> tuple[dict[int, np.ndarray], int]:
    """Pooled patch norms of ``config.source`` at ``layers`` over the images (unmodified forwards)."""
    pooled: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    heads = backbone.num_heads if config.granularity == "head" else None
    count = 0
    with HookSet() as hooks:
        captures = {layer: QKVCapture(backbone.sites[layer], hooks) for layer in layers}
        for i, batch in enumerate(_batches(images)):
            if max_batches is not None and i >= max_batches:
                break
            backbone.forward_features(batch.to(backbone.device, backbone.dtype))
            for layer, capture in captures.items():
                norms = patch_norms(capture.pop().get(config.source), backbone.num_prefix_tokens, heads)
                pooled[layer].append(norms.flatten().cpu().numpy())
            count += batch.shape[0]
    if count == 0:
        raise ValueError("calibration got no images")
    return {layer: np.concatenate(parts) for layer, parts in pooled.items()}, count


def calibrate(
    model: nn.Module | Backbone,
    images: torch.Tensor | Iterable[torch.Tensor],
    config: ITAEConfig | None = None,
    *,
    max_batches: int | None = None,
) -> Calibration:
    """Find the threshold(s) of ``config.layers`` for a model and a data set, without labels.

    images: preprocessed (B, 3, H, W) tensor, or an iterable of such batches (a DataLoader is fine).
    Returns a ``Calibration`` whose ``config`` carries the numeric thresholds for ``attenuate``.
    Deterministic: the same images in the same order give the same thresholds.
    """
    from .patch import resolve_layers

    config = ITAEConfig() if config is None else config
    backbone = adapt(model)
    layers = resolve_layers(backbone, config)
    norms, count = collect_norms(backbone, images, config, layers, max_batches)
    splits = {layer: find_threshold(norms[layer], config) for layer in layers}
    result = Calibration(
        config=config.replace(threshold=tuple(splits[layer].threshold for layer in layers)),
        thresholds={layer: s.threshold for layer, s in splits.items()},
        flagged_fraction={layer: s.flagged_fraction for layer, s in splits.items()},
        bimodal={layer: s.bimodal for layer, s in splits.items()},
        norms=norms,
        num_images=count,
    )
    log.debug("itae: %s", result.summary())  # callers that know the context log it (e.g. embed)
    return result
