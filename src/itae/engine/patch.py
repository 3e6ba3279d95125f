"""``attenuate``: engineer the attention of a live model instance, and always restore it.

The block's own attention runs unchanged (SDPA, flash or eager, whatever the model uses). Hooks on
the q/k/v projections observe the projections; a pre-hook on the output projection overwrites the
engineered rows of the attention context before it is projected:
- rows="cls": only the CLS row is recomputed, at O(T d) per head; no T x T matrix is formed.
- rows="all": every row is recomputed (SDPA with an additive bias for mask/scale, query chunks for min).
Images with no flagged patch keep the block's own output untouched, bit for bit.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ITAEConfig
from ..models.adapters import adapt
from ..models.base import AttentionSite, Backbone
from .capture import HookSet, QKVCapture
from .functional import artifact_mask, cls_row_attention, engineered_attention, patch_norms

log = logging.getLogger(__name__)

_ACTIVE: weakref.WeakSet = weakref.WeakSet()


@dataclass
class LayerResult:
    """What detection found in one engineered block during the last forward."""

    norms: torch.Tensor  # (B, N) or (B, H, N) float32
    artifact_mask: torch.Tensor  # same shape, bool
    threshold: float

    @property
    def flagged_fraction(self) -> float:
        return float(self.artifact_mask.float().mean())


def resolve_layers(backbone: Backbone, config: ITAEConfig) -> list[int]:
    """Config layer indices as non-negative block indices; a clear error when out of range."""
    layers = [backbone.resolve_layer(i) for i in config.layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"ITAEConfig.layers {config.layers} name the same block twice for a {backbone.num_blocks}-block model")
    return layers


class LayerResults(dict):
    """``{block: LayerResult}`` of the last forward, by block index; negative indices count from the end
    (``state.last[-1]`` is the last block's, whatever the model's depth)."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.num_blocks = num_blocks

    def __getitem__(self, block: int) -> LayerResult:
        key = block + self.num_blocks if isinstance(block, int) and -self.num_blocks <= block < 0 else block
        if key not in self:
            raise KeyError(
                f"block {block} was not engineered in the last forward; blocks: {sorted(self)} "
                f"(of {self.num_blocks}; -1 is the last)"
            )
        return super().__getitem__(key)


class ITAEState:
    """Live state of an ``attenuate`` context: thresholds in use and the last forward's detection
    (``last[block]``, negative blocks counting from the end)."""

    def __init__(self, backbone: Backbone, config: ITAEConfig, layers: list[int]) -> None:
        self.backbone = backbone
        self.config = config
        self.layers = layers
        self.thresholds: dict[int, float] = {}
        if config.is_calibrated:
            self.thresholds = {layer: config.threshold_for(i) for i, layer in enumerate(layers)}
        self.last = LayerResults(backbone.num_blocks)
        self.calibrated_on_first_batch = False

    def threshold(self, layer: int, norms: torch.Tensor) -> float:
        if layer not in self.thresholds:
            # threshold="auto" without a calibration: calibrate once, on the first batch seen.
            from .calibrate import find_threshold

            result = find_threshold(norms.detach().flatten().cpu().numpy(), self.config)
            self.thresholds[layer] = result.threshold
            self.calibrated_on_first_batch = True
            log.info(
                "itae: block %d threshold %.4g calibrated on the first batch (%d patch norms, %.2f%% flagged%s)",
                layer, result.threshold, norms.numel(), 100 * result.flagged_fraction,
                "" if result.bimodal else "; no valley found, nothing flagged",
            )
        return self.thresholds[layer]


class attenuate:  # noqa: N801 - used as a context manager, named like one
    """Engineer the attention of ``model`` (an instance) inside a ``with`` block.

    >>> with itae.attenuate(model, itae.calibrate(model, sample).config) as state:
    ...     features = model(pixel_values)
    ...     state.last[-1].artifact_mask  # (B, N) flagged patches of the last block, last forward

    Everything is validated here, at the call: a bad config, an unsupported model or a block index
    out of range raises before anything is patched. On exit every hook is removed, also after an
    exception; parameters and buffers are never touched.
    """

    def __init__(self, model: nn.Module | Backbone, config: ITAEConfig | None = None) -> None:
        config = ITAEConfig() if config is None else config
        if not isinstance(config, ITAEConfig):
            raise TypeError(f"config must be an ITAEConfig; got {type(config).__name__}")
        if config.is_auto:
            raise ValueError(
                f"ITAEConfig(source={config.source!r}, side={config.side!r}): 'auto' is chosen from a sample of the "
                "data by itae.calibrate(model, images, config); pass its .config to attenuate, or fix source and side"
            )
        self.backbone = adapt(model)
        self.config = config
        self.layers = resolve_layers(self.backbone, config)
        self.state = ITAEState(self.backbone, config, self.layers)
        self._hooks: HookSet | None = None

    def __enter__(self) -> ITAEState:
        model = self.backbone.model
        if model in _ACTIVE:
            raise RuntimeError("this model is already inside an itae.attenuate context; nesting is not supported")
        hooks = HookSet()
        try:
            for layer in self.layers:
                site = self.backbone.sites[layer]
                capture = QKVCapture(site, hooks)
                hooks.pre(site.out_proj, self._engineer_hook(layer, site, capture))
        except BaseException:
            hooks.remove()
            raise
        self._hooks = hooks
        _ACTIVE.add(model)
        return self.state

    def __exit__(self, *exc) -> None:
        try:
            if self._hooks is not None:
                self._hooks.remove()
        finally:
            self._hooks = None
            _ACTIVE.discard(self.backbone.model)

    def _engineer_hook(self, layer: int, site: AttentionSite, capture: QKVCapture):
        config = self.config
        state = self.state
        num_prefix = self.backbone.num_prefix_tokens

        def hook(_module: nn.Module, args: tuple):
            qkv = capture.pop()
            (context,) = args[:1]  # (B, T, D), heads merged
            source = qkv.get(config.source)
            norms = patch_norms(source, num_prefix, site.num_heads if config.granularity == "head" else None)
            threshold = state.threshold(layer, norms)
            mask = artifact_mask(norms, threshold, config.side)
            state.last[layer] = LayerResult(norms.detach(), mask.detach(), threshold)
            # Images with nothing flagged keep the block's own output (and no host sync is needed).
            flagged = mask.flatten(1).any(dim=1)  # (B,)
            q, k, v = qkv.heads(site)
            b, t, dim = context.shape
            kwargs = dict(num_prefix=num_prefix, mode=config.mode, alpha=config.alpha, scale=site.scale)
            if config.rows == "cls":
                new = cls_row_attention(q[:, :, :1], k, v, mask, **kwargs)  # (B, H, 1, d)
                new = new.transpose(1, 2).reshape(b, 1, dim).to(context.dtype)
                new = torch.where(flagged[:, None, None], new, context[:, :1])
                if torch.is_grad_enabled() and context.requires_grad:
                    context = torch.cat([new, context[:, 1:]], dim=1)
                else:
                    context[:, :1] = new
            else:
                new = engineered_attention(q, k, v, mask, **kwargs)  # (B, H, T, d)
                new = new.transpose(1, 2).reshape(b, t, dim).to(context.dtype)
                context = torch.where(flagged[:, None, None], new, context)
            return (context, *args[1:])

        return hook
