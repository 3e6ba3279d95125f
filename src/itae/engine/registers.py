"""Test-time registers (Jiang, Dravid, Efros, Gandelsman, NeurIPS 2025): find register neurons, move them.

Outlier tokens (high residual norm) of large ViTs are made by a few MLP neurons, the "register
neurons". ``find_register_neurons`` finds them without labels on a sample of images; inside
``test_time_registers`` one extra token, initialised to zero, is inserted, and in the MLPs that hold
register neurons each such neuron's activation is set, at the extra token, to its maximum over all
tokens of the image, and to zero at the other tokens. The outliers' role moves to the extra token.

Where the extra token goes, and why: right after the prefix tokens (CLS, then any trained registers),
so it is a prefix token for everything downstream (ITAE never flags it and takes its minimum over
patches only). It is removed before the final norm, so every output (CLS, registers, patches) keeps
its original position and count. Everything is per image: a batch gives what its images give one by
one. With no neurons chosen nothing is patched at all (no extra token).

Per family: under rotary embeddings (DINOv3) the prefix tokens are not rotated, so neither is the extra
token, and every patch keeps its rotation (HF rotates the last rows, as many as there are patches; timm's
Eva counts its prefix tokens, and that count is raised by one inside the context). SigLIP has no CLS
token: the extra token goes first and is removed before the final norm, so the attention-pooling probe
pools over the patches only, as in the unmodified model. An attention mask handed to every block (SigLIP2
with eager attention) is widened to cover the extra token; a padded batch is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from itae.errors import InputError, InputTypeError

from ..config import ITAEConfig
from ..methods import TTRConfig
from ..models.adapters import adapt
from ..models.base import Backbone
from .capture import HookedContext, HookSet
from .detect import detect_artifacts
from .split import find_threshold

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward early, once what is needed has been seen."""


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def check_registers_apply(backbone: Backbone) -> None:
    """Refuse, with the reason, a model test-time registers cannot be applied to."""
    if len(backbone.mlp_sites) != backbone.num_blocks:
        raise InputError(
            f"test-time registers need each block's MLP described (Backbone.mlp_sites); {backbone.name!r} "
            "does not describe them"
        )
    if backbone.final_norm is None:
        raise InputError(f"test-time registers need the model's final norm; {backbone.name!r} has none described")


def _max_layer(backbone: Backbone, value: int) -> int:
    return backbone.num_blocks - 1 if value >= backbone.num_blocks else backbone.resolve_layer(value)


@dataclass
class RegisterNeurons:
    """What ``find_register_neurons`` found.

    config: the input config with ``neurons`` set (highest score first), ready for ``test_time_registers``.
    threshold: the residual-norm threshold used; outlier_fraction: share of patch tokens above it.
    scores: the chosen neurons' scores, in the order of ``config.neurons``.
    """

    config: TTRConfig
    threshold: float
    num_images: int
    images_with_outliers: int
    outlier_fraction: float
    scores: list[float] = field(default_factory=list)
    outlier_block: int = -1

    def summary(self) -> str:
        blocks = ", ".join(f"block {b}: {len(ns)}" for b, ns in self.config.by_block().items()) or "none"
        return (
            f"{len(self.config.neurons or ())} register neurons ({blocks}) from {self.images_with_outliers} of "
            f"{self.num_images} images with outliers (block {self.outlier_block} residual norm > "
            f"{self.threshold:.4g}: {100 * self.outlier_fraction:.2f}% of patches)"
        )

    def to_record(self) -> dict:
        return {
            "images": self.num_images,
            "images_with_outliers": self.images_with_outliers,
            "outlier_block": self.outlier_block,
            "norm_threshold": float(self.threshold),
            "outlier_fraction": float(self.outlier_fraction),
            "scores": [float(s) for s in self.scores],
        }


@torch.no_grad()
def find_register_neurons(
    model: nn.Module | Backbone, batches: Iterable[torch.Tensor], config: TTRConfig | None = None
) -> RegisterNeurons:
    """Find register neurons on preprocessed batches (B, 3, H, W) of unlabelled images.

    1. Outliers: the patch tokens whose residual norm at ``config.outlier_layer``'s output is above
       ``config.norm_threshold`` (or the valley split of the pooled log norms, for "auto").
    2. Scores: per image with outliers, each neuron's mean absolute activation over its outlier tokens,
       in the MLPs of blocks 0..``max_layer``; averaged over those images.
    3. The ``top_k`` highest (block, neuron) pairs.

    The batches are kept (on the host) for the second pass. No outlier in the sample: no neurons.
    """
    config = TTRConfig() if config is None else config
    if not isinstance(config, TTRConfig):
        raise InputTypeError(f"config must be a TTRConfig; got {type(config).__name__}")
    backbone = adapt(model)
    check_registers_apply(backbone)
    outlier_block = backbone.resolve_layer(config.outlier_layer)
    last = _max_layer(backbone, config.max_layer)
    prefix = backbone.num_prefix_tokens
    device, dtype = backbone.device, backbone.dtype
    kept = [x.detach().to("cpu") for x in batches]
    if not kept or sum(len(x) for x in kept) == 0:
        raise InputError("find_register_neurons needs at least one image")

    # pass 1: residual norms of the patch tokens at the outlier block (the forward stops there)
    norms: list[torch.Tensor] = []
    with HookSet() as hooks:
        def keep_norms(_m, _a, out):
            h = _first(out)
            norms.append(torch.linalg.vector_norm(h[:, prefix:].float(), dim=-1).cpu())  # (B, N)
            raise _Stop
        hooks.forward(backbone.blocks[outlier_block], keep_norms)
        for x in kept:
            try:
                backbone.forward_features(x.to(device, dtype))
            except _Stop:
                pass
    pooled = torch.cat([n.flatten() for n in norms])
    if config.norm_threshold == "auto":
        split = find_threshold(pooled.numpy(), ITAEConfig(side="high"))
        threshold = split.threshold if split.bimodal else float("inf")
    else:
        threshold = float(config.norm_threshold)
    masks = [n > threshold for n in norms]  # (B, N) each
    num_images = int(sum(len(m) for m in masks))
    with_outliers = int(sum(int(m.any(dim=1).sum()) for m in masks))
    fraction = float(sum(int(m.sum()) for m in masks)) / max(1, pooled.numel())

    hidden = backbone.mlp_sites[0].hidden_dim
    totals = torch.zeros(last + 1, hidden, dtype=torch.float64)
    if with_outliers and config.top_k > 0:
        # pass 2: mean |activation| at each image's outliers, MLPs of blocks 0..last (stops after block last)
        current: dict[str, torch.Tensor] = {}
        with HookSet() as hooks:
            for b in range(last + 1):
                def score(_m, args, b=b):
                    mask = current["mask"]  # (B, N) bool, on the device
                    act = args[0][:, prefix:].float().abs()  # (B, N, hidden)
                    count = mask.sum(dim=1).clamp(min=1)  # (B,)
                    per_image = torch.einsum("bn,bnh->bh", mask.float(), act) / count[:, None]
                    totals[b] += per_image.sum(dim=0).double().cpu()  # images without outliers add zeros
                hooks.pre(backbone.mlp_sites[b].out_proj, score)

            def stop(_m, _a, _o):
                raise _Stop
            hooks.forward(backbone.blocks[last], stop)
            for x, mask in zip(kept, masks, strict=True):
                rows = mask.any(dim=1)
                if not bool(rows.any()):
                    continue
                current["mask"] = mask[rows].to(device)
                try:
                    backbone.forward_features(x[rows].to(device, dtype))
                except _Stop:
                    pass
    scores = (totals / max(1, with_outliers)).flatten()
    k = min(config.top_k, scores.numel()) if with_outliers else 0
    top = torch.topk(scores, k) if k else None
    neurons: tuple[tuple[int, int], ...] = ()
    chosen: list[float] = []
    if top is not None:
        neurons = tuple((int(i) // hidden, int(i) % hidden) for i in top.indices)
        chosen = [float(v) for v in top.values]
    result = RegisterNeurons(
        config=replace(config, neurons=neurons), threshold=threshold, num_images=num_images,
        images_with_outliers=with_outliers, outlier_fraction=fraction, scores=chosen, outlier_block=outlier_block,
    )
    log.debug("itae: %s", result.summary())
    return result


class TTRState:
    """Live state of a ``test_time_registers`` context.

    backbone: the model as seen inside the context, with the extra token counted as one more register
    (``num_register_tokens + 1``): pass it to ``itae.attenuate`` to run ITAE with the registers.
    """

    def __init__(self, backbone: Backbone, config: TTRConfig) -> None:
        self.config = config
        self.num_prefix = backbone.num_prefix_tokens  # where the extra token goes
        active = bool(config.neurons)
        self.backbone = replace(backbone, num_register_tokens=backbone.num_register_tokens + 1) if active else backbone
        self.length: int | None = None  # token count inside the blocks during the current forward


class test_time_registers(HookedContext):  # noqa: N801 - used as a context manager, named like one
    """Apply test-time registers to ``model`` (an instance) inside a ``with`` block.

    >>> found = itae.find_register_neurons(backbone, sample_batches)
    >>> with itae.test_time_registers(backbone, found.config):
    ...     features = backbone.forward_features(x)     # same shapes and positions as without

    ``config.neurons`` must be set (by ``find_register_neurons``, or by hand). Validated here, before
    anything is patched; on exit every hook is removed, also after an exception. Parameters and
    buffers are never touched.
    """

    def __init__(self, model: nn.Module | Backbone, config: TTRConfig) -> None:
        if not isinstance(config, TTRConfig):
            raise InputTypeError(f"config must be a TTRConfig; got {type(config).__name__}")
        if not config.is_resolved:
            raise InputError("TTRConfig.neurons is None: find them first (itae.find_register_neurons)")
        self.backbone = adapt(model)
        check_registers_apply(self.backbone)
        for b, n in config.neurons:
            if b >= self.backbone.num_blocks:
                raise InputError(f"register neuron ({b}, {n}): block {b} is out of range for a "
                                 f"{self.backbone.num_blocks}-block model")
            if n >= self.backbone.mlp_sites[b].hidden_dim:
                raise InputError(f"register neuron ({b}, {n}): the MLP of block {b} has "
                                 f"{self.backbone.mlp_sites[b].hidden_dim} neurons")
        self.config = config
        self.state = TTRState(self.backbone, config)

    def _on_exit(self) -> None:
        self.state.length = None

    def _install(self, hooks: HookSet) -> None:
        if not self.config.neurons:
            return  # nothing to move: the model runs as it is (no extra token)
        backbone, state = self.backbone, self.state
        p = state.num_prefix

        def insert(_module, args, kwargs):
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs.pop("hidden_states"), ()
            zero = h.new_zeros(h.shape[0], 1, h.shape[2])
            h = torch.cat([h[:, :p], zero, h[:, p:]], dim=1)  # (B, T, D) -> (B, T + 1, D)
            state.length = h.shape[1]
            if args:
                return (h, *rest), kwargs
            return rest, {**kwargs, "hidden_states": h}

        def remove(_module, args):
            h = args[0]
            if state.length is None or h.shape[1] != state.length:
                return None  # e.g. the CLS-only fast path normalises the CLS row alone
            state.length = None
            return (torch.cat([h[:, :p], h[:, p + 1 :]], dim=1), *args[1:])

        def widen_mask(_module, args, kwargs):
            # an attention mask handed to every block (SigLIP2's, eager attention) must cover the extra token
            if len(args) > 1 and _is_mask(args[1], state.length):
                return (args[0], _widen(args[1], p), *args[2:]), kwargs
            if _is_mask(kwargs.get("attention_mask"), state.length):
                return args, {**kwargs, "attention_mask": _widen(kwargs["attention_mask"], p)}
            return None

        hooks.pre(backbone.blocks[0], insert, with_kwargs=True)
        for block in backbone.blocks:
            hooks.pre(block, widen_mask, with_kwargs=True)
        for site in backbone.sites:
            # an attention that leaves a fixed count of prefix tokens unrotated (timm's Eva) counts the
            # extra token among them, so every patch keeps its rotary position
            count = site.rotary.prefix_count if site.rotary is not None else None
            if count is not None:
                hooks.set_attr(site.rotary.module, count, getattr(site.rotary.module, count) + 1)
        hooks.pre(backbone.final_norm, remove)
        for block, neurons in self.config.by_block().items():
            hooks.pre(backbone.mlp_sites[block].out_proj, self._move_hook(block, neurons))

    def _move_hook(self, block: int, neurons: list[int]):
        state, zero_prefix = self.state, self.config.zero_prefix
        p = state.num_prefix
        index_cpu = torch.tensor(neurons, dtype=torch.long)
        cache: dict[torch.device, torch.Tensor] = {}

        def hook(_module, args):
            hidden = args[0]  # (B, L, hidden), after the nonlinearity
            if state.length is None or hidden.shape[1] != state.length:
                raise RuntimeError(
                    f"test-time registers: block {block}'s MLP saw {hidden.shape[1]} tokens, not the full "
                    f"sequence of {state.length}; a path that runs it on some rows only (the CLS-only fast path "
                    "on the last block) cannot serve register neurons there"
                )
            index = cache.get(hidden.device)
            if index is None:
                index = cache[hidden.device] = index_cpu.to(hidden.device)
            cols = hidden.index_select(2, index)  # (B, L, k)
            new = torch.zeros_like(cols)
            if not zero_prefix:
                new[:, :p] = cols[:, :p]
            new[:, p] = cols.amax(dim=1)  # per image: the neuron's largest activation over all its tokens
            if torch.is_grad_enabled() and hidden.requires_grad:
                hidden = hidden.index_copy(2, index, new)
            else:
                hidden.index_copy_(2, index, new)
            return (hidden, *args[1:])

        return hook


def _is_mask(mask, length: int | None) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and length is not None and mask.shape[-1] == length - 1


def _widen(mask: torch.Tensor, p: int) -> torch.Tensor:
    """A (B, 1, T, T) attention mask (boolean or additive) for T + 1 tokens, the extra one at ``p``: it
    sees and is seen as token ``p`` (a prefix token or the first patch, never padding). Padded batches
    are refused: the extra token's activation is a maximum over all the image's tokens."""
    masked = ~mask if mask.dtype == torch.bool else mask != 0
    if bool(masked.any()):
        raise RuntimeError("test-time registers do not support padded (masked) batches; feed whole images "
                           "(Backbone.forward_features does)")
    mask = torch.cat([mask[:, :, :p + 1], mask[:, :, p:]], dim=2)
    return torch.cat([mask[..., :p + 1], mask[..., p:]], dim=3)


@dataclass
class RegistersCheck:
    """The self-check of a run with test-time registers, on a few images.

    outlier_fraction: share of patches that are outliers (residual norm at the outlier block above
    the threshold) in the unmodified model. cls_attention_before / after: head-mean CLS attention mass
    of the last block on those same patches, without and with the registers (per image, then averaged);
    cls_attention_register: mass on the extra token.
    """

    neurons: dict[int, list[int]]
    num_images: int
    outlier_fraction: float
    outlier_fraction_after: float
    cls_attention_before: float
    cls_attention_after: float
    cls_attention_register: float

    def to_dict(self) -> dict:
        return {
            "neurons": {str(b): ns for b, ns in self.neurons.items()},
            "num_neurons": sum(len(ns) for ns in self.neurons.values()),
            "images": self.num_images,
            "outlier_fraction": self.outlier_fraction,
            "outlier_fraction_after": self.outlier_fraction_after,
            "cls_attention_on_outliers_before": self.cls_attention_before,
            "cls_attention_on_outliers_after": self.cls_attention_after,
            "cls_attention_on_register": self.cls_attention_register,
        }


@torch.no_grad()
def registers_check(
    model: nn.Module | Backbone, pixel_values: torch.Tensor, config: TTRConfig, threshold: float
) -> RegistersCheck:
    """Outliers and the last block's CLS attention on them, before and after test-time registers."""
    backbone = adapt(model)
    outlier_block = backbone.resolve_layer(config.outlier_layer)
    last = backbone.num_blocks - 1
    probe = ITAEConfig(source="v", side="low", threshold=0.0, layers=tuple(sorted({outlier_block, last})))
    before = detect_artifacts(backbone, pixel_values, probe)
    mask = before[outlier_block].norms["residual"] > threshold  # (B, N)
    p = backbone.num_prefix_tokens

    def on_outliers(attention: torch.Tensor, start: int) -> float:
        patches = attention.mean(1)[:, start:]  # (B, N): head mean
        return float((patches * mask).sum(-1).mean())

    with test_time_registers(backbone, config) as state:
        after = detect_artifacts(state.backbone, pixel_values, probe)
    moved = bool(config.neurons)
    # where the patches start in the engineered row, and the extra token's column (a pooling probe's row
    # has neither: it is over the patches, and the extra token is gone before it)
    start_before, start_after = before[last].num_prefix_tokens, after[last].num_prefix_tokens
    seen = moved and start_after > start_before
    after_mask = after[outlier_block].norms["residual"] > threshold
    return RegistersCheck(
        neurons=config.by_block(),
        num_images=int(pixel_values.shape[0]),
        outlier_fraction=float(mask.float().mean()),
        outlier_fraction_after=float(after_mask.float().mean()),
        cls_attention_before=on_outliers(before[last].cls_attention, start_before),
        cls_attention_after=on_outliers(after[last].cls_attention, start_after),
        cls_attention_register=float(after[last].cls_attention.mean(1)[:, p].mean()) if seen else 0.0,
    )


__all__ = [
    "RegisterNeurons", "RegistersCheck", "TTRState", "check_registers_apply", "find_register_neurons",
    "registers_check", "test_time_registers",
]
