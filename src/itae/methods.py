"""The training-free artifact fixes, by name, and the test-time registers configuration.

Methods (``itae.embed(..., method=...)``, ``--method``, the bench's rows):

- ``"none"``: the unmodified model;
- ``"itae"``: Inference-Time Attention Engineering (``ITAEConfig``, ``itae.attenuate``);
- ``"ttr"``: test-time registers (Jiang, Dravid, Efros, Gandelsman, "Vision Transformers Don't Need
  Trained Registers", NeurIPS 2025; ``TTRConfig``, ``itae.test_time_registers``);
- ``"itae+ttr"``: both: the registers' token is in place, and ITAE engineers the last block's CLS row
  around it (the extra token counts as a prefix token: it is never flagged).

The trained counterpart (a model trained with registers) is a model, not a method: the bench runs it
as its ``registers`` row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from itae.errors import ConfigError, ConfigTypeError

from .config import ITAEConfig

Method = Literal["none", "itae", "ttr", "itae+ttr"]
METHODS: tuple[str, ...] = ("none", "itae", "ttr", "itae+ttr")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return method


def method_uses(method: str) -> tuple[bool, bool]:
    """(uses ITAE, uses test-time registers) for a method name."""
    check_method(method)
    return method in ("itae", "itae+ttr"), method in ("ttr", "itae+ttr")


def method_name(itae: ITAEConfig | None, ttr: TTRConfig | None) -> str:
    """The method name of a pair of configs (None: that fix is off)."""
    if itae is not None and ttr is not None:
        return "itae+ttr"
    return "itae" if itae is not None else "ttr" if ttr is not None else "none"


def resolve_method(
    method: str | None, itae: ITAEConfig | None, ttr: TTRConfig | None
) -> tuple[ITAEConfig | None, TTRConfig | None]:
    """The (ITAE, TTR) configs a call runs with. ``method`` None keeps the configs as given (None: off);
    a method name turns each fix on (with the given config, or its defaults) or off."""
    if itae is not None and not isinstance(itae, ITAEConfig):
        raise ConfigTypeError(f"itae must be an ITAEConfig or None; got {type(itae).__name__}")
    if ttr is not None and not isinstance(ttr, TTRConfig):
        raise ConfigTypeError(f"ttr must be a TTRConfig or None; got {type(ttr).__name__}")
    if method is None:
        return itae, ttr
    use_itae, use_ttr = method_uses(method)
    return (itae or ITAEConfig()) if use_itae else None, (ttr or TTRConfig()) if use_ttr else None


NormThreshold = float | Literal["auto"]


@dataclass(frozen=True)
class TTRConfig:
    """How register neurons are found, label-free, on a sample of images (``itae.find_register_neurons``).

    The defaults are the published values for DINOv2 ViT-L/14 (the authors' configuration file
    ``configs/dinov2_large.yaml`` in github.com/nickjiang2378/test-time-registers): outliers at the
    output of the second-to-last block, residual norm above 150; register neurons among the MLPs of
    blocks 0..17, the top 50 by score. Other models need other values (the norms scale with the model):
    ``norm_threshold="auto"`` splits the pooled log residual norms at the valley of their histogram, as
    ITAE's calibration does (``itae.engine.calibrate.find_threshold``, high side).

    outlier_layer: block whose output (residual stream, before the final norm) defines the outlier
        tokens; negative counts from the end. Only patch tokens are candidates (CLS and registers never are).
    norm_threshold: a patch token is an outlier when its residual L2 norm is above this; or "auto".
    max_layer: the last block whose MLP neurons may be chosen (a value past the last block means all
        blocks; negative counts from the end).
    top_k: at most this many (block, neuron) pairs, the highest scores first. Score of a neuron: its mean
        absolute activation (after the nonlinearity: the input of the MLP's last linear) over an image's
        outlier tokens, averaged over the images that have outliers.
    zero_prefix: at inference the register neurons are zeroed at every token but the extra one, CLS and
        trained registers included (as the authors' DINOv2 code does); False keeps them at the prefix
        tokens (as their CLIP code does) and zeroes them at the patches only.
    neurons: the chosen (block, neuron) pairs, non-negative indices; None until found. A config with
        neurons is what ``itae.test_time_registers`` applies and what a store records.
    """

    outlier_layer: int = -2
    norm_threshold: NormThreshold = 150.0
    max_layer: int = 17
    top_k: int = 50
    zero_prefix: bool = True
    neurons: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("outlier_layer", "max_layer", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigTypeError(f"TTRConfig.{name} must be an int; got {value!r}")
        if self.top_k < 0:
            raise ConfigError(f"TTRConfig.top_k must be >= 0; got {self.top_k}")
        if not isinstance(self.zero_prefix, bool):
            raise ConfigTypeError(f"TTRConfig.zero_prefix must be True or False; got {self.zero_prefix!r}")
        t = self.norm_threshold
        if isinstance(t, str):
            if t != "auto":
                raise ConfigError(f"TTRConfig.norm_threshold must be a positive number or 'auto'; got {t!r}")
        else:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ConfigError(f"TTRConfig.norm_threshold must be a positive number or 'auto'; got {t!r}")
            object.__setattr__(self, "norm_threshold", float(t))
        if self.neurons is not None:
            try:
                pairs = tuple((int(b), int(n)) for b, n in self.neurons)
            except (TypeError, ValueError):
                raise ConfigTypeError(f"TTRConfig.neurons must be (block, neuron) pairs; got {self.neurons!r}") from None
            if any(b < 0 or n < 0 for b, n in pairs):
                raise ConfigError(f"TTRConfig.neurons holds non-negative (block, neuron) pairs; got {pairs!r}")
            if len(set(pairs)) != len(pairs):
                raise ConfigError(f"TTRConfig.neurons has duplicates: {pairs!r}")
            object.__setattr__(self, "neurons", pairs)

    @property
    def is_resolved(self) -> bool:
        return self.neurons is not None

    def by_block(self) -> dict[int, list[int]]:
        """Chosen neurons grouped by block, blocks ascending."""
        out: dict[int, list[int]] = {}
        for b, n in sorted(self.neurons or ()):
            out.setdefault(b, []).append(n)
        return out

    def replace(self, **changes: Any) -> TTRConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["neurons"] = None if self.neurons is None else [list(p) for p in self.neurons]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TTRConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown TTRConfig field(s): {', '.join(unknown)}")
        known = dict(d)
        if known.get("neurons") is not None:
            known["neurons"] = tuple(tuple(p) for p in known["neurons"])
        return cls(**known)


__all__ = ["METHODS", "Method", "TTRConfig", "check_method", "method_name", "method_uses", "resolve_method"]
