"""Embedding extraction as Ray Data batch inference, into the same store that ``itae.embed`` writes.

One streamed Ray Data pipeline::

    indices of the records still missing      ray.data.from_items, built on the driver
      -> _Decoder actors (CPU)                read, decode, preprocess: the local DataLoader's own code
      -> _Embedder actors (a GPU each, when    one model replica per actor: forward (fast CLS-only path or
         the cluster has GPUs)                 ITAE hooks, as the local path chooses) and pooling
      -> driver                                gather by store chunk, commit complete chunks atomically

With GPU replicas, decoding is its own CPU stage so that it spreads over every CPU of the cluster while
the GPUs only run the model; the price is that resized, cropped uint8 pixels travel through Ray's object
store (normalisation happens on the model's device, as in the local path). With CPU replicas there is
nothing to overlap, so each model actor decodes its own batches.

Everything that defines the result is shared with the local path (source and order, decoder and
transform, calibration on the driver over the same images, forward and pooling, store writer), so both
engines give the same embeddings and a store started by one can be finished by the other.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from itae.config import ITAEConfig
from itae.data.dataset import ImageDataset
from itae.data.decode import build_transform
from itae.data.sources import ImageSource
from itae.data.spec import SourceSpec
from itae.data.store import EmbeddingStore, StoreWriter
from itae.errors import InputError, InputTypeError, MissingDependencyError
from itae.extraction.chunks import ChunkAssembler
from itae.extraction.forward import make_forward, to_device
from itae.extraction.options import (
    EmbedOptions,
    Feature,
    build_specs,
    check_count,
    check_itae,
    check_positive,
    default_num_workers,
    embedding_dim,
)
from itae.extraction.sampling import calibrate_source, embed_kept, new_kept_batches
from itae.extraction.session import finish_store, new_manifest, open_output, open_writer
from itae.models.base import Preprocess
from itae.models.loading import DEFAULT_MODEL
from itae.models.spec import ModelSpec, resolve_device

logger = logging.getLogger("itae.distributed")

# Input blocks handed to the decoders: about one batch each, so small runs still spread over every decoder,
# but never more than this many, so the driver puts few objects for very large sources.
_MAX_INPUT_BLOCKS = 2048


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray without the data extra lacks it)
    except ImportError:
        raise MissingDependencyError(
            'the Ray engine needs Ray Data, which is not installed: pip install "itae[ray]"'
        ) from None
    return ray


# ------------------------------------------------------------------------------------- Ray stages


class _Decoder:
    """CPU stage: record indices -> resized, cropped uint8 pixels, or the reason a record cannot be used.

    Reuses ``ImageDataset`` (the local DataLoader's dataset), so the pixels and the failure reasons are
    exactly the local path's. Output rows keep their shape: a failed record has zero pixels and a reason.
    """

    def __init__(self, source: ImageSource, preprocess: Preprocess, max_pixels: int | None,
                 fast_decode: bool = False) -> None:
        self.dataset = ImageDataset(source, build_transform(preprocess), max_pixels=max_pixels, uint8=True,
                                    fast_decode=fast_decode)
        self.size = preprocess.image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = np.asarray(batch["item"], dtype=np.int64)
        pixels = np.zeros((len(index), 3, self.size, self.size), dtype=np.uint8)  # (B, 3, S, S)
        reasons = []
        for row, i in enumerate(index.tolist()):
            _, x, reason = self.dataset[i]
            if x is not None:
                pixels[row] = x.numpy()
            reasons.append(reason or "")
        return {"index": index, "pixels": pixels, "reason": np.array(reasons, dtype=object)}


class _Embedder:
    """Model stage: one backbone per actor, loaded once; uint8 pixels -> (B, D) float32 embeddings.

    ``preprocess`` is the driver's (recorded in the manifest); its normalisation runs on the actor's
    device. With ``decode`` (the ``_Decoder`` arguments) it decodes its batches itself: no CPU stage.
    The forward (fast path, ITAE hooks or compiled blocks) is the core's, open for the actor's lifetime.
    """

    def __init__(
        self,
        model: str,
        arch: str | None,
        precision: str,
        resolution: int | None,
        config: dict[str, Any] | None,
        feature: Feature,
        normalize: bool,
        fast_cls: bool,
        preprocess: Preprocess,
        decode: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        # Ray exposes only the GPUs granted to this actor; none granted means CPU.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        spec = ModelSpec(model, arch=arch, precision=precision, resolution=resolution)
        self.backbone = spec.load(device)
        self.config = None if config is None else ITAEConfig.from_dict(config)
        self.dim = embedding_dim(self.backbone.embed_dim, feature)
        self._forward = make_forward(self.backbone, self.config, feature=feature, normalize=normalize,
                                     fast_cls=fast_cls, compile=compile)
        self.forward = self._forward.__enter__()  # the actor's lifetime: its process ends with it
        self.fast = self.forward.fast
        self.transform = build_transform(preprocess)
        self.decoder = None if decode is None else _Decoder(**decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decoder is not None:
            batch = self.decoder(batch)
        index = np.asarray(batch["index"], dtype=np.int64)
        reason = batch["reason"]
        ok = np.array([r == "" for r in reason], dtype=bool)
        # (B, D) with every row, so all output blocks have one shape; failed rows stay zero (the driver
        # skips them).
        out = np.zeros((len(index), self.dim), dtype=np.float32)
        if ok.any():
            bb = self.backbone
            x = torch.from_numpy(np.array(batch["pixels"][ok], dtype=np.uint8))  # (b, 3, S, S), writable
            with torch.inference_mode():
                # The local path's own step: uint8 to the device, normalised there, cast to the model dtype.
                emb = self.forward.pixels(to_device(x, self.transform, bb.device, bb.dtype))
            out[ok] = emb.cpu().numpy()
        return {"index": index, "embedding": out, "reason": np.asarray(reason, dtype=object)}


# ----------------------------------------------------------------------------------------- driver


def embed_ray(
    source: str | os.PathLike | ImageSource | SourceSpec,
    backbone_name: str | os.PathLike | ModelSpec = DEFAULT_MODEL,
    *,
    out: str | os.PathLike,
    options: EmbedOptions | None = None,
    itae: ITAEConfig | None = ITAEConfig(),
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    address: str | None = None,
    num_actors: int = 1,
    num_gpus_per_actor: float | None = None,
    num_decoders: int | None = None,
    **keywords,
) -> EmbeddingStore:
    """``itae.embed`` as Ray Data batch inference: decoding on CPU actors, the model on ``num_actors`` actors.

    Writes the same store as ``itae.embed`` (same layout, settings, chunks, ``errors.csv``), resumable by
    either engine. Arguments shared with ``itae.embed`` mean the same (the specs and their plain
    keywords; the device is chosen per actor, ``num_workers`` and the commit interval are not used); the
    others:

    backbone_name: a ``ModelSpec``, or a model name or path, that every Ray worker can load
        (``itae.load_backbone``).
    address: None starts a local Ray instance (shut down afterwards); "auto" or "ray://host:port" joins a
        running cluster. If Ray is already initialised in this process, that instance is used as it is.
    num_actors: model replicas. num_gpus_per_actor: GPUs per replica (default 1 when the cluster has
        GPUs, else 0: CPU replicas). num_decoders: CPU decoding actors feeding the model actors; 0 decodes
        inside the model actors (one stage, no pixels through the object store). Default: with GPU
        replicas, autoscale from 1 to the cluster's CPUs not held by the model actors; with CPU replicas, 0.

    An "auto" threshold is calibrated once, on the driver, on ``calibration_images`` decodable images
    (whole batches spread evenly over the source), exactly as ``itae.embed`` does; the driver embeds those
    images from the tokens the calibration pass kept, and the resolved config goes to every actor.
    Source paths and the model must be readable from every node (a shared file system) on a cluster.
    """
    ray = _import_ray()
    if not isinstance(backbone_name, (str, os.PathLike, ModelSpec)):
        raise InputTypeError(
            f"the Ray engine loads the model by name in each actor; pass a model name or path, not a "
            f"{type(backbone_name).__name__} (for an in-memory model use itae.embed)"
        )
    spec, mspec, opts = build_specs(source, backbone_name, options, keywords, caller="embed_ray")
    check_itae(itae)
    check_count("num_decoders", num_decoders)
    check_positive("num_actors", num_actors)
    if num_gpus_per_actor is not None and not num_gpus_per_actor >= 0:
        raise InputError(f"num_gpus_per_actor must be >= 0 or None; got {num_gpus_per_actor!r}")
    if address is not None and not isinstance(address, str):
        raise InputTypeError(f"address must be None, 'auto' or 'ray://host:port'; got {type(address).__name__}")

    prepared = _prepare_store(spec, mspec, opts, out=out, itae=itae, resume=resume, overwrite=overwrite,
                              ray_running=ray.is_initialized())
    if isinstance(prepared, EmbeddingStore):  # already complete
        return prepared
    src, assembler, preprocess, run_cfg = prepared
    writer = assembler.writer

    done = set(writer.committed_chunks())
    todo = [k for k in range(writer.num_chunks) if k not in done]
    if todo:
        with _ray_session(ray, address):
            _run_pipeline(
                ray, src, preprocess, assembler, todo, mspec, opts, config=run_cfg, num_actors=num_actors,
                num_gpus_per_actor=num_gpus_per_actor, num_decoders=num_decoders, progress=progress,
            )
    return finish_store(writer, src, engine="Ray")


def _prepare_store(
    spec: SourceSpec, mspec: ModelSpec, opts: EmbedOptions, *, out: str | os.PathLike, itae: ITAEConfig | None,
    resume: bool, overwrite: bool, ray_running: bool,
) -> EmbeddingStore | tuple[ImageSource, ChunkAssembler, Preprocess, ITAEConfig | None]:
    """Open the source and the store folder as ``itae.embed`` does: the same manifest, the same resume
    rules and the same calibration, so the stores of both engines are interchangeable. The batches the
    calibration pass read are embedded here, on the driver, from the tokens it kept (as ``itae.embed``
    does): the actors get only the other records.

    Returns the finished store when it is already complete, else (source, the assembler holding the
    driver's results, preprocess, config).
    """
    # Cheap checks first: a bad source creates no output folder, a bad output folder loads no model.
    src = spec.open()
    out_dir, existing = open_output(out, resume=resume, overwrite=overwrite)
    # The driver loads the model once: for the manifest (name, width, preprocessing) and for calibration.
    device = resolve_device("auto")
    bb = mspec.load(device)
    preprocess = bb.preprocess  # the resolution is already applied
    manifest = new_manifest(
        bb, preprocess, src, name=mspec.name, itae=itae, feature=opts.feature, normalize=opts.normalize,
        precision=mspec.precision, calibration_images=opts.calibration_images, chunk_size=opts.chunk_size,
        labels=spec.labels, fast_decode=opts.fast_decode,
        engine="ray",  # not a setting (resume ignores it): which engine started the store
    )
    kept = new_kept_batches(bb, itae, opts.compile)

    def calibrate(cfg: ITAEConfig):
        # Forking DataLoader workers from a process that already runs Ray is fragile: decode
        # in-process then (calibration reads only a few hundred images).
        workers = 0 if ray_running else default_num_workers(device)
        return calibrate_source(
            bb, src, build_transform(preprocess), cfg, opts.calibration_images, opts.batch_size, opts.chunk_size,
            out_dir, num_workers=workers, device=device, max_pixels=opts.max_pixels, fast_decode=opts.fast_decode,
            kept=kept,
        )

    try:
        opened = open_writer(out_dir, existing, manifest, itae, overwrite=overwrite, calibrate=calibrate)
        if isinstance(opened, EmbeddingStore):
            return opened
        writer, run_cfg = opened
        assembler = ChunkAssembler(writer, src)
        if kept is not None and kept.batches:
            for batch, emb in embed_kept(bb, kept, run_cfg, opts.feature, opts.normalize, opts.fast_cls):
                assembler.add(batch["index"].numpy(), None if emb is None else emb.cpu().numpy(),
                              zip(batch["failed_index"], batch["failed_reason"], strict=True))
    finally:
        # The actors load their own replicas; the driver's copy would only hold (GPU) memory.
        bb = None  # noqa: F841 - drops the last reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return src, assembler, preprocess, run_cfg


@contextmanager
def _ray_session(ray, address: str | None) -> Iterator[None]:
    """Use the Ray instance of this process, else start or join one; shut down only one started here."""
    if ray.is_initialized():
        if address is not None:
            logger.warning("Ray is already initialised in this process; using it and ignoring address=%r",
                           address)
        yield
        return
    if address is None:
        # Workers' logs stay in Ray's log folder; errors still reach the driver as exceptions.
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address)
    try:
        yield
    finally:
        ray.shutdown()


def _run_pipeline(
    ray,
    src: ImageSource,
    preprocess: Preprocess,
    assembler: ChunkAssembler,
    todo: list[int],
    mspec: ModelSpec,
    opts: EmbedOptions,
    *,
    config: ITAEConfig | None,
    num_actors: int,
    num_gpus_per_actor: float | None,
    num_decoders: int | None,
    progress: bool,
) -> None:
    """Stream the missing chunks through the Ray pipeline; the assembler commits each chunk once complete.

    Chunks the assembler holds partly already (the driver's results) are not sent again.
    """
    writer: StoreWriter = assembler.writer
    resources = ray.cluster_resources()
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1 if resources.get("GPU", 0) > 0 else 0
    model_cpus = 1
    if num_decoders is None and num_gpus_per_actor > 0:
        spare = int(resources.get("CPU", 1)) - num_actors * model_cpus
        decoders = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, spare))
    elif num_decoders:
        decoders = ray.data.ActorPoolStrategy(size=num_decoders)
    else:
        # CPU model actors: a separate decoding stage would compete for the same CPUs and add a copy of
        # every image through the object store; each actor decodes its own batches instead.
        decoders = None
    decode_args = dict(source=src, preprocess=preprocess, max_pixels=opts.max_pixels, fast_decode=opts.fast_decode)

    have = {k: b.records() for k, b in assembler.buffers.items()}
    indices = [i for k in todo for i in range(*writer.chunk_bounds(k)) if i not in have.get(k, ())]
    if not indices:
        if assembler.buffers:
            raise RuntimeError(f"chunks {sorted(assembler.buffers)} are complete but were not committed")
        return
    batch_size = opts.batch_size
    blocks = min(_MAX_INPUT_BLOCKS, -(-len(indices) // batch_size))
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order)
    ctx.enable_progress_bars = False  # one bar, ours, as the local path shows
    # Results may come out of order (faster throughput); the driver holds only chunks not yet complete.
    ctx.execution_options.preserve_order = False
    try:
        ds = ray.data.from_items(indices, override_num_blocks=blocks)  # one column, "item"
        if decoders is not None:
            ds = ds.map_batches(_Decoder, fn_constructor_kwargs=decode_args, batch_size=batch_size,
                                batch_format="numpy", compute=decoders, num_cpus=1)
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_kwargs=dict(model=mspec.name, arch=mspec.arch, precision=mspec.precision,
                                       resolution=mspec.resolution,
                                       config=None if config is None else config.to_dict(), feature=opts.feature,
                                       normalize=opts.normalize, fast_cls=opts.fast_cls, preprocess=preprocess,
                                       decode=decode_args if decoders is None else None, compile=opts.compile),
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=num_gpus_per_actor, num_cpus=model_cpus,
        )
        logger.info("extracting %d images on Ray: %d model actor(s) with %s GPU each; decoding %s",
                    len(indices), num_actors, num_gpus_per_actor,
                    "in the model actors" if decoders is None else "on CPU actors")
        bar = tqdm(total=len(src), initial=len(src) - len(indices), unit="img", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True, desc="embedding (ray)")
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                index, reason = np.asarray(batch["index"], dtype=np.int64), batch["reason"]
                ok = np.array([r == "" for r in reason], dtype=bool)  # rows of failed records are zero
                assembler.add(index[ok], batch["embedding"][ok],
                              ((int(index[j]), str(reason[j])) for j in np.flatnonzero(~ok)))
                bar.update(len(index))
        finally:
            bar.close()
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved
    assembler.check_done("the Ray pipeline")


__all__ = ["embed_ray"]
