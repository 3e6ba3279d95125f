"""Label-free checks of a norm split: are the flagged patches the model's attention sinks?

Artifacts are, by what they do in the unmodified model (Darcet et al. 2024), the patches that the CLS
row over-attends and that carry a high residual-stream norm. Two numbers say how well a set of flagged
patches matches that, without labels:

- attention lift: the share of the CLS row's patch attention (renormalised over the patches, head
  mean, unmodified model) that falls on the flagged patches, divided by their share of the patches.
  1 is what uniform attention gives; artifacts take many times their share. Below 1, ITAE would move
  attention away from patches the CLS token attends less than average: they are not sinks.
- residual-norm ratio: the mean residual-stream norm (block output, before the final norm) of the
  flagged patches divided by that of the other patches.

``source="auto"`` splits the norms of every candidate (source q/k/v x side low/high) and keeps the best
candidate that passes the bar (``passes_bar``): a mode was found, at most 25% of patches flagged, a
lift of at least ``MIN_LIFT`` and a residual-norm ratio of at least ``MIN_RESIDUAL_RATIO``. "Best" is
the attention the flagged patches take beyond their share (``excess``: attention mass x (1 - 1/lift)),
which favours the split that removes most of the sinks' attention while flagging few ordinary patches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

MIN_LIFT = 2.0
MIN_RESIDUAL_RATIO = 1.0
MAX_FLAGGED_SHARE = 0.25
CANDIDATES = (("v", "low"), ("v", "high"), ("k", "low"), ("k", "high"), ("q", "low"), ("q", "high"))
BAR = (f"a mode found, at most {MAX_FLAGGED_SHARE:.0%} of patches flagged, attention lift >= {MIN_LIFT:g} "
       f"and residual-norm ratio >= {MIN_RESIDUAL_RATIO:g}")


@dataclass(frozen=True)
class SplitCheck:
    """One split of one block's patch norms and its label-free scores.

    flagged_fraction: share of patches flagged (pooled over the images).
    attention: mean CLS patch attention mass on the flagged patches (unmodified model), in [0, 1].
    lift, residual_ratio: see the module docstring; None when nothing (or everything) is flagged.
    passes: whether the split passes the bar; reason: why not (empty when it passes).
    """

    block: int
    source: str
    side: str
    threshold: float
    flagged_fraction: float
    attention: float
    lift: float | None
    residual_ratio: float | None
    passes: bool
    reason: str = ""

    @property
    def excess(self) -> float:
        """CLS attention the flagged patches take beyond their share of the patches."""
        return max(0.0, self.attention - self.flagged_fraction)

    @property
    def flags_nothing(self) -> bool:
        return self.flagged_fraction == 0.0

    @property
    def not_sinks(self) -> bool:
        """Flagged patches that the CLS row attends less than average: ITAE would hurt, not help."""
        return self.lift is not None and self.lift < 1.0

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line: what was flagged and how sink-like it is."""
        head = f"block {self.block}: {self.source}/{self.side}"
        if self.flags_nothing:
            return f"{head}: nothing flagged" + (f" ({self.reason})" if self.reason else "")
        text = (f"{head}, threshold {self.threshold:.4g}, {100 * self.flagged_fraction:.2f}% of patches flagged, "
                f"attention lift {_fmt(self.lift)}, residual-norm ratio {_fmt(self.residual_ratio)}")
        if self.not_sinks:
            text += " (lift below 1: the flagged patches are not sinks)"
        return text


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def attention_share(cls_attention: np.ndarray) -> np.ndarray:
    """CLS attention over the patches, renormalised to sum to 1 per image (and head): (..., N) -> same."""
    total = cls_attention.sum(axis=-1, keepdims=True)
    return cls_attention / np.maximum(total, 1e-30)


def check_split(
    block: int, source: str, side: str, threshold: float, mask: np.ndarray, patch_attention: np.ndarray,
    residual: np.ndarray, *, found_mode: bool = True,
) -> SplitCheck:
    """Score one split.

    mask: (B, N) or (B, H, N) bool, flagged patches. patch_attention: renormalised CLS patch attention
    (``attention_share``), (B, N) head mean for a (B, N) mask, (B, H, N) per head for a (B, H, N) mask.
    residual: (B, N) residual-stream norms of the patches.
    """
    mask = np.asarray(mask, dtype=bool)
    share = float(mask.mean()) if mask.size else 0.0
    attention = float((patch_attention * mask).sum(axis=-1).mean()) if mask.size else 0.0
    lift = attention / share if share > 0 else None
    token_mask = mask.any(axis=1) if mask.ndim == 3 else mask  # a patch flagged in any head
    flagged, others = residual[token_mask], residual[~token_mask]
    ratio = float(flagged.mean() / max(others.mean(), 1e-30)) if flagged.size and others.size else None
    reason = _why_not(found_mode, share, lift, ratio)
    return SplitCheck(block, source, side, float(threshold), share, attention, lift, ratio, not reason, reason)


def _why_not(found_mode: bool, share: float, lift: float | None, ratio: float | None) -> str:
    if not found_mode:
        return "no separate mode in the norms"
    if share == 0.0:
        return "the threshold flags no patch"
    if share > MAX_FLAGGED_SHARE:
        return f"{100 * share:.1f}% of patches flagged, too many for artifacts"
    if lift is None or lift < MIN_LIFT:
        return f"attention lift {_fmt(lift)} < {MIN_LIFT:g}"
    if ratio is None or ratio < MIN_RESIDUAL_RATIO:
        return f"residual-norm ratio {_fmt(ratio)} < {MIN_RESIDUAL_RATIO:g}"
    return ""


def choose(candidates: list[list[SplitCheck]]) -> int | None:
    """Index of the best candidate pair, given each pair's checks over the engineered blocks.

    The pair that passes the bar in the most blocks wins, then the one with the most excess attention
    summed over its passing blocks, then the earlier one in ``CANDIDATES`` order. None when no pair
    passes in any block.
    """
    best, best_key = None, None
    for i, checks in enumerate(candidates):
        passing = [c for c in checks if c.passes]
        if not passing:
            continue
        key = (len(passing), round(sum(c.excess for c in passing), 6))
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best
