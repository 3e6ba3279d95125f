"""Diagnostics: what the artifacts look like inside a model, block by block."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from itae.errors import InputError

from ..config import ITAEConfig
from ..models.adapters import adapt
from ..models.base import Backbone
from .calibrate import PatchStats, resolve_splits
from .capture import HookSet, QKVCapture, mha_inputs, mha_projections
from .functional import artifact_mask, cls_row_weights, patch_norms, split_heads
from .selfcheck import attention_share


@dataclass
class LayerDiagnostics:
    """One block's view of a batch. N patches, T = prefix + N tokens, H heads.

    norms: "q", "k", "v" (projection) and "residual" (block output, before the final norm), each (B, N).
    cls_attention / cls_attention_itae: CLS-row softmax over all T keys, (B, H, T), prefix keys first,
        unmodified and after engineering under the config.
        On a model without a CLS token (SigLIP) the row of its attention-pooling probe, over the N patches.
    artifact_mask: (B, N) bool, or (B, H, N) for granularity "head".
    threshold: NaN when ITAE is off (``detect_artifacts(..., itae=False)``).
    """

    block: int
    norms: dict[str, torch.Tensor]
    cls_attention: torch.Tensor
    cls_attention_itae: torch.Tensor
    artifact_mask: torch.Tensor
    threshold: float
    num_prefix_tokens: int
    grid: tuple[int, int]
    source: str | None = None  # the source and side that flagged (None: ITAE off)
    side: str | None = None

    @property
    def flagged_fraction(self) -> float:
        return float(self.artifact_mask.float().mean())

    @property
    def attention_on_artifacts(self) -> torch.Tensor:
        """(B,) head-mean CLS attention mass on flagged patches, unmodified."""
        patches = self.cls_attention[:, :, self.num_prefix_tokens :]
        mask = self.artifact_mask if self.artifact_mask.dim() == 3 else self.artifact_mask[:, None]
        return (patches * mask).sum(-1).mean(1)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def detect_artifacts(
    model: nn.Module | Backbone, pixel_values: torch.Tensor, config: ITAEConfig | None = None, *, itae: bool = True,
) -> dict[int, LayerDiagnostics]:
    """Norms, CLS attention and artifact masks of the blocks in ``config.layers`` for one batch.

    The forward is the unmodified model's. With threshold "auto" the threshold is calibrated on this
    batch's pooled norms, and with source or side "auto" they are chosen on this batch as
    ``itae.calibrate`` does (use ``itae.calibrate`` on a sample of the data set for a stable choice);
    ``LayerDiagnostics.source`` / ``side`` say which were used. ``itae=False`` describes the unmodified
    model only: nothing is flagged and ``cls_attention_itae`` is the unmodified row.
    """
    config = ITAEConfig() if config is None else config
    backbone = adapt(model)
    layers = backbone.resolve_layers(config.layers)
    if pixel_values.dim() != 4:
        raise InputError(f"pixel_values must be (B, 3, H, W); got shape {tuple(pixel_values.shape)}")
    num_prefix = backbone.num_prefix_tokens
    # the prefix keys of the engineered row: none for a pooling probe, whose keys are the output tokens
    # (all patches: an extra token of test-time registers is taken out before them)
    key_prefix = num_prefix if backbone.cls_token else 0
    residual: dict[int, torch.Tensor] = {}
    captured = {}
    with HookSet() as hooks:
        captures = {layer: QKVCapture(backbone.sites[layer], hooks) for layer in layers}
        for layer in layers:
            def keep(_m, _i, out, layer=layer):
                residual[layer] = _first(out)
            hooks.forward(backbone.blocks[layer], keep)
        for layer, capture in captures.items():
            # pop right after each site's attention ran: the pre-hook on out_proj fires in order
            def take(_m, *_a, layer=layer, capture=capture):
                captured[layer] = capture.pop()
            site = backbone.sites[layer]
            if site.mha is not None:  # its out_proj is not called as a module
                hooks.forward(site.mha, take)
            else:
                hooks.pre(site.out_proj, take)
        probe_qk = {}
        if not backbone.cls_token and backbone.probe is not None:
            def keep_probe(module, args, kwargs):
                q, k, _ = mha_projections(module, *mha_inputs(args, kwargs))
                probe_qk.update(q=split_heads(q, backbone.probe.num_heads), k=split_heads(k, backbone.probe.num_heads))
            hooks.pre(backbone.probe.attention, keep_probe, with_kwargs=True)
        backbone.forward_features(pixel_values.to(backbone.device, backbone.dtype))

    h = pixel_values.shape[-2] // backbone.patch_size
    w = pixel_values.shape[-1] // backbone.patch_size
    heads_for_norm = backbone.num_heads if config.granularity == "head" else None
    def row_qk(layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The engineered row's query and keys: the CLS row, or an attention-pooling probe's row (its keys
        are the normed output tokens, all patches) on a model without a CLS token."""
        if backbone.cls_token:
            return q, k, backbone.sites[layer].scale
        if not probe_qk:
            raise InputError(f"{backbone.name} has neither a CLS token nor an attention-pooling probe")
        return probe_qk["q"], probe_qk["k"], backbone.probe.head_dim**-0.5

    norms = {}
    before = {}
    for layer in layers:
        site = backbone.sites[layer]
        qkv = captured[layer]
        norms[layer] = {name: patch_norms(qkv.get(name), num_prefix) for name in ("q", "k", "v")}
        norms[layer]["residual"] = patch_norms(residual[layer], num_prefix)
        q, k, _ = qkv.heads(site)
        q, k, scale = row_qk(layer, q, k)
        before[layer] = cls_row_weights(q[:, :, :1], k, None, num_prefix=key_prefix, scale=scale)[:, :, 0]

    if itae and not config.is_calibrated:
        # the choice calibration makes, on this batch: the same statistics, the same rule
        stats = {}
        for layer in layers:
            qkv = captured[layer]
            per_head = heads_for_norm is not None
            patches = before[layer][:, :, key_prefix:]
            stats[layer] = PatchStats(
                norms={n: patch_norms(qkv.get(n), num_prefix, heads_for_norm).cpu().numpy() for n in ("q", "k", "v")},
                residual=norms[layer]["residual"].cpu().numpy(),
                attention=attention_share((patches if per_head else patches.mean(1)).float().cpu().numpy()),
            )
        config = resolve_splits(stats, config, layers).config

    out: dict[int, LayerDiagnostics] = {}
    for position, layer in enumerate(layers):
        site = backbone.sites[layer]
        qkv = captured[layer]
        q, k, _ = qkv.heads(site)
        q, k, scale = row_qk(layer, q, k)
        if itae:
            source_norms = patch_norms(qkv.get(config.source), num_prefix, heads_for_norm)
            threshold = config.threshold_for(position)
            mask = artifact_mask(source_norms, threshold, config.side)
            kw = dict(num_prefix=key_prefix, mode=config.mode, alpha=config.alpha, scale=scale)
            after = cls_row_weights(q[:, :, :1], k, mask, **kw)[:, :, 0]
        else:
            threshold = math.nan
            mask = torch.zeros_like(norms[layer]["v"], dtype=torch.bool)
            after = before[layer]
        out[layer] = LayerDiagnostics(
            block=layer, norms={k_: v_.cpu() for k_, v_ in norms[layer].items()},
            cls_attention=before[layer].cpu(), cls_attention_itae=after.cpu(), artifact_mask=mask.cpu(),
            threshold=float(threshold), num_prefix_tokens=key_prefix, grid=(h, w),
            source=config.source if itae else None, side=config.side if itae else None,
        )
    return out
