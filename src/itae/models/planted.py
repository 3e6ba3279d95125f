"""Plant attention-sink artifacts into a ViT, to see and test the mechanism without pretrained weights.

``plant_artifacts`` edits a model instance so that chosen patch positions behave like the artifact
tokens of large DINOv2 models in the last block: a large residual-stream component, a key that the
CLS query aligns with (huge CLS attention), and a value near zero (a low value norm). It is a test
and demonstration device: it reproduces the mechanism, not DINOv2's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import adapt
from .base import Backbone


def _pos_embed(backbone: Backbone) -> tuple[nn.Parameter, int]:
    """The position-embedding parameter and the index of its first patch position."""
    m = backbone.model
    if backbone.family == "hf":
        emb = m.base_model.embeddings
        return emb.position_embeddings, 1
    pos = m.pos_embed
    if backbone.family == "timm":
        return pos, 0 if getattr(m, "no_embed_class", False) else m.num_prefix_tokens
    return pos, 1  # official DINOv2: [CLS, patches]; registers carry no position


def _projection_weights(backbone: Backbone, layer: int):
    """(W, b) views of q, k and v of a block, each W (D, D_in)."""
    site = backbone.sites[layer]
    if site.qkv is not None:
        w, b = site.qkv.weight, site.qkv.bias
        d = w.shape[0] // 3
        return [(w[i * d : (i + 1) * d], None if b is None else b[i * d : (i + 1) * d]) for i in range(3)]
    return [(m.weight, m.bias) for m in (site.q, site.k, site.v)]


def _typical_token_norm(backbone: Backbone, n_positions: int) -> torch.Tensor:
    """Mean patch-token norm at the last block's input, on noise images at the native resolution."""
    side = int(round(n_positions**0.5)) * backbone.patch_size
    seen: list[torch.Tensor] = []
    handle = backbone.blocks[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
        backbone.forward_features(x.to(backbone.device, backbone.dtype))
    finally:
        handle.remove()
    return seen[0][:, backbone.num_prefix_tokens :].float().norm(dim=-1).mean().cpu()


@torch.no_grad()
def plant_artifacts(
    model: nn.Module | Backbone,
    positions: Sequence[int],
    *,
    strength: float = 30.0,
    sink_logit: float = 12.0,
    seed: int = 0,
) -> nn.Module:
    """Make the patch tokens at ``positions`` (0-based patch indices) attention sinks of the last block.

    strength: size of the planted residual component, relative to the typical token norm.
    sink_logit: roughly how many logits above the other patches the CLS query scores a sink.
    The model instance is edited in place (weights change) and returned.
    """
    backbone = adapt(model)
    gen = torch.Generator().manual_seed(seed)
    dim = backbone.embed_dim
    pos, first = _pos_embed(backbone)
    n_positions = pos.shape[1] - first
    for p in positions:
        if not 0 <= p < n_positions:
            raise ValueError(f"patch position {p} out of range for {n_positions} position embeddings")

    # planted direction u: unit, zero-mean (so LayerNorm keeps it), the same for every sink
    u = torch.randn(dim, generator=gen)
    u = u - u.mean()
    u = u / u.norm()
    typical = _typical_token_norm(backbone, n_positions)
    idx = torch.as_tensor(list(positions), dtype=torch.long) + first
    pos[0, idx] += (strength * typical * u).to(pos.dtype)

    (wq, bq), (wk, bk), (wv, bv) = _projection_weights(backbone, -1)
    heads, head_dim = backbone.num_heads, dim // backbone.num_heads
    # key direction a: the same unit direction in every head, so every head's CLS row sees the sinks
    a_head = torch.randn(head_dim, generator=gen)
    a_head = a_head / a_head.norm()
    a = a_head.repeat(heads).to(wk.dtype)  # (D,)
    # after LayerNorm a sink's input is about sqrt(D) * u, so its key gains gain * sqrt(D) * a
    scale = head_dim**-0.5
    gain = 4.0
    wk += gain * torch.outer(a, u.to(wk.dtype))
    # queries get a constant component along a: CLS (and every row) then scores sinks highly
    q_push = sink_logit / (scale * gain * dim**0.5)
    if bq is None:
        raise ValueError("plant_artifacts needs a query bias (qkv_bias=True), as in DINOv2")
    bq += (q_push * a).to(bq.dtype)
    # value: project u out, and no bias, so a sink's value is near zero (low value norm)
    wv.copy_(wv - torch.outer(wv @ u.to(wv.dtype), u.to(wv.dtype)))
    if bv is not None:
        bv.zero_()
    return backbone.model
