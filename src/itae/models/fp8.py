"""FP8 (e4m3) matrix products for the transformer blocks: an optional, approximate speed mode.

``quantize_fp8(backbone)`` replaces every ``nn.Linear`` of every block except the last with a
``Float8Linear``: the weight is stored in float8 e4m3 with one scale per output feature, and the input
is quantized the same way per token, on the fly, before ``torch._scaled_mm`` multiplies the two (FP8
tensor cores on NVIDIA GPUs of compute capability 8.9 and newer; a slow reference on CPU). Outputs,
norms, attention and residuals stay in bf16. Per-token scales follow tokens whose norms are orders of
magnitude apart (the artifact tokens themselves), and e4m3's floating point keeps a channel 1,000x
below the largest one in its normal range.

The last block is left as it is: it is where ITAE detects and engineers, and the fast CLS path folds its
weights. Its input comes from FP8 blocks, so detection sees slightly different norms; calibrate with the
same precision that extracts. FP8 changes the embeddings (measured in ``benchmarks/gpu_check.py``); it is
never on by default.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from itae.errors import InputError

from .adapters import adapt
from .base import Backbone

logger = logging.getLogger("itae.models")

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_TINY = 1e-12


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, K) e4m3 and (M, 1) float32 scales with x ~= q * scale, each row's largest |x| -> 448.

    The scaling runs in x's own dtype (no float32 copy of the activations): bf16's rounding (2^-9) is far
    below e4m3's (2^-4).
    """
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=_TINY)
    scale = amax / E4M3_MAX
    scaled = x * (1.0 / scale).to(x.dtype)
    return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(nn.Module):
    """``y = x W^T + b`` with W in float8 e4m3 (a scale per output feature) and x quantized per token.

    Built from an ``nn.Linear`` with ``from_linear``; ``weight`` gives the dequantized weight (for
    inspection, not for speed). ``out_dtype`` is the activations' dtype (bf16 on GPUs).
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.out_dtype = out_dtype
        # The e4m3 bytes are kept as uint8, so that Module.to(dtype) (which casts floating-point buffers)
        # leaves them alone; (N, K) row-major, whose .t() is the column-major operand _scaled_mm wants.
        self.register_buffer("weight_bits", weight_fp8.view(torch.uint8))
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float())  # (1, N)
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> Float8Linear:
        if linear.in_features % 16 or linear.out_features % 16:
            raise InputError(
                f"FP8 matrix products need feature counts divisible by 16; got {linear.in_features} -> "
                f"{linear.out_features}"
            )
        weight_fp8, scale = _quantize_rows(linear.weight.detach())
        return cls(weight_fp8, scale, linear.bias, out_dtype)

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight_bits.view(E4M3)

    @property
    def weight(self) -> torch.Tensor:
        return (self.weight_fp8.float() * self.weight_scale.float().t()).to(self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x8, x_scale = _quantize_rows(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale.float(),
                             out_dtype=self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3, out={self.out_dtype}"


def check_fp8_device(device: torch.device) -> None:
    """Refuse devices without FP8 matrix products, in one clear line."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise InputError(
                f"precision 'fp8' needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, "
                f"Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}: use 'bf16'"
            )
    elif device.type != "cpu":  # CPU: a slow reference, for tests and checks
        raise InputError(f"precision 'fp8' runs on NVIDIA GPUs (and slowly on CPU), not on {device.type!r}")


def quantize_fp8(backbone: Backbone) -> Backbone:
    """Put FP8 linears into every block but the last, in place; returns the re-described backbone.

    The model must already be in bf16 on its device. Idempotent: a quantized model is returned as it is.
    """
    check_fp8_device(backbone.device)
    if backbone.dtype != torch.bfloat16:
        raise InputError(f"quantize_fp8 expects a bf16 model; this one is {backbone.dtype}")
    replaced = 0
    for block in backbone.blocks[:-1]:
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, child_name, Float8Linear.from_linear(child, torch.bfloat16))
                    replaced += 1
    if replaced == 0:
        return backbone
    if backbone.device.type == "cpu":
        logger.warning("precision 'fp8' on the CPU runs a slow reference of the FP8 arithmetic (for checks); "
                       "it is not faster than fp32 or bf16 there")
    described = adapt(backbone.model, name=backbone.name)
    described.preprocess = backbone.preprocess
    return described


def is_fp8(backbone: Backbone) -> bool:
    return any(isinstance(m, Float8Linear) for m in backbone.model.modules())


def cast_weights(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """``model.to(device=device, dtype=dtype)``, in place, except that FP8 linears keep their dtypes.

    ``Module.to(dtype)`` would round a ``Float8Linear``'s float32 scales (and its bias) to ``dtype``, so a
    model quantized by an earlier fp8 extraction would give other numbers the next time.
    """
    kept = {m: dict(m.named_buffers(recurse=False)) for m in model.modules() if isinstance(m, Float8Linear)}
    model.to(device=device, dtype=dtype)
    for module, buffers in kept.items():  # .to() put new tensors in place of these; the originals are intact
        for name, buf in buffers.items():
            setattr(module, name, buf.to(device))
    return model


def apply_precision(backbone: Backbone, precision: str) -> Backbone:
    """The backbone for an extraction precision: FP8 linears for "fp8", unchanged otherwise."""
    return quantize_fp8(backbone) if precision == "fp8" else backbone


__all__ = ["Float8Linear", "apply_precision", "cast_weights", "check_fp8_device", "is_fp8", "quantize_fp8"]
