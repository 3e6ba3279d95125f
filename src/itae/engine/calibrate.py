"""Calibration: pool the patch norms of a model over a sample of the data and split them without labels.

The split itself (``find_threshold``, ``Split``) lives in ``itae.engine.split``: it looks for a rare
artifact mode beyond the bulk of the log norms on the configured side, and flags nothing when there is
none (a single mode, as in models trained with registers, or two large populations such as dark and
bright images).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from itae.errors import InputError

from ..config import ITAEConfig
from ..models.adapters import adapt
from ..models.base import Backbone
from .capture import HookSet, QKVCapture, mha_inputs, mha_projections
from .functional import artifact_mask, cls_row_weights, patch_norms, split_heads
from .selfcheck import BAR, CANDIDATES, SplitCheck, attention_share, check_split, choose
from .split import MAX_FLAGGED_FRACTION, Split, find_threshold

__all__ = [
    "MAX_FLAGGED_FRACTION", "Calibration", "PatchStats", "Split", "calibrate", "check_thresholds", "collect_norms",
    "find_threshold", "resolve_splits",
]

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Thresholds found for a model and a data set, and the self-check of what they flag.

    config: the input config with numeric thresholds and a fixed source and side (the chosen ones when
        they were "auto"), ready for ``attenuate``.
    thresholds, flagged_fraction, bimodal: per engineered block (non-negative index).
    checks: per block, the self-check of the split in use (``SplitCheck``: source, side, threshold,
        flagged share, attention lift, residual-norm ratio).
    candidates: per block, every (source, side) split tried, in ``CANDIDATES`` order (one for a fixed
        source and side).
    chosen_by: "auto" or "fixed". reason: why nothing is flagged, when auto found no split passing the bar.
    norms: the pooled patch norms of the source in use, per block (1-D float32 arrays), for histograms.
    """

    config: ITAEConfig
    thresholds: dict[int, float]
    flagged_fraction: dict[int, float]
    bimodal: dict[int, bool]
    norms: dict[int, np.ndarray] = field(repr=False)
    num_images: int = 0
    checks: dict[int, SplitCheck] = field(default_factory=dict)
    candidates: dict[int, list[SplitCheck]] = field(default_factory=dict, repr=False)
    chosen_by: str = "fixed"
    reason: str | None = None
    calibrated: bool = True  # False: numeric thresholds given, only checked (``check_thresholds``)

    @property
    def source(self) -> str:
        return self.config.source

    @property
    def side(self) -> str:
        return self.config.side

    @property
    def flags_nothing(self) -> bool:
        return all(f == 0.0 for f in self.flagged_fraction.values())

    def summary(self) -> str:
        """One line: images, the choice, and per block what was flagged and how sink-like it is."""
        head = f"{'calibrated' if self.calibrated else 'checked'} on {self.num_images} images"
        if self.reason:
            return f"{head}; nothing flagged: {self.reason}"
        pair = f"{self.source}/{self.side} ({'chosen by auto' if self.chosen_by == 'auto' else 'fixed'})"
        return f"{head}; {pair}; " + "; ".join(c.describe() for c in self.checks.values())

    def self_check(self) -> dict:
        """The self-check as plain data, for manifests, run records and reports."""
        return {
            "chosen_by": self.chosen_by,
            "source": self.source,
            "side": self.side,
            "images": self.num_images,
            "calibrated": self.calibrated,
            "flagged": not self.flags_nothing,
            "reason": self.reason,
            "summary": self.summary(),
            "bar": BAR,
            "blocks": {str(b): c.to_dict() for b, c in self.checks.items()},
            "candidates": {str(b): [c.to_dict() for c in cs] for b, cs in self.candidates.items()},
        }


def _batches(images: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise InputError(f"images must be a (B, 3, H, W) tensor or an iterable of them; got shape {tuple(images.shape)}")
        yield images
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):  # (pixel_values, ...) from a DataLoader
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise InputError("images must yield (B, 3, H, W) tensors")
        yield batch


@dataclass
class PatchStats:
    """What calibration keeps of one block over its images: M images, N patches, H heads.

    norms: "q", "k", "v" patch norms, (M, N), or (M, H, N) for granularity "head".
    residual: (M, N) residual-stream norms of the patches (block output, before the final norm).
    attention: the unmodified CLS row's attention over the patches, renormalised over them,
        (M, N) head mean, or (M, H, N) per head for granularity "head".
    """

    norms: dict[str, np.ndarray]
    residual: np.ndarray
    attention: np.ndarray


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def collect_norms(
    backbone: Backbone, images: torch.Tensor | Iterable[torch.Tensor], config: ITAEConfig,
    layers: list[int], max_batches: int | None = None,
) -> tuple[dict[int, PatchStats], int]:
    """q, k, v and residual patch norms and the CLS patch attention at ``layers`` over the images.

    One unmodified forward per batch captures everything every (source, side) candidate needs; each
    batch is reduced at once to per-patch numbers (no attention matrix, no hidden states are kept).
    """
    per_head = config.granularity == "head"
    heads = backbone.num_heads if per_head else None
    num_prefix = backbone.num_prefix_tokens
    parts: dict[int, dict[str, list[np.ndarray]]] = {layer: {} for layer in layers}
    residual: dict[int, torch.Tensor] = {}
    count = 0

    def keep(layer: int, name: str, x: torch.Tensor) -> None:
        parts[layer].setdefault(name, []).append(x.float().cpu().numpy())

    with HookSet() as hooks:
        captures = {layer: QKVCapture(backbone.sites[layer], hooks) for layer in layers}
        for layer in layers:
            def on_output(_m, _i, out, layer=layer):
                residual[layer] = _first(out)
            hooks.forward(backbone.blocks[layer], on_output)
        probe_qk: dict[str, torch.Tensor] = {}
        if not backbone.cls_token and backbone.probe is not None:
            probe = backbone.probe

            def keep_probe(module, args, kwargs):  # the pooling probe's row plays the CLS row
                q, k, _ = mha_projections(module, *mha_inputs(args, kwargs))
                probe_qk.update(q=split_heads(q, probe.num_heads), k=split_heads(k, probe.num_heads))
            hooks.pre(probe.attention, keep_probe, with_kwargs=True)
        for i, batch in enumerate(_batches(images)):
            if max_batches is not None and i >= max_batches:
                break
            backbone.forward_features(batch.to(backbone.device, backbone.dtype))
            for layer, capture in captures.items():
                qkv = capture.pop()
                site = backbone.sites[layer]
                for name in ("q", "k", "v"):
                    keep(layer, name, patch_norms(qkv.get(name), num_prefix, heads))
                keep(layer, "residual", patch_norms(residual.pop(layer), num_prefix))
                if probe_qk:  # its keys are the output tokens, all patches (an extra register is gone by then)
                    q, k, scale, key_prefix = probe_qk["q"], probe_qk["k"], backbone.probe.head_dim**-0.5, 0
                else:
                    q, k, _ = qkv.heads(site)
                    scale, key_prefix = site.scale, num_prefix
                weights = cls_row_weights(q[:, :, :1], k, None, num_prefix=key_prefix, scale=scale)
                patches = weights[:, :, 0, key_prefix:]  # (B, H, N)
                keep(layer, "attention", patches if per_head else patches.mean(1))
            count += batch.shape[0]
    if count == 0:
        raise InputError("calibration got no images")
    stats = {}
    for layer, p in parts.items():
        joined = {name: np.concatenate(arrays) for name, arrays in p.items()}
        stats[layer] = PatchStats(
            norms={name: joined[name] for name in ("q", "k", "v")},
            residual=joined["residual"],
            attention=attention_share(joined["attention"]),
        )
    return stats, count


def _nothing_threshold(norms: np.ndarray, side: str) -> float:
    """A threshold that flags none of ``norms`` on ``side``."""
    finite = norms[np.isfinite(norms)]
    if not finite.size:
        return -1.0 if side == "low" else math.inf
    if side == "low":
        return float(finite.min()) / math.e if finite.min() > 0 else -1.0
    return float(finite.max()) * math.e if finite.max() > 0 else 1.0


def _split_and_check(block: int, stats: PatchStats, config: ITAEConfig, source: str, side: str) -> tuple[Split, SplitCheck]:
    norms = stats.norms[source]
    split = find_threshold(norms.ravel(), config.replace(source=source, side=side, threshold="auto"))
    if not split.bimodal:  # the split flags nothing: make sure its threshold does, even on zero norms
        split = Split(_nothing_threshold(norms, side), 0.0, False)
    mask = artifact_mask(torch.from_numpy(norms), split.threshold, side).numpy()
    check = check_split(block, source, side, split.threshold, mask, stats.attention, stats.residual,
                        found_mode=split.bimodal)
    return split, check


@contextmanager
def _quiet(logger: logging.Logger, quiet: bool):
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_splits(stats: dict[int, PatchStats], config: ITAEConfig, layers: list[int]) -> Calibration:
    """Split the norms of each block, choosing the source and side when they are "auto" (no forwards).

    A fixed source and side keep their split whatever the checks say (they are still computed);
    "auto" keeps the best candidate that passes the bar (``itae.engine.selfcheck``), or flags nothing.
    """
    pairs = [(s, d) for s, d in CANDIDATES
             if config.source in ("auto", s) and config.side in ("auto", d)]
    with _quiet(logging.getLogger(find_threshold.__module__), len(pairs) > 1):
        # a candidate that finds no artifacts is an expected outcome here, not a warning
        results = [[_split_and_check(b, stats[b], config, s, d) for b in layers] for s, d in pairs]
    candidates = {b: [results[i][j][1] for i in range(len(pairs))] for j, b in enumerate(layers)}
    reason = None
    if config.is_auto:
        best = choose([[c for _, c in r] for r in results])
        if best is None:
            groups: dict[str, list[str]] = {}
            for c in candidates[layers[0]]:
                groups.setdefault(c.reason, []).append(f"{c.source}/{c.side}")
            reason = f"no (source, side) split passes the bar ({BAR}): " + "; ".join(
                f"{', '.join(names)}: {why}" for why, names in groups.items())
    else:
        best = 0
    if best is None:
        source, side = "v", "low"  # the published reading; its threshold flags nothing
        chosen = []
        for b in layers:
            t = _nothing_threshold(stats[b].norms[source], side)
            chosen.append((Split(t, 0.0, False),
                           SplitCheck(b, source, side, t, 0.0, 0.0, None, None, False, "no candidate passes the bar")))
    else:
        source, side = pairs[best]
        chosen = []
        for j, b in enumerate(layers):
            split, check = results[best][j]
            if config.is_auto and not check.passes:  # the pair won in other blocks: flag nothing here
                t = _nothing_threshold(stats[b].norms[source], side)
                split = Split(t, 0.0, False)
                check = SplitCheck(b, source, side, t, 0.0, 0.0, None, None, False, check.reason)
            chosen.append((split, check))
    splits = {b: s for b, (s, _) in zip(layers, chosen, strict=True)}
    return Calibration(
        config=config.replace(source=source, side=side, threshold=tuple(splits[b].threshold for b in layers)),
        thresholds={b: s.threshold for b, s in splits.items()},
        flagged_fraction={b: s.flagged_fraction for b, s in splits.items()},
        bimodal={b: s.bimodal for b, s in splits.items()},
        norms={b: stats[b].norms[source].ravel().astype(np.float32) for b in layers},
        checks={b: c for b, (_, c) in zip(layers, chosen, strict=True)},
        candidates=candidates,
        chosen_by="auto" if config.is_auto else "fixed",
        reason=reason,
    )


def calibrate(
    model: nn.Module | Backbone,
    images: torch.Tensor | Iterable[torch.Tensor],
    config: ITAEConfig | None = None,
    *,
    max_batches: int | None = None,
) -> Calibration:
    """Find the threshold(s) of ``config.layers`` for a model and a data set, without labels.

    images: preprocessed (B, 3, H, W) tensor, or an iterable of such batches (a DataLoader is fine).
    With source or side "auto" (the default) every candidate split is scored on the same forwards and
    the best one passing the bar is kept (``itae.engine.selfcheck``); with both fixed, their split is
    kept and only checked. Returns a ``Calibration`` whose ``config`` carries the numeric thresholds
    and the source and side in use, for ``attenuate``.
    Deterministic: the same images in the same order give the same thresholds.
    """

    config = ITAEConfig() if config is None else config
    if config.is_calibrated:
        config = config.replace(threshold="auto")
    backbone = adapt(model)
    layers = backbone.resolve_layers(config.layers)
    stats, count = collect_norms(backbone, images, config, layers, max_batches)
    result = resolve_splits(stats, config, layers)
    result.num_images = count
    for check in result.checks.values():
        if check.not_sinks:
            log.warning("itae: %s; ITAE would move attention away from ordinary patches", check.describe())
    log.debug("itae: %s", result.summary())  # callers that know the context log it (e.g. embed)
    return result


def check_thresholds(
    model: nn.Module | Backbone, images: torch.Tensor | Iterable[torch.Tensor], config: ITAEConfig,
    *, max_batches: int | None = None,
) -> Calibration:
    """The self-check of a config whose thresholds are already numbers, on a sample of images.

    Nothing is chosen or changed: the returned ``Calibration`` holds the config as given, and per block
    what its thresholds flag on the images and how sink-like that is (``Calibration.checks``).
    """

    if not config.is_calibrated:
        raise InputError("check_thresholds needs numeric thresholds; use itae.calibrate for 'auto'")
    backbone = adapt(model)
    layers = backbone.resolve_layers(config.layers)
    stats, count = collect_norms(backbone, images, config, layers, max_batches)
    checks = {}
    for position, b in enumerate(layers):
        norms = stats[b].norms[config.source]
        t = config.threshold_for(position)
        mask = artifact_mask(torch.from_numpy(norms), t, config.side).numpy()
        checks[b] = check_split(b, config.source, config.side, t, mask, stats[b].attention, stats[b].residual)
    for check in checks.values():
        if check.not_sinks:
            log.warning("itae: %s; ITAE would move attention away from ordinary patches", check.describe())
    return Calibration(
        config=config, thresholds={b: c.threshold for b, c in checks.items()},
        flagged_fraction={b: c.flagged_fraction for b, c in checks.items()},
        bimodal={b: c.flagged_fraction > 0 for b, c in checks.items()},
        norms={b: stats[b].norms[config.source].ravel().astype(np.float32) for b in layers},
        num_images=count, checks=checks, candidates={b: [c] for b, c in checks.items()}, chosen_by="fixed",
        calibrated=False,
    )
