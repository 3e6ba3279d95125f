"""The small typed protocol through which every backend meets the rest of the code.

A backend adapter wraps a model instance and says where its attention lives (``AttentionSite``),
how many prefix tokens it has, its patch size and its preprocessing. Adding a backend is adding
one file that builds a ``Backbone``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from itae.errors import InputError, InputIndexError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a model.

    image_size: side of the square crop fed to the model (a multiple of ``patch_size``).
    resize_size: shorter side after resizing, before the centre crop.
    """

    image_size: int = 224
    resize_size: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 14

    def with_resolution(self, size: int) -> Preprocess:
        """The same recipe at another resolution, rounded to the nearest multiple of the patch size."""
        if size < 1:
            raise InputError(f"resolution must be positive; got {size}")
        rounded = max(self.patch_size, int(round(size / self.patch_size)) * self.patch_size)
        ratio = self.resize_size / self.image_size
        return Preprocess(
            image_size=rounded,
            resize_size=int(round(rounded * ratio)),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            patch_size=self.patch_size,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Rotary:
    """A rotary position embedding that the attention applies to q and k after the projections.

    ``module`` receives the embedding with each call (the attention module itself, in the layouts we
    know); ``read(args, kwargs)`` takes it from that call's arguments; ``apply(q, k, embedding)`` rotates
    q and k, each (B, H, T, d), exactly as the model does (prefix tokens unrotated in DINOv3).
    ``prefix_count``: the attribute of ``module`` that counts the unrotated prefix tokens, where the
    module keeps one (timm's Eva); None where the count follows from the shapes (HF DINOv3 rotates the
    last rows, as many as the embedding has positions).
    """

    module: nn.Module
    read: Callable
    apply: Callable
    prefix_count: str | None = None


@dataclass
class AttentionSite:
    """Where one block's self-attention can be observed and engineered, without replacing its forward.

    Exactly one layout is set: ``qkv`` (a fused linear whose output is (B, T, 3D), ordered q, k, v); all
    of ``q``, ``k``, ``v`` (linears with outputs (B, T, D)); or ``mha``, a ``torch.nn.MultiheadAttention``
    (batch first), whose fused ``in_proj`` is not a module of its own: the engine then reads the
    module's inputs and replaces rows of its output. Otherwise ``out_proj`` is the module whose *input*
    is the attention context (B, T, D) with heads merged: the engine overwrites rows of that input.
    ``q_norm``/``k_norm`` are per-head modules applied to q and k before the logits (Identity in
    DINOv2); ``rotary`` a rotary position embedding applied after them (DINOv3).
    """

    index: int
    block: nn.Module
    attention: nn.Module
    out_proj: nn.Module
    num_heads: int
    head_dim: int
    scale: float
    qkv: nn.Module | None = None
    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    rotary: Rotary | None = None
    mha: nn.Module | None = None

    def __post_init__(self) -> None:
        fused = self.qkv is not None
        split = all(m is not None for m in (self.q, self.k, self.v))
        if fused + split + (self.mha is not None) != 1:
            raise InputError("an AttentionSite needs exactly one of a fused qkv linear, all of q, k, v, or an mha")


@dataclass
class ProbeSite:
    """An attention-pooling head (SigLIP's ``SiglipMultiheadAttentionPoolingHead``): one learned query
    attends to the normed output tokens through ``attention`` (a batch-first ``nn.MultiheadAttention``).
    On a model without a CLS token, its attention row is the row ITAE engineers."""

    head: nn.Module
    attention: nn.Module
    num_heads: int
    head_dim: int


@dataclass
class MLPSite:
    """Where one block's MLP hidden activation can be observed and edited, without replacing a forward.

    ``out_proj`` is the MLP's last linear (``fc2``; ``w3`` / ``weights_out`` in SwiGLU MLPs; ``down_proj``
    in HF DINOv3, plain or gated; ``c_proj`` in OpenCLIP): its *input* is the hidden activation after the
    nonlinearity (or the gate), (B, T, hidden_dim), one column per neuron. A forward pre-hook on ``out_proj`` reads or rewrites it.
    """

    index: int
    mlp: nn.Module
    out_proj: nn.Module
    hidden_dim: int


def mlp_site(index: int, mlp: nn.Module) -> MLPSite | None:
    """Describe the MLP of block ``index`` (a ``Mlp``/``Dinov2MLP``-style, SwiGLU, HF DINOv3 or OpenCLIP
    module); None when it has no recognised last linear (any module with ``in_features``: ``nn.Linear``,
    FP8 linears, ...)."""
    for name in ("fc2", "w3", "weights_out", "down_proj", "c_proj"):
        out = getattr(mlp, name, None)
        if isinstance(out, nn.Module) and isinstance(getattr(out, "in_features", None), int):
            return MLPSite(index=index, mlp=mlp, out_proj=out, hidden_dim=int(out.in_features))
    return None


def mlp_sites(mlps: list[nn.Module | None]) -> list[MLPSite]:
    """Each block's MLP described for the hidden-activation hooks; none at all when one of them is not
    recognised (what needs them, test-time registers, then refuses the model)."""
    sites = [mlp_site(i, mlp) for i, mlp in enumerate(mlps)]
    return [] if any(s is None for s in sites) else sites


@dataclass
class BlockParts:
    """The pre-norm transformer block around the attention: x + ls1(attn(norm1(x))), then
    x + ls2(mlp(norm2(x))). Lets a caller run a block for chosen rows only."""

    norm1: nn.Module
    ls1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module


@dataclass
class Features:
    """Normed output tokens of a forward pass, named by meaning."""

    cls: torch.Tensor  # (B, D)
    patches: torch.Tensor | None = None  # (B, N, D)
    registers: torch.Tensor | None = None  # (B, R, D)


@dataclass
class Backbone:
    """A model instance plus everything the rest of ``itae`` needs to know about it.

    Built by the adapters in ``itae.models`` (``adapt(model)``); never subclass a model to make one.
    """

    model: nn.Module
    family: str  # "hf", "timm", "hub" or "open_clip"
    name: str
    num_register_tokens: int
    patch_size: int
    embed_dim: int
    num_heads: int
    blocks: list[nn.Module]
    sites: list[AttentionSite]
    preprocess: Preprocess
    forward_features_fn: object = field(repr=False, default=None)  # Callable[[Tensor], Features]
    embed_fn: object = field(repr=False, default=None)  # Callable[[Tensor], Tensor]: pixels -> (B, T, D) tokens
    final_norm: nn.Module | None = field(repr=False, default=None)
    parts: list[BlockParts] = field(repr=False, default_factory=list)
    mlp_sites: list[MLPSite] = field(repr=False, default_factory=list)  # one per block, when described
    block_args: tuple = ()  # extra positional arguments of each block call (HF CLIP/SigLIP: attention_mask=None)
    block_kwargs_fn: object = field(repr=False, default=None)  # Callable[[Tensor], dict]: keyword arguments of
    # every block call for these pixels (HF DINOv3: its rotary embedding, read by the sites' ``rotary``)
    cls_token: bool = True  # False for models that pool with a probe (SigLIP)
    probe: ProbeSite | None = field(repr=False, default=None)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token) + self.num_register_tokens

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def resolve_layer(self, index: int) -> int:
        """A block index (negative counts from the end) as a non-negative index, or a clear error."""
        n = self.num_blocks
        if not -n <= index < n:
            raise InputIndexError(f"block index {index} is out of range for a model with {n} blocks")
        return index % n

    def resolve_layers(self, indices: Sequence[int], what: str = "ITAEConfig.layers") -> list[int]:
        """Block indices as non-negative ones, each block at most once; ``what`` names them in errors."""
        layers = [self.resolve_layer(i) for i in indices]
        if len(set(layers)) != len(layers):
            raise InputError(f"{what} {indices} name the same block twice for a {self.num_blocks}-block model")
        return layers

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens and position embedding: (B, 3, H, W) -> (B, T, D)."""
        return self.embed_fn(pixel_values)  # type: ignore[operator]

    def forward_features(self, pixel_values: torch.Tensor) -> Features:
        """Run the model and return its normed CLS, patch and register tokens."""
        return self.forward_features_fn(pixel_values)  # type: ignore[operator]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
