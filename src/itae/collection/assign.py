"""Put new images into the clusters of an earlier run: ``itae assign NEW --clusters OUT -o OUT2``.

The new images are embedded exactly as the reference store's were (its model, precision, preprocessing,
feature, normalisation, and its ITAE configuration with the thresholds calibrated then: no
recalibration), into ``OUT2/embeddings``; each is given the cluster of the nearest saved centroid.
Writes ``OUT2/assignments.csv`` (``path, cluster, label, distance``), ``OUT2/errors.csv`` and
``OUT2/assign.json``, each whole or not at all.

The reference is a run folder (``itae run``), or a folder that ``itae cluster`` wrote: it holds
``assignments.csv``, ``clustering.json`` and, since centroids are saved, ``centroids.npy``. For an older
folder without ``centroids.npy`` the centroids are recomputed as the mean of each cluster's embeddings
(unit norm for spherical k-means), which are k-means' own centroids.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itae.errors import InputError

from .._io import atomic_write, atomic_write_text
from ..clustering.centroids import centroids_from_labels, nearest_centroid
from ..data.store import EmbeddingStore, StoreError, library_versions, prepare_output
from ..pipeline import ASSIGNMENTS, CENTROIDS, CLUSTERING, ERRORS, STORE_DIR, read_assignments

ASSIGN_RECORD = "assign.json"


@dataclass(frozen=True)
class Reference:
    """The clusters new images are assigned to: the store they were made from and their centroids."""

    folder: Path
    store: EmbeddingStore
    cluster_ids: np.ndarray  # (k,) cluster id of each centroid row
    centers: np.ndarray  # (k, d) float32
    spherical: bool
    centroids_source: str  # "centroids.npy" or "recomputed from assignments.csv"


def find_reference_store(folder: Path) -> EmbeddingStore:
    """The embedding store behind a run or cluster folder: ``folder/embeddings``, the store named in
    ``clustering.json``, or ``folder`` itself (``itae cluster STORE`` writes beside the store)."""
    candidates = [folder / STORE_DIR, folder]
    clustering = _read_clustering(folder)
    if clustering.get("store"):
        candidates.insert(1, Path(clustering["store"]))
    for c in candidates:
        if (c / "manifest.json").is_file():
            return EmbeddingStore(c)
    raise FileNotFoundError(
        f"no embedding store found for {str(folder)!r} (looked in {', '.join(repr(str(c)) for c in candidates)}); "
        "give the folder of an itae run or of itae cluster"
    )


def _read_clustering(folder: Path) -> dict[str, Any]:
    p = folder / CLUSTERING
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {str(p)!r}: {e}") from None


def load_reference(clusters: str | os.PathLike) -> Reference:
    """Open the reference clusters (see the module docstring) and their centroids."""
    folder = Path(clusters)
    if not folder.is_dir():
        raise FileNotFoundError(f"clusters={str(folder)!r} is not a folder; give the output folder of itae run "
                                "or itae cluster")
    if not (folder / ASSIGNMENTS).is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no {ASSIGNMENTS}; give the output folder of itae run or "
                                "itae cluster")
    store = find_reference_store(folder)
    emb = store.embeddings(mmap=True)
    spherical = bool(_read_clustering(folder).get("spherical", False))
    centroid_file = folder / CENTROIDS
    if centroid_file.is_file():
        centers = np.load(centroid_file, allow_pickle=False)
        if centers.ndim != 2 or centers.shape[1] != emb.shape[1]:
            raise StoreError(f"{str(centroid_file)!r} has shape {centers.shape}, which does not fit the store's "
                             f"{emb.shape[1]}-dimensional embeddings")
        return Reference(folder, store, np.arange(centers.shape[0], dtype=np.int64), centers.astype(np.float32),
                         spherical, CENTROIDS)
    data = read_assignments(folder / ASSIGNMENTS)
    if data["ids"] != store.ids:
        raise StoreError(f"{str(folder / ASSIGNMENTS)!r} does not list the images of the store "
                         f"{str(store.path)!r} in its order; cannot recompute the centroids")
    ids, centers = centroids_from_labels(emb, data["clusters"], spherical=spherical)
    return Reference(folder, store, ids, centers, spherical, f"recomputed from {ASSIGNMENTS}")


def same_model(given: str, stored: str) -> bool:
    """Whether a model name given now names the store's model (same text, same known model, same path)."""
    from ..models.loading import canonical_name

    if given.strip() == stored.strip():
        return True
    canon = canonical_name(given)
    if canon is not None and canon == canonical_name(stored):
        return True
    a, b = Path(given).expanduser(), Path(stored).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def assign(
    data: str | os.PathLike,
    clusters: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    arch: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    labels: str = "none",
    split: str | None = None,
    hf_config: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Embed the images of ``data`` as the reference store was embedded and assign each to the nearest
    centroid of ``clusters`` (a run or cluster folder); write the results under ``out``. Returns the record
    written to ``out/assign.json``.

    model: optional; when given it must name the reference store's model (anything else is refused, since
    the centroids live in that model's embedding space). arch: the architecture of a bare checkpoint file.
    labels and the other source options read ``data`` as ``itae run`` does; labels, when known, are
    copied into assignments.csv.
    """
    from ..data.sources import open_source
    from ..extraction.local import embed
    from ..models.spec import ModelSpec, resolve_device

    ref = load_reference(clusters)
    manifest = ref.store.manifest
    if model is not None and not same_model(str(model), ref.store.model):
        raise InputError(
            f"the clusters in {str(ref.folder)!r} were made with model {ref.store.model!r}, not {str(model)!r}; "
            "new images must be embedded with the same model: pass model=None"
        )
    out = Path(out)
    if out.resolve() == ref.folder.resolve():
        raise InputError(f"the output folder {str(out)!r} is the reference folder; give another -o (the "
                         "reference's assignments.csv would be replaced)")
    source = open_source(data, labels=labels, image_column=image_column, label_column=label_column, split=split,
                         hf_config=hf_config)
    out = prepare_output(out)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    t0 = time.perf_counter()
    precision = str(manifest["precision"])
    preprocess = dict(manifest["preprocess"])
    fast_decode = bool(preprocess.pop("fast_decode", False))
    dev = resolve_device(device)
    backbone = ModelSpec(ref.store.model, arch=arch, device=dev, precision=precision,
                         resolution=int(preprocess["image_size"])).load()
    loaded = json.loads(json.dumps(backbone.preprocess.to_dict()))
    if loaded != preprocess:
        diffs = sorted(k for k in {**loaded, **preprocess} if loaded.get(k) != preprocess.get(k))
        raise InputError(
            f"the model {ref.store.model!r} now prepares images differently from when the reference store was "
            f"made ({', '.join(f'{k}: store {preprocess.get(k)!r}, now {loaded.get(k)!r}' for k in diffs)})"
        )
    itae_cfg = ref.store.itae_config
    if itae_cfg is not None and not itae_cfg.is_calibrated:  # a store always holds resolved thresholds
        raise StoreError(f"the store {str(ref.store.path)!r} holds no calibrated ITAE thresholds")
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    new_store = embed(
        source, backbone, out=out / STORE_DIR, itae=itae_cfg, feature=manifest["feature"],
        normalize=bool(manifest["normalize"]), batch_size=batch_size, num_workers=num_workers, device=dev,
        precision=precision, fast_decode=fast_decode, labels=labels, progress=progress, overwrite=overwrite,
    )
    t_embed = time.perf_counter() - t0
    if new_store.manifest.get("itae") != manifest.get("itae"):  # e.g. a resumed store made otherwise
        raise StoreError(f"{str(new_store.path)!r} was embedded with ITAE settings other than the reference's; "
                         "use another out folder or overwrite=True")

    emb = new_store.embeddings(mmap=True)
    cluster_of, distance = nearest_centroid(emb, ref.centers, spherical=ref.spherical, cluster_ids=ref.cluster_ids)
    new_labels = new_store.labels
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "cluster", "label", "distance"])
    for i, ident in enumerate(new_store.ids):
        writer.writerow([ident, int(cluster_of[i]), "" if new_labels is None else new_labels[i],
                         f"{float(distance[i]):.6g}"])
    atomic_write_text(out / ASSIGNMENTS, buf.getvalue())
    atomic_write(out / ERRORS, lambda f: f.write((new_store.path / ERRORS).read_bytes()))

    ids, counts = np.unique(cluster_of, return_counts=True)
    record: dict[str, Any] = {
        "status": "complete",
        "started": started,
        "data": str(data),
        "clusters": str(ref.folder),
        "reference_store": str(ref.store.path),
        "model": ref.store.model,
        "itae": None if itae_cfg is None else itae_cfg.to_dict(),
        "centroids": ref.centroids_source,
        "spherical": ref.spherical,
        "n_images": len(new_store),
        "n_errors": len(new_store.errors),
        "per_cluster": {int(c): int(n) for c, n in zip(ids, counts)},
        "distance": {"median": float(np.median(distance)), "max": float(distance.max())},
        "versions": {**library_versions(), "python": platform.python_version()},
        "timings": {"load_model_s": t_load, "embed_s": t_embed},
    }
    atomic_write_text(out / ASSIGN_RECORD, json.dumps(record, indent=2) + "\n")
    return record


__all__ = ["ASSIGN_RECORD", "Reference", "assign", "find_reference_store", "load_reference", "same_model"]
