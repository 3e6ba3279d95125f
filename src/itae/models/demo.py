"""A small ViT with planted attention-sink artifacts: the ITAE mechanism, on real images, without downloads.

Pretrained DINOv2 weights cannot be downloaded everywhere. This module builds, in a fraction of a
second and from a seed alone (no data, no training), a 2-block ViT in three variants that ``itae``
loads like any other model:

- ``demo:clean``: random-feature patch embedding and MLP, then a last block whose CLS row attends
  uniformly to the patches. Its CLS embedding is a bag of nonlinear random features of the image's
  4x4 patches: it clusters CIFAR-10 clearly above chance (about like raw pixels).
- ``demo:planted``: the same weights plus a planted sink circuit, built as the artifacts of large
  DINOv2 models behave (Darcet et al. 2024): two fixed border patches (top-left and bottom-right
  corners, where object-centred photos show background) get a massive residual component along a
  direction ``u``; the last block's keys read ``u``, so the CLS query scores them about ``sink_logit``
  above every other token and they take almost all of its attention; the value projection is blind to
  ``u``, so their values are small (the low value norm ITAE detects). A gated unit pair in the first
  MLP, which only fires on tokens carrying ``u``, writes the high-frequency (checkerboard) response
  of the sink's own patch into the residual stream: what the sinks hand to the CLS token is
  pixel-level texture of two background patches, a nuisance unrelated to the object.
- ``demo:planted-keys``: the same sinks with another signature: long keys and ordinary values (the
  value projection is left as it is), so value norms do not show them and key norms do.
- ``demo:registers``: the clean weights plus two register tokens that carry ``u`` (the sink role)
  and no image content (they take about 90% of the CLS attention and hand it a constant): the
  trained alternative of Darcet et al., in the same construction.

Sinks sit at fixed positions rather than on content-chosen patches so that the artifact is a
property of the weights, as in a trained model, and identical for every image; ITAE is told nothing
about them: it must find them from value norms with its label-free calibrated threshold.

This demonstrates the mechanism (sinks that hold the CLS attention degrade the embedding; moving
the attention away recovers it); it says nothing about DINOv2's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from itae.errors import InputError

from .adapters import adapt
from .base import Backbone, Preprocess

DEMO_PREFIX = "demo:"
DEMO_KINDS = ("clean", "planted", "planted-keys", "registers")
DEMO_MODELS = tuple(DEMO_PREFIX + kind for kind in DEMO_KINDS)

IMAGE_SIZE = 32
PATCH_SIZE = 4
GRID = IMAGE_SIZE // PATCH_SIZE
EMBED_DIM = 192
NUM_HEADS = 3
SINK_POSITIONS = (0, GRID * GRID - 1)  # top-left and bottom-right patches of the 8 x 8 grid
NUM_REGISTERS = 2

_NUISANCE_UNITS = 6  # first-MLP units reserved for the planted nuisance: 3 colour channels x (+, -)
_GATE = 20.0  # gate slope on u: sinks sit far inside GELU's linear range, other tokens far below zero


def is_demo_name(name: object) -> bool:
    """True for the names this module builds (``demo:clean``, ``demo:planted``, ``demo:planted-keys``,
    ``demo:registers``)."""
    return isinstance(name, str) and name.strip().lower() in DEMO_MODELS


def demo_preprocess() -> Preprocess:
    """Resize the shorter side to 32 px and centre-crop 32 x 32 (CIFAR-10's size), ImageNet statistics."""
    return Preprocess(image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE, interpolation="bicubic", patch_size=PATCH_SIZE)


def _zero_mean_basis(dim: int, gen: torch.Generator) -> torch.Tensor:
    """(dim, dim - 1) orthonormal columns spanning the zero-mean vectors: LayerNorm keeps them."""
    m = torch.randn(dim, dim - 1, generator=gen, dtype=torch.float64)
    m = m - m.mean(dim=0, keepdim=True)
    q, _ = torch.linalg.qr(m)
    return q


def _checkerboard(channel: int) -> torch.Tensor:
    """(3 * P * P,) unit filter: the highest spatial frequency of one colour channel of a patch."""
    f = torch.zeros(3, PATCH_SIZE, PATCH_SIZE, dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(PATCH_SIZE), torch.arange(PATCH_SIZE), indexing="ij")
    f[channel] = ((-1.0) ** (i + j)).double()
    return (f / f.norm()).flatten()


@torch.no_grad()
def demo_model(
    kind: str = "planted",
    *,
    seed: int = 0,
    sink_positions: Sequence[int] = SINK_POSITIONS,
    strength: float = 200.0,
    sink_logit: float = 12.0,
    nuisance_gain: float = 1500.0,
) -> nn.Module:
    """Build the demo ViT (a timm ``VisionTransformer``) of ``kind`` "clean", "planted", "planted-keys" or
    "registers".

    seed: the random features (all variants of a seed share them). strength: the sinks' massive
    component, in units of the typical patch-token norm. sink_logit: how far above the other tokens
    the CLS query scores a sink. nuisance_gain: how strongly the sinks carry their patch's texture.
    Deterministic: the same arguments give the same weights.
    """
    from timm.models.vision_transformer import VisionTransformer

    if kind not in DEMO_KINDS:
        raise InputError(f"demo model kind must be one of {', '.join(map(repr, DEMO_KINDS))}; got {kind!r}")
    positions = sorted({int(p) for p in sink_positions})
    if kind.startswith("planted") and (not positions or not all(0 <= p < GRID * GRID for p in positions)):
        raise InputError(f"sink_positions must be patch indices in [0, {GRID * GRID}); got {list(sink_positions)!r}")

    dim = EMBED_DIM
    registers = NUM_REGISTERS if kind == "registers" else 0
    model = VisionTransformer(
        img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, embed_dim=dim, depth=2, num_heads=NUM_HEADS,
        mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token", no_embed_class=True,
        reg_tokens=registers, weight_init="skip",
    )
    gen = torch.Generator().manual_seed(seed)
    basis = _zero_mean_basis(dim, gen)
    u = basis[:, 0]  # the sink direction
    nuisance_dirs = basis[:, 1:4]  # where the planted texture is written, one per colour channel
    texture_dirs = basis[:, 4:7]  # where the patch embedding writes each channel's checkerboard response
    content = basis[:, 7:]  # (D, D - 8) everything else: the random features
    n_feat = content.shape[1]
    hidden = model.blocks[0].mlp.fc1.out_features
    params: dict[str, torch.Tensor] = {name: torch.zeros_like(p, dtype=torch.float64)
                                       for name, p in model.named_parameters()}
    for name in params:  # every LayerNorm: unit gain, zero shift
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            params[name].fill_(1.0)

    # patch embedding: random filters into the content subspace, checkerboards into texture_dirs
    fan_in = 3 * PATCH_SIZE * PATCH_SIZE
    filters = torch.randn(n_feat, fan_in, generator=gen, dtype=torch.float64)
    filters = 2.0 * filters / filters.norm(dim=1, keepdim=True)
    w = content @ filters + sum(torch.outer(texture_dirs[:, c], _checkerboard(c)) for c in range(3))
    params["patch_embed.proj.weight"] = w.reshape(dim, 3, PATCH_SIZE, PATCH_SIZE)
    params["patch_embed.proj.bias"] = content @ (0.5 * torch.randn(n_feat, generator=gen, dtype=torch.float64))
    params["pos_embed"] = (content @ (0.02 * torch.randn(n_feat, GRID * GRID, generator=gen, dtype=torch.float64))).T[None]

    # block 0: no token mixing (zero attention output); a random-feature MLP that writes only into
    # the content and texture subspaces, so that u and the nuisance directions stay clean
    fc1 = torch.randn(hidden, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    fc1_bias = 0.5 * torch.randn(hidden, generator=gen, dtype=torch.float64)
    fc2 = 2.0 * torch.randn(dim, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    fc1[-_NUISANCE_UNITS:] = 0.0
    fc1_bias[-_NUISANCE_UNITS:] = 0.0
    fc2[:, -_NUISANCE_UNITS:] = 0.0
    keep = torch.cat([content, texture_dirs], dim=1)
    params["blocks.0.mlp.fc1.weight"], params["blocks.0.mlp.fc1.bias"] = fc1, fc1_bias
    params["blocks.0.mlp.fc2.weight"] = keep @ (keep.T @ fc2)

    # last block: zero queries and keys (the CLS row attends uniformly), random values, identity output
    params["blocks.1.attn.qkv.weight"][2 * dim :] = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    params["blocks.1.attn.proj.weight"] = torch.eye(dim, dtype=torch.float64)

    for name, p in model.named_parameters():
        p.copy_(params[name].to(p.dtype))
    model.eval()
    if kind == "clean":
        return model

    typical = _typical_patch_norm(model)
    if kind.startswith("planted"):
        idx = torch.as_tensor(positions)
        model.pos_embed[0, idx] += (strength * typical * u).float()
        _plant_nuisance(model, u, nuisance_dirs, texture_dirs, nuisance_gain * strength * typical / math.sqrt(dim))
        _plant_sink_attention(model, u, sink_logit, blind_values=kind == "planted")
    else:
        # registers need not monopolise the CLS row (about 90% of it here): their values are constant
        model.reg_token[0] += (strength * typical * u).float()
        _plant_sink_attention(model, u, sink_logit / 2)
    return model


def _typical_patch_norm(model: nn.Module) -> float:
    """Mean norm of the patch tokens entering block 0, on fixed noise images (no data needed)."""
    x = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    tokens = model.patch_embed(x) + model.pos_embed  # (B, N, D)
    return float(tokens.norm(dim=-1).mean())


def _plant_nuisance(model: nn.Module, u: torch.Tensor, nuisance_dirs: torch.Tensor, texture_dirs: torch.Tensor,
                    gain: float) -> None:
    """Gated unit pairs in the first MLP: on tokens carrying u, write their texture into nuisance_dirs.

    For a LayerNormed token z, unit (c, s) computes GELU(GATE * (u.z - sqrt(D)/2) + s * t_c.z) with t_c the
    texture direction of channel c. A sink has u.z close to sqrt(D): both units of a pair are far in
    GELU's linear range and their difference is 2 * t_c.z. Any other token has u.z = 0: both are off.
    """
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    dim = u.shape[0]
    first = fc1.out_features - _NUISANCE_UNITS
    for c in range(3):
        for s, sign in enumerate((1.0, -1.0)):
            unit = first + 2 * c + s
            fc1.weight[unit] = (_GATE * u + sign * texture_dirs[:, c]).float()
            fc1.bias[unit] = -_GATE * math.sqrt(dim) / 2
            fc2.weight[:, unit] = (sign * gain / 2 * nuisance_dirs[:, c]).float()


def _plant_sink_attention(model: nn.Module, u: torch.Tensor, sink_logit: float, *, blind_values: bool = True) -> None:
    """Last block: keys read u and every query carries the matching direction; values ignore u
    (``blind_values``) or are left as they are."""
    attn = model.blocks[-1].attn
    dim = u.shape[0]
    head_dim = dim // attn.num_heads
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(head_dim, generator=gen, dtype=torch.float64)
    a = (a / a.norm()).repeat(attn.num_heads)  # (D,): the same unit direction in every head
    key_gain = 4.0
    w, b = attn.qkv.weight, attn.qkv.bias  # (3D, D), (3D,), ordered q, k, v
    w[dim : 2 * dim] += (key_gain * torch.outer(a, u)).float()
    # a sink's normed input is about sqrt(D) * u: its logit is scale * q_push * key_gain * sqrt(D)
    q_push = sink_logit / (head_dim**-0.5 * key_gain * math.sqrt(dim))
    b[:dim] += (q_push * a).float()
    if not blind_values:
        return
    wv = w[2 * dim :].double()
    w[2 * dim :] = (wv - torch.outer(wv @ u, u)).float()


def demo_backbone(
    kind: str = "planted", *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    **kw,
) -> Backbone:
    """The demo model of ``kind`` as a ``Backbone`` named ``demo:<kind>``, with its 32-px preprocessing."""
    model = demo_model(kind, seed=seed, **kw).to(device=device, dtype=dtype).eval()
    backbone = adapt(model, name=DEMO_PREFIX + kind if seed == 0 else f"{DEMO_PREFIX}{kind}@{seed}")
    backbone.preprocess = demo_preprocess()
    return backbone


def load_demo(
    name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, resolution: int | None = None,
) -> Backbone:
    """``load_backbone`` for the names ``demo:clean``, ``demo:planted`` and ``demo:registers``."""
    if not is_demo_name(name):
        raise InputError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_MODELS)}")
    if resolution is not None and int(resolution) != IMAGE_SIZE:
        raise InputError(f"the demo models take {IMAGE_SIZE} x {IMAGE_SIZE} images; drop resolution={resolution}")
    return demo_backbone(name.strip().lower()[len(DEMO_PREFIX):], device=device, dtype=dtype)
