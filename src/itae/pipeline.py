"""From images to scored clusters: the steps behind ``itae run``, as a Python API.

``run`` = ``itae.embed`` (into ``OUT/embeddings``) -> ``cluster_store`` (``OUT/assignments.csv`` and
``OUT/clustering.json``) -> ``evaluate_assignments`` (``OUT/metrics.json``, when labels are known) -> report
(``OUT/report.html``), with ``OUT/errors.csv`` and ``OUT/run.json`` (resolved configuration, versions,
timings; ``"status"``: ``"running"``, then ``"finished"``, or ``"failed"`` with the error). A run replaces an
earlier run's outputs in OUT. Every argument is checked before the output folder is touched; the folder is
locked while a run uses it (``itae._lock``); every file is written whole or not at all (temporary file,
then rename).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from itae.errors import InputError

from ._io import ID_ERRORS, atomic_write, atomic_write_text
from ._lock import folder_lock
from .config import ITAEConfig
from .data.dataset import spread_indices
from .data.spec import SourceSpec
from .data.store import EmbeddingStore, library_versions
from .extraction.local import embed
from .extraction.options import EmbedOptions, build_specs, check_itae
from .methods import TTRConfig
from .models.loading import DEFAULT_MODEL
from .models.spec import ModelSpec, resolve_device

log = logging.getLogger("itae")

ASSIGNMENTS = "assignments.csv"
METRICS = "metrics.json"
RUN = "run.json"
REPORT = "report.html"
CLUSTERING = "clustering.json"
CENTROIDS = "centroids.npy"
ERRORS = "errors.csv"
INSPECT_DIR = "inspect"
STORE_DIR = "embeddings"
# What a run writes besides its (resumable) store: removed when a new run starts in the same folder, so
# no file of an earlier run (another k, labels, --no-report) is left looking like this run's.
RUN_OUTPUTS = (ASSIGNMENTS, METRICS, REPORT, CLUSTERING, ERRORS, RUN, CENTROIDS)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def check_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and prove it writable, before any work is done (the store's own check)."""
    from .data.store import prepare_output

    return prepare_output(out)


def check_k(k: int | None, n: int | None = None) -> None:
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k must be an integer; got {k!r}")
    if k < 1:
        raise InputError(f"k must be at least 1; got {k}")
    if n is not None and k > n:
        raise InputError(f"k={k} is larger than the number of images ({n})")


# --------------------------------------------------------------------------------------- cluster


def cluster_store(
    store: str | os.PathLike | EmbeddingStore,
    k: int | None,
    *,
    out: str | os.PathLike,
    method: str = "kmeans",
    seeds: Sequence[int] = (0,),
    spherical: bool = False,
    **kw: Any,
):
    """Cluster the embeddings of a finished store; write ``out/assignments.csv``; return the ClusterResult.

    assignments.csv: ``path, cluster, label, distance`` (label empty when unknown; distance to the
    cluster's centroid), plus ``cluster_seed<S>`` columns when several seeds ran. ``out/centroids.npy``
    (k, d) float32 holds the first seed's centroids, row i for cluster i (unit norm when spherical), for
    ``itae assign``.
    """
    from .clustering import check_cluster_arguments, cluster

    check_k(k)
    check_cluster_arguments(k, method=method, seeds=seeds, spherical=spherical, **kw)
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    out = check_output_dir(out)
    emb = store.embeddings(mmap=True)
    check_k(k, emb.shape[0])
    result = cluster(emb, k, method=method, seeds=tuple(seeds), spherical=spherical, **kw)
    atomic_write(out / CENTROIDS, lambda f: np.save(f, np.ascontiguousarray(result.centers, dtype=np.float32)))
    _write_json(out / CLUSTERING, {
        "store": str(store.path), "method": method, "k": result.k, "k_requested": k, "seeds": list(seeds),
        "spherical": spherical, "params": result.params, "k_scores": result.k_scores,
    })
    labels = store.labels
    extra_seeds = [s for s in result.per_seed_labels if len(result.per_seed_labels) > 1]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "cluster", "label", "distance", *[f"cluster_seed{s}" for s in extra_seeds]])
    for i, ident in enumerate(store.ids):
        d = result.distances[i]
        writer.writerow([
            ident, int(result.labels[i]), "" if labels is None else labels[i],
            "" if not np.isfinite(d) else f"{float(d):.6g}",
            *[int(result.per_seed_labels[s][i]) for s in extra_seeds],
        ])
    atomic_write_text(out / ASSIGNMENTS, buf.getvalue(), errors=ID_ERRORS)  # ids as the store has them
    return result


# -------------------------------------------------------------------------------------- evaluate


def read_assignments(path: str | os.PathLike) -> dict[str, Any]:
    """Columns of an assignments.csv: ids, clusters, labels (None if absent), per-seed clusters."""
    path = Path(path)
    if path.is_dir():
        path = path / ASSIGNMENTS
    if not path.is_file():
        raise FileNotFoundError(f"no assignments file at {str(path)!r}; run itae cluster first")
    with open(path, newline="", encoding="utf-8", errors=ID_ERRORS) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(f"{str(path)!r} holds no assignments")
    missing = [c for c in ("path", "cluster", "label") if c not in rows[0]]
    if missing:
        raise InputError(f"{str(path)!r} is not an assignments file: no column {', '.join(missing)}")
    try:
        seeds = {int(c[len("cluster_seed"):]): [int(r[c]) for r in rows] for c in rows[0] if c.startswith("cluster_seed")}
        clusters = np.array([int(r["cluster"]) for r in rows])
    except (TypeError, ValueError) as e:  # a short row (None) or a cluster that is no integer
        raise InputError(f"{str(path)!r} holds a cluster that is not an integer ({e})") from None
    labels = [r["label"] for r in rows]
    return {
        "ids": [r["path"] for r in rows],
        "clusters": clusters,
        "labels": None if all(v == "" for v in labels) else labels,
        "per_seed": {s: np.array(v) for s, v in seeds.items()},
    }


def evaluate_assignments(assignments: str | os.PathLike, *, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score an assignments.csv against its labels; write ``metrics.json`` beside it (or in ``out``).

    With several seeds, ``acc``/``nmi``/``ari``/``purity`` are those of the first seed's run and
    ``mean``/``std`` summarise all seeds.
    """
    from .metrics import evaluate, summarize

    path = Path(assignments)
    data = read_assignments(path)
    if data["labels"] is None:
        raise InputError("the assignments have no labels to score against (embed with labels, e.g. labels='from-folders')")
    missing = sum(1 for v in data["labels"] if v == "")
    if missing:
        raise InputError(f"{missing} of {len(data['labels'])} images have no label; scores need every label")
    metrics: dict[str, Any] = dict(evaluate(data["labels"], data["clusters"]))
    if data["per_seed"]:
        runs = [dict(evaluate(data["labels"], labels), seed=s) for s, labels in data["per_seed"].items()]
        metrics["seeds"] = runs
        summary = summarize(runs)
        scores = ("acc", "nmi", "ari", "purity")
        metrics["n_runs"] = summary["n_runs"]
        metrics["mean"] = {k: summary[k]["mean"] for k in scores}
        metrics["std"] = {k: summary[k]["std"] for k in scores}
    folder = Path(out) if out is not None else (path if path.is_dir() else path.parent)
    _write_json(folder / METRICS, metrics)
    return metrics


# ------------------------------------------------------------------------------------------- run


def _sample_pixels(backbone, source, n_images: int, *, spread: bool = False):
    """Up to ``n_images`` decodable images of ``source`` (the first ones, or spread evenly), preprocessed."""
    from .diagnostics import read_images

    first = spread_indices(len(source), n_images) if spread else []
    order = first + [i for i in range(len(source)) if i not in set(first)]
    batch = read_images(backbone, source, limit=n_images, order=order)
    return batch.pixels, batch.names


SELF_CHECK_IMAGES = 64


def self_check(store: EmbeddingStore, backbone, source, n_images: int = SELF_CHECK_IMAGES) -> dict[str, Any]:
    """What ITAE flagged in this run and whether those are sinks (``Calibration.self_check``), plus ``status``.

    status: "off" (no ITAE), "flagging" or "nothing flagged". The check of a calibrated store is the one
    its calibration made; numeric thresholds given by the user are checked on ``n_images`` images
    spread over the source.
    """
    from .engine.calibrate import check_thresholds

    cfg = store.itae_config
    if cfg is None:
        return {"status": "off", "summary": "ITAE off: the unmodified model (baseline)"}
    check = ((store.manifest.get("calibration") or {}).get("self_check"))
    if check is None:
        x, _ = _sample_pixels(backbone, source, n_images, spread=True)
        if x is None:
            return {"status": "unchecked", "summary": "ITAE on; no decodable image to check it on"}
        check = check_thresholds(backbone, x, cfg).self_check()
    check = dict(check)
    check["status"] = "flagging" if check["flagged"] else "nothing flagged"
    return check


def self_check_line(check: dict[str, Any]) -> str:
    """The one line a run prints about ITAE."""
    if check["status"] in ("off", "unchecked"):
        return check["summary"]
    if check["status"] == "nothing flagged":
        return ("ITAE on, but nothing flagged: the embeddings are the unmodified model's; "
                + check["summary"])
    return "ITAE self-check: " + check["summary"]


def _warn_self_check(check: dict[str, Any]) -> None:
    if check["status"] == "nothing flagged" and not check.get("calibrated", True):
        log.warning("itae: the threshold(s) given flag no patch on %d sample images: ITAE changes nothing "
                    "(method='none' gives the baseline)", check.get("images", 0))
    elif check["status"] == "nothing flagged":
        log.info("itae: %s", check["summary"])


def run(
    data: str | os.PathLike | SourceSpec,
    k: int | None,
    out: str | os.PathLike,
    *,
    model: str | ModelSpec = DEFAULT_MODEL,
    itae: ITAEConfig | None = ITAEConfig(),
    method: str | None = None,
    algorithm: str = "kmeans",
    ttr: TTRConfig | None = None,
    seeds: Sequence[int] = (0,),
    spherical: bool = False,
    options: EmbedOptions | None = None,
    report: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    cluster_options: dict[str, Any] | None = None,
    title: str | None = None,
    **keywords: Any,
) -> dict[str, Any]:
    """Embed ``data``, cluster it into ``k`` groups (None: chosen automatically), score it when labels are
    known, and write everything under ``out``. Returns the run record (also ``out/run.json``).

    Every argument is checked before anything is written or any image is read. ``out`` is locked for the
    run (another run into it fails at once, naming its pid); ``run.json`` says ``"running"`` while the run
    goes on and ends ``"finished"``, or ``"failed"`` with the error.

    data, model, options: the ``SourceSpec`` (or its path), the ``ModelSpec`` (or its name) and the
    ``EmbedOptions`` of the embedding step (see ``itae.embed``); ``keywords``: their fields as plain
    keywords (``labels="from-folders"``, ``precision="bf16"``, ``batch_size=32``, ``save_every=...``, ...).
    method: the artifact fix ("none", "itae", "ttr", "itae+ttr"; see ``itae.embed``); None runs what
    ``itae`` and ``ttr`` say. algorithm: the clustering algorithm ("kmeans", "agglomerative", "hdbscan";
    an algorithm passed as ``method``, as before 0.2, still works, with a DeprecationWarning).
    title: the report's title (default: "itae run: " and the data's name).
    """
    from .clustering import METHODS as CLUSTER_METHODS
    from .clustering import check_cluster_arguments
    from .methods import resolve_method

    if method in CLUSTER_METHODS:
        warnings.warn(f"run(method={method!r}) for the clustering algorithm is deprecated; use "
                      f"algorithm={method!r}", DeprecationWarning, stacklevel=2)
        algorithm, method = method, None
    itae, ttr = resolve_method(method, itae, ttr)

    # Every flag first: a mistake costs nothing, not an embedding run.
    check_k(k)
    check_cluster_arguments(k, method=algorithm, seeds=seeds, spherical=spherical, **(cluster_options or {}))
    source_spec, model_spec, opts = build_specs(data, model, options, keywords, caller="run")
    check_itae(itae)
    dev = resolve_device(model_spec.device)
    out = check_output_dir(out)
    with folder_lock(out, "itae run"):
        source = source_spec.open(exclude=(out,))
        check_k(k, len(source))
        _clear_previous_run(out)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        shown = source_spec.path if isinstance(source_spec.path, (str, os.PathLike)) else source.spec
        # Written first and replaced at the end: a run that stops half-way says so.
        begun = {"status": "running", "started": started, "data": str(shown), "out": str(out)}
        _write_json(out / RUN, begun)
        try:
            record = _run_steps(
                source, k, out, started=started, data=shown, model=model_spec.replace(device=dev), opts=opts,
                itae=itae, labels=source_spec.labels, algorithm=algorithm, ttr=ttr, seeds=seeds,
                spherical=spherical, report=report, progress=progress, overwrite=overwrite,
                cluster_options=cluster_options, title=title,
            )
        except BaseException as e:
            error = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            _write_json(out / RUN, {**begun, "status": "failed", "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "error": " ".join(error.split())})
            raise
    return record


def _run_steps(source, k, out: Path, *, started: str, data, model: ModelSpec, opts: EmbedOptions, itae, labels,
               algorithm, ttr, seeds, spherical, report, progress, overwrite, cluster_options,
               title=None) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    backbone = model.load()  # the device is resolved already
    timings["load_model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = embed(source, backbone, out=out / STORE_DIR, itae=itae, ttr=ttr, options=opts, labels=labels,
                  device=model.device, precision=model.precision, progress=progress, overwrite=overwrite)
    timings["embed_s"] = time.perf_counter() - t0
    atomic_write(out / ERRORS, lambda f: f.write((store.path / ERRORS).read_bytes()))
    n = len(store)

    t0 = time.perf_counter()
    result = cluster_store(store, k, out=out, method=algorithm, seeds=seeds, spherical=spherical,
                           **(cluster_options or {}))
    timings["cluster_s"] = time.perf_counter() - t0

    metrics = None
    if store.labels is not None:
        t0 = time.perf_counter()
        metrics = evaluate_assignments(out / ASSIGNMENTS)
        timings["evaluate_s"] = time.perf_counter() - t0

    resolved_itae = store.itae_config
    check = self_check(store, backbone, source)
    _warn_self_check(check)
    record: dict[str, Any] = {
        "status": "finished",
        "started": started,
        "data": str(data),
        "out": str(out),
        "model": backbone.name,
        "method": store.method,
        "itae": None if resolved_itae is None else resolved_itae.to_dict(),
        "ttr": store.manifest.get("ttr"),
        "ttr_check": (store.manifest.get("ttr_search") or {}).get("check"),
        "self_check": check,
        "embedding": {"feature": opts.feature, "normalize": opts.normalize, "precision": model.precision,
                      "device": str(model.device), "batch_size": opts.batch_size,
                      "preprocess": backbone.preprocess.to_dict()},
        "clustering": {"method": algorithm, "k": result.k, "k_requested": k, "seeds": list(seeds),
                       "spherical": spherical, "params": result.params, "k_scores": result.k_scores},
        "n_images": n,
        "n_errors": len(store.errors),
        "metrics": metrics,
        "versions": {**library_versions(), "python": platform.python_version()},
        "timings": timings,
    }

    if report:
        t0 = time.perf_counter()
        layout = write_run_report(out, store, source, result, metrics, record, backbone=backbone, title=title)
        timings["report_s"] = time.perf_counter() - t0
        record["report"] = {"title": title or default_title(data), "map_layout": layout.method,
                            "map_description": layout.description}
    timings["images_per_s_embed"] = n / timings["embed_s"] if timings["embed_s"] > 0 else None
    record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(out / RUN, record)
    return record


def _clear_previous_run(out: Path) -> None:
    """Remove an earlier run's outputs from ``out`` (its store stays, to be resumed or refused).

    Only in a folder that holds a run (``run.json`` or ``assignments.csv``): elsewhere these names may
    be the user's own files, and nothing is removed.
    """
    if not ((out / RUN).is_file() or (out / ASSIGNMENTS).is_file()):
        return
    for name in RUN_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    inspect = out / INSPECT_DIR
    if inspect.is_dir():
        for png in inspect.glob("*.png"):  # the report's diagnostics; anything else there is left alone
            png.unlink()
        try:
            inspect.rmdir()
        except OSError:
            pass


def default_title(data: str | os.PathLike) -> str:
    return f"itae run: {Path(str(data)).name or data}"


def write_run_report(out: Path, store: EmbeddingStore, source, result, metrics, record, *, backbone=None,
                     title: str | None = None):
    """``out/report.html`` for a finished run (diagnostics included when the backbone is given); returns
    the map's layout (an ``EmbeddingMap``: which method drew it, and how)."""
    from .data.decode import DecodeError, load_rgb
    from .diagnostics import REPORT_IMAGES, write_diagnostics
    from .report.figures import embedding_map
    from .report.html import write_report

    index = {ident: i for i, ident in enumerate(source.ids)}

    def thumbnail(ident: str):
        try:
            return load_rgb(source.read(index[ident]))
        except (DecodeError, OSError, KeyError):
            return None

    pngs: list[Path] = []
    if backbone is not None:
        try:
            pngs = [write_diagnostics(backbone, source, out / INSPECT_DIR, itae=store.itae_config,
                                      max_images=REPORT_IMAGES).grid]
        except Exception as e:  # diagnostics are a bonus: a report without them beats no report
            log.warning("itae: artifact diagnostics skipped: %s", e)
    check = record.get("self_check") or {"status": "off" if store.itae_config is None else "unchecked",
                                         "summary": ""}
    banner = self_check_line(check) if check.get("summary") else None
    caption = ("The unmodified model (ITAE off)" if store.itae_config is None
               else "CLS attention before and after ITAE")
    config = {k: v for k, v in record.items() if k not in ("metrics", "versions", "timings")}
    config["versions"] = record["versions"]
    embeddings = store.embeddings(mmap=True)
    layout = embedding_map(embeddings)
    k_selection = None
    if result.k_scores:
        criterion = result.params.get("k_selection", {}).get("criterion", "silhouette")
        k_selection = {"criterion": criterion, "scores": result.k_scores, "chosen": result.k}
    write_report(
        out / REPORT, title=title or default_title(record["data"]), metrics=metrics,
        config=_jsonable(config), ids=store.ids, cluster_labels=result.labels, true_labels=store.labels,
        embeddings=embeddings, layout=layout, k_selection=k_selection, centroid_distances=result.distances,
        thumbnails=thumbnail, diagnostics_pngs=[(caption, p) for p in pngs], banner=banner, self_check=check,
    )
    return layout
