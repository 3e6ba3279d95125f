"""The store session both engines share: open the output folder, build the manifest, resume or start a
writer (calibrating a new store's "auto" threshold first), and finish: finalise, or clean up when no image
could be decoded."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from itae.config import ITAEConfig
from itae.data.sources import ImageSource
from itae.data.store import (
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
from itae.errors import InputError
from itae.methods import TTRConfig
from itae.models.base import Backbone, Preprocess

from .options import embedding_dim

logger = logging.getLogger("itae.extraction")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}



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
        "dim": embedding_dim(bb.embed_dim, feature),
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


def all_failed_message(src: ImageSource, out_dir: Path, example: tuple[int, str, str] | None) -> str:
    hint = f" (e.g. {example[1]!r}: {example[2]})" if example else ""
    return (
        f"none of the {len(src)} images of {src.spec!r} could be decoded{hint}; reasons are listed in "
        f"{str(out_dir / ERRORS)!r}; no embeddings were written"
    )


def finish_store(writer: StoreWriter, src: ImageSource, engine: str = "") -> EmbeddingStore:
    """The finished store; when no image of ``src`` decoded, only ``errors.csv`` is kept (no store that
    looks usable) and the error says why."""
    errors = writer.error_rows()
    if len(errors) == len(src):
        write_errors_csv(writer.out, errors)
        remove_chunks(writer.out)
        (writer.out / MANIFEST).unlink()
        raise InputError(all_failed_message(src, writer.out, errors[0]))
    store = writer.finalize()
    logger.info("embedded %d of %d images into %s%s (%d failed, see %s)", len(store), len(src), writer.out,
                f" with {engine}" if engine else "", len(errors), ERRORS)
    return store


__all__ = ["all_failed_message", "finish_store", "new_manifest", "open_output", "open_writer", "ttr_manifest"]
