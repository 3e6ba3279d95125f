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
from dataclasses import dataclass

import torch
from torch import nn

from itae.errors import InputError, InputTypeError

from ..config import ITAEConfig
from ..models.adapters import adapt
from ..models.base import AttentionSite, Backbone
from .capture import HookedContext, HookSet, QKVCapture, mha_inputs, mha_projections
from .functional import artifact_mask, cls_row_attention, engineered_attention, patch_norms, split_heads
from .split import find_threshold

log = logging.getLogger(__name__)


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
    return backbone.resolve_layers(config.layers)


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
            result = find_threshold(norms.detach().flatten().cpu().numpy(), self.config)
            self.thresholds[layer] = result.threshold
            self.calibrated_on_first_batch = True
            log.info(
                "itae: block %d threshold %.4g calibrated on the first batch (%d patch norms, %.2f%% flagged%s)",
                layer, result.threshold, norms.numel(), 100 * result.flagged_fraction,
                "" if result.bimodal else f"; nothing flagged: {result.reason}",
            )
        return self.thresholds[layer]


class attenuate(HookedContext):  # noqa: N801 - used as a context manager, named like one
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
            raise InputTypeError(f"config must be an ITAEConfig; got {type(config).__name__}")
        if config.is_auto:
            raise InputError(
                f"ITAEConfig(source={config.source!r}, side={config.side!r}): 'auto' is chosen from a sample of the "
                "data by itae.calibrate(model, images, config); pass its .config to attenuate, or fix source and side"
            )
        self.backbone = adapt(model)
        self.config = config
        self.layers = resolve_layers(self.backbone, config)
        check_applies(self.backbone, config, self.layers)
        self.state = ITAEState(self.backbone, config, self.layers)

    def _install(self, hooks: HookSet) -> None:
        probe = self.backbone.probe if not self.backbone.cls_token else None
        for layer in self.layers:
            site = self.backbone.sites[layer]
            capture = QKVCapture(site, hooks)
            engineer = self._engineer_hook(layer, site, capture, detect_only=probe is not None)
            if site.mha is not None:
                hooks.forward_with_kwargs(site.mha, engineer)
            else:
                hooks.pre(site.out_proj, engineer)
        if probe is not None:
            hooks.forward_with_kwargs(probe.attention, self._probe_hook(self.layers[-1]))

    def _engineer_hook(self, layer: int, site: AttentionSite, capture: QKVCapture, *, detect_only: bool = False):
        """For a ``mha`` site a forward hook that replaces rows of the module's output; otherwise a
        pre-hook on ``out_proj`` that replaces rows of the attention context. ``detect_only``: record
        the artifact mask and change nothing (a probe engineers it, see ``_probe_hook``)."""
        config = self.config
        state = self.state
        num_prefix = self.backbone.num_prefix_tokens

        def hook(module: nn.Module, args: tuple, *rest):
            qkv = capture.pop()
            source = qkv.get(config.source)
            norms = patch_norms(source, num_prefix, site.num_heads if config.granularity == "head" else None)
            threshold = state.threshold(layer, norms)
            mask = artifact_mask(norms, threshold, config.side)
            state.last[layer] = LayerResult(norms.detach(), mask.detach(), threshold)
            if detect_only:
                return None
            # Images with nothing flagged keep the block's own output (and no host sync is needed).
            flagged = mask.flatten(1).any(dim=1)  # (B,)
            q, k, v = qkv.heads(site)
            b, t, dim = qkv.q.shape
            kwargs = dict(num_prefix=num_prefix, mode=config.mode, alpha=config.alpha, scale=site.scale)
            if config.rows == "cls":
                new = cls_row_attention(q[:, :, :1], k, v, mask, **kwargs)  # (B, H, 1, d)
                new = new.transpose(1, 2).reshape(b, 1, dim)
            else:
                new = engineered_attention(q, k, v, mask, **kwargs)  # (B, H, T, d)
                new = new.transpose(1, 2).reshape(b, t, dim)
            if site.mha is not None:  # rest = (kwargs, output): replace rows of the projected output
                output = rest[1]
                out = output[0]
                new = site.mha.out_proj(new.to(out.dtype))
                return (_replace_rows(out, new, flagged), *output[1:])
            (context,) = args[:1]  # (B, T, D), heads merged
            return (_replace_rows(context, new.to(context.dtype), flagged), *args[1:])

        return hook

    def _probe_hook(self, layer: int):
        """Forward hook on a probe's ``nn.MultiheadAttention``: its single query row engineered with the
        artifact mask that block ``layer`` recorded in this forward (no prefix tokens: every key is a patch)."""
        config = self.config
        state = self.state
        probe = self.backbone.probe

        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            result = state.last.get(layer)
            if result is None:
                raise RuntimeError(f"the attention-pooling probe ran before block {layer} was observed")
            query, key, value = mha_inputs(args, kwargs)
            attn_mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
            padding = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
            if padding is not None or (attn_mask is not None and bool((attn_mask != 0).any())):
                raise RuntimeError("ITAE on a pooling probe does not support padded (masked) batches; "
                                   "feed whole images (Backbone.forward_features does)")
            q, k, v = (split_heads(x, probe.num_heads) for x in mha_projections(module, query, key, value))
            mask = result.artifact_mask
            if mask.shape[-1] != k.shape[2]:
                raise RuntimeError(f"the probe attends to {k.shape[2]} tokens; block {layer} flagged among {mask.shape[-1]}")
            new = cls_row_attention(q, k, v, mask, num_prefix=0, mode=config.mode, alpha=config.alpha,
                                    scale=probe.head_dim**-0.5)  # (B, H, 1, d)
            out = output[0]
            new = module.out_proj(new.transpose(1, 2).reshape(out.shape).to(out.dtype))
            flagged = mask.flatten(1).any(dim=1)
            return (torch.where(flagged[:, None, None], new, out), *output[1:])

        return hook


def _replace_rows(full: torch.Tensor, new: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
    """``full`` (B, T, D) with its first ``new.shape[1]`` rows replaced by ``new`` for flagged images."""
    rows = new.shape[1]
    new = torch.where(flagged[:, None, None], new, full[:, :rows])
    if rows == full.shape[1]:
        return new
    if torch.is_grad_enabled() and full.requires_grad:
        return torch.cat([new, full[:, rows:]], dim=1)
    full[:, :rows] = new
    return full


def check_applies(backbone: Backbone, config: ITAEConfig, layers: list[int]) -> None:
    """Refuse, before anything is patched, a config that ITAE cannot apply to this model."""
    if backbone.cls_token:
        return
    if backbone.probe is None:
        raise InputError(
            f"ITAE engineers the CLS row or an attention-pooling probe; {backbone.name} has neither (no CLS token, no "
            "pooling head): use the method 'none' for this model"
        )
    if config.rows != "cls" or layers != [backbone.num_blocks - 1]:
        raise InputError(
            f"{backbone.name} has no CLS token: ITAE engineers its pooling probe's row with artifacts detected in the "
            "last block, so rows must be 'cls' and layers (-1,)"
        )
    if config.granularity == "head" and backbone.probe.num_heads != backbone.sites[-1].num_heads:
        raise InputError(
            f"per-head detection needs as many probe heads as block heads ({backbone.probe.num_heads} vs "
            f"{backbone.sites[-1].num_heads}); use granularity 'token'"
        )
