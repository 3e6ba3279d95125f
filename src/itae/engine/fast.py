"""The fast path when only the CLS embedding is wanted: the last block runs for the CLS row alone.

With ITAE engineering only the CLS row of the last block (the published setting), nothing the
last block computes for patch rows can reach the CLS output. So the last block computes one CLS
query row of attention, with K and V folded into the query and the output projection
(``cls_attention_absorbed``), and the output projection and MLP for the CLS token only; with ITAE
it also projects the detection source (Q, K or V) for all tokens, for the norms. Without ITAE the
last block thus needs no K or V projection at all. Without a config the same function is the plain model's CLS output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from itae.errors import InputError, InputIndexError

from ..config import ITAEConfig
from ..models.base import AttentionSite, Backbone, Features
from .functional import _engineer_logits, _key_mask, artifact_mask, cls_row_weights, patch_norms, split_heads


def supports_fast_cls(backbone: Backbone, config: ITAEConfig | None) -> bool:
    """Whether ``forward_cls`` can serve this backbone and config (else use ``attenuate``)."""
    if backbone.embed_fn is None or backbone.final_norm is None or len(backbone.parts) != backbone.num_blocks:
        return False
    if not backbone.cls_token:
        return False  # a pooling probe: use attenuate
    if backbone.sites[-1].rotary is not None and backbone.block_kwargs_fn is None:
        return False  # rotary embeddings the blocks must be handed, and no way to make them here
    if config is None:
        return True
    return (
        config.rows == "cls"
        and config.is_calibrated
        and [backbone.resolve_layer(i) for i in config.layers] == [backbone.num_blocks - 1]
    )


def _weights(site: AttentionSite):
    """(W, b) of q, k and v, each W (D, D_in) and b (D,) or None, from a fused or split layout."""
    if site.qkv is not None or site.mha is not None:
        fused = site.qkv if site.qkv is not None else None
        w = fused.weight if fused is not None else site.mha.in_proj_weight
        b = fused.bias if fused is not None else site.mha.in_proj_bias
        dim = w.shape[0] // 3
        return [(w[i * dim : (i + 1) * dim], None if b is None else b[i * dim : (i + 1) * dim]) for i in range(3)]
    return [(m.weight, m.bias) for m in (site.q, site.k, site.v)]


def _identity(m) -> bool:
    return m is None or isinstance(m, torch.nn.Identity)


def cls_attention_absorbed(
    z: torch.Tensor,
    q_cls: torch.Tensor,
    site: AttentionSite,
    mask: torch.Tensor | None,
    *,
    num_prefix: int,
    mode: str = "min",
    alpha: float = 0.1,
) -> torch.Tensor:
    """CLS-row attention context (B, D) from the normed tokens z (B, T, D_in), without K or V.

    The projections are folded into the query and the output, per head h:
    q_h . k_t = (W_k,h^T q_h) . z_t + q_h . b_k,h and sum_t p_t v_t = W_v,h (sum_t p_t z_t) + b_v,h,
    so the only passes over all T tokens are two thin batched products with z (B, T, D_in):
    O(B T D H) instead of the O(B T D^2) of projecting K and V.
    """
    (_, _), (wk, bk), (wv, bv) = _weights(site)
    b, _, d_in = z.shape
    heads, d = site.num_heads, site.head_dim
    qh = q_cls.reshape(b, heads, d)  # (B, 1, D) -> (B, H, d)
    # u[b, h] = W_k,h^T q[b, h]: (H, B, d) @ (H, d, D_in) -> (H, B, D_in)
    u = torch.matmul(qh.transpose(0, 1), wk.view(heads, d, d_in))
    logits = torch.matmul(z, u.permute(1, 2, 0)).transpose(1, 2)  # (B, T, H) -> (B, H, T)
    if bk is not None:
        logits = logits + (qh * bk.view(heads, d)).sum(-1, keepdim=True)
    logits = logits.float() * site.scale
    if mask is not None:
        logits = _engineer_logits(logits[:, :, None], _key_mask(mask, heads), num_prefix, mode, alpha)[:, :, 0]
    probs = logits.softmax(dim=-1).to(z.dtype)  # (B, H, T)
    pooled = torch.matmul(probs, z)  # (B, H, D_in): the attention-weighted mean token, per head
    # W_v,h pooled[b, h]: (H, B, D_in) @ (H, D_in, d) -> (H, B, d)
    context = torch.matmul(pooled.transpose(0, 1), wv.view(heads, d, d_in).transpose(1, 2)).transpose(0, 1)
    if bv is not None:
        context = context + bv.view(heads, d)  # the weights sum to one
    return context.reshape(b, heads * d)


def _check_fast(backbone: Backbone, config: ITAEConfig | None) -> None:
    if not supports_fast_cls(backbone, config):
        raise InputError(
            "forward_cls serves a calibrated config that engineers only the last block's CLS row; "
            "use itae.attenuate for other configs"
        )


def supports_forward_from(backbone: Backbone) -> bool:
    """Whether a forward can start at any block from its input tokens alone: the backbone exposes its
    blocks and final norm, has a CLS token, and its blocks take no per-image arguments (rotary
    embeddings, attention masks) that would have to be made again from the pixels."""
    return (
        backbone.embed_fn is not None
        and backbone.final_norm is not None
        and backbone.cls_token
        and backbone.probe is None
        and backbone.block_kwargs_fn is None
        and not backbone.block_args
    )


def _run_blocks(blocks, h: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
    for block in blocks:
        h = block(h, *args, **(kwargs or {}))
        h = h[0] if isinstance(h, (tuple, list)) else h
    return h


def forward_features_from(backbone: Backbone, hidden: torch.Tensor, start: int) -> Features:
    """The rest of the forward from the input tokens (B, T, D) of block ``start``: the same steps, in the
    same order, as the model's own forward after that block's input (ITAE hooks apply when installed)."""
    h = backbone.final_norm(_run_blocks(backbone.blocks[start:], hidden))  # type: ignore[misc]
    p = backbone.num_prefix_tokens
    return Features(cls=h[:, 0], patches=h[:, p:], registers=h[:, 1:p])


def forward_cls(
    backbone: Backbone, pixel_values: torch.Tensor, config: ITAEConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normed CLS embedding (B, D), with ITAE on the last block when ``config`` is given.

    Returns (cls, artifact_mask) where artifact_mask is (B, N) (or (B, H, N)) or None without a config.
    ``config`` must have a numeric threshold and engineer only the last block's CLS row
    (``supports_fast_cls``). Only the detection source is projected for all tokens (and nothing,
    without a config): the CLS row itself folds the K and V projections into the query and output.
    """
    _check_fast(backbone, config)
    block_kwargs = backbone.block_kwargs_fn(pixel_values) if backbone.block_kwargs_fn is not None else {}
    return forward_cls_from(backbone, backbone.embed(pixel_values), 0, config, block_kwargs=block_kwargs)


def forward_cls_from(
    backbone: Backbone,
    hidden: torch.Tensor,
    start: int,
    config: ITAEConfig | None = None,
    *,
    block_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``forward_cls`` from the input tokens (B, T, D) of block ``start`` instead of the pixels.

    ``forward_cls(bb, x, cfg)`` is ``forward_cls_from(bb, bb.embed(x), 0, cfg)``, bit for bit; starting at
    a later block skips the blocks before it (their output was kept, e.g. from a calibration pass).
    ``block_kwargs``: the keyword arguments every block call takes for these pixels (rotary embeddings).
    """
    _check_fast(backbone, config)
    if not 0 <= start < backbone.num_blocks:
        raise InputIndexError(f"start block {start} is out of range for a model with {backbone.num_blocks} blocks")
    block_kwargs = block_kwargs or {}
    h = _run_blocks(backbone.blocks[start:-1], hidden, backbone.block_args, block_kwargs)
    site, parts = backbone.sites[-1], backbone.parts[-1]
    num_prefix = backbone.num_prefix_tokens
    z = parts.norm1(h)  # (B, T, D)
    projections = _weights(site)
    mask = None
    if config is not None:
        w, b = projections["qkv".index(config.source)]
        source = F.linear(z, w, b)  # (B, T, D): the one projection detection needs
        heads = site.num_heads if config.granularity == "head" else None
        mask = artifact_mask(patch_norms(source, num_prefix, heads), config.threshold_for(0), config.side)
    wq, bq = projections[0]
    q_cls = F.linear(z[:, :1], wq, bq)  # (B, 1, D)
    kw = dict(num_prefix=num_prefix)
    if config is not None:
        kw.update(mode=config.mode, alpha=config.alpha)
    if _identity(site.q_norm) and _identity(site.k_norm) and site.rotary is None:
        context = cls_attention_absorbed(z, q_cls, site, mask, **kw)[:, None]  # (B, 1, D)
    else:  # per-head q/k norms and per-token rotations do not fold into the weights: project K and V
        (_, _), (wk, bk), (wv, bv) = projections
        qh = split_heads(q_cls, site.num_heads)
        kh = split_heads(F.linear(z, wk, bk), site.num_heads)
        if not _identity(site.q_norm):
            qh = site.q_norm(qh)
        if not _identity(site.k_norm):
            kh = site.k_norm(kh)
        if site.rotary is not None:
            # the rotation leaves prefix rows (the CLS query among them) as they are: rotate the keys only
            _, kh = site.rotary.apply(kh, kh, site.rotary.read((), block_kwargs))
        vh = split_heads(F.linear(z, wv, bv), site.num_heads)
        weights = cls_row_weights(qh, kh, mask, scale=site.scale, **kw)
        context = torch.matmul(weights.to(vh.dtype), vh).transpose(1, 2).reshape(h.shape[0], 1, -1)
    x = h[:, :1] + parts.ls1(site.out_proj(context))
    x = x + parts.ls2(parts.mlp(parts.norm2(x)))
    return backbone.final_norm(x)[:, 0], mask


class compiled_blocks:  # noqa: N801 - a context manager, named like one
    """Compile each transformer block of the instance with ``torch.compile`` ("regional" compilation),
    and restore the plain modules on exit.

    All blocks share one compiled graph (same code, same shapes), so compiling costs one block's
    worth of time instead of the whole model's. Not for use together with ``attenuate``: its hooks
    would break the compiled graphs; ``forward_cls`` is the compiled ITAE path.
    """

    def __init__(self, backbone: Backbone, **compile_kwargs) -> None:
        self.backbone = backbone
        self.kwargs = compile_kwargs

    def __enter__(self) -> Backbone:
        for block in self.backbone.blocks:
            block.compile(**self.kwargs)
        return self.backbone

    def __exit__(self, *exc) -> None:
        for block in self.backbone.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; None is the plain forward
