"""From pixels (or kept block inputs) to pooled embeddings: the one forward both engines run.

``make_forward`` chooses, once per extraction, between the CLS-only fast path, the ITAE hooks and compiled
blocks, and keeps the hooks (ITAE, test-time registers) or the compiled blocks on for as long as it is open.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from itae.config import ITAEConfig
from itae.data.decode import PreprocessTransform
from itae.engine.fast import (
    compiled_blocks,
    forward_cls,
    forward_cls_from,
    forward_features_from,
    supports_fast_cls,
)
from itae.engine.patch import attenuate
from itae.engine.registers import test_time_registers
from itae.errors import InputError
from itae.methods import TTRConfig
from itae.models.base import Backbone, Features

from .options import Feature, check_feature

logger = logging.getLogger("itae.extraction")


def pool_features(features: Features, feature: Feature = "cls", normalize: bool = False) -> torch.Tensor:
    """(B, D) float32 image embeddings from a forward's normed tokens; (B, 2D) for ``cls+mean``."""
    check_feature(feature)
    parts = []
    if feature in ("cls", "cls+mean"):
        parts.append(features.cls.float())
    if feature in ("mean", "cls+mean"):
        if features.patches is None or features.patches.shape[1] == 0:
            raise InputError(f"feature={feature!r} needs patch tokens, but the model returned none")
        parts.append(features.patches.float().mean(dim=1))  # (B, N, D) -> (B, D)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out


def embed_batches(
    backbone: Backbone,
    batches: Iterable[torch.Tensor],
    *,
    feature: Feature = "cls",
    normalize: bool = False,
) -> Iterator[torch.Tensor]:
    """Embed already preprocessed batches (B, 3, S, S) with ``backbone`` as it is (wrap the call in
    ``itae.attenuate`` for ITAE); yields (B, D) float32 tensors on the backbone's device."""
    device, dtype = backbone.device, backbone.dtype
    with torch.inference_mode():
        for x in batches:
            x = x.to(device, non_blocking=True).to(dtype)
            yield pool_features(backbone.forward_features(x), feature, normalize)


def to_device(pixels: torch.Tensor, transform: PreprocessTransform, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, 3, S, S) on the host -> normalised (B, 3, S, S) in the model's dtype on ``device``."""
    # Copy the uint8 pixels (pinned, asynchronous), normalise in float32 there, then cast.
    return transform.normalize(pixels.to(device, non_blocking=True)).to(dtype)


class Forward:
    """Pooled embeddings of one open ``make_forward``: ``pixels(x)`` and ``kept(hidden, start)`` give
    (B, D) float32 tensors, maybe still computing on the device."""

    def __init__(self, backbone: Backbone, config: ITAEConfig | None, fast: bool, feature: Feature,
                 normalize: bool) -> None:
        self.backbone, self.config, self.fast = backbone, config, fast
        self.feature, self.normalize = feature, normalize

    @property
    def description(self) -> str:
        if self.fast:
            return "the CLS-only fast path"
        return "ITAE hooks" if self.config is not None else "the unmodified model"

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """From preprocessed pixels (B, 3, S, S) on the model's device, in its dtype."""
        bb = self.backbone
        features = Features(cls=forward_cls(bb, x, self.config)[0]) if self.fast else bb.forward_features(x)
        return pool_features(features, self.feature, self.normalize)

    def kept(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """From the input tokens (B, T, D) of block ``start`` of the same images, kept on the host."""
        bb = self.backbone
        h = hidden.to(bb.device, non_blocking=True)
        if self.fast:
            features = Features(cls=forward_cls_from(bb, h, start, self.config)[0])
        else:
            features = forward_features_from(bb, h, start)
        return pool_features(features, self.feature, self.normalize)


def embed_batch(forward: Forward, batch: dict[str, Any], transform: PreprocessTransform,
                kept_start: int | None) -> torch.Tensor | None:
    """A loader batch's (B, D) embeddings: from its kept block inputs when it has them, else from its
    pixels; None when no image of it decoded."""
    hidden = batch.get("hidden")
    if hidden is not None:  # (B, T, D) input of block kept_start
        return forward.kept(hidden, kept_start)
    if batch["pixels"] is None:
        return None
    bb = forward.backbone
    return forward.pixels(to_device(batch["pixels"], transform, bb.device, bb.dtype))


@contextmanager
def make_forward(
    backbone: Backbone,
    config: ITAEConfig | None,
    *,
    feature: Feature = "cls",
    normalize: bool = False,
    fast_cls: bool = True,
    compile: bool = False,
    ttr: TTRConfig | None = None,
) -> Iterator[Forward]:
    """The extraction's forward, with what it needs (hooks or compiled blocks) on until the block exits.

    The CLS-only fast path (``itae.engine.fast``) runs wherever it computes the same thing: feature "cls",
    a config it supports, and no register neuron in the last block. Otherwise ITAE runs through hooks,
    which compiled blocks would break: ``compile`` then is ignored, with a warning.
    """
    with ExitStack() as stack:
        bb = backbone
        if ttr is not None:  # the registers' hooks stay on throughout; ITAE sees their extra token
            bb = stack.enter_context(test_time_registers(bb, ttr)).backbone
        with_ttr = bool(ttr is not None and ttr.neurons)
        # the CLS-only fast path runs the last block's MLP for the CLS row alone: no register neurons there
        ttr_fast = not with_ttr or (bb.num_blocks > 1 and all(b < bb.num_blocks - 1 for b, _ in ttr.neurons))
        fast = fast_cls and feature == "cls" and supports_fast_cls(bb, config) and ttr_fast
        if config is not None and not fast:
            stack.enter_context(attenuate(bb, config))
            if compile:
                logger.warning("compile ignored: this ITAE config runs through hooks, which compiled blocks would break")
        elif compile and with_ttr:
            logger.warning("compile ignored: test-time registers run through hooks, which compiled blocks would break")
        elif compile:
            stack.enter_context(compiled_blocks(bb))
        yield Forward(bb, config, fast, feature, normalize)


__all__ = ["Forward", "embed_batch", "embed_batches", "make_forward", "pool_features", "to_device"]
