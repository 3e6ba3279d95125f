"""Batched embedding extraction into an ``EmbeddingStore``, with ITAE on by default.

Images are decoded in DataLoader workers, sent to the device in pinned memory when it is CUDA, run
through the model in the requested dtype, pooled (``cls``, ``mean`` of patches, or ``cls+mean``) and
written to the store chunk by chunk as they come: memory does not grow with the number of images. An
interrupted run resumes at the first missing chunk and ends with a store identical to an
uninterrupted run's.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from itae.config import ITAEConfig
from itae.errors import InputError, InputTypeError, ResourceError
from itae.methods import TTRConfig, resolve_method
from itae.models.base import Backbone, Features, Preprocess

from .dataset import CalibrationBatches, ChunkBatchSampler, ImageDataset, collate_images, spread_indices
from .decode import PreprocessTransform, build_transform
from .sources import ImageSource, LabelMode, open_source
from .store import (
    ERRORS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    EmbeddingStore,
    StoreError,
    StoreWriter,
    clear_store_files,
    describe_setting_differences,
    foreign_files,
    library_versions,
    prepare_output,
    read_manifest,
    remove_chunks,
    setting_differences,
    write_errors_csv,
)

logger = logging.getLogger("itae.data")

Feature = Literal["cls", "mean", "cls+mean"]
Precision = Literal["fp32", "bf16", "fp16", "fp8"]
FEATURES = ("cls", "mean", "cls+mean")
# fp8: bf16 activations with FP8 matrix products in every block but the last (itae.models.fp8)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


# ------------------------------------------------------------------------------------ small pieces


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
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    return PRECISIONS[precision]


def check_embed_arguments(
    *, feature: str, precision: str, itae: ITAEConfig | None, fast_decode: bool, counts: dict[str, int | None],
    **positive: int,
) -> torch.dtype:
    """The argument checks both engines (``embed``, ``embed_ray``) make before opening anything.

    ``positive``: integers that must be >= 1; ``counts``: integers that must be >= 0, or None.
    Returns the precision's dtype.
    """
    if feature not in FEATURES:
        raise InputError(f"feature must be one of {', '.join(map(repr, FEATURES))}; got {feature!r}")
    dtype = resolve_precision(precision)
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer; got {value!r}")
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"{name} must be an integer >= 0 or None; got {value!r}")
    if not isinstance(fast_decode, bool):
        raise InputTypeError(f"fast_decode must be True or False; got {fast_decode!r}")
    if itae is not None and not isinstance(itae, ITAEConfig):
        raise InputTypeError(f"itae must be an ITAEConfig or None; got {type(itae).__name__}")
    return dtype


def check_save_interval(save_interval: float) -> None:
    if isinstance(save_interval, bool) or not isinstance(save_interval, (int, float)) or not save_interval > 0:
        raise InputError(f"save_interval must be a positive number of seconds; got {save_interval!r}")


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


def pool_features(features: Features, feature: Feature = "cls", normalize: bool = False) -> torch.Tensor:
    """(B, D) float32 image embeddings from a forward's normed tokens; (B, 2D) for ``cls+mean``."""
    if feature not in FEATURES:
        raise InputError(f"feature must be one of {', '.join(map(repr, FEATURES))}; got {feature!r}")
    parts = []
    if feature in ("cls", "cls+mean"):
        parts.append(features.cls.float())
    if feature in ("mean", "cls+mean"):
        if features.patches is None or features.patches.shape[1] == 0:
            raise InputError(f"feature={feature!r} needs patch tokens, but the model returned none")
        parts.append(features.patches.float().mean(dim=1))  # (B, N, D) -> (B, D)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out


def embed_batches(
    backbone: Backbone,
    batches: Iterable[torch.Tensor],
    *,
    feature: Feature = "cls",
    normalize: bool = False,
) -> Iterator[torch.Tensor]:
    """Embed already preprocessed batches (B, 3, S, S) with ``backbone`` as it is (wrap the call in
    ``itae.attenuate`` for ITAE); yields (B, D) float32 tensors on the backbone's device."""
    device, dtype = backbone.device, backbone.dtype
    with torch.inference_mode():
        for x in batches:
            x = x.to(device, non_blocking=True).to(dtype)
            yield pool_features(backbone.forward_features(x), feature, normalize)


def _load(backbone: str | os.PathLike | Backbone | nn.Module, device: torch.device, precision: str,
          resolution: int | None) -> tuple[Backbone, Preprocess]:
    """The backbone on ``device`` in ``precision`` and the preprocessing at the asked resolution."""
    from itae.models.fp8 import apply_precision, cast_weights

    dtype = resolve_precision(precision)
    if isinstance(backbone, (str, os.PathLike)):
        from itae.models.loading import load_backbone

        bb = load_backbone(os.fspath(backbone), device=device, dtype=dtype, resolution=resolution)
        return apply_precision(bb, precision), bb.preprocess  # load_backbone already applied the resolution
    from itae.models.adapters import adapt

    bb = adapt(backbone)
    # Real low-precision weights, not autocast: half the memory traffic on GPU.
    cast_weights(bb.model, device, dtype)
    bb.model.eval()
    preprocess = bb.preprocess.with_resolution(resolution) if resolution else bb.preprocess
    return apply_precision(bb, precision), preprocess


# ---------------------------------------------------------------------------------------- embed


def embed(
    source: str | os.PathLike | ImageSource,
    backbone: str | Backbone | nn.Module = "facebook/dinov2-base",
    *,
    out: str | os.PathLike,
    itae: ITAEConfig | None = ITAEConfig(),
    method: str | None = None,
    ttr: TTRConfig | None = None,
    feature: Feature = "cls",
    normalize: bool = False,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device = "auto",
    precision: Precision = "fp32",
    resolution: int | None = None,
    calibration_images: int = 512,
    chunk_size: int = 4096,
    labels: LabelMode = "none",
    image_column: str = "image",
    label_column: str = "label",
    split: str | None = None,
    hf_config: str | None = None,
    max_pixels: int | None = None,
    fast_decode: bool = False,
    fast_cls: bool = True,
    compile: bool = False,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    save_every: int = 4096,
    save_interval: float = 30.0,
) -> EmbeddingStore:
    """Embed every image of ``source`` with ``backbone`` (ITAE on unless ``itae=None``) into a store at ``out``.

    source: a folder, a .txt/.csv list, WebDataset shards, a HF data set (see ``open_source``; ``labels``,
        ``image_column``, ``label_column``, ``split`` and ``hf_config`` are passed to it), or an ``ImageSource``.
    backbone: a model name or path (``itae.load_backbone``), a ``Backbone``, or a supported model instance
        (moved to ``device`` and the precision's dtype in place).
    itae: the ITAE configuration; a threshold of "auto" is calibrated first on ``calibration_images``
        decodable images, whole batches of the extraction spread evenly over the source
        (``CalibrationBatches``), and the resolved thresholds are stored in the manifest and reused on
        resume. Extraction starts the calibrated batches at the first engineered block, from the
        tokens the calibration pass kept (up to ``KEEP_BYTES`` on the host), so they cost that block and
        the rest of the model only (not with test-time registers, whose extra token changes every block's
        input). None embeds with the unmodified model.
    method: the artifact fix, "none", "itae", "ttr" (test-time registers) or "itae+ttr"; None (default)
        runs what ``itae`` and ``ttr`` say. A method runs with the given config of each fix it uses, or
        that fix's defaults.
    ttr: the test-time registers configuration (``itae.TTRConfig``; None: off). Without neurons, they are
        found first on ``calibration_images`` decodable images spread evenly over the source, and the found
        neurons are stored in the manifest and reused on resume.
    feature: "cls" (default), "mean" of the patch tokens, or "cls+mean" (concatenated, 2D wide).
    normalize: L2-normalise each stored embedding.
    num_workers: decoding workers (default: one per spare core, at most 32 with a GPU and 8 without).
    device: "auto" (cuda, mps, cpu), or a device name. precision: "fp32", "bf16" or "fp16" model weights, or "fp8"
        (bf16 with FP8 matrix products in every block but the last, ``itae.models.fp8``: approximate).
    resolution: crop size fed to the model (rounded to the patch size); default: the model's own.
    max_pixels: refuse images larger than this as decompression bombs (default: PIL's limit).
    fast_decode: decode JPEGs of at least twice the resize size at 1/2, 1/4 or 1/8 scale (libjpeg's scaled
        decoding): 2-6x faster decoding of 1-12 MP photos, pixels within about one grey level of a full
        decode on average. Recorded with the preprocessing, so a store is never resumed with the other.
    fast_cls: for feature="cls", run the last block for the CLS row only (``itae.engine.fast``) where the
        config allows it (ITAE off, or CLS rows of the last block only); False always runs the full model.
    compile: compile the model's blocks with ``torch.compile`` for the extraction (restored afterwards);
        used only where no ITAE hooks are needed (ITAE off, or the fast CLS path).
    resume: continue (or return) a store at ``out`` made with the same settings; overwrite: start afresh.
    save_every, save_interval: commit progress every ``save_every`` images or ``save_interval`` seconds,
        whichever comes first (a kill loses at most that much work); neither changes the finished store.

    Images that cannot be decoded are skipped and listed in ``out/errors.csv``. Returns the finished store.
    """
    itae, ttr = resolve_method(method, itae, ttr)
    check_embed_arguments(
        feature=feature, precision=precision, itae=itae, fast_decode=fast_decode,
        counts={"num_workers": num_workers},
        batch_size=batch_size, chunk_size=chunk_size, calibration_images=calibration_images,
        save_every=save_every,
    )
    check_save_interval(save_interval)

    # Cheap checks first: a bad source creates no output folder, a bad output folder loads no model.
    src = open_source(source, labels=labels, image_column=image_column, label_column=label_column, split=split,
                      hf_config=hf_config)
    out_dir, existing = open_output(out, resume=resume, overwrite=overwrite)
    dev = resolve_device(device)
    if num_workers is None:
        num_workers = default_num_workers(dev)
    bb, preprocess = _load(backbone, dev, precision, resolution)
    if ttr is not None:
        from itae.engine.registers import check_registers_apply

        check_registers_apply(bb)  # refused before anything runs
    if itae is not None:  # ITAE on a model it does not apply to (no CLS row, no probe) is refused before any image
        from itae.engine.patch import check_applies, resolve_layers

        check_applies(bb, itae, resolve_layers(bb, itae))
    transform = build_transform(preprocess)
    manifest = new_manifest(
        bb, preprocess, src, name=backbone if isinstance(backbone, str) else None, itae=itae, feature=feature,
        normalize=normalize, precision=precision, calibration_images=calibration_images, chunk_size=chunk_size,
        labels=labels, fast_decode=fast_decode, **ttr_manifest(ttr),
    )
    loader_kw = dict(num_workers=num_workers, device=dev, max_pixels=max_pixels, fast_decode=fast_decode)
    kept = None if ttr is not None else new_kept_batches(bb, itae, compile)  # TTR's token: no reuse
    opened = open_writer(
        out_dir, existing, manifest, itae, overwrite=overwrite,
        calibrate=lambda cfg: _calibrate(bb, src, transform, cfg, calibration_images, batch_size, chunk_size,
                                         out_dir, kept=kept, **loader_kw),
        find_neurons=None if ttr is None or ttr.is_resolved else lambda: _find_neurons(
            bb, src, transform, ttr, calibration_images, batch_size, **loader_kw),
    )
    if isinstance(opened, EmbeddingStore):
        return opened
    writer, run_cfg = opened
    run_ttr = None if writer.manifest.get("ttr") is None else TTRConfig.from_dict(writer.manifest["ttr"])
    done = set(writer.committed_chunks())
    todo = [k for k in range(writer.num_chunks) if k not in done]
    if todo:
        _extract(bb, src, transform, writer, todo, run_cfg, feature, normalize, batch_size, progress, fast_cls,
                 compile, save=(save_every, save_interval), ttr=run_ttr, kept=kept, **loader_kw)

    errors = writer.error_rows()
    num_failed = len(errors)
    if num_failed == len(src):  # keep only errors.csv: no store that looks usable
        write_errors_csv(out_dir, errors)
        remove_chunks(out_dir)
        (out_dir / MANIFEST).unlink()
        raise InputError(_all_failed_message(src, out_dir, errors[0]))
    store = writer.finalize()
    logger.info("embedded %d of %d images into %s (%d failed, see %s)", len(store), len(src), out_dir,
                num_failed, ERRORS)
    return store


def new_kept_batches(bb: Backbone, itae: ITAEConfig | None, compile: bool) -> KeptBatches | None:
    """Where the calibration pass keeps its work for extraction, or None where it cannot be reused.

    Not with ``compile``: compiled blocks round differently from the eager ones calibration runs, and a
    store must not depend on whether its run was interrupted (a resumed run never calibrates).
    """
    from itae.engine.fast import supports_forward_from
    from itae.engine.patch import resolve_layers

    if itae is None or itae.is_calibrated or compile or not supports_forward_from(bb):
        return None
    return KeptBatches(start=min(resolve_layers(bb, itae)))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# Decoded images waiting in DataLoader queues, at most (uint8 bytes): bounds host memory however many
# workers and whatever the batch size.
PREFETCH_BYTES = 1 << 30


def _loader(
    src: ImageSource, transform: PreprocessTransform, batch_sampler, *, num_workers: int, device: torch.device,
    max_pixels: int | None, fast_decode: bool,
) -> DataLoader:
    prefetch = None
    if num_workers > 0:
        batch = max((len(b) for b in batch_sampler), default=1) if isinstance(batch_sampler, list) else \
            batch_sampler.batch_size
        per_batch = batch * 3 * transform.preprocess.image_size ** 2
        prefetch = max(1, min(4, PREFETCH_BYTES // max(1, per_batch * num_workers)))
    return DataLoader(
        ImageDataset(src, transform, max_pixels=max_pixels, uint8=True, fast_decode=fast_decode),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch,
    )


def _to_device(pixels: torch.Tensor, transform: PreprocessTransform, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, 3, S, S) on the host -> normalised (B, 3, S, S) in the model's dtype on ``device``."""
    # Copy the uint8 pixels (pinned, asynchronous), normalise in float32 there, then cast.
    return transform.normalize(pixels.to(device, non_blocking=True)).to(dtype)


def open_output(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> tuple[Path, dict[str, Any] | None]:
    """The output folder, created and checked writable, and the manifest of a store already there."""
    out_dir = prepare_output(out)
    existing = read_manifest(out_dir)
    if existing is not None and not overwrite and not resume:
        raise StoreError(
            f"{str(out_dir)!r} already holds an embedding store; pass resume=True to continue it or "
            "overwrite=True to replace it"
        )
    return out_dir, existing


def new_manifest(
    bb: Backbone,
    preprocess: Preprocess,
    src: ImageSource,
    *,
    name: str | None,
    itae: ITAEConfig | None,
    feature: str,
    normalize: bool,
    precision: str,
    calibration_images: int,
    chunk_size: int,
    labels: str,
    fast_decode: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of a new store: every setting that decides its contents (``extra`` keys are kept
    but are not settings: resume ignores them)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "model": bb.name or name or type(bb.model).__name__,
        "feature": feature,
        "normalize": bool(normalize),
        "precision": precision,
        "dtype": "float32",
        "dim": bb.embed_dim * (2 if feature == "cls+mean" else 1),
        # fast_decode changes the pixels, so it is part of the preprocessing (absent when off: older
        # stores, made with full decoding, resume as before)
        "preprocess": _jsonable(preprocess.to_dict()) | ({"fast_decode": True} if fast_decode else {}),
        "itae_requested": None if itae is None else itae.to_dict(),
        "calibration_images": calibration_images if itae is not None and not itae.is_calibrated else None,
        "itae": None,
        "calibration": None,
        "chunk_size": chunk_size,
        "source": {
            "spec": src.spec,
            "kind": src.kind,
            "labels": labels,
            "has_labels": src.has_labels,
            "num_records": len(src),
            "fingerprint": src.fingerprint(),
        },
        "versions": library_versions(),
        **extra,
    }


def ttr_manifest(ttr: TTRConfig | None) -> dict[str, Any]:
    """The manifest keys of test-time registers: the requested config (a setting), the neurons in use, and
    their search's record. Absent when they are off, so such stores look as they did before them."""
    if ttr is None:
        return {}
    return {
        "ttr_requested": ttr.to_dict(),
        "ttr": ttr.to_dict() if ttr.is_resolved else None,
        "ttr_search": None,
    }


def open_writer(
    out_dir: Path,
    existing: dict[str, Any] | None,
    manifest: dict[str, Any],
    itae: ITAEConfig | None,
    *,
    overwrite: bool,
    calibrate: Any,
    find_neurons: Any = None,
) -> EmbeddingStore | tuple[StoreWriter, ITAEConfig | None]:
    """Resume the store in ``out_dir`` (same settings only) or start a new one.

    Returns the finished store when there is nothing left to do, else the writer and the resolved ITAE
    config (calibrated through ``calibrate(config) -> (config, record)`` for a new store with "auto").
    ``find_neurons() -> (TTRConfig, record)``, for a new store, finds its register neurons (kept in
    ``manifest["ttr"]``; a resumed store keeps its own).
    """
    if existing is not None and not overwrite:
        diffs = setting_differences(existing, manifest)
        if diffs:
            detail = describe_setting_differences(existing, manifest, diffs)
            raise StoreError(
                f"{str(out_dir)!r} holds a store made with other settings ({detail}); use another folder, the "
                "same settings, or overwrite=True"
            )
        if existing.get("versions") != manifest["versions"]:
            logger.warning("resuming a store written with other library versions: %s", existing.get("versions"))
        if existing.get("complete"):
            remove_chunks(out_dir)  # leftovers of a run killed while cleaning up
            logger.info("store at %s is already complete", out_dir)
            return EmbeddingStore(out_dir)
        manifest = existing
        run_cfg = None if existing["itae"] is None else ITAEConfig.from_dict(existing["itae"])
    else:
        if existing is not None:
            clear_store_files(out_dir)
        others = foreign_files(out_dir)
        if others:
            raise StoreError(
                f"output folder {str(out_dir)!r} is not empty and holds no itae store (e.g. {others[0]!r}); "
                "choose an empty or new folder"
            )
        clear_store_files(out_dir)  # stale chunks or errors.csv of a run that never wrote its manifest
        run_cfg = itae
        if itae is not None and not itae.is_calibrated:
            run_cfg, manifest["calibration"] = calibrate(itae)
        manifest["itae"] = None if run_cfg is None else run_cfg.to_dict()
        if find_neurons is not None:
            found, manifest["ttr_search"] = find_neurons()
            manifest["ttr"] = found.to_dict()
    writer = StoreWriter(out_dir, manifest)
    writer.begin()
    return writer, run_cfg


# Block inputs kept from the calibration pass for extraction to start from, at most (bytes, on the host):
# 512 images of ViT-g/14 at 224 px in fp32 are 0.8 GiB. Images beyond it are embedded from their pixels.
KEEP_BYTES = 1 << 30


@dataclass
class KeptBatches:
    """Work of the calibration pass that extraction reuses: per extraction batch (keyed by its first
    record index), the batch's records and failures, and the input tokens (B, T, D) of block ``start``
    (None when no image of the batch decoded)."""

    start: int
    batches: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return sum(len(b["index"]) for b in self.batches.values())


def _calibrate(
    bb: Backbone,
    src: ImageSource,
    transform,
    itae: ITAEConfig,
    count: int,
    batch_size: int,
    chunk_size: int,
    out_dir: Path,
    *,
    num_workers: int,
    device: torch.device,
    max_pixels: int | None,
    fast_decode: bool = False,
    kept: KeptBatches | None = None,
) -> tuple[ITAEConfig, dict[str, Any]]:
    """Resolve an "auto" threshold on ``count`` decodable images: whole extraction batches spread evenly
    over the source (``CalibrationBatches``).

    Evenly spaced batches give every part of a class-sorted folder its share of the sample; images that
    fail to decode are replaced by the next batches in source order (the last one read may be cut short).
    Deterministic for a source. With ``kept``, the input tokens of block ``kept.start`` of every batch
    calibration read whole are kept there, so that extraction starts those batches at that block.
    """
    from contextlib import nullcontext

    from itae.engine.calibrate import calibrate
    from itae.engine.reuse import keep_block_inputs

    sampler = CalibrationBatches(len(src), chunk_size, batch_size, count)
    loader = _loader(src, transform, sampler, num_workers=num_workers, device=device, max_pixels=max_pixels,
                     fast_decode=fast_decode)
    used = 0
    failures: list[tuple[int, str]] = []
    fed: list[tuple[dict[str, Any], bool]] = []  # each batch given to calibrate, and whether it went whole
    undecodable: list[dict[str, Any]] = []  # batches of which no image decoded

    def batches() -> Iterator[torch.Tensor]:
        nonlocal used
        for batch in loader:
            failures.extend(zip(batch["failed_index"], batch["failed_reason"], strict=True))
            record = {k: batch[k] for k in ("index", "failed_index", "failed_reason")} | {"pixels": None}
            if batch["pixels"] is None:
                undecodable.append(record)
                continue
            x = batch["pixels"][: count - used]
            used += len(x)
            fed.append((record, len(x) == len(batch["pixels"])))
            yield _to_device(x, transform, device, bb.dtype)
            if used >= count:
                return

    keeper = keep_block_inputs(bb, kept.start, KEEP_BYTES) if kept is not None else nullcontext()
    with torch.inference_mode(), keeper:
        gen = batches()
        first = next(gen, None)
        if first is None:  # nothing decodes: say so, list why, write nothing else
            rows = [(i, src.ids[i], r) for i, r in failures]
            write_errors_csv(out_dir, rows)
            raise InputError(_all_failed_message(src, out_dir, rows[0] if rows else None))

        def chained() -> Iterator[torch.Tensor]:
            yield first
            yield from gen

        cal = calibrate(bb, chained(), itae)
    if kept is not None:
        _keep(kept, keeper.kept, fed, undecodable)
    logger.info("ITAE calibration (%d decodable images, whole batches spread over the source): %s", used,
                cal.summary())
    record = {
        "images": used,
        "thresholds": {str(k): float(v) for k, v in cal.thresholds.items()},
        "flagged_fraction": {str(k): float(v) for k, v in cal.flagged_fraction.items()},
        "bimodal": {str(k): bool(v) for k, v in getattr(cal, "bimodal", {}).items()},
        "self_check": cal.self_check(),
    }
    return cal.config, record


def _find_neurons(
    bb: Backbone,
    src: ImageSource,
    transform,
    ttr: TTRConfig,
    count: int,
    batch_size: int,
    *,
    num_workers: int,
    device: torch.device,
    max_pixels: int | None,
    fast_decode: bool = False,
) -> tuple[TTRConfig, dict[str, Any]]:
    """Find register neurons on ``count`` decodable images spread evenly over the source (the images
    ``_calibrate`` uses), and check them on the first few: outliers and CLS attention before and after."""
    from itae.engine.registers import find_register_neurons, registers_check

    order = spread_indices(len(src), count)
    sampler = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    loader = _loader(src, transform, sampler, num_workers=num_workers, device=device, max_pixels=max_pixels,
                     fast_decode=fast_decode)
    batches = [batch["pixels"] for batch in loader if batch["pixels"] is not None]
    if not batches:
        raise InputError(f"none of the {len(order)} sample images of {src.spec!r} could be decoded")
    batches = [_to_device(x, transform, device, bb.dtype) for x in batches]
    found = find_register_neurons(bb, batches, ttr)
    check = registers_check(bb, torch.cat(batches)[:16], found.config, found.threshold)
    logger.info("test-time registers (%d images spread over the source): %s", found.num_images, found.summary())
    return found.config, {**found.to_record(), "check": check.to_dict()}


def _batch_key(record: dict[str, Any]) -> int:
    """A batch's first record index: where ``ChunkBatchSampler`` starts it."""
    return min(record["index"].tolist() + list(record["failed_index"]))


def _keep(kept: KeptBatches, hidden: list[torch.Tensor | None], fed: list[tuple[dict[str, Any], bool]],
          undecodable: list[dict[str, Any]]) -> None:
    """Pair the block inputs seen during calibration with the batches it was given, one forward each.

    Any other pattern (a calibration that ran more or fewer forwards than batches) keeps nothing: the
    tokens could not be told apart, and extraction then computes every image from its pixels.
    """
    for record in undecodable:
        kept.batches[_batch_key(record)] = record | {"hidden": None}
    if len(hidden) != len(fed):
        logger.debug("calibration ran %d forwards for %d batches: nothing kept for extraction", len(hidden), len(fed))
        return
    for (record, whole), h in zip(fed, hidden, strict=True):
        if whole and h is not None and h.shape[0] == len(record["index"]):
            kept.batches[_batch_key(record)] = record | {"hidden": h}


def _all_failed_message(src: ImageSource, out_dir: Path, example: tuple[int, str, str] | None) -> str:
    hint = f" (e.g. {example[1]!r}: {example[2]})" if example else ""
    return (
        f"none of the {len(src)} images of {src.spec!r} could be decoded{hint}; reasons are listed in "
        f"{str(out_dir / ERRORS)!r}; no embeddings were written"
    )


class _ChunkBuffer:
    """What one chunk has gathered so far; committed when all its records are accounted for.

    ``saved``: how many of its records (from the chunk's start) are already committed as parts.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0
        self.saved = 0
        self.index: list[np.ndarray] = []
        self.embeddings: list[np.ndarray] = []
        self.failed: list[tuple[int, str]] = []


# ----------------------------------------------------------------- commit interval (save_every)

# The clock of the commit interval (a test replaces it).
_clock = time.monotonic


class _ProgressSaver:
    """When to commit the chunk in progress: every ``every`` images or ``interval`` seconds, whichever
    comes first, counted from the last commit."""

    def __init__(self, every: int, interval: float) -> None:
        self.every, self.interval = every, interval
        self.last_count, self.last_time = 0, _clock()

    def due(self, processed: int) -> bool:
        return processed - self.last_count >= self.every or _clock() - self.last_time >= self.interval

    def saved(self, processed: int) -> None:
        self.last_count, self.last_time = processed, _clock()


def _resume_parts(writer: StoreWriter, todo: list[int]) -> dict[int, _ChunkBuffer]:
    """Buffers of the chunks to do that have committed parts, filled with them."""
    buffers: dict[int, _ChunkBuffer] = {}
    for k in todo:
        parts = writer.load_parts(k)
        if parts is None:
            continue
        start, stop = writer.chunk_bounds(k)
        buf = buffers[k] = _ChunkBuffer(stop - start)
        buf.index.append(parts["index"])
        buf.embeddings.append(parts["embeddings"].reshape(len(parts["index"]), writer.dim))
        buf.failed.extend(zip(parts["failed_index"].tolist(), parts["failed_reason"].tolist(), strict=True))
        buf.seen = buf.saved = parts["stop"] - start
    if buffers:
        logger.info("resuming %d chunk(s) after their committed parts", len(buffers))
    return buffers


def _commit_part(writer: StoreWriter, k: int, buf: _ChunkBuffer, src: ImageSource) -> None:
    """Commit the records of chunk ``k`` gathered since its last part (batches arrive in order, so they
    are the records [chunk start + saved, chunk start + seen))."""
    chunk_start = writer.chunk_bounds(k)[0]
    lo, hi = chunk_start + buf.saved, chunk_start + buf.seen
    index = np.concatenate(buf.index) if buf.index else np.zeros(0, dtype=np.int64)
    emb = np.concatenate(buf.embeddings, axis=0) if buf.embeddings else np.zeros((0, writer.dim), np.float32)
    new = (index >= lo) & (index < hi)
    order = np.argsort(index[new], kind="stable")
    index, emb = index[new][order], emb[new][order]
    failed = sorted((i, r) for i, r in buf.failed if lo <= i < hi)
    writer.write_part(k, lo, hi, **_records(src, index, emb, failed))
    buf.saved = buf.seen


def _extract(
    bb: Backbone,
    src: ImageSource,
    transform,
    writer: StoreWriter,
    todo: list[int],
    cfg: ITAEConfig | None,
    feature: Feature,
    normalize: bool,
    batch_size: int,
    progress: bool,
    fast_cls: bool,
    compile: bool,
    *,
    num_workers: int,
    device: torch.device,
    max_pixels: int | None,
    fast_decode: bool = False,
    save: tuple[int, float] = (4096, 30.0),
    ttr: TTRConfig | None = None,
    kept: KeptBatches | None = None,
) -> None:
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from itae.engine.fast import compiled_blocks, supports_fast_cls

    buffers = _resume_parts(writer, todo)
    starts = {k: writer.chunk_bounds(k)[0] + buf.seen for k, buf in buffers.items()}
    kept = kept if kept is not None and kept.batches else None
    reused = 0 if kept is None else kept.num_images
    sampler = ChunkBatchSampler(len(src), writer.chunk_size, batch_size, todo, starts,
                                skip=() if kept is None else kept.batches)
    loader = _loader(src, transform, sampler, num_workers=num_workers, device=device, max_pixels=max_pixels,
                     fast_decode=fast_decode)

    def batches() -> Iterator[dict]:
        """Every batch of ``todo`` in order: decoded by the loader, or as the calibration pass kept it."""
        if kept is None:
            yield from loader
            return
        decoded = None  # started at the first batch it must serve: no workers when calibration kept all
        for b in ChunkBatchSampler(len(src), writer.chunk_size, batch_size, todo, starts):
            batch = kept.batches.pop(b[0], None)
            if batch is None:
                decoded = iter(loader) if decoded is None else decoded
                batch = next(decoded)
            yield batch

    remaining = sum(writer.chunk_bounds(k)[1] - writer.chunk_bounds(k)[0] for k in todo)
    remaining -= sum(buf.seen for buf in buffers.values())
    bar = tqdm(total=len(src), initial=len(src) - remaining, unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, desc="embedding")
    registers = nullcontext()
    if ttr is not None:  # the registers' hooks stay on around the whole loop; ITAE sees their extra token
        from itae.engine.registers import test_time_registers

        registers = test_time_registers(bb, ttr)
        bb = registers.state.backbone
    with_ttr = bool(ttr is not None and ttr.neurons)
    # the CLS-only fast path runs the last block's MLP for the CLS row alone: no register neurons there
    ttr_fast = not with_ttr or (bb.num_blocks > 1 and all(b < bb.num_blocks - 1 for b, _ in ttr.neurons))
    fast = fast_cls and feature == "cls" and supports_fast_cls(bb, cfg) and ttr_fast
    if cfg is not None and not fast:
        from itae.engine.patch import attenuate

        context = attenuate(bb, cfg)  # entered once around the whole loop
        if compile:
            logger.warning("compile ignored: this ITAE config runs through hooks, which compiled blocks would break")
    elif compile and with_ttr:
        logger.warning("compile ignored: test-time registers run through hooks, which compiled blocks would break")
        context = nullcontext()
    else:
        context = compiled_blocks(bb) if compile else nullcontext()
    logger.info("extracting %d images with %s%s", remaining,
                "the CLS-only fast path" if fast else "ITAE hooks" if cfg is not None else "the unmodified model",
                f" ({reused} of them from block {kept.start}, kept by calibration)" if kept is not None else "")
    processed = failed = 0
    t0 = time.perf_counter()
    saver = _ProgressSaver(*save)

    def finish(batch: dict, emb: torch.Tensor | None) -> None:
        """Bring one batch's embeddings to the host and into its chunk; commit the chunk when full."""
        nonlocal processed, failed
        indices = batch["index"]
        all_idx = indices.tolist() + list(batch["failed_index"])
        k = min(all_idx) // writer.chunk_size
        start, stop = writer.chunk_bounds(k)
        buf = buffers.setdefault(k, _ChunkBuffer(stop - start))
        if emb is not None:
            _check_finite(emb, indices, src)
            buf.index.append(indices.numpy())
            buf.embeddings.append(emb.cpu().numpy())
        buf.failed.extend(zip(batch["failed_index"], batch["failed_reason"], strict=True))
        buf.seen += len(all_idx)
        processed += len(all_idx)
        failed += len(batch["failed_index"])
        if buf.seen == buf.size:
            _commit(writer, k, buffers.pop(k), src)
            saver.saved(processed)
        elif saver.due(processed):
            _commit_part(writer, k, buf, src)
            saver.saved(processed)
        bar.update(len(all_idx))
        rate = processed / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(img_s=f"{rate:.1f}", failed=failed, refresh=False)

    # One batch in flight: batch i+1 is queued on the device before batch i's embeddings are read back
    # (which waits for the device), so the device does not idle while the host copies, checks and writes.
    pending: tuple[dict, torch.Tensor | None] | None = None
    try:
        with registers, context, torch.inference_mode():
            for batch in batches():
                emb = None
                hidden = batch.get("hidden")
                if hidden is not None or batch["pixels"] is not None:
                    try:
                        if hidden is not None:  # (B, T, D) input of block kept.start
                            features = _forward_kept(bb, hidden, kept.start, cfg, fast)
                        else:
                            x = _to_device(batch["pixels"], transform, bb.device, bb.dtype)
                            features = _forward_pixels(bb, x, cfg, fast)
                        emb = pool_features(features, feature, normalize)  # (B, D) float32, maybe still computing
                    except torch.OutOfMemoryError as e:
                        raise _out_of_memory(e, bb.device, len(batch["index"]), writer) from None
                    if emb.shape[1] != writer.dim:
                        raise RuntimeError(f"the model gave {emb.shape[1]}-d embeddings, expected {writer.dim}")
                if pending is not None:
                    finish(*pending)
                pending = (batch, emb)
            if pending is not None:
                finish(*pending)
    finally:
        bar.close()
    if buffers:
        raise RuntimeError(f"extraction ended with unfinished chunks {sorted(buffers)}")


def _forward_pixels(bb: Backbone, x: torch.Tensor, cfg: ITAEConfig | None, fast: bool) -> Features:
    """Features of preprocessed pixels (B, 3, S, S): the CLS-only fast path, or the model as it is (with
    the ITAE hooks of an enclosing ``attenuate``)."""
    from itae.engine.fast import forward_cls

    if fast:
        return Features(cls=forward_cls(bb, x, cfg)[0])
    return bb.forward_features(x)


def _forward_kept(bb: Backbone, hidden: torch.Tensor, start: int, cfg: ITAEConfig | None,
                  fast: bool) -> Features:
    """``forward`` of the same images from the input tokens (B, T, D) of block ``start``, kept on the host."""
    from itae.engine.fast import forward_cls_from, forward_features_from

    h = hidden.to(bb.device, non_blocking=True)
    if fast:
        return Features(cls=forward_cls_from(bb, h, start, cfg)[0])
    return forward_features_from(bb, h, start)


def embed_kept(bb: Backbone, kept: KeptBatches, cfg: ITAEConfig | None, feature: Feature, normalize: bool,
               fast_cls: bool) -> Iterator[tuple[dict[str, Any], torch.Tensor | None]]:
    """Each kept batch with its (B, D) float32 embeddings (None where no image decoded), computed from the
    kept tokens as ``embed`` computes them; the batches leave ``kept`` as they are served."""
    from contextlib import nullcontext

    from itae.engine.fast import supports_fast_cls
    from itae.engine.patch import attenuate

    fast = fast_cls and feature == "cls" and supports_fast_cls(bb, cfg)
    with attenuate(bb, cfg) if cfg is not None and not fast else nullcontext(), torch.inference_mode():
        for key in sorted(kept.batches):
            batch = kept.batches.pop(key)
            emb = None
            if batch["hidden"] is not None:
                emb = pool_features(_forward_kept(bb, batch["hidden"], kept.start, cfg, fast), feature, normalize)
            yield batch, emb


def _out_of_memory(err: BaseException, device: torch.device, batch: int, writer: StoreWriter) -> ResourceError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ResourceError(
        f"out of {device.type} memory with a batch of {batch} images ({first[:160]}); use a smaller batch_size "
        f"or precision='bf16'. The {len(writer.committed_chunks())} committed chunk(s) are kept "
        "and a rerun resumes from them"
    )


def _check_finite(emb: torch.Tensor, indices: torch.Tensor, src: ImageSource) -> None:
    ok = torch.isfinite(emb).all(dim=1)
    if bool(ok.all()):
        return
    bad = [int(i) for i in indices[~ok.cpu()].tolist()]
    names = ", ".join(repr(src.ids[i]) for i in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise InputError(
        f"non-finite (NaN or inf) embedding for image {names}; refusing to write it. Committed chunks are "
        "kept and a rerun resumes; with fp16 this is usually an overflow, so try precision='bf16' or precision='fp32'"
    )


def _commit(writer: StoreWriter, k: int, buf: _ChunkBuffer, src: ImageSource) -> None:
    if buf.index:
        index = np.concatenate(buf.index)
        emb = np.concatenate(buf.embeddings, axis=0)
    else:
        index = np.zeros(0, dtype=np.int64)
        emb = np.zeros((0, writer.dim), dtype=np.float32)
    order = np.argsort(index, kind="stable")
    index, emb = index[order], emb[order]
    writer.write_chunk(k, **_records(src, index, emb, sorted(buf.failed)))


def _records(src: ImageSource, index: np.ndarray, emb: np.ndarray, failed: list[tuple[int, str]]) -> dict[str, Any]:
    """The store's record fields of embedded images ``index`` (their rows ``emb``) and of ``failed`` ones."""
    labels = src.labels
    return dict(
        index=index,
        ids=[src.ids[i] for i in index.tolist()],
        labels=[labels[i] if labels is not None else "" for i in index.tolist()],
        embeddings=emb,
        failed_index=[i for i, _ in failed],
        failed_ids=[src.ids[i] for i, _ in failed],
        failed_reason=[r for _, r in failed],
    )


__all__ = [
    "KEEP_BYTES", "KeptBatches", "default_num_workers", "embed", "embed_batches", "pool_features", "resolve_device",
    "resolve_precision", "spread_indices",
]
