"""``run_bench``: run a grid, reuse what runs share, and survive interruption.

Reuse: each backbone is loaded once; an embedding is computed once per (data set, split, backbone,
feature, ITAE configuration) into ``<out_dir>/cache`` and shared by every seed; an "auto" threshold is
calibrated once per (backbone, data set, detection settings) and shared by every ITAE variant that
detects the same way (variants that differ only in mode, rows or alpha).
Restart: ``results.csv`` is rewritten whole (temporary file + rename) after every finished run; a run
whose key (dataset, model, method, seed, protocol) is there is skipped; embeddings resume chunk-wise.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itae.config import ITAEConfig
from itae.data.extract import spread_indices
from itae.data.sources import ImageSource, open_source

from .results import (
    KEY_COLUMNS,
    atomic_write_text,
    markdown,
    read_rows,
    run_key,
    summarize_rows,
    write_rows,
)
from .spec import BenchSpec, DatasetSpec, MethodSpec, _digest, load_spec, quick_spec, registers_counterpart

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
SPEC_JSON = "spec.json"


class DatasetLoadError(ValueError):
    """A benchmark data set could not be opened; the message is one line saying what to do."""


@dataclass
class BenchResults:
    """What a grid produced: the rows of this spec's runs (from results.csv) and their summary."""

    out_dir: Path
    spec: BenchSpec
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    ran: int = 0
    skipped: int = 0
    csv_path: Path = field(init=False)
    md_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.csv_path = self.out_dir / RESULTS_CSV
        self.md_path = self.out_dir / RESULTS_MD

    def markdown(self) -> str:
        return markdown(self.summary)


# ------------------------------------------------------------------------------------------ sources


class SubsetSource(ImageSource):
    """A class-balanced, deterministic subset of another source: classes take turns, in source order."""

    def __init__(self, base: ImageSource, max_images: int) -> None:
        by_class: dict[str, list[int]] = {}
        for i, label in enumerate(base.labels or [""] * len(base)):
            by_class.setdefault(label, []).append(i)
        queues = [by_class[c] for c in sorted(by_class)]
        chosen: list[int] = []
        depth = 0
        while len(chosen) < max_images and any(depth < len(q) for q in queues):
            chosen.extend(q[depth] for q in queues if depth < len(q))
            depth += 1
        self.base = base
        self.indices = sorted(chosen[:max_images])
        self.kind = f"{base.kind}-subset"
        labels = None if base.labels is None else [base.labels[i] for i in self.indices]
        super().__init__(f"{base.spec}[{len(self.indices)} of {len(base)}]", [base.ids[i] for i in self.indices], labels)

    def read(self, index: int):
        return self.base.read(self.indices[index])


def open_dataset(ds: DatasetSpec, split: str | None) -> ImageSource:
    """The labelled ``ImageSource`` of one split of a data set, or a one-line ``DatasetLoadError``."""
    path = Path(ds.source).expanduser()
    local = path.exists()
    try:
        if local and path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            folder = path / split if split and (path / split).is_dir() else path
            src = open_source(folder, labels="from-folders")
        elif local and path.is_file():
            src = open_source(path, labels="column", label_column=ds.label_column)
        else:
            # A local copy (save_to_disk) holds one configuration already: hf_config is for the hub only.
            src = open_source(ds.source if local else f"hf:{ds.source}", labels="column", image_column=ds.image_column,
                              label_column=ds.label_column, split=split, hf_config=None if local else ds.hf_config)
    except ImportError as e:
        raise DatasetLoadError(f"data set {ds.name!r}: {_first_line(e)}") from None
    except Exception as e:  # many libraries, many error types: the user needs one line
        where = "" if local else (
            f"; if the HF hub cannot be reached, save a copy elsewhere (datasets.load_dataset({ds.source!r}, "
            f"{'' if ds.hf_config is None else repr(ds.hf_config) + ', '}split={split!r}).save_to_disk(DIR)) "
            "and set this data set's 'source' to DIR"
        )
        raise DatasetLoadError(f"cannot open data set {ds.name!r} ({ds.source}, split {split!r}): {_first_line(e)}{where}") from None
    if not src.has_labels:
        raise DatasetLoadError(f"data set {ds.name!r} has no labels; the benchmark scores against labels")
    if ds.max_images is not None and ds.max_images < len(src):
        src = SubsetSource(src, ds.max_images)
    return src


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


# ------------------------------------------------------------------------------------------- models


def load_model(name: str, device: str):
    """A ``Backbone`` by name: anything ``itae.load_backbone`` takes, the demo models included."""
    from itae.data.extract import resolve_device
    from itae.models.loading import load_backbone

    return load_backbone(name, device=resolve_device(device))


class _Lazy:
    """Loads a backbone on first use only: a grid whose embeddings are cached loads no model."""

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device, self._bb = name, device, None

    def get(self):
        if self._bb is None:
            self._bb = load_model(self.name, self.device)
        return self._bb


# --------------------------------------------------------------------------------------- embeddings


def calibrate_cached(lazy: _Lazy, src: ImageSource, config: ITAEConfig, spec: BenchSpec, folder: Path) -> dict[str, Any]:
    """Thresholds for ``config``'s detection settings on ``src``, computed once and kept in ``folder``."""
    detect = {k: config.to_dict()[k] for k in ("source", "side", "layers", "granularity", "calibration")}
    key = _digest({"detect": detect, "source": src.fingerprint(), "images": spec.calibration_images})
    path = folder / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    import itae
    from itae.data.decode import DecodeError, build_transform, load_rgb

    backbone = lazy.get()
    transform = build_transform(backbone.preprocess)
    pixels = []
    for i in spread_indices(len(src), spec.calibration_images):
        try:
            pixels.append(transform(load_rgb(src.read(i))))
        except (DecodeError, OSError):
            continue  # the embedding step lists undecodable images in errors.csv
    if not pixels:
        raise DatasetLoadError(f"no image of {src.spec!r} could be decoded for calibration")
    batches = [torch_stack(pixels[b : b + spec.batch_size]) for b in range(0, len(pixels), spec.batch_size)]
    cal = itae.calibrate(backbone, batches, config.replace(threshold="auto"))
    record = {
        "thresholds": [float(t) for t in cal.config.threshold],
        "flagged_fraction": float(np.mean(list(cal.flagged_fraction.values()))),
        "bimodal": [bool(b) for b in cal.bimodal.values()],
        "images": cal.num_images,
        "detect": detect,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def torch_stack(tensors: list) -> Any:
    import torch

    return torch.stack(tensors)


def embeddings_cached(lazy: _Lazy, src: ImageSource, config: ITAEConfig | None, spec: BenchSpec, folder: Path,
                      progress: bool) -> tuple[np.ndarray, list[str]]:
    """(N, D) embeddings and labels of ``src``, computed once per configuration into ``folder``."""
    from itae.data.extract import embed
    from itae.data.store import EmbeddingStore

    try:
        store = EmbeddingStore(folder)
        complete = store.is_complete
    except Exception:  # no store yet, or a partial one: ``embed`` resumes it
        complete = False
    made_from = store.manifest["source"] if complete else {}
    if complete and (made_from.get("fingerprint"), made_from.get("num_records"), made_from.get("spec")) != (
            src.fingerprint(), len(src), src.spec):
        # the cache is keyed by data set name and split: another source under the same name lands here
        raise ValueError(
            f"the cached embeddings in {str(folder)!r} were made from other images than {src.spec!r} "
            "(the data set's source, configuration or max_images changed); use another out_dir or delete that folder"
        )
    if not complete:
        store = embed(
            src, lazy.get(), out=folder, itae=config, feature=spec.feature, normalize=spec.normalize,
            batch_size=spec.batch_size, num_workers=spec.num_workers, device=spec.device,
            calibration_images=spec.calibration_images, progress=progress, resume=True,
        )
    return np.asarray(store.embeddings(mmap=False), dtype=np.float32), list(store.labels or [])


# ------------------------------------------------------------------------------------------ running


def _cluster(spec: BenchSpec, fit: np.ndarray, predict: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    if predict is not None:  # train-test: fit on train, nearest centroid on test
        from itae.clustering import KMeansClusterer

        est = KMeansClusterer(k, seed=seed, spherical=spec.spherical, n_init=spec.n_init).fit(fit)
        return est.predict(predict)
    from itae.clustering import cluster

    kw = {"n_init": spec.n_init} if spec.cluster_method == "kmeans" else {}
    return cluster(fit, k, method=spec.cluster_method, seeds=(seed,), spherical=spec.spherical, **kw).labels


def run_bench(
    spec: BenchSpec | dict[str, Any] | str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    progress: bool = True,
    report: bool = True,
) -> BenchResults:
    """Run every (data set, model, method, seed) of ``spec`` not yet in ``out_dir/results.csv``.

    spec: a ``BenchSpec``, a dict, or a JSON file; with ``quick=True``, a folder of labelled images
        (``<folder>/[test/]<class>/<image>``) on which the offline preset runs (see ``quick_spec``).
    Writes ``results.csv`` (one row per run, rewritten atomically after each), ``results.md`` (mean ± std
    per data set, model and method, deltas against the baseline), ``spec.json``, ``cache/`` and, with
    ``report``, ``report.html`` (the table plus one run shown in full).
    """
    from itae.metrics import evaluate

    if quick:
        if spec is None or not isinstance(spec, (str, os.PathLike)):
            raise ValueError("quick=True runs the offline preset on a folder of labelled images; pass its path as spec")
        spec = quick_spec(spec)
    elif spec is None:
        raise ValueError("give a bench spec (a BenchSpec, a dict or a JSON file), or quick=True with a folder")
    spec = load_spec(spec)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SPEC_JSON, json.dumps(spec.to_dict(), indent=2, default=str) + "\n")
    csv_path, md_path = out / RESULTS_CSV, out / RESULTS_MD
    settings = spec.settings_key()

    all_rows = read_rows(csv_path)
    done = {}
    for row in all_rows:
        done[run_key(row)] = row
    grid = [(ds, model, method, seed) for ds in spec.datasets for model in spec.models
            for method in spec.methods for seed in spec.seeds]
    keys = {id(g): _key(g, spec) for g in grid}
    for g in grid:
        row = done.get(keys[id(g)])
        if row is not None and row.get("settings") != settings:
            raise ValueError(
                f"{str(csv_path)!r} already has run {keys[id(g)]} made with other settings (k, feature, normalize, "
                "clustering or calibration); use another out_dir or delete that file"
            )
        if row is not None and row.get("data") and row["data"] != _data_key(g[0], spec):
            raise ValueError(
                f"{str(csv_path)!r} already has run {keys[id(g)]} made on other data (the data set's source, "
                "splits, columns, configuration or max_images); use another out_dir or delete that file"
            )
    pending = [g for g in grid if keys[id(g)] not in done]
    log = _Log(progress, len(grid))
    log.skipped(len(grid) - len(pending))

    def save() -> None:
        write_rows(csv_path, all_rows)
        atomic_write_text(md_path, markdown(summarize_rows(_ordered(all_rows, grid, keys))))

    # Group by the backbone that embeds (the registers method swaps the model), then by data set.
    by_backbone: dict[str, list] = {}
    for g in pending:
        _, model, method, _ = g
        by_backbone.setdefault(registers_counterpart(model) if method.registers else model, []).append(g)
    sources: dict[tuple[str, str | None], ImageSource] = {}

    def source(ds: DatasetSpec, split: str | None) -> ImageSource:
        if (ds.name, split) not in sources:
            sources[ds.name, split] = open_dataset(ds, split)
        return sources[ds.name, split]

    ran = 0
    for backbone_name, runs in by_backbone.items():
        lazy = _Lazy(backbone_name, spec.device)
        for ds in spec.datasets:
            ds_runs = [g for g in runs if g[0] is ds]
            if not ds_runs:
                continue
            fit_split = ds.train_split if spec.protocol == "train-test" else ds.split
            eval_src = source(ds, ds.split)
            fit_src = source(ds, fit_split) if spec.protocol == "train-test" else eval_src
            cache = out / "cache" / _safe(ds.name)
            model_dir = _safe(backbone_name)
            for method in dict.fromkeys(g[2] for g in ds_runs):  # first-seen order, no repeats
                config, cal = _method_config(method, lazy, fit_src, spec, cache / "calibration" / model_dir)
                emb_name = "baseline" if config is None else "itae-" + _digest(config.to_dict())
                sub = f"{spec.feature}{'-normalized' if spec.normalize else ''}"
                t0 = time.perf_counter()
                x_eval, y_eval = embeddings_cached(lazy, eval_src, config, spec,
                                                   cache / _safe(str(ds.split)) / model_dir / sub / emb_name, progress)
                x_fit = None
                if spec.protocol == "train-test":
                    x_fit, _ = embeddings_cached(lazy, fit_src, config, spec,
                                                 cache / _safe(str(fit_split)) / model_dir / sub / emb_name, progress)
                log.embedded(ds.name, backbone_name, method.name, len(x_eval), time.perf_counter() - t0)
                classes, y = np.unique(np.asarray(y_eval), return_inverse=True)
                k = spec.k or len(classes)
                for g in (g for g in ds_runs if g[2] is method):
                    seed = g[3]
                    t0 = time.perf_counter()
                    if x_fit is None:
                        pred = _cluster(spec, x_eval, None, k, seed)
                    else:
                        pred = _cluster(spec, x_fit, x_eval, k, seed)
                    scores = evaluate(y, pred)
                    row = dict(zip(KEY_COLUMNS, keys[id(g)], strict=True))
                    row.update(
                        backbone=backbone_name, k=k, n_images=len(y), n_classes=len(classes),
                        acc=float(scores["acc"]), nmi=float(scores["nmi"]), ari=float(scores["ari"]),
                        purity=float(scores["purity"]),
                        threshold=None if cal is None else ";".join(f"{t:.6g}" for t in cal["thresholds"]),
                        flagged_fraction=None if cal is None else cal["flagged_fraction"],
                        embedding=emb_name, settings=settings, data=_data_key(ds, spec),
                        seconds=round(time.perf_counter() - t0, 3),
                    )
                    all_rows.append(row)
                    save()
                    ran += 1
                    log.run(row)
    if not pending or not csv_path.is_file():
        save()
    rows = _ordered(read_rows(csv_path), grid, keys)
    results = BenchResults(out, spec, rows, summarize_rows(rows), ran=ran, skipped=len(grid) - len(pending))
    if report:
        from .report import write_bench_report

        try:
            write_bench_report(results)
        except Exception as e:  # results.csv and results.md are written; the page is a view of them
            print(f"itae bench: report.html not written: {e}", file=sys.stderr)
    return results


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


def _method_config(method: MethodSpec, lazy: _Lazy, src: ImageSource, spec: BenchSpec,
                   folder: Path) -> tuple[ITAEConfig | None, dict[str, Any] | None]:
    """The embedding configuration of a method, with "auto" thresholds resolved (and cached)."""
    if method.itae is None:
        return None, None
    if method.itae.is_calibrated:
        return method.itae, None
    cal = calibrate_cached(lazy, src, method.itae, spec, folder)
    return method.itae.replace(threshold=tuple(cal["thresholds"])), cal


class _Log:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.count = enabled, total, 0

    def _print(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def skipped(self, n: int) -> None:
        self.count += n
        if n:
            self._print(f"bench: {n} of {self.total} runs already in results.csv, skipped")

    def embedded(self, dataset: str, model: str, method: str, n: int, seconds: float) -> None:
        self._print(f"bench: embeddings {dataset} / {model} / {method}: {n} images ({seconds:.1f}s)")

    def run(self, row: dict[str, Any]) -> None:
        self.count += 1
        self._print(
            f"bench: [{self.count}/{self.total}] {row['dataset']} {row['model']} {row['method']} seed {row['seed']}: "
            f"ACC {100 * row['acc']:.2f} NMI {100 * row['nmi']:.2f} ARI {100 * row['ari']:.2f}"
        )
