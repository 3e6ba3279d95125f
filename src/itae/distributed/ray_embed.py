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

from itae.config import ITAEConfig
from itae.data.extract import Feature, Precision, resolve_precision
from itae.data.sources import ImageSource, LabelMode
from itae.data.store import EmbeddingStore, StoreWriter
from itae.errors import InputError, InputTypeError, MissingDependencyError
from itae.models.base import Preprocess

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
        from itae.data.dataset import ImageDataset
        from itae.data.decode import build_transform

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
        from itae.data.decode import build_transform
        from itae.engine.fast import supports_fast_cls
        from itae.models.loading import load_backbone

        # Ray exposes only the GPUs granted to this actor; none granted means CPU.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from itae.models.fp8 import apply_precision

        self.backbone = apply_precision(
            load_backbone(model, arch=arch, device=device, dtype=resolve_precision(precision), resolution=resolution),
            precision,
        )
        self.config = None if config is None else ITAEConfig.from_dict(config)
        self.feature = feature
        self.normalize = normalize
        self.dim = self.backbone.embed_dim * (2 if feature == "cls+mean" else 1)
        # The same choice as the local path: the CLS-only fast forward wherever it computes the same thing.
        self.fast = fast_cls and feature == "cls" and supports_fast_cls(self.backbone, self.config)
        if compile:  # as the local path: only where no ITAE hooks run; compiled for the actor's lifetime
            if self.config is not None and not self.fast:
                logger.warning("compile ignored: this ITAE config runs through hooks, which compiled blocks would break")
            else:
                from itae.engine.fast import compiled_blocks

                compiled_blocks(self.backbone).__enter__()
        self.transform = build_transform(preprocess)
        self.decoder = None if decode is None else _Decoder(**decode)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        from itae.data.extract import pool_features
        from itae.models.base import Features

        bb = self.backbone
        if self.fast:
            from itae.engine.fast import forward_cls

            features = Features(cls=forward_cls(bb, x, self.config)[0])
        elif self.config is not None:
            from itae.engine.patch import attenuate

            with attenuate(bb, self.config):  # hooks live for this batch only; restored even on error
                features = bb.forward_features(x)
        else:
            features = bb.forward_features(x)
        return pool_features(features, self.feature, self.normalize)  # (B, D) float32

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
            from itae.data.extract import _to_device

            bb = self.backbone
            x = torch.from_numpy(np.array(batch["pixels"][ok], dtype=np.uint8))  # (b, 3, S, S), writable
            with torch.inference_mode():
                # The local path's own step: uint8 to the device, normalised there, cast to the model dtype.
                emb = self._forward(_to_device(x, self.transform, bb.device, bb.dtype))
            out[ok] = emb.cpu().numpy()
        return {"index": index, "embedding": out, "reason": np.asarray(reason, dtype=object)}


# ----------------------------------------------------------------------------------------- driver


def embed_ray(
    source: str | os.PathLike | ImageSource,
    backbone_name: str | os.PathLike = "facebook/dinov2-base",
    *,
    out: str | os.PathLike,
    arch: str | None = None,
    itae: ITAEConfig | None = ITAEConfig(),
    feature: Feature = "cls",
    normalize: bool = False,
    batch_size: int = 64,
    precision: Precision = "fp32",
    resolution: int | None = None,
    labels: LabelMode = "none",
    image_column: str = "image",
    label_column: str = "label",
    split: str | None = None,
    hf_config: str | None = None,
    max_pixels: int | None = None,
    fast_decode: bool = False,
    compile: bool = False,
    address: str | None = None,
    num_actors: int = 1,
    num_gpus_per_actor: float | None = None,
    num_decoders: int | None = None,
    calibration_images: int = 512,
    chunk_size: int = 4096,
    fast_cls: bool = True,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
) -> EmbeddingStore:
    """``itae.embed`` as Ray Data batch inference: decoding on CPU actors, the model on ``num_actors`` actors.

    Writes the same store as ``itae.embed`` (same layout, settings, chunks, ``errors.csv``), resumable by
    either engine. Arguments shared with ``itae.embed`` mean the same; the others:

    backbone_name, arch: a model name or path that every Ray worker can load (``itae.load_backbone``).
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
    from itae.data import extract as local

    if not isinstance(backbone_name, (str, os.PathLike)):
        raise InputTypeError(
            f"the Ray engine loads the model by name in each actor; pass a model name or path, not a "
            f"{type(backbone_name).__name__} (for an in-memory model use itae.embed)"
        )
    dtype = local.check_embed_arguments(
        feature=feature, precision=precision, itae=itae, fast_decode=fast_decode,
        counts={"num_decoders": num_decoders},
        batch_size=batch_size, chunk_size=chunk_size, calibration_images=calibration_images, num_actors=num_actors,
    )
    if num_gpus_per_actor is not None and not num_gpus_per_actor >= 0:
        raise InputError(f"num_gpus_per_actor must be >= 0 or None; got {num_gpus_per_actor!r}")
    if address is not None and not isinstance(address, str):
        raise InputTypeError(f"address must be None, 'auto' or 'ray://host:port'; got {type(address).__name__}")

    prepared = _prepare_store(
        local, source, os.fspath(backbone_name), arch=arch, out=out, itae=itae, feature=feature,
        normalize=normalize, batch_size=batch_size, precision=precision, dtype=dtype,
        resolution=resolution, labels=labels, image_column=image_column, label_column=label_column,
        split=split, hf_config=hf_config, max_pixels=max_pixels, fast_decode=fast_decode,
        calibration_images=calibration_images, fast_cls=fast_cls, compile=compile,
        chunk_size=chunk_size, resume=resume, overwrite=overwrite, ray_running=ray.is_initialized(),
    )
    if isinstance(prepared, EmbeddingStore):  # already complete
        return prepared
    src, writer, preprocess, run_cfg, buffers = prepared

    done = set(writer.committed_chunks())
    todo = [k for k in range(writer.num_chunks) if k not in done]
    if todo:
        with _ray_session(ray, address):
            _run_pipeline(
                ray, local, src, preprocess, writer, todo, model=os.fspath(backbone_name), arch=arch,
                precision=precision, resolution=resolution, config=run_cfg, feature=feature,
                normalize=normalize, batch_size=batch_size, max_pixels=max_pixels, fast_decode=fast_decode,
                fast_cls=fast_cls, compile=compile,
                num_actors=num_actors, num_gpus_per_actor=num_gpus_per_actor, num_decoders=num_decoders,
                progress=progress, buffers=buffers,
            )

    errors = writer.error_rows()
    if len(errors) == len(src):  # as the local path: keep only errors.csv, no store that looks usable
        from itae.data.store import MANIFEST, remove_chunks, write_errors_csv

        write_errors_csv(writer.out, errors)
        remove_chunks(writer.out)
        (writer.out / MANIFEST).unlink()
        raise InputError(local._all_failed_message(src, writer.out, errors[0]))
    store = writer.finalize()
    logger.info("embedded %d of %d images into %s with Ray (%d failed)", len(store), len(src), writer.out,
                len(errors))
    return store


def _prepare_store(
    local,
    source: str | os.PathLike | ImageSource,
    model: str,
    *,
    arch: str | None,
    out: str | os.PathLike,
    itae: ITAEConfig | None,
    feature: Feature,
    normalize: bool,
    batch_size: int,
    precision: str,
    dtype: torch.dtype,
    resolution: int | None,
    labels: LabelMode,
    image_column: str,
    label_column: str,
    split: str | None,
    hf_config: str | None,
    max_pixels: int | None,
    fast_decode: bool,
    calibration_images: int,
    fast_cls: bool,
    compile: bool,
    chunk_size: int,
    resume: bool,
    overwrite: bool,
    ray_running: bool,
) -> EmbeddingStore | tuple[ImageSource, StoreWriter, Preprocess, ITAEConfig | None, dict[int, Any]]:
    """Open the source and the store folder as ``itae.embed`` does: the same manifest, the same resume
    rules and the same calibration, so the stores of both engines are interchangeable. The batches the
    calibration pass read are embedded here, on the driver, from the tokens it kept (as ``itae.embed``
    does): the actors get only the other records.

    Returns the finished store when it is already complete, else (source, writer, preprocess, config,
    chunk buffers holding the driver's results).
    """
    from itae.data.sources import open_source

    # Cheap checks first: a bad source creates no output folder, a bad output folder loads no model.
    src = open_source(source, labels=labels, image_column=image_column, label_column=label_column,
                      split=split, hf_config=hf_config)
    out_dir, existing = local.open_output(out, resume=resume, overwrite=overwrite)
    # The driver loads the model once: for the manifest (name, width, preprocessing) and for calibration.
    from itae.models.loading import load_backbone

    device = local.resolve_device("auto")
    from itae.models.fp8 import apply_precision

    bb = apply_precision(load_backbone(model, arch=arch, device=device, dtype=dtype, resolution=resolution),
                         precision)
    preprocess = bb.preprocess  # the resolution is already applied
    manifest = local.new_manifest(
        bb, preprocess, src, name=model, itae=itae, feature=feature, normalize=normalize, precision=precision,
        calibration_images=calibration_images, chunk_size=chunk_size, labels=labels, fast_decode=fast_decode,
        engine="ray",  # not a setting (resume ignores it): which engine started the store
    )

    kept = local.new_kept_batches(bb, itae, compile)

    def calibrate(cfg: ITAEConfig):
        from itae.data.decode import build_transform

        # Forking DataLoader workers from a process that already runs Ray is fragile: decode
        # in-process then (calibration reads only a few hundred images).
        workers = 0 if ray_running else local.default_num_workers(device)
        return local._calibrate(
            bb, src, build_transform(preprocess), cfg, calibration_images, batch_size, chunk_size, out_dir,
            num_workers=workers, device=device, max_pixels=max_pixels, fast_decode=fast_decode, kept=kept,
        )

    buffers: dict[int, Any] = {}
    try:
        opened = local.open_writer(out_dir, existing, manifest, itae, overwrite=overwrite, calibrate=calibrate)
        if kept is not None and kept.batches and not isinstance(opened, EmbeddingStore):
            writer, run_cfg = opened
            for batch, emb in local.embed_kept(bb, kept, run_cfg, feature, normalize, fast_cls):
                _gather(local, writer, src, buffers, _result_rows(batch, emb, writer.dim))
    finally:
        # The actors load their own replicas; the driver's copy would only hold (GPU) memory.
        bb = None  # noqa: F841 - drops the last reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if isinstance(opened, EmbeddingStore):
        return opened
    writer, run_cfg = opened
    return src, writer, preprocess, run_cfg, buffers


def _result_rows(batch: dict[str, Any], emb: torch.Tensor | None, dim: int) -> dict[str, np.ndarray]:
    """A local batch and its embeddings as the rows the model actors return (failed rows zero)."""
    index = batch["index"].tolist() + list(batch["failed_index"])
    out = np.zeros((len(index), dim), dtype=np.float32)
    if emb is not None:
        out[: len(batch["index"])] = emb.cpu().numpy()
    reasons = [""] * len(batch["index"]) + list(batch["failed_reason"])
    return {"index": np.asarray(index, dtype=np.int64), "embedding": out, "reason": np.asarray(reasons, dtype=object)}


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
    local,
    src: ImageSource,
    preprocess: Preprocess,
    writer: StoreWriter,
    todo: list[int],
    *,
    model: str,
    arch: str | None,
    precision: str,
    resolution: int | None,
    config: ITAEConfig | None,
    feature: Feature,
    normalize: bool,
    batch_size: int,
    max_pixels: int | None,
    fast_decode: bool,
    fast_cls: bool,
    compile: bool,
    num_actors: int,
    num_gpus_per_actor: float | None,
    num_decoders: int | None,
    progress: bool,
    buffers: dict[int, Any] | None = None,
) -> None:
    """Stream the missing chunks through the Ray pipeline and commit each chunk once it is complete.

    ``buffers``: chunks partly filled already (by the driver); their records are not sent again.
    """
    from tqdm.auto import tqdm

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
    decode_args = dict(source=src, preprocess=preprocess, max_pixels=max_pixels, fast_decode=fast_decode)

    buffers = {} if buffers is None else buffers
    have = {k: {int(i) for part in b.index for i in part} | {i for i, _ in b.failed} for k, b in buffers.items()}
    indices = [i for k in todo for i in range(*writer.chunk_bounds(k)) if i not in have.get(k, ())]
    if not indices:
        if buffers:
            raise RuntimeError(f"chunks {sorted(buffers)} are complete but were not committed")
        return
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
            fn_constructor_kwargs=dict(model=model, arch=arch, precision=precision, resolution=resolution,
                                       config=None if config is None else config.to_dict(), feature=feature,
                                       normalize=normalize, fast_cls=fast_cls, preprocess=preprocess,
                                       decode=decode_args if decoders is None else None, compile=compile),
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
                _gather(local, writer, src, buffers, batch)
                bar.update(len(batch["index"]))
        finally:
            bar.close()
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved
    if buffers:
        raise RuntimeError(f"the Ray pipeline ended with unfinished chunks {sorted(buffers)}")


def _gather(
    local, writer: StoreWriter, src: ImageSource, buffers: dict[int, Any], batch: dict[str, np.ndarray]
) -> None:
    """Add one result batch to its chunks' buffers (a batch may span chunks) and commit complete chunks."""
    index = np.asarray(batch["index"], dtype=np.int64)
    reason = batch["reason"]
    emb = batch["embedding"]  # (B, D); rows of failed records are zero and ignored
    ok = np.array([r == "" for r in reason], dtype=bool)
    if ok.any():
        local._check_finite(torch.from_numpy(np.ascontiguousarray(emb[ok])), torch.from_numpy(index[ok]), src)
        if emb.shape[1] != writer.dim:
            raise RuntimeError(f"the model gave {emb.shape[1]}-d embeddings, expected {writer.dim}")
    chunk = index // writer.chunk_size
    for k in np.unique(chunk).tolist():
        rows = chunk == k
        start, stop = writer.chunk_bounds(k)
        buf = buffers.setdefault(k, local._ChunkBuffer(stop - start))
        good = rows & ok
        if good.any():
            buf.index.append(index[good])
            buf.embeddings.append(np.asarray(emb[good], dtype=np.float32))
        bad = np.flatnonzero(rows & ~ok)
        buf.failed.extend((int(index[j]), str(reason[j])) for j in bad)
        buf.seen += int(rows.sum())
        if buf.seen == buf.size:
            local._commit(writer, k, buffers.pop(k), src)
        elif buf.seen > buf.size:
            raise RuntimeError(f"chunk {k} received {buf.seen} results for {buf.size} records")


__all__ = ["embed_ray"]
