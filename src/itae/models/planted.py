"""Plant attention-sink artifacts into a ViT, to see and test the mechanism without pretrained weights.

``plant_artifacts`` edits a model instance so that some patch tokens behave like the artifact tokens
of large DINOv2 models: a large residual-stream component that the CLS query of the chosen blocks
attends (almost all of its attention). How they look to detection is the ``signature``: low values
(the published reading), long keys with ordinary values, or a massive activation that makes q, k and
v all long. Sinks sit at fixed patch positions, or wherever an image shows a trigger texture (chosen
per image by its content). It is a test and demonstration device: it reproduces the mechanism, not
DINOv2's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from itae.errors import InputError

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


SIGNATURES = ("low-value", "long-key", "residual")


def _patch_conv(backbone: Backbone) -> nn.Conv2d:
    """The patch-embedding convolution."""
    m = backbone.model
    if backbone.family == "hf":
        return m.base_model.embeddings.patch_embeddings.projection
    return m.patch_embed.proj


def trigger_pattern(patch_size: int) -> torch.Tensor:
    """(3, P, P) the texture that makes a patch a sink under ``plant_artifacts(positions=None)``:
    a +-1 checkerboard, the same in the three channels, in preprocessed (normalised) pixel units. Flat
    and smooth patches do not respond to it."""
    i, j = torch.meshgrid(torch.arange(patch_size), torch.arange(patch_size), indexing="ij")
    return ((-1.0) ** (i + j)).expand(3, patch_size, patch_size).clone()


def paint_trigger(pixel_values: torch.Tensor, positions: Sequence[Sequence[int]], patch_size: int) -> torch.Tensor:
    """A copy of (B, 3, H, W) ``pixel_values`` with the trigger texture added at each image's patch
    ``positions`` (0-based patch indices, row-major): sinks chosen per image by the image's content."""
    out = pixel_values.clone()
    grid_w = pixel_values.shape[-1] // patch_size
    pattern = trigger_pattern(patch_size).to(out.dtype)
    for b, image_positions in enumerate(positions):
        for p in image_positions:
            r, c = divmod(int(p), grid_w)
            out[b, :, r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] += pattern
    return out


@torch.no_grad()
def plant_artifacts(
    model: nn.Module | Backbone,
    positions: Sequence[int] | None,
    *,
    signature: str = "low-value",
    layers: Sequence[int] = (-1,),
    strength: float = 30.0,
    sink_logit: float = 12.0,
    seed: int = 0,
) -> nn.Module:
    """Make patch tokens attention sinks of the blocks ``layers`` (the last one by default).

    positions: fixed 0-based patch indices, the same in every image; or None: sinks sit wherever the
        image shows the trigger texture (``trigger_pattern``, painted with ``paint_trigger``), so their
        positions and number follow each image's content.
    signature: how the sinks look to detection, besides their large residual-stream component:
        "low-value" (the published reading): long keys that the CLS query aligns with, values near zero;
        "long-key": long keys, ordinary values;
        "residual": a massive activation in one channel that the block's q, k and v projections read
        strongly: q, k and v are all long, and the CLS query is aligned with the sinks' own key.
    strength: size of the planted residual component, relative to the typical token norm.
    sink_logit: roughly how many logits above the other patches the CLS query scores a sink.
    The model instance is edited in place (weights change) and returned.
    """
    if signature not in SIGNATURES:
        raise InputError(f"signature must be one of {', '.join(map(repr, SIGNATURES))}; got {signature!r}")
    backbone = adapt(model)
    gen = torch.Generator().manual_seed(seed)
    dim = backbone.embed_dim
    pos, first = _pos_embed(backbone)
    n_positions = pos.shape[1] - first
    for p in positions or ():
        if not 0 <= p < n_positions:
            raise InputError(f"patch position {p} out of range for {n_positions} position embeddings")
    blocks = sorted({backbone.resolve_layer(i) for i in layers})

    if signature == "residual":  # one channel: a massive activation, as high-norm tokens show
        u = torch.zeros(dim)
        u[int(torch.randint(dim, (1,), generator=gen))] = 1.0
    else:  # a unit, zero-mean direction (LayerNorm keeps it), the same for every sink
        u = torch.randn(dim, generator=gen)
    u = u - u.mean()
    u = u / u.norm()
    typical = _typical_token_norm(backbone, n_positions)
    planted = (strength * typical * u).to(pos.dtype)
    if positions is None:
        conv = _patch_conv(backbone)
        pattern = trigger_pattern(conv.kernel_size[0]).to(conv.weight.dtype)
        # (D, 3, P, P): the trigger (pixel values +-1) answers with exactly the planted component
        conv.weight += planted.to(conv.weight.dtype)[:, None, None, None] * pattern[None] / pattern.square().sum()
    else:
        idx = torch.as_tensor(list(positions), dtype=torch.long) + first
        pos[0, idx] += planted

    heads, head_dim = backbone.num_heads, dim // backbone.num_heads
    scale = head_dim**-0.5
    a_head = torch.randn(head_dim, generator=gen)
    a = (a_head / a_head.norm()).repeat(heads)  # (D,): the same unit direction in every head
    for block in blocks:
        (wq, bq), (wk, bk), (wv, bv) = _projection_weights(backbone, block)
        if bq is None:
            raise InputError("plant_artifacts needs a query bias (qkv_bias=True), as in DINOv2")
        uw = u.to(wk.dtype)
        if signature == "residual":
            gain = 8.0
            for w in (wq, wk, wv):  # the block reads the massive channel strongly: q, k, v all long
                w += (gain - 1.0) * torch.outer(w @ uw, uw)
            # after LayerNorm a sink's input is about sqrt(D) * u: its key is about k_sink
            k_sink = wk @ (dim**0.5 * uw) + (0 if bk is None else bk)
            k_heads = k_sink.reshape(heads, head_dim)
            push = k_heads / k_heads.square().sum(-1, keepdim=True) * (sink_logit / scale)
            bq += push.reshape(-1).to(bq.dtype)
            continue
        # keys read u along a; every query carries a: CLS (and every row) scores sinks highly
        key_gain = 4.0 if signature == "low-value" else 8.0  # long keys are the only trace of "long-key" sinks
        wk += key_gain * torch.outer(a.to(wk.dtype), uw)
        bq += (sink_logit / (scale * key_gain * dim**0.5) * a).to(bq.dtype)
        if signature == "low-value":  # values blind to u, and no bias: a sink's value is near zero
            wv.copy_(wv - torch.outer(wv @ uw, uw))
            if bv is not None:
                bv.zero_()
    return backbone.model
