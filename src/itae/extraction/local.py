"""The local engine: batched extraction in this process, decoding in DataLoader workers.

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
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from itae.config import ITAEConfig
from itae.data.dataset import ChunkBatchSampler
from itae.data.decode import PreprocessTransform, build_transform
from itae.data.sources import ImageSource
from itae.data.spec import SourceSpec
from itae.data.store import EmbeddingStore, StoreWriter
from itae.engine.patch import check_applies, resolve_layers
from itae.engine.registers import check_registers_apply
from itae.errors import ResourceError
from itae.methods import TTRConfig, resolve_method
from itae.models.base import Backbone
from itae.models.loading import DEFAULT_MODEL
from itae.models.spec import ModelSpec, prepare_model, resolve_device

from . import chunks, sampling
from .forward import embed_batch, make_forward
from .options import EmbedOptions, build_specs, check_itae, default_num_workers
from .session import finish_store, new_manifest, open_output, open_writer, ttr_manifest

logger = logging.getLogger("itae.extraction")


def embed(
    source: str | os.PathLike | ImageSource | SourceSpec,
    backbone: str | os.PathLike | ModelSpec | Backbone | nn.Module = DEFAULT_MODEL,
    *,
    out: str | os.PathLike,
    itae: ITAEConfig | None = ITAEConfig(),
    method: str | None = None,
    ttr: TTRConfig | None = None,
    options: EmbedOptions | None = None,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    **keywords,
) -> EmbeddingStore:
    """Embed every image of ``source`` with ``backbone`` (ITAE on unless ``itae=None``) into a store at ``out``.

    source: a ``SourceSpec``, or what it takes as ``path``: a folder, a .txt/.csv list, WebDataset shards, a
        HF data set (see ``open_source``), or an ``ImageSource``.
    backbone: a ``ModelSpec``, a model name or path (``itae.load_backbone``), a ``Backbone``, or a supported
        model instance (moved to the device and the precision's dtype in place).
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
    options: the ``EmbedOptions`` (feature, batch size, workers, calibration images, fast paths, commit
        interval, ...); default ``EmbedOptions()``.
    resume: continue (or return) a store at ``out`` made with the same settings; overwrite: start afresh.
    keywords: the fields of the three specs as plain keywords, replacing those given: ``labels``,
        ``image_column``, ``label_column``, ``split``, ``hf_config`` (``SourceSpec.config``); ``arch``,
        ``device``, ``precision``, ``resolution``; and every ``EmbedOptions`` field (``feature="mean"``,
        ``batch_size=32``, ...).

    Images that cannot be decoded are skipped and listed in ``out/errors.csv``. Returns the finished store.
    """
    itae, ttr = resolve_method(method, itae, ttr)
    spec, mspec, opts = build_specs(source, backbone, options, keywords)
    check_itae(itae)

    # Cheap checks first: a bad source creates no output folder, a bad output folder loads no model.
    src = spec.open()
    out_dir, existing = open_output(out, resume=resume, overwrite=overwrite)
    dev = resolve_device(mspec.device)
    num_workers = default_num_workers(dev) if opts.num_workers is None else opts.num_workers
    bb, preprocess = prepare_model(backbone, mspec, dev)
    if ttr is not None:
        check_registers_apply(bb)  # refused before anything runs
    if itae is not None:  # ITAE on a model it does not apply to (no CLS row, no probe) is refused before any image
        check_applies(bb, itae, resolve_layers(bb, itae))
    transform = build_transform(preprocess)
    manifest = new_manifest(
        bb, preprocess, src, name=mspec.name if isinstance(backbone, (str, os.PathLike, ModelSpec)) else None,
        itae=itae, feature=opts.feature, normalize=opts.normalize, precision=mspec.precision,
        calibration_images=opts.calibration_images, chunk_size=opts.chunk_size, labels=spec.labels,
        fast_decode=opts.fast_decode, **ttr_manifest(ttr),
    )
    loader_kw = dict(num_workers=num_workers, device=dev, max_pixels=opts.max_pixels, fast_decode=opts.fast_decode)
    kept = None if ttr is not None else sampling.new_kept_batches(bb, itae, opts.compile)  # TTR's token: no reuse
    opened = open_writer(
        out_dir, existing, manifest, itae, overwrite=overwrite,
        calibrate=lambda cfg: sampling.calibrate_source(
            bb, src, transform, cfg, opts.calibration_images, opts.batch_size, opts.chunk_size, out_dir, kept=kept,
            **loader_kw),
        find_neurons=None if ttr is None or ttr.is_resolved else lambda: sampling.find_neurons(
            bb, src, transform, ttr, opts.calibration_images, opts.batch_size, **loader_kw),
    )
    if isinstance(opened, EmbeddingStore):
        return opened
    writer, run_cfg = opened
    run_ttr = None if writer.manifest.get("ttr") is None else TTRConfig.from_dict(writer.manifest["ttr"])
    done = set(writer.committed_chunks())
    todo = [k for k in range(writer.num_chunks) if k not in done]
    if todo:
        _extract(bb, src, transform, writer, todo, run_cfg, opts, progress=progress, ttr=run_ttr, kept=kept,
                 **loader_kw)
    return finish_store(writer, src)


def _extract(
    bb: Backbone,
    src: ImageSource,
    transform: PreprocessTransform,
    writer: StoreWriter,
    todo: list[int],
    cfg: ITAEConfig | None,
    opts: EmbedOptions,
    *,
    progress: bool,
    num_workers: int,
    device: torch.device,
    max_pixels: int | None,
    fast_decode: bool = False,
    ttr: TTRConfig | None = None,
    kept: sampling.KeptBatches | None = None,
) -> None:
    assembler = chunks.ChunkAssembler(writer, src)
    starts = assembler.resume_parts(todo)
    kept = kept if kept is not None and kept.batches else None
    reused = 0 if kept is None else kept.num_images
    sampler = ChunkBatchSampler(len(src), writer.chunk_size, opts.batch_size, todo, starts,
                                skip=() if kept is None else kept.batches)
    loader = sampling.make_loader(src, transform, sampler, num_workers=num_workers, device=device,
                                  max_pixels=max_pixels, fast_decode=fast_decode)

    def batches() -> Iterator[dict]:
        """Every batch of ``todo`` in order: decoded by the loader, or as the calibration pass kept it."""
        if kept is None:
            yield from loader
            return
        decoded = None  # started at the first batch it must serve: no workers when calibration kept all
        for b in ChunkBatchSampler(len(src), writer.chunk_size, opts.batch_size, todo, starts):
            batch = kept.batches.pop(b[0], None)
            if batch is None:
                decoded = iter(loader) if decoded is None else decoded
                batch = next(decoded)
            yield batch

    remaining = sum(writer.chunk_bounds(k)[1] - writer.chunk_bounds(k)[0] for k in todo) - assembler.num_seen
    bar = tqdm(total=len(src), initial=len(src) - remaining, unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, desc="embedding")
    processed = failed = 0
    t0 = time.perf_counter()
    saver = chunks.ProgressSaver(opts.save_every, opts.save_interval)

    def finish(batch: dict, emb: torch.Tensor | None) -> None:
        """Bring one batch's embeddings to the host and into its chunk; commit the chunk when full."""
        nonlocal processed, failed
        count = len(batch["index"]) + len(batch["failed_index"])
        done = assembler.add(batch["index"].numpy(), None if emb is None else emb.cpu().numpy(),
                             zip(batch["failed_index"], batch["failed_reason"], strict=True))
        processed += count
        failed += len(batch["failed_index"])
        (k, complete), = done.items()  # a batch lies in one chunk
        if complete:
            saver.saved(processed)
        elif saver.due(processed):
            assembler.commit_part(k)
            saver.saved(processed)
        bar.update(count)
        rate = processed / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(img_s=f"{rate:.1f}", failed=failed, refresh=False)

    # One batch in flight: batch i+1 is queued on the device before batch i's embeddings are read back
    # (which waits for the device), so the device does not idle while the host copies, checks and writes.
    pending: tuple[dict, torch.Tensor | None] | None = None
    try:
        with make_forward(bb, cfg, feature=opts.feature, normalize=opts.normalize, fast_cls=opts.fast_cls,
                          compile=opts.compile, ttr=ttr) as forward, torch.inference_mode():
            logger.info("extracting %d images with %s%s", remaining, forward.description,
                        f" ({reused} of them from block {kept.start}, kept by calibration)" if kept is not None else "")
            for batch in batches():
                try:
                    emb = embed_batch(forward, batch, transform, None if kept is None else kept.start)
                except torch.OutOfMemoryError as e:
                    raise _out_of_memory(e, bb.device, len(batch["index"]), writer) from None
                if pending is not None:
                    finish(*pending)
                pending = (batch, emb)
            if pending is not None:
                finish(*pending)
    finally:
        bar.close()
    assembler.check_done("extraction")


def _out_of_memory(err: BaseException, device: torch.device, batch: int, writer: StoreWriter) -> ResourceError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ResourceError(
        f"out of {device.type} memory with a batch of {batch} images ({first[:160]}); use a smaller batch_size "
        f"or precision='bf16'. The {len(writer.committed_chunks())} committed chunk(s) are kept "
        "and a rerun resumes from them"
    )


__all__ = ["embed"]
