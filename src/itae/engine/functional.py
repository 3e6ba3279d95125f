"""The method as small pure functions on tensors.

Shapes: B batch, H heads, T tokens (prefix + patches), P prefix tokens (CLS + registers),
N = T - P patches, d head width, D = H * d.

Two paths compute the engineered attention:
- ``cls_row_attention`` / ``engineered_attention``: the fast path. No T x T matrix for the CLS row;
  all rows go through SDPA (mask/scale) or query chunks (min).
- ``reference_attention``: the naive reference, explicit logits, kept for tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from itae.errors import InputError

__all__ = [
    "patch_norms",
    "artifact_mask",
    "split_heads",
    "cls_row_weights",
    "cls_row_attention",
    "engineered_attention",
    "reference_attention",
    "attention_bias",
]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, d)."""
    b, t, dim = x.shape
    return x.view(b, t, num_heads, dim // num_heads).transpose(1, 2)


def patch_norms(x: torch.Tensor, num_prefix: int, num_heads: int | None = None) -> torch.Tensor:
    """L2 norms of the patch tokens of a projection ``x`` of shape (B, T, D).

    With ``num_heads`` None the norm is over all D dims: (B, N). Otherwise per head: (B, H, N).
    Norms are computed in float32 whatever the input dtype.
    """
    patches = x[:, num_prefix:]
    if num_heads is None:
        return torch.linalg.vector_norm(patches, dim=-1, dtype=torch.float32)
    b, n, dim = patches.shape
    # (B, N, D) -> (B, N, H, d) -> norm over d -> (B, H, N)
    per_head = patches.reshape(b, n, num_heads, dim // num_heads)
    return torch.linalg.vector_norm(per_head, dim=-1, dtype=torch.float32).transpose(1, 2)


def artifact_mask(norms: torch.Tensor, threshold: float, side: str = "low") -> torch.Tensor:
    """Boolean mask of artifact patches: norm <= threshold (side "low") or >= threshold ("high")."""
    if side == "low":
        return norms <= threshold
    if side == "high":
        return norms >= threshold
    raise InputError(f"side must be 'low' or 'high'; got {side!r}")


def _key_mask(mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N) or (B, H, N) patch mask -> (B, 1 or H, 1, N), broadcastable against (B, H, L, N) logits."""
    if mask.dim() == 2:
        return mask[:, None, None, :]
    if mask.dim() == 3:
        if mask.shape[1] not in (1, num_heads):
            raise InputError(f"per-head mask has {mask.shape[1]} heads, attention has {num_heads}")
        return mask[:, :, None, :]
    raise InputError(f"artifact mask must be (B, N) or (B, H, N); got shape {tuple(mask.shape)}")


def _engineer_logits(
    logits: torch.Tensor, mask: torch.Tensor, num_prefix: int, mode: str, alpha: float
) -> torch.Tensor:
    """Apply the change to logits (B, H, L, T); ``mask`` is the patch mask from ``_key_mask``."""
    prefix, patches = logits[..., :num_prefix], logits[..., num_prefix:]
    if mode == "min":
        row_min = patches.amin(dim=-1, keepdim=True)  # min over patch keys only
        patches = torch.where(mask, row_min, patches)
    elif mode == "mask":
        patches = patches.masked_fill(mask, float("-inf"))
    elif mode == "scale":
        patches = patches + mask.to(patches.dtype) * math.log(alpha)
    else:
        raise InputError(f"mode must be 'min', 'mask' or 'scale'; got {mode!r}")
    return torch.cat([prefix, patches], dim=-1)


def attention_bias(
    mask: torch.Tensor, num_prefix: int, mode: str, alpha: float, dtype: torch.dtype, num_heads: int
) -> torch.Tensor:
    """Additive key bias (B, 1 or H, 1, T) for modes "mask" (-inf) and "scale" (log alpha)."""
    if mode not in ("mask", "scale"):
        raise InputError(f"an additive bias exists only for modes 'mask' and 'scale'; got {mode!r}")
    km = _key_mask(mask, num_heads)
    value = float("-inf") if mode == "mask" else math.log(alpha)
    patch_bias = torch.zeros(km.shape, dtype=dtype, device=mask.device).masked_fill(km, value)
    prefix_bias = patch_bias.new_zeros(*km.shape[:-1], num_prefix)
    return torch.cat([prefix_bias, patch_bias], dim=-1)


def cls_row_attention(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_prefix: int,
    mode: str = "min",
    alpha: float = 0.1,
    scale: float | None = None,
) -> torch.Tensor:
    """Engineered attention output of the CLS query only.

    q_cls: (B, H, 1, d); k, v: (B, H, T, d); mask: (B, N) or (B, H, N). Returns (B, H, 1, d).
    Costs O(T d) per head: the T x T matrix is never formed.
    """
    probs = cls_row_weights(q_cls, k, mask, num_prefix=num_prefix, mode=mode, alpha=alpha, scale=scale)
    return torch.matmul(probs.to(v.dtype), v)


def cls_row_weights(
    q_cls: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    num_prefix: int,
    mode: str = "min",
    alpha: float = 0.1,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax weights (B, H, 1, T) of the CLS query, in float32; engineered unless ``mask`` is None."""
    scale = q_cls.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q_cls, k.transpose(-1, -2)).float() * scale  # (B, H, 1, T)
    if mask is not None:
        logits = _engineer_logits(logits, _key_mask(mask, k.shape[1]), num_prefix, mode, alpha)
    return logits.softmax(dim=-1)


def engineered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_prefix: int,
    mode: str = "min",
    alpha: float = 0.1,
    scale: float | None = None,
    chunk_elements: int = 1 << 26,
) -> torch.Tensor:
    """Engineered attention for every query row. q, k, v: (B, H, T, d) -> (B, H, T, d).

    "mask"/"scale" pass an additive bias to SDPA. "min" needs each row's minimum over patch keys,
    so it runs in query chunks of at most ``chunk_elements`` logits: never a stored T x T per head.
    """
    if mode in ("mask", "scale"):
        bias = attention_bias(mask, num_prefix, mode, alpha, q.dtype, k.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    km = _key_mask(mask, k.shape[1])
    b, h, t, _ = q.shape
    step = max(1, chunk_elements // max(1, b * h * k.shape[2]))
    out = torch.empty_like(q)
    for start in range(0, t, step):
        stop = min(t, start + step)
        logits = torch.matmul(q[:, :, start:stop], k.transpose(-1, -2)).float() * scale
        logits = _engineer_logits(logits, km, num_prefix, "min", alpha)
        out[:, :, start:stop] = torch.matmul(logits.softmax(dim=-1).to(v.dtype), v)
    return out


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_prefix: int,
    mode: str = "min",
    alpha: float = 0.1,
    rows: str = "cls",
    scale: float | None = None,
) -> torch.Tensor:
    """Naive reference: explicit (B, H, T, T) logits, replacement on the chosen rows, softmax, @ V.

    Written to mirror the equation line by line, for tests. q, k, v: (B, H, T, d).
    """
    b, h, t, d = q.shape
    scale = d**-0.5 if scale is None else scale
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale  # (B, H, T, T)
    full_mask = mask if mask.dim() == 3 else mask[:, None, :].expand(b, h, mask.shape[-1])
    engineered_rows = [0] if rows == "cls" else list(range(t))
    for bi in range(b):
        for hi in range(h):
            for r in engineered_rows:
                row = logits[bi, hi, r].clone()
                patch_logits = row[num_prefix:]
                flagged = full_mask[bi, hi]
                if mode == "min":
                    patch_logits[flagged] = patch_logits.min()
                elif mode == "mask":
                    patch_logits[flagged] = float("-inf")
                elif mode == "scale":
                    patch_logits[flagged] = patch_logits[flagged] + math.log(alpha)
                row[num_prefix:] = patch_logits
                logits[bi, hi, r] = row
    probs = torch.softmax(logits, dim=-1)
    return (probs @ v.double()).to(v.dtype)
