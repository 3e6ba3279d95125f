"""``EmbedOptions``: how an extraction embeds, batches and commits, as one frozen, validated value."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch

from itae.config import FEATURES, ITAEConfig
from itae.data.sources import ImageSource
from itae.data.spec import SourceSpec
from itae.errors import InputError, InputTypeError
from itae.models.spec import ModelSpec

Feature = Literal["cls", "mean", "cls+mean"]


def check_feature(feature: str) -> None:
    if feature not in FEATURES:
        raise InputError(f"feature must be one of {', '.join(map(repr, FEATURES))}; got {feature!r}")


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer; got {value!r}")


def check_count(name: str, value: Any) -> None:
    """``value`` must be an integer >= 0, or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InputError(f"{name} must be an integer >= 0 or None; got {value!r}")


@dataclass(frozen=True)
class EmbedOptions:
    """How images become stored embeddings (what ``itae.embed`` and the Ray engine share).

    feature: "cls", "mean" of the patch tokens, or "cls+mean" (concatenated, 2D wide). normalize: L2-normalise
        each stored embedding.
    batch_size: images per forward. num_workers: decoding workers (None: one per spare core, at most 32
        with a GPU and 8 without; the Ray engine decodes in its own actors).
    calibration_images: decodable images an "auto" threshold (or the register search) is calibrated on.
    chunk_size: records per committed store chunk.
    max_pixels: refuse larger images as decompression bombs (None: PIL's limit).
    fast_decode: decode large JPEGs at 1/2, 1/4 or 1/8 scale (recorded with the preprocessing).
    fast_cls: run the last block for the CLS row only where that computes the same thing.
    compile: compile the model's blocks (only where no hooks are needed).
    save_every, save_interval: commit progress every that many images or seconds, whichever comes first.
    """

    feature: Feature = "cls"
    normalize: bool = False
    batch_size: int = 64
    num_workers: int | None = None
    calibration_images: int = 512
    chunk_size: int = 4096
    max_pixels: int | None = None
    fast_decode: bool = False
    fast_cls: bool = True
    compile: bool = False
    save_every: int = 4096
    save_interval: float = 30.0

    def __post_init__(self) -> None:
        check_feature(self.feature)
        for name in ("batch_size", "chunk_size", "calibration_images", "save_every"):
            check_positive(name, getattr(self, name))
        check_count("num_workers", self.num_workers)
        if not isinstance(self.fast_decode, bool):
            raise InputTypeError(f"fast_decode must be True or False; got {self.fast_decode!r}")
        s = self.save_interval
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise InputError(f"save_interval must be a positive number of seconds; got {s!r}")

    def replace(self, **changes: Any) -> EmbedOptions:
        return replace(self, **changes)

    @classmethod
    def split_keywords(cls, kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``kw`` as (the fields of this class, the rest)."""
        names = {f.name for f in fields(cls)}
        return {k: v for k, v in kw.items() if k in names}, {k: v for k, v in kw.items() if k not in names}


def embedding_dim(embed_dim: int, feature: str) -> int:
    """The width of a stored embedding: the model's width, twice for "cls+mean"."""
    return embed_dim * (2 if feature == "cls+mean" else 1)


def default_num_workers(device: str | torch.device | None = None) -> int:
    """One decoding worker per spare CPU core (the main process runs the model): at most 32 when the model
    runs on a GPU, which decoding must keep fed, and at most 8 otherwise, where the workers take cores from
    the model itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    cap = 32 if device is not None and torch.device(device).type == "cuda" else 8
    return max(0, min(cap, cores - 1))




# The plain keywords of ``itae.embed`` / ``itae.run`` / ``embed_ray`` that fill each spec.
SOURCE_KEYWORDS = {"labels": "labels", "image_column": "image_column", "label_column": "label_column",
                   "split": "split", "hf_config": "config"}
MODEL_KEYWORDS = ("arch", "device", "precision", "resolution")


def build_specs(
    source: str | os.PathLike | ImageSource | SourceSpec,
    model: str | os.PathLike | ModelSpec | Any,
    options: EmbedOptions | None,
    keywords: dict[str, Any],
    *,
    caller: str = "embed",
) -> tuple[SourceSpec, ModelSpec, EmbedOptions]:
    """The three specs of an extraction from its arguments: specs given as they are, with plain keywords
    (``keywords``: e.g. ``batch_size=32``, ``precision="bf16"``, ``split="test"``) replacing their fields.

    ``model``: a ``ModelSpec``, a name or path, or a model instance (then the spec holds its device,
    precision and resolution only).
    """
    kw = dict(keywords)
    src_kw = {SOURCE_KEYWORDS[k]: kw.pop(k) for k in list(kw) if k in SOURCE_KEYWORDS}
    model_kw = {k: kw.pop(k) for k in list(kw) if k in MODEL_KEYWORDS}
    opt_kw, unknown = EmbedOptions.split_keywords(kw)
    if unknown:
        raise InputTypeError(f"{caller}() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    spec = source if isinstance(source, SourceSpec) else SourceSpec(source)
    spec = spec.replace(**src_kw) if src_kw else spec
    if isinstance(model, ModelSpec):
        mspec = model.replace(**model_kw) if model_kw else model
    elif isinstance(model, (str, os.PathLike)):
        mspec = ModelSpec(os.fspath(model), **model_kw)
    else:
        mspec = ModelSpec(**model_kw)
    opts = options if options is not None else EmbedOptions()
    if not isinstance(opts, EmbedOptions):
        raise InputTypeError(f"options must be an EmbedOptions or None; got {type(opts).__name__}")
    return spec, mspec, opts.replace(**opt_kw) if opt_kw else opts


def check_itae(itae: Any) -> None:
    if itae is not None and not isinstance(itae, ITAEConfig):
        raise InputTypeError(f"itae must be an ITAEConfig or None; got {type(itae).__name__}")


__all__ = ["FEATURES", "EmbedOptions", "Feature", "build_specs", "check_itae", "default_num_workers", "embedding_dim"]
