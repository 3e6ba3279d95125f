"""``run_bench``: run a grid, reuse what runs share, say what it costs, and survive interruption.

Reuse: each backbone is loaded once; an embedding is computed once per (data set, split, backbone,
feature, ITAE configuration) into ``<out_dir>/cache`` (layout: ``itae.bench.cache``) and shared by every
seed; an "auto" threshold is calibrated once per (backbone, data set, detection settings) and shared by
every ITAE variant that detects the same way (variants that differ only in mode, rows or alpha).
Cost first: before the first image, the number of images and forward passes still to do, and an estimate
of their time from a short timed batch of the first model on the chosen device.
Restart: ``results.csv`` is rewritten whole (temporary file + rename) after every finished run; a run
whose key (dataset, model, method, seed, protocol) is there is skipped once its settings, data and model
are checked to be the same; cached embeddings resume chunk-wise, and are checked against the images and
the model that made them.
Failures: a data set or model that cannot be loaded stops the grid with one line that says how to point it
at a local copy, or, with ``keep_going``, is reported and its cells are marked missing in the results.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itae._io import atomic_write_text
from itae.config import ITAEConfig
from itae.data.sources import ImageSource
from itae.errors import InputError
from itae.methods import TTRConfig
from itae.models.loading import ModelLoadError

from .cache import calibration_dir, embedding_dir
from .datasets import DatasetLoadError, SubsetSource, first_line, open_dataset
from .protocol import cluster_run, load_model, model_location
from .published import compare, comparison_note, reference_set
from .report import write_bench_report
from .results import KEY_COLUMNS, markdown, read_rows, run_key, summarize_rows, write_rows
from .spec import BenchSpec, DatasetSpec, MethodSpec, _digest, load_spec, quick_spec, registers_counterpart

logger = logging.getLogger("itae.bench")

__all__ = ["BenchResults", "DatasetLoadError", "SubsetSource", "open_dataset", "run_bench"]

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
SPEC_JSON = "spec.json"

Cell = tuple[str, str, str]  # (data set, model, method)


@dataclass
class BenchResults:
    """What a grid produced: the rows of this spec's runs (from results.csv), their summary, the
    published figures beside them (when the spec names a reference) and the cells that could not run."""

    out_dir: Path
    spec: BenchSpec
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    ran: int = 0
    skipped: int = 0
    missing: dict[Cell, str] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    csv_path: Path = field(init=False)
    md_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.csv_path = self.out_dir / RESULTS_CSV
        self.md_path = self.out_dir / RESULTS_MD

    def markdown(self) -> str:
        return _render(self.spec, self.summary, self.comparison, self.missing)


def _render(spec: BenchSpec, summary: list[dict[str, Any]], comparison: list[dict[str, Any]],
            missing: dict[Cell, str]) -> str:
    notes = []
    cut = [d.name for d in spec.datasets if d.max_images is not None]
    if cut and comparison:
        notes.append(f"{', '.join(cut)}: a class-balanced subset (max_images), not the whole split the published "
                     "figures were measured on: the comparison is indicative only.")
    note = comparison_note(reference_set(spec.reference)) if spec.reference else ""
    if spec.reference and not comparison:
        ref = reference_set(spec.reference)
        cells = sorted({f"{f.dataset} / {f.model} / {f.method}" for f in ref.figures})
        notes.append(f"No published figure ({ref.title}) falls in this grid; they are for: {'; '.join(cells)}.")
    return markdown(summary, comparison=comparison, comparison_note=note, missing=missing, notes=notes)


def _comparison(spec: BenchSpec, summary: list[dict[str, Any]], missing: dict[Cell, str]) -> list[dict[str, Any]]:
    if spec.reference is None:
        return []
    cells = [(d.name, m, meth.name) for d in spec.datasets for m in spec.models for meth in spec.methods]
    return compare(reference_set(spec.reference), summary, cells, missing)


# ------------------------------------------------------------------------------------------- models


class _Lazy:
    """Loads a backbone on first use only: a grid whose embeddings are cached loads no model."""

    def __init__(self, name: str, device: str, model_root: str | None = None) -> None:
        self.name, self.device, self.model_root, self._bb = name, device, model_root, None
        self.location = model_location(name, model_root)

    def get(self):
        if self._bb is None:
            try:
                self._bb = load_model(self.name, self.device, self.model_root)
            except ModelLoadError as e:
                leaf = self.name.rstrip("/").split("/")[-1]
                raise ModelLoadError(
                    f"model {self.name!r} cannot be loaded ({first_line(e)}); point the grid at a local copy: "
                    f"model_root=DIR with DIR/{leaf} a save_pretrained folder (or the model's 'model_root' in a spec)"
                ) from None
        return self._bb

    def release(self) -> None:
        self._bb = None


def expected_model_label(location: str) -> str:
    """The name that a store made by the model at ``location`` records (``load_backbone``'s label)."""
    from itae.models.demo import is_demo_name
    from itae.models.loading import canonical_name

    if is_demo_name(location):
        return location.strip().lower()
    path = Path(location).expanduser()
    if path.exists():
        return str(path)
    return canonical_name(location) or location.strip()


# --------------------------------------------------------------------------------------- embeddings


def _detect_settings(config: ITAEConfig) -> dict[str, Any]:
    return {k: config.to_dict()[k] for k in ("source", "side", "layers", "granularity", "calibration")}


def calibration_path(config: ITAEConfig, src: ImageSource, spec: BenchSpec, folder: Path) -> Path:
    """Where the thresholds of ``config``'s detection settings on ``src`` are kept."""
    key = _digest({"detect": _detect_settings(config), "source": src.fingerprint(), "images": spec.calibration_images})
    return folder / f"{key}.json"


def calibrate_cached(lazy: _Lazy, src: ImageSource, config: ITAEConfig, spec: BenchSpec, folder: Path) -> dict[str, Any]:
    """Thresholds for ``config``'s detection settings on ``src``, computed once and kept in ``folder``."""
    path = calibration_path(config, src, spec, folder)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from itae.data.decode import build_transform
    from itae.engine.calibrate import calibrate
    from itae.extraction.sampling import SampleBatches, spread_batches

    backbone = lazy.get()
    # the extraction's own sampling and loader; undecodable images are left out (errors.csv lists them)
    sample = SampleBatches(src, build_transform(backbone.preprocess),
                           spread_batches(len(src), spec.calibration_images, spec.batch_size),
                           device=backbone.device, dtype=backbone.dtype)
    batches = list(sample)
    if not batches:
        raise DatasetLoadError(f"no image of {src.spec!r} could be decoded for calibration")
    cal = calibrate(backbone, batches, config.replace(threshold="auto"))
    record = {
        "thresholds": [float(t) for t in cal.config.threshold],
        "flagged_fraction": float(np.mean(list(cal.flagged_fraction.values()))),
        "bimodal": [bool(b) for b in cal.bimodal.values()],
        "source": cal.source,
        "side": cal.side,
        "self_check": cal.self_check(),
        "images": cal.num_images,
        "detect": _detect_settings(config),
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def _complete_store(folder: Path):
    """The finished embedding store in ``folder``, or None (none yet, or a partial one that ``embed`` resumes)."""
    from itae.data.store import EmbeddingStore

    if not folder.is_dir():
        return None
    try:
        store = EmbeddingStore(folder)
        return store if store.is_complete else None
    except Exception:  # a partial store: ``embed`` resumes it
        return None


def embeddings_cached(lazy: _Lazy, src: ImageSource, config: ITAEConfig | None, spec: BenchSpec, folder: Path,
                      progress: bool, ttr: TTRConfig | None = None) -> tuple[np.ndarray, list[str]]:
    """(N, D) embeddings and labels of ``src``, computed once per configuration into ``folder``; a finished
    store is reused only when it was made from the same images by the same model. With test-time
    registers, the store's register neurons are found on ``src`` (the store keeps them: ``ttr_of``)."""
    from itae.extraction.local import embed

    store = _complete_store(folder)
    if store is not None:
        made_from = store.manifest["source"]
        if (made_from.get("fingerprint"), made_from.get("num_records"), made_from.get("spec")) != (
                src.fingerprint(), len(src), src.spec):
            # the cache is keyed by data set name and split: another source under the same name lands here
            raise InputError(
                f"the cached embeddings in {str(folder)!r} were made from other images than {src.spec!r} "
                "(the data set's source, configuration or max_images changed); use another out_dir or delete that folder"
            )
        made_by, expected = store.manifest.get("model"), expected_model_label(lazy.location)
        if made_by is not None and made_by != expected:
            raise InputError(
                f"the cached embeddings in {str(folder)!r} were made by model {made_by!r}, not {expected!r} (the "
                "model's local copy or model_root changed); use another out_dir or delete that folder"
            )
    else:
        store = embed(
            src, lazy.get(), out=folder, itae=config, ttr=ttr, feature=spec.feature, normalize=spec.normalize,
            batch_size=spec.batch_size, num_workers=spec.num_workers, device=spec.device,
            calibration_images=spec.calibration_images, progress=progress, resume=True,
        )
    return np.asarray(store.embeddings(mmap=False), dtype=np.float32), list(store.labels or [])


def ttr_of(folder: Path) -> tuple[TTRConfig | None, dict[str, Any] | None]:
    """The register neurons a finished store used, and the record of their search (None without)."""
    from itae.data.store import EmbeddingStore

    store = EmbeddingStore(folder)
    return store.ttr_config, store.manifest.get("ttr_search")


# ------------------------------------------------------------------------------------------ cost


# Parameters of the DINOv2 sizes (HF Dinov2Model), to scale one timed model's speed to the others.
_SIZE_PARAMS = {"s": 22.1e6, "b": 86.6e6, "l": 304.4e6, "g": 1136.5e6}


def _known_params(name: str) -> float | None:
    from itae.models.loading import KNOWN_MODELS, canonical_name

    canonical = canonical_name(name)
    known = KNOWN_MODELS.get(canonical) if canonical else None
    if known is None or known.kind != "dinov2":
        return None
    return _SIZE_PARAMS.get(known.arch[len("dinov2_vit")])


@dataclass
class _Work:
    """What one (backbone, data set, method) still has to compute: images to embed and to calibrate on."""

    backbone: str
    dataset: str
    method: str
    embed_images: int = 0
    calibration_images: int = 0

    @property
    def passes(self) -> int:
        return self.embed_images + self.calibration_images


def _timed_rate(backbone, batch_size: int) -> tuple[float, int, float]:
    """Images per second of a forward pass (model only) on a short batch of random pixels: one warm-up
    batch, then one timed batch. Returns (rate, batch, seconds)."""
    import torch

    size = backbone.preprocess.image_size
    b = max(1, min(batch_size, 16))
    x = torch.randn(b, 3, size, size, device=backbone.device, dtype=backbone.dtype)
    with torch.inference_mode():
        backbone.forward_features(x[:1])
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)
        t0 = time.perf_counter()
        backbone.forward_features(x)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)
        seconds = max(time.perf_counter() - t0, 1e-9)
    return b / seconds, b, seconds


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# ------------------------------------------------------------------------------------------ running


def run_bench(
    spec: BenchSpec | dict[str, Any] | str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    progress: bool = True,
    report: bool = True,
    keep_going: bool = False,
    estimate: bool = True,
    title: str | None = None,
) -> BenchResults:
    """Run every (data set, model, method, seed) of ``spec`` not yet in ``out_dir/results.csv``.

    spec: a ``BenchSpec``, a dict, or a JSON file; with ``quick=True``, a folder of labelled images
        (``<folder>/[test/]<class>/<image>``) on which the offline preset runs (see ``quick_spec``).
    keep_going: a data set or model that cannot be loaded is reported in one line and its cells are marked
        missing; without it the grid stops there (``DatasetLoadError`` / ``ModelLoadError``).
    estimate: before the first image, time a short batch of the first model to estimate the grid's time
        (the counts of images and forward passes are printed either way, also without ``progress``).
    Writes ``results.csv`` (one row per run, rewritten atomically after each), ``results.md`` (mean ± std
    per data set, model and method, deltas against the baseline, the published figures beside ours when
    the spec names a reference, missing cells), ``spec.json``, ``cache/`` and, with ``report``,
    ``report.html`` (the tables plus one run shown in full), named ``title`` when given.
    """
    from itae.metrics import evaluate

    if quick:
        if spec is None or not isinstance(spec, (str, os.PathLike)):
            raise InputError("quick=True runs the offline preset on a folder of labelled images; pass its path as spec")
        spec = quick_spec(spec)
    elif spec is None:
        raise InputError("give a bench spec (a BenchSpec, a dict or a JSON file), or quick=True with a folder")
    spec = load_spec(spec)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SPEC_JSON, json.dumps(spec.to_dict(), indent=2, default=str) + "\n")
    csv_path, md_path = out / RESULTS_CSV, out / RESULTS_MD
    settings = spec.settings_key()
    log = _Log(progress)

    all_rows = read_rows(csv_path)
    done = {}
    for row in all_rows:
        done[run_key(row)] = row
    grid = [(ds, model, method, seed) for ds in spec.datasets for model in spec.models
            for method in spec.methods for seed in spec.seeds]
    keys = {id(g): _key(g, spec) for g in grid}
    for g in grid:
        row = done.get(keys[id(g)])
        if row is None:
            continue
        if row.get("settings") != settings:
            raise InputError(
                f"{str(csv_path)!r} already has run {keys[id(g)]} made with other settings (k, feature, normalize, "
                "clustering or calibration); use another out_dir or delete that file"
            )
        if row.get("data") and row["data"] != _data_key(g[0], spec):
            raise InputError(
                f"{str(csv_path)!r} already has run {keys[id(g)]} made on other data (the data set's source, "
                "splits, columns, configuration or max_images); use another out_dir or delete that file"
            )
        location = model_location(_backbone_of(g), spec.model_root)
        if row.get("weights") and row["weights"] != location:
            raise InputError(
                f"{str(csv_path)!r} already has run {keys[id(g)]} made with the weights of {row['weights']!r}, not "
                f"{location!r} (model_root changed); use another out_dir or delete that file"
            )
    pending = [g for g in grid if keys[id(g)] not in done]
    log.total = len(grid)
    log.skipped(len(grid) - len(pending))
    missing: dict[Cell, str] = {}

    def save() -> None:
        write_rows(csv_path, all_rows)
        summary = summarize_rows(_ordered(all_rows, grid, keys))
        atomic_write_text(md_path, _render(spec, summary, _comparison(spec, summary, missing), missing))

    def give_up(cells: list, why: str, line: str) -> None:
        logger.warning("itae bench: %s", line)  # a warning, so that the command line words it in its flags
        for g in cells:
            missing.setdefault((g[0].name, g[1], g[2].name), why)

    # Open every data set that has runs to do, before any model: a missing one is known at once.
    sources: dict[tuple[str, str | None], ImageSource] = {}
    runnable = []
    for ds in spec.datasets:
        ds_runs = [g for g in pending if g[0] is ds]
        if not ds_runs:
            continue
        try:
            for split in dict.fromkeys((ds.split, _fit_split(ds, spec))):
                sources[ds.name, split] = open_dataset(ds, split)
        except DatasetLoadError as e:
            if not keep_going:
                raise
            give_up(ds_runs, f"data set {ds.name} could not be loaded", str(e))
            continue
        runnable += ds_runs

    # Group by the backbone that embeds (the registers method swaps the model), then by data set.
    by_backbone: dict[str, list] = {}
    for g in runnable:
        by_backbone.setdefault(_backbone_of(g), []).append(g)
    lazies = {name: _Lazy(name, spec.device, spec.model_root) for name in by_backbone}

    work = _plan(spec, by_backbone, sources, out)
    unavailable: set[str] = set()
    if work:
        log.cost(work)
        if estimate:
            for name in [n for n in by_backbone if any(w.backbone == n and w.passes for w in work)]:
                try:
                    rate, b, seconds = _timed_rate(lazies[name].get(), spec.batch_size)
                except ModelLoadError as e:
                    if not keep_going:
                        raise
                    give_up(by_backbone[name], f"model {name} could not be loaded", str(e))
                    unavailable.add(name)
                    continue
                log.estimate(name, rate, b, seconds, lazies[name].get().device, work, unavailable)
                break
    else:
        log.nothing_to_embed(len(pending))

    ran = 0
    for backbone_name, runs in by_backbone.items():
        if backbone_name in unavailable:
            continue
        lazy = lazies[backbone_name]
        try:
            ran += _run_backbone(spec, lazy, runs, sources, out, keys, settings, all_rows, save, log, evaluate)
        except ModelLoadError as e:
            if not keep_going:
                raise
            give_up([g for g in runs if keys[id(g)] not in {run_key(r) for r in all_rows}],
                    f"model {backbone_name} could not be loaded", str(e))
        lazy.release()
    save()
    rows = _ordered(read_rows(csv_path), grid, keys)
    summary = summarize_rows(rows)
    results = BenchResults(out, spec, rows, summary, ran=ran, skipped=len(grid) - len(pending), missing=missing,
                           comparison=_comparison(spec, summary, missing))
    if report and rows:
        try:
            write_bench_report(results, title=title)
        except Exception as e:  # results.csv and results.md are written; the page is a view of them
            log.always(f"itae bench: report.html not written: {e}")
    return results


def _run_backbone(spec: BenchSpec, lazy: _Lazy, runs: list, sources: dict, out: Path, keys: dict, settings: str,
                  all_rows: list, save, log: _Log, evaluate) -> int:
    """Every pending run of one backbone, data set by data set; returns how many ran."""
    ran = 0
    backbone_name = lazy.name
    for ds in spec.datasets:
        ds_runs = [g for g in runs if g[0] is ds]
        if not ds_runs:
            continue
        fit_split = _fit_split(ds, spec)
        eval_src = sources[ds.name, ds.split]
        fit_src = sources[ds.name, fit_split]
        for method in dict.fromkeys(g[2] for g in ds_runs):  # first-seen order, no repeats
            config, cal = _method_config(method, lazy, fit_src, spec, calibration_dir(out, ds.name, backbone_name))
            emb_name = _embedding_name(config, method.ttr)
            t0 = time.perf_counter()
            eval_dir = _emb_dir(out, ds, ds.split, backbone_name, spec, emb_name)
            x_eval, y_eval = embeddings_cached(lazy, eval_src, config, spec, eval_dir, log.enabled, method.ttr)
            # the register neurons found on the first store embedded serve both splits
            found, search = ttr_of(eval_dir) if method.ttr is not None else (None, None)
            x_fit = None
            if spec.protocol == "train-test":
                x_fit, _ = embeddings_cached(lazy, fit_src, config, spec, _emb_dir(out, ds, fit_split, backbone_name,
                                                                                   spec, emb_name), log.enabled, found)
            log.embedded(ds.name, backbone_name, method.name, len(x_eval), time.perf_counter() - t0)
            classes, y = np.unique(np.asarray(y_eval), return_inverse=True)
            k = spec.k or len(classes)
            for g in (g for g in ds_runs if g[2] is method):
                seed = g[3]
                t0 = time.perf_counter()
                if x_fit is None:
                    pred = cluster_run(spec, x_eval, None, k, seed)
                else:
                    pred = cluster_run(spec, x_fit, x_eval, k, seed)
                scores = evaluate(y, pred)
                row = dict(zip(KEY_COLUMNS, keys[id(g)], strict=True))
                row.update(
                    backbone=backbone_name, k=k, n_images=len(y), n_classes=len(classes),
                    acc=float(scores["acc"]), nmi=float(scores["nmi"]), ari=float(scores["ari"]),
                    purity=float(scores["purity"]),
                    threshold=None if cal is None else ";".join(f"{t:.6g}" for t in cal["thresholds"]),
                    flagged_fraction=None if cal is None else cal["flagged_fraction"],
                    neurons=None if found is None else len(found.neurons or ()),
                    outlier_fraction=None if search is None else search.get("outlier_fraction"),
                    **_check_columns(cal),
                    embedding=emb_name, settings=settings, data=_data_key(ds, spec),
                    seconds=round(time.perf_counter() - t0, 3), weights=lazy.location,
                )
                all_rows.append(row)
                save()
                ran += 1
                log.run(row)
    return ran


def _plan(spec: BenchSpec, by_backbone: dict[str, list], sources: dict, out: Path) -> list[_Work]:
    """What is left to compute, without loading a model: embeddings not yet finished, calibrations not yet
    kept (an ITAE embedding whose thresholds are not calibrated yet is counted as to do)."""
    work = []
    for backbone_name, runs in by_backbone.items():
        for ds in spec.datasets:
            methods = dict.fromkeys(g[2] for g in runs if g[0] is ds)
            if not methods:
                continue
            fit_split = _fit_split(ds, spec)
            splits = dict.fromkeys((ds.split, fit_split))
            for method in methods:
                w = _Work(backbone_name, ds.name, method.name)
                config, uncalibrated = method.itae, False
                if config is not None and not config.is_calibrated:
                    path = calibration_path(config, sources[ds.name, fit_split], spec,
                                            calibration_dir(out, ds.name, backbone_name))
                    if path.is_file():
                        config = _resolved(config, json.loads(path.read_text(encoding="utf-8")))
                    else:  # its embedding is named by the thresholds, unknown until calibrated: to do
                        w.calibration_images = min(spec.calibration_images, len(sources[ds.name, fit_split]))
                        uncalibrated = True
                for split in splits:
                    if uncalibrated or _complete_store(
                            _emb_dir(out, ds, split, backbone_name, spec, _embedding_name(config, method.ttr))) is None:
                        w.embed_images += len(sources[ds.name, split])
                if w.passes:
                    work.append(w)
    return work


def _embedding_name(config: ITAEConfig | None, ttr: TTRConfig | None = None) -> str:
    name = "baseline" if config is None else "itae-" + _digest(config.to_dict())
    if ttr is not None:
        ttr_name = "ttr-" + _digest(ttr.to_dict())
        name = ttr_name if config is None else f"{name}-{ttr_name}"
    return name


def _emb_dir(out: Path, ds: DatasetSpec, split: str | None, backbone: str, spec: BenchSpec, emb_name: str) -> Path:
    return embedding_dir(out, ds.name, split, backbone, spec.feature, spec.normalize, emb_name)


def _fit_split(ds: DatasetSpec, spec: BenchSpec) -> str | None:
    return ds.train_split if spec.protocol == "train-test" else ds.split


def _backbone_of(g: tuple) -> str:
    _, model, method, _ = g
    return registers_counterpart(model) if method.registers else model


def _data_key(ds: DatasetSpec, spec: BenchSpec) -> str:
    """Digest of what decides a data set's images and labels (rows of older versions have none)."""
    return _digest({
        "source": str(ds.source), "split": ds.split, "hf_config": ds.hf_config, "max_images": ds.max_images,
        "image_column": ds.image_column, "label_column": ds.label_column,
        "train_split": ds.train_split if spec.protocol == "train-test" else None,
    })


def _key(g: tuple, spec: BenchSpec) -> tuple[str, ...]:
    ds, model, method, seed = g
    return (ds.name, model, method.name, str(seed), spec.protocol)


def _ordered(rows: list[dict[str, Any]], grid: list, keys: dict[int, tuple]) -> list[dict[str, Any]]:
    """This spec's rows in grid order (results.csv may also hold other grids' rows)."""
    by_key = {run_key(r): r for r in rows}
    return [by_key[keys[id(g)]] for g in grid if keys[id(g)] in by_key]


def _check_columns(cal: dict[str, Any] | None) -> dict[str, Any]:
    """The self-check of a calibrated method as result columns (per block values joined by ';')."""
    if cal is None or "self_check" not in cal:
        return {}
    blocks = list(cal["self_check"]["blocks"].values())

    def joined(key: str) -> str:
        return ";".join("" if b[key] is None else f"{b[key]:.4g}" for b in blocks)

    return {"source": cal["source"], "side": cal["side"], "lift": joined("lift"),
            "residual_ratio": joined("residual_ratio")}


def _method_config(method: MethodSpec, lazy: _Lazy, src: ImageSource, spec: BenchSpec,
                   folder: Path) -> tuple[ITAEConfig | None, dict[str, Any] | None]:
    """The embedding configuration of a method, with "auto" thresholds resolved (and cached)."""
    if method.itae is None:
        return None, None
    if method.itae.is_calibrated:
        return method.itae, None
    cal = calibrate_cached(lazy, src, method.itae, spec, folder)
    return _resolved(method.itae, cal), cal


def _resolved(config: ITAEConfig, cal: dict[str, Any]) -> ITAEConfig:
    """``config`` with the source, side and thresholds a calibration record resolved."""
    return config.replace(source=cal.get("source", config.source), side=cal.get("side", config.side),
                          threshold=tuple(cal["thresholds"]))


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.total, self.count = enabled, 0, 0

    def _print(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def always(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def skipped(self, n: int) -> None:
        self.count += n
        if n:
            self._print(f"bench: {n} of {self.total} runs already in results.csv, skipped")

    def cost(self, work: list[_Work]) -> None:
        images = sum(w.embed_images for w in work)
        calibration = sum(w.calibration_images for w in work)
        passes = sum(1 for w in work if w.embed_images)
        self.always(  # cost first, even without progress lines
            f"bench: to do: {images:,} images to embed in {passes} embedding pass(es) over "
            f"{len({w.dataset for w in work})} data set(s) and {len({w.backbone for w in work})} model(s), plus "
            f"{calibration:,} calibration images: {images + calibration:,} forward passes"
        )

    def estimate(self, name: str, rate: float, batch: int, seconds: float, device, work: list[_Work],
                 unavailable: set[str]) -> None:
        total = 0.0
        for w in work:
            if w.backbone in unavailable:
                continue
            # another DINOv2 size: scaled by the ratio of the sizes' parameter counts; else as the timed model
            known, timed = _known_params(w.backbone), _known_params(name)
            scale = known / timed if known and timed and w.backbone != name else 1.0
            total += w.passes * scale / rate
        self.always(
            f"bench: timed batch: {batch} images through {name} in {seconds:.2f} s on {device} "
            f"({rate:.1f} img/s, model only); estimate for the grid: about {_duration(total)} of forward passes "
            "(other models scaled by parameter count; decoding and clustering not counted)"
        )

    def nothing_to_embed(self, pending: int) -> None:
        if pending:
            self._print(f"bench: every embedding is cached; {pending} run(s) to cluster and score")

    def embedded(self, dataset: str, model: str, method: str, n: int, seconds: float) -> None:
        self._print(f"bench: embeddings {dataset} / {model} / {method}: {n} images ({seconds:.1f}s)")

    def run(self, row: dict[str, Any]) -> None:
        self.count += 1
        self._print(
            f"bench: [{self.count}/{self.total}] {row['dataset']} {row['model']} {row['method']} seed {row['seed']}: "
            f"ACC {100 * row['acc']:.2f} NMI {100 * row['nmi']:.2f} ARI {100 * row['ari']:.2f}"
        )
