"""Which model runs, where and in what precision: ``ModelSpec``, device and precision resolution, and the
one place that loads a backbone for extraction (precision, fp8 included, applied there)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from itae.config import PRECISION_NAMES
from itae.errors import InputError, InputTypeError

from .adapters import adapt
from .base import Backbone, Preprocess
from .fp8 import apply_precision, cast_weights
from .loading import DEFAULT_MODEL, load_backbone

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
# fp8: bf16 activations with FP8 matrix products in every block but the last (itae.models.fp8)
PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.bfloat16, torch.float16, torch.bfloat16), strict=True))
DEVICES = ("auto", "cpu", "cuda", "mps")  # the names; "cuda:N" is accepted too


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; an explicit device must be available."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but CUDA is not available; use device='auto' or device='cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was asked for but MPS is not available; use device='auto' or device='cpu'")
    return dev


def resolve_precision(precision: str) -> torch.dtype:
    """The weights' dtype of an extraction precision."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    return PRECISIONS[precision]


@dataclass(frozen=True)
class ModelSpec:
    """The model an extraction runs.

    name: a model name or path (``itae.load_backbone``). arch: the architecture of a bare checkpoint file.
    device: "auto" (cuda, mps, cpu) or a device name; resolved when the model is loaded.
    precision: "fp32", "bf16" or "fp16" weights, or "fp8" (bf16 with FP8 matrix products in every block
        but the last, ``itae.models.fp8``). resolution: crop size fed to the model (rounded to the patch
        size); None: the model's own.
    """

    name: str = DEFAULT_MODEL
    arch: str | None = None
    device: str | torch.device = "auto"
    precision: Precision = "fp32"
    resolution: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.name, os.PathLike):
            object.__setattr__(self, "name", os.fspath(self.name))
        if not isinstance(self.name, str) or not self.name:
            raise InputTypeError(f"ModelSpec.name must be a model name or path; got {self.name!r}")
        if self.arch is not None and not isinstance(self.arch, str):
            raise InputTypeError(f"ModelSpec.arch must be a string or None; got {self.arch!r}")
        if not isinstance(self.device, (str, torch.device)):
            raise InputTypeError(f"ModelSpec.device must be a device name or torch.device; got {self.device!r}")
        resolve_precision(self.precision)
        r = self.resolution
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise InputError(f"resolution must be a positive integer or None; got {r!r}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def replace(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    def load(self, device: torch.device | None = None) -> Backbone:
        """The backbone on ``device`` (default: the spec's, resolved) in the spec's precision."""
        dev = resolve_device(self.device) if device is None else device
        bb = load_backbone(self.name, arch=self.arch, device=dev, dtype=self.dtype, resolution=self.resolution)
        return apply_precision(bb, self.precision)


def prepare_model(
    model: str | os.PathLike | ModelSpec | Backbone | nn.Module, spec: ModelSpec, device: torch.device,
) -> tuple[Backbone, Preprocess]:
    """The backbone on ``device`` in ``spec``'s precision and the preprocessing at its resolution.

    ``model``: a ``ModelSpec``, name or path (then ``spec``, which names it, is loaded), or a ``Backbone``
    or supported model instance, moved to ``device`` and the precision's dtype in place.
    """
    if isinstance(model, (str, os.PathLike, ModelSpec)):
        bb = spec.load(device)
        return bb, bb.preprocess  # loading already applied the resolution
    bb = adapt(model)
    # Real low-precision weights, not autocast: half the memory traffic on GPU.
    cast_weights(bb.model, device, spec.dtype)
    bb.model.eval()
    preprocess = bb.preprocess.with_resolution(spec.resolution) if spec.resolution else bb.preprocess
    return apply_precision(bb, spec.precision), preprocess


__all__ = ["DEVICES", "PRECISIONS", "ModelSpec", "Precision", "prepare_model", "resolve_device", "resolve_precision"]
