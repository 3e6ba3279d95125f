"""The ITAE configuration: one small frozen dataclass, validated once on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from itae.errors import ConfigError, ConfigTypeError

Source = Literal["q", "k", "v", "auto"]
Side = Literal["low", "high", "auto"]
Rows = Literal["cls", "all"]
Mode = Literal["min", "mask", "scale"]
Granularity = Literal["token", "head"]
Threshold = float | tuple[float, ...] | Literal["auto"]

AUTO = "auto"
SOURCES = ("q", "k", "v")  # the fixed choices; "auto" picks one of them per model and data set
SIDES = ("low", "high")
ROWS = ("cls", "all")
MODES = ("min", "mask", "scale")
GRANULARITIES = ("token", "head")
CALIBRATION_METHODS = ("mode", "otsu", "gmm")
# The choices of the extraction specs (``EmbedOptions.feature``, ``ModelSpec.precision``), here so that the
# CLI lists them without importing torch.
FEATURES = ("cls", "mean", "cls+mean")
PRECISION_NAMES = ("fp32", "bf16", "fp16", "fp8")


def _check_choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"ITAEConfig.{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, str) and value == AUTO:
        raise ConfigTypeError(f"ITAEConfig.{name} must be a number; 'auto' is not accepted here")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"ITAEConfig.{name} must be a number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"ITAEConfig.{name} must be finite; got {value!r}")
    return value


@dataclass(frozen=True)
class ITAEConfig:
    """How artifacts are detected and how the attention to them is engineered.

    source: projection ("q", "k" or "v") whose patch-token L2 norm flags artifacts, or "auto" (default):
        ``itae.calibrate`` tries every source and side and keeps the split whose flagged tokens the
        unmodified CLS row over-attends (see ``itae.engine.calibrate``).
    threshold: a float, one float per engineered layer, or "auto" (calibrated; see ``itae.calibrate``).
        A number needs a fixed source and side (a number means nothing without them).
    side: "low" flags tokens with norm <= threshold (as published), "high" flags norm >= threshold,
        "auto" (default) is chosen with the source.
    layers: block indices to engineer; negative indices count from the end.
    rows: "cls" engineers only the CLS query row (as published); "all" engineers every query row.
    mode: "min" replaces artifact logits by the row minimum over patch keys (as published);
        "mask" removes them (-inf); "scale" adds log(alpha) to them.
    alpha: attenuation factor for mode="scale", in (0, 1].
    granularity: "token" takes the norm over all heads; "head" flags per head.
    calibration: how "auto" splits the pooled log norms: "mode" (default: a rare mode beyond the bulk,
        see ``itae.engine.split``), or itae 0.1.0's "otsu" / "gmm" (a two-class cut moved to the valley).
    """

    source: Source = "auto"
    threshold: Threshold = "auto"
    side: Side = "auto"
    layers: tuple[int, ...] = (-1,)
    rows: Rows = "cls"
    mode: Mode = "min"
    alpha: float = 0.1
    granularity: Granularity = "token"
    calibration: str = "mode"

    def __post_init__(self) -> None:
        _check_choice("source", self.source, (*SOURCES, AUTO))
        _check_choice("side", self.side, (*SIDES, AUTO))
        _check_choice("rows", self.rows, ROWS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("calibration", self.calibration, CALIBRATION_METHODS)

        layers = self.layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        try:
            layers = tuple(layers)
        except TypeError:
            raise ConfigTypeError(f"ITAEConfig.layers must be a tuple of ints; got {self.layers!r}") from None
        if not layers:
            raise ConfigError("ITAEConfig.layers must name at least one block")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ConfigTypeError(f"ITAEConfig.layers must hold ints; got {i!r}")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"ITAEConfig.layers has duplicates: {layers!r}")
        object.__setattr__(self, "layers", layers)

        threshold = self.threshold
        if isinstance(threshold, str):
            if threshold != "auto":
                raise ConfigError(f"ITAEConfig.threshold must be a number, a tuple of numbers or 'auto'; got {threshold!r}")
        elif isinstance(threshold, (list, tuple)):
            values = tuple(_check_finite("threshold", t) for t in threshold)
            if len(values) != len(layers):
                raise ConfigError(
                    f"ITAEConfig.threshold has {len(values)} values but layers has {len(layers)}; "
                    "give one threshold per engineered layer, or one number for all"
                )
            object.__setattr__(self, "threshold", values)
        else:
            object.__setattr__(self, "threshold", _check_finite("threshold", threshold))

        if self.threshold != AUTO and AUTO in (self.source, self.side):
            auto = " and ".join(f"{name}='auto'" for name in ("source", "side") if getattr(self, name) == AUTO)
            raise ConfigError(
                f"ITAEConfig: a numeric threshold needs a fixed source and side; got threshold={self.threshold!r} "
                f"with {auto}. Give them (e.g. source='v', side='low', as published) or leave threshold='auto'"
            )

        alpha = _check_finite("alpha", self.alpha)
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"ITAEConfig.alpha must be in (0, 1]; got {alpha!r}")
        object.__setattr__(self, "alpha", alpha)

    @property
    def is_calibrated(self) -> bool:
        return self.threshold != "auto"

    @property
    def is_auto(self) -> bool:
        """True when calibration chooses the source and side (either is "auto")."""
        return AUTO in (self.source, self.side)

    def threshold_for(self, position: int) -> float:
        """The threshold of the ``position``-th engineered layer (position in ``layers``)."""
        if self.threshold == "auto":
            raise ConfigError("threshold is 'auto': calibrate first (itae.calibrate) or pass a number")
        if isinstance(self.threshold, tuple):
            return self.threshold[position]
        return float(self.threshold)

    def replace(self, **changes: Any) -> ITAEConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        if isinstance(self.threshold, tuple):
            d["threshold"] = list(self.threshold)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ITAEConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown ITAEConfig field(s): {', '.join(unknown)}")
        if "layers" in known and isinstance(known["layers"], list):
            known["layers"] = tuple(known["layers"])
        if "threshold" in known and isinstance(known["threshold"], list):
            known["threshold"] = tuple(known["threshold"])
        return cls(**known)
