"""Calibration sampling: which images an "auto" threshold, the register search and the bench are
computed on, read through the same loader as extraction; and the calibration pass's work that extraction
reuses (``KeptBatches``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from itae.config import ITAEConfig
from itae.data.dataset import CalibrationBatches, ImageDataset, collate_images, spread_indices
from itae.data.decode import PreprocessTransform
from itae.data.sources import ImageSource
from itae.data.store import write_errors_csv
from itae.engine.calibrate import calibrate
from itae.engine.fast import supports_forward_from
from itae.engine.patch import resolve_layers
from itae.engine.registers import find_register_neurons, registers_check
from itae.engine.reuse import keep_block_inputs
from itae.errors import InputError
from itae.methods import TTRConfig
from itae.models.base import Backbone

from .forward import make_forward, to_device
from .session import all_failed_message

logger = logging.getLogger("itae.extraction")

# Decoded images waiting in DataLoader queues, at most (uint8 bytes): bounds host memory however many
# workers and whatever the batch size.
PREFETCH_BYTES = 1 << 30


def make_loader(
    src: ImageSource, transform: PreprocessTransform, batch_sampler, *, num_workers: int, device: torch.device,
    max_pixels: int | None, fast_decode: bool,
) -> DataLoader:
    """A DataLoader of uint8 batches (``collate_images``) of ``src`` in the order of ``batch_sampler``."""
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


def spread_batches(num_records: int, count: int, batch_size: int) -> list[list[int]]:
    """``count`` records spread evenly over the source (``spread_indices``), in batches of ``batch_size``."""
    order = spread_indices(num_records, count)
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


class SampleBatches:
    """The decodable images of a sample, batch by batch, preprocessed on the device in ``dtype``.

    ``sampler``: the batches of record indices to read, in order; ``count``: stop after this many decodable
    images (the last batch may be cut short), None: read every batch. While iterating, it records
    ``used`` (images given), ``failures`` (record, reason), ``fed`` (each batch's records, and whether it
    went whole) and ``undecodable`` (batches of which no image decoded).
    """

    def __init__(self, src: ImageSource, transform: PreprocessTransform, sampler, *, device: torch.device,
                 dtype: torch.dtype, count: int | None = None, num_workers: int = 0,
                 max_pixels: int | None = None, fast_decode: bool = False) -> None:
        self.transform, self.device, self.dtype, self.count = transform, device, dtype, count
        self.loader = make_loader(src, transform, sampler, num_workers=num_workers, device=device,
                                  max_pixels=max_pixels, fast_decode=fast_decode)
        self.used = 0
        self.failures: list[tuple[int, str]] = []
        self.fed: list[tuple[dict[str, Any], bool]] = []
        self.undecodable: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        count = self.count
        for batch in self.loader:
            self.failures.extend(zip(batch["failed_index"], batch["failed_reason"], strict=True))
            record = {k: batch[k] for k in ("index", "failed_index", "failed_reason")} | {"pixels": None}
            if batch["pixels"] is None:
                self.undecodable.append(record)
                continue
            x = batch["pixels"] if count is None else batch["pixels"][: count - self.used]
            self.used += len(x)
            self.fed.append((record, len(x) == len(batch["pixels"])))
            yield to_device(x, self.transform, self.device, self.dtype)
            if count is not None and self.used >= count:
                return


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


def new_kept_batches(bb: Backbone, itae: ITAEConfig | None, compile: bool) -> KeptBatches | None:
    """Where the calibration pass keeps its work for extraction, or None where it cannot be reused.

    Not with ``compile``: compiled blocks round differently from the eager ones calibration runs, and a
    store must not depend on whether its run was interrupted (a resumed run never calibrates).
    """
    if itae is None or itae.is_calibrated or compile or not supports_forward_from(bb):
        return None
    return KeptBatches(start=min(resolve_layers(bb, itae)))



def calibrate_source(
    bb: Backbone,
    src: ImageSource,
    transform: PreprocessTransform,
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
    Returns the calibrated config and the manifest's record of the calibration.
    """
    sample = SampleBatches(src, transform, CalibrationBatches(len(src), chunk_size, batch_size, count),
                           device=device, dtype=bb.dtype, count=count, num_workers=num_workers,
                           max_pixels=max_pixels, fast_decode=fast_decode)
    keeper = keep_block_inputs(bb, kept.start, KEEP_BYTES) if kept is not None else nullcontext()
    with torch.inference_mode(), keeper:
        gen = iter(sample)
        first = next(gen, None)
        if first is None:  # nothing decodes: say so, list why, write nothing else
            rows = [(i, src.ids[i], r) for i, r in sample.failures]
            write_errors_csv(out_dir, rows)
            raise InputError(all_failed_message(src, out_dir, rows[0] if rows else None))

        def chained() -> Iterator[torch.Tensor]:
            yield first
            yield from gen

        cal = calibrate(bb, chained(), itae)
    if kept is not None:
        _keep(kept, keeper.kept, sample.fed, sample.undecodable)
    logger.info("ITAE calibration (%d decodable images, whole batches spread over the source): %s", sample.used,
                cal.summary())
    record = {
        "images": sample.used,
        "thresholds": {str(k): float(v) for k, v in cal.thresholds.items()},
        "flagged_fraction": {str(k): float(v) for k, v in cal.flagged_fraction.items()},
        "bimodal": {str(k): bool(v) for k, v in getattr(cal, "bimodal", {}).items()},
        "self_check": cal.self_check(),
    }
    return cal.config, record


def find_neurons(
    bb: Backbone,
    src: ImageSource,
    transform: PreprocessTransform,
    ttr: TTRConfig,
    count: int,
    batch_size: int,
    *,
    num_workers: int,
    device: torch.device,
    max_pixels: int | None,
    fast_decode: bool = False,
) -> tuple[TTRConfig, dict[str, Any]]:
    """Find register neurons on the decodable ones of ``count`` images spread evenly over the source
    (``spread_batches``), and check them on the first few: outliers and CLS attention before and after."""
    sample = SampleBatches(src, transform, spread_batches(len(src), count, batch_size), device=device,
                           dtype=bb.dtype, num_workers=num_workers, max_pixels=max_pixels, fast_decode=fast_decode)
    batches = list(sample)
    if not batches:
        raise InputError(f"none of the {len(spread_indices(len(src), count))} sample images of {src.spec!r} "
                         "could be decoded")
    found = find_register_neurons(bb, batches, ttr)
    check = registers_check(bb, torch.cat(batches)[:16], found.config, found.threshold)
    logger.info("test-time registers (%d images spread over the source): %s", found.num_images, found.summary())
    return found.config, {**found.to_record(), "check": check.to_dict()}


def embed_kept(bb: Backbone, kept: KeptBatches, cfg: ITAEConfig | None, feature: str, normalize: bool,
               fast_cls: bool) -> Iterator[tuple[dict[str, Any], torch.Tensor | None]]:
    """Each kept batch with its (B, D) float32 embeddings (None where no image decoded), computed from the
    kept tokens as extraction computes them; the batches leave ``kept`` as they are served."""
    with make_forward(bb, cfg, feature=feature, normalize=normalize, fast_cls=fast_cls) as forward, \
            torch.inference_mode():
        for key in sorted(kept.batches):
            batch = kept.batches.pop(key)
            emb = None if batch["hidden"] is None else forward.kept(batch["hidden"], kept.start)
            yield batch, emb


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


__all__ = [
    "KEEP_BYTES", "KeptBatches", "SampleBatches", "calibrate_source", "embed_kept", "find_neurons", "make_loader",
    "new_kept_batches", "spread_batches",
]
