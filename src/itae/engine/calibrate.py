"""Calibration: pool the patch norms of a model over a sample of the data and split them without labels.

The split itself (``find_threshold``, ``Split``) lives in ``itae.engine.split``: it looks for a rare
artifact mode beyond the bulk of the log norms on the configured side, and flags nothing when there is
none (a single mode, as in models trained with registers, or two large populations such as dark and
bright images).
"""

from __future__ import annotations

import logging
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
from .split import MAX_FLAGGED_FRACTION, Split, find_threshold

__all__ = ["MAX_FLAGGED_FRACTION", "Calibration", "Split", "calibrate", "collect_norms", "find_threshold"]

log = logging.getLogger(__name__)


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
