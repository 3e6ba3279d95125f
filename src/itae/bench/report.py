"""``report.html`` for a benchmark grid: the results table, and one run shown in full.

The shown run is the first data set's ITAE run that flags the most patches (else its first run): its
2-D map, confusion matrix, gallery and the artifact diagnostics of a few of its images. The page names
that run (data set, model, method, seed) in each section that shows it, and gives every score in percent,
as ``results.md`` does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from itae.config import ITAEConfig
from itae.diagnostics import REPORT_IMAGES, write_diagnostics
from itae.errors import InputError
from itae.report.figures import embedding_map

from .cache import embedding_dir
from .datasets import open_dataset
from .protocol import cluster_run, load_model
from .published import comparison_note, reference_set
from .results import comparison_cells, shared_backbone_notes

log = logging.getLogger("itae.bench")

REPORT = "report.html"
SCORES = ("acc", "nmi", "ari")


def _pct(mean_std: tuple[float, float]) -> str:
    return f"{100 * mean_std[0]:.2f} ± {100 * mean_std[1]:.2f}"


def _method_label(entry: dict[str, Any]) -> str:
    """The method, with the model that embedded when it is not the row's model (the registers method)."""
    backbone = entry.get("backbone") or entry["model"]
    return entry["method"] if backbone == entry["model"] else f"{entry['method']} ({backbone})"


def _summary_rows(summary: list[dict[str, Any]]) -> list[list[str]]:
    table = [["data set", "protocol", "model", "method", "runs", "ACC %", "NMI %", "ARI %",
              "ΔACC (points)", "ΔNMI (points)", "ΔARI (points)"]]
    for e in summary:
        delta = e.get("delta")
        table.append([
            e["dataset"], e["protocol"], e["model"], _method_label(e), str(e["runs"]),
            *(_pct(e[s]) for s in SCORES),
            *(["—"] * 3 if not delta else [f"{100 * delta[s]:+.2f}" for s in SCORES]),
        ])
    return table


def _shown_run_metrics(shown: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The shown run's own scores, in %, as one row named by the run."""
    def pct(key: str) -> str:
        value = shown.get(key)
        return "—" if value in (None, "") else f"{100 * float(value):.2f}"

    name = f"{shown['dataset']} · {shown['model']} · {shown['method']} · seed {shown['seed']}"
    return {name: {
        "embedded by": shown.get("backbone") or shown["model"], "k": str(shown["k"]),
        "images": str(shown.get("n_images", "")), "ACC %": pct("acc"), "NMI %": pct("nmi"), "ARI %": pct("ari"),
        "purity %": pct("purity"), "patches flagged %": pct("flagged_fraction"),
    }}


def _shown_run_name(shown: dict[str, Any]) -> str:
    backbone = shown.get("backbone") or shown["model"]
    model = shown["model"] if backbone == shown["model"] else f"{shown['model']} (embedded by {backbone})"
    return (f"data set {shown['dataset']} · model {model} · method {shown['method']} · seed {shown['seed']} "
            f"(ACC {100 * float(shown['acc']):.2f}%, NMI {100 * float(shown['nmi']):.2f}%, "
            f"ARI {100 * float(shown['ari']):.2f}%)")


def _comparison_tables(results) -> list[tuple[str, list[list[str]], list[str]]]:
    """The published figures beside ours, and the cells that could not be run, as report tables."""
    tables = []
    if results.comparison:
        header = ["data set", "model", "method", "score", "ours %", "published %", "Δ (points)", "reproduced"]
        tables.append(("Published figures beside ours",
                       [header, *(comparison_cells(c) for c in results.comparison)],
                       [comparison_note(reference_set(results.spec.reference))]))
    if results.missing:
        tables.append(("Missing cells", [["data set", "model", "method", "why"],
                                         *([*cell, why] for cell, why in results.missing.items())],
                       ["Cells of the grid that could not be run; the rest of the grid went on."]))
    return tables


def write_bench_report(results, *, diagnostics: bool = True, title: str | None = None) -> Path:
    """Write ``<out_dir>/report.html`` for a finished (or partly finished) grid; return its path.

    title: the page's title (default: "itae bench: " and the data sets' names)."""
    from itae.clustering import centroid_distances  # scikit-learn comes with it: loaded only when needed
    from itae.data.store import EmbeddingStore
    from itae.report.html import write_report

    spec, out = results.spec, Path(results.out_dir)
    rows = results.rows
    if not rows:
        raise InputError("no finished runs to report")
    ds = next(d for d in spec.datasets if any(r["dataset"] == d.name for r in rows))  # the first with runs
    first = [r for r in rows if r["dataset"] == ds.name and r["protocol"] == spec.protocol]
    engineered = [r for r in first if r["method"] != "baseline" and r.get("flagged_fraction") not in (None, "")]
    # show where ITAE acts: the engineered run that flags the most patches, else the first run
    shown = max(engineered, key=lambda r: float(r["flagged_fraction"]), default=first[0])
    folder = embedding_dir(out, ds.name, ds.split, shown["backbone"], spec.feature, spec.normalize, shown["embedding"])
    store = EmbeddingStore(folder)
    x = np.asarray(store.embeddings(mmap=False), dtype=np.float32)
    classes, y = np.unique(np.asarray(store.labels), return_inverse=True)
    pred = cluster_run(spec, x, None, int(shown["k"]), int(shown["seed"]))
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
            cfg = store.itae_config or ITAEConfig()
            backbone = load_model(shown["backbone"], spec.device, spec.model_root)
            drawn = write_diagnostics(backbone, source, out / "inspect", itae=cfg, max_images=REPORT_IMAGES)
            pngs = [(f"{shown['model']} · {shown['method']}: CLS attention before and after ITAE", drawn.grid)]
        except Exception as e:  # diagnostics are a bonus: the table matters more
            log.warning("itae bench: artifact diagnostics skipped: %s", e)
    config = {"spec": spec.to_dict(), "shown_run": {k: shown[k] for k in ("dataset", "model", "method", "seed")}}
    why = (f"the ITAE run that flags the most patches on {ds.name}" if shown in engineered
           else f"the first run on {ds.name}")
    table_notes = [
        "ACC / NMI / ARI in %, mean ± sample std over seeds; Δ = difference of means against the baseline "
        "method of the same data set, protocol and model, in points.",
        *shared_backbone_notes(results.summary),
    ]
    return write_report(
        out / REPORT,
        title=title or f"itae bench: {', '.join(d.name for d in spec.datasets)}",
        metrics=_shown_run_metrics(shown),
        metrics_note=f"The run that the confusion table, map and gallery below show ({why}); scores in %. "
                     "Every run of the grid is in the next table.",
        config=config, ids=store.ids, cluster_labels=pred, true_labels=list(classes[y]),
        embeddings=x, layout=embedding_map(x), centroid_distances=centroid_distances(x, pred), thumbnails=thumbnail,
        diagnostics_pngs=pngs,
        extra_tables=[("All runs", _summary_rows(results.summary), table_notes), *_comparison_tables(results)],
        shown_run=_shown_run_name(shown),
    )
