"""``report.html`` for a benchmark grid: the results table, and one run shown in full.

The shown run is the first data set's ITAE run that flags the most patches (else its first run): its
2-D map, confusion matrix, gallery and the artifact diagnostics of a few of its images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("itae.bench")

REPORT = "report.html"


def _pct(mean_std: tuple[float, float]) -> str:
    return f"{100 * mean_std[0]:.2f} ± {100 * mean_std[1]:.2f}"


def _summary_tables(summary: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], list[list[str]]]:
    metrics: dict[str, dict[str, float]] = {}
    table = [["data set", "protocol", "model", "method", "runs", "ACC %", "NMI %", "ARI %", "ΔACC", "ΔNMI", "ΔARI"]]
    for e in summary:
        metrics[f"{e['dataset']} · {e['model']} · {e['method']}"] = {s: e[s][0] for s in ("acc", "nmi", "ari")}
        delta = e.get("delta")
        table.append([
            e["dataset"], e["protocol"], e["model"], e["method"], str(e["runs"]),
            _pct(e["acc"]), _pct(e["nmi"]), _pct(e["ari"]),
            *(["—"] * 3 if not delta else [f"{100 * delta[s]:+.2f}" for s in ("acc", "nmi", "ari")]),
        ])
    return metrics, table


def write_bench_report(results, *, diagnostics: bool = True) -> Path:
    """Write ``<out_dir>/report.html`` for a finished (or partly finished) grid; return its path."""
    from itae.data.store import EmbeddingStore
    from itae.report.html import write_report

    from .runner import _cluster, _safe, load_model, open_dataset

    spec, out = results.spec, Path(results.out_dir)
    metrics, table = _summary_tables(results.summary)
    rows = results.rows
    if not rows:
        raise ValueError("no finished runs to report")
    ds = spec.datasets[0]
    first = [r for r in rows if r["dataset"] == ds.name and r["protocol"] == spec.protocol]
    engineered = [r for r in first if r["method"] != "baseline" and r.get("flagged_fraction") not in (None, "")]
    # show where ITAE acts: the engineered run that flags the most patches, else the first run
    shown = max(engineered, key=lambda r: float(r["flagged_fraction"]), default=first[0])
    sub = f"{spec.feature}{'-normalized' if spec.normalize else ''}"
    folder = out / "cache" / _safe(ds.name) / _safe(str(ds.split)) / _safe(shown["backbone"]) / sub / shown["embedding"]
    store = EmbeddingStore(folder)
    x = np.asarray(store.embeddings(mmap=False), dtype=np.float32)
    classes, y = np.unique(np.asarray(store.labels), return_inverse=True)
    pred = _cluster(spec, x, None, int(shown["k"]), int(shown["seed"]))
    source = open_dataset(ds, ds.split)
    index = {ident: i for i, ident in enumerate(source.ids)}

    def thumbnail(ident: str):
        from itae.data.decode import load_rgb

        try:
            return load_rgb(source.read(index[ident]))
        except Exception:  # a missing thumbnail is drawn as a placeholder
            return None

    pngs: list = []
    if diagnostics:
        try:
            from itae.config import ITAEConfig
            from itae.pipeline import _diagnostic_pngs

            cfg = store.itae_config or ITAEConfig()
            backbone = load_model(shown["backbone"], spec.device)
            pngs = [(f"{shown['model']} · {shown['method']}: CLS attention before and after ITAE", p)
                    for p in _diagnostic_pngs(backbone, source, cfg, out / "inspect")]
        except Exception as e:  # diagnostics are a bonus: the table matters more
            log.warning("itae bench: artifact diagnostics skipped: %s", e)
    config = {"spec": spec.to_dict(), "shown_run": {k: shown[k] for k in ("dataset", "model", "method", "seed")}}
    return write_report(
        out / REPORT,
        title=f"itae bench: {', '.join(d.name for d in spec.datasets)}",
        metrics=metrics, config=config, ids=store.ids, cluster_labels=pred, true_labels=list(classes[y]),
        embeddings=x, thumbnails=thumbnail, diagnostics_pngs=pngs,
        extra_tables=[("All runs: mean ± sample std over seeds, Δ against the baseline (points)", table)],
    )
