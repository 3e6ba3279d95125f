"""`report.html`: one self-contained page per run (metrics, confusion, explorable map, gallery, diagnostics,
config).

The page needs no network: CSS and the map's small script are inline, images are base64 data URIs. The
map is a canvas drawn by that script (pan, zoom, hover, colour by cluster or label, cluster filter; see
`itae.report.mapview`), with thumbnails for a sample of its points. Everything drawn is sampled and
capped, so a run over 100,000 images still gives a page of a few MB that opens fast; the page says what
was sampled. Every string that comes from data (ids, labels, config values, metric names) is escaped:
``html.escape`` here, Jinja2's autoescaping and ``tojson`` in the map's template.

Noise (cluster label -1, from HDBSCAN) follows the rule of `itae.metrics`: it is not a cluster. The page
counts clusters without it, shows it as one "noise" row of the confusion table that is matched to no
label (its points count as wrong in the accuracy printed there), draws it in grey on the map, and shows
it as a "noise" group after the clusters in the gallery.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from itae._io import atomic_write_text
from itae._version import __version__ as version
from itae.data.sources import display_name
from itae.errors import InputError
from itae.metrics import ClusterMatching, is_noise, match_clusters, noise_index
from itae.report.figures import EmbeddingMap, embedding_map, thumbnail_jpeg
from itae.report.mapview import map_payload, map_section_html
from itae.report.templates import environment

SECTION_IDS = ("metrics", "confusion", "map", "gallery", "diagnostics", "config")
__all__ = ["SECTION_IDS", "write_report"]

Thumbnails = Callable[[str], Any] | Mapping[str, Any]
PngLike = bytes | str | Path


_DOT = " \u00b7 "


def _e(value: Any) -> str:
    """Escape any value for HTML text and attribute context."""
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------------------------
# Small helpers


def _fmt(value: Any) -> str:
    """A cell value as escaped text; containers are spelled out, never shown as a Python repr."""
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, Mapping):
        return _DOT.join(f"{_e(k)} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return _e(v)
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.2f}"
    return _e(value)


def _data_uri(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    else:
        raise InputError("diagnostic images must be PNG, JPEG or WebP bytes")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _short(text: str, limit: int) -> str:
    """Keep the end of long ids (the file name is the informative part)."""
    return text if len(text) <= limit else "\u2026" + text[-(limit - 1):]


def _noise_mask(clusters: np.ndarray) -> np.ndarray:
    """(n,) bool: which points are noise (label -1; only numeric cluster labels can be)."""
    if clusters.dtype.kind not in "iuf":
        return np.zeros(clusters.shape, dtype=bool)
    return clusters == -1


def _as_label_array(labels: Sequence[Any]) -> np.ndarray:
    """Labels as int64 when they are all integers (sorted numerically), else as strings."""
    arr = np.asarray(list(labels), dtype=object)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr):
        return arr.astype(np.int64)
    return arr.astype(str)


# ----------------------------------------------------------------------------------------------------
# Confusion matrix


def _confusion_html(matching: ClusterMatching, max_size: int) -> str:
    cluster_ids, label_ids, table = matching.cluster_ids, matching.class_ids, matching.table
    match = matching.cluster_of()  # label column -> cluster row
    acc = matching.accuracy

    label_counts = table.sum(axis=0)
    cluster_counts = table.sum(axis=1)
    shown_cols = np.arange(len(label_ids))
    if len(shown_cols) > max_size:
        shown_cols = np.sort(np.argsort(-label_counts, kind="stable")[:max_size])
    noise_row = matching.noise_row
    shown_rows = [match[c] for c in shown_cols if c in match]
    for r in np.argsort(-cluster_counts, kind="stable"):
        if len(shown_rows) >= max_size:
            break
        if r not in shown_rows and r != noise_row:
            shown_rows.append(int(r))
    n_shown_clusters = len(shown_rows)
    if noise_row is not None:
        shown_rows.append(noise_row)  # always shown, last, besides the cap on clusters

    notes = [
        f"Rows are clusters, matched one-to-one to labels by the Hungarian method (accuracy under this matching: "
        f"{100.0 * acc:.2f}%); each row is shaded by the share of the cluster in each label."
    ]
    if noise_row is not None:
        n_noise, n_all = int(cluster_counts[noise_row]), int(table.sum())
        notes.append(
            f"The last row, noise, holds the {n_noise:,} images ({100.0 * n_noise / max(n_all, 1):.1f}%) that "
            "are in no cluster: it is not a cluster, is matched to no label, and its images count as wrong in "
            "the accuracy above."
        )
    if len(shown_cols) < len(label_ids) or n_shown_clusters < matching.n_clusters:
        notes.append(
            f"Showing {n_shown_clusters} of {matching.n_clusters} clusters and {len(shown_cols)} of "
            f"{len(label_ids)} labels (the largest labels and their matched clusters); the totals count all labels."
        )
    head = "".join(f'<th class="rot" title="{_e(label_ids[c])}"><span>{_e(_short(str(label_ids[c]), 16))}</span></th>'
                   for c in shown_cols)
    body = []
    for r in shown_rows:
        total = int(cluster_counts[r])
        matched_col = next((c for c, rr in match.items() if rr == r), None)
        cells = []
        for c in shown_cols:
            v = int(table[r, c])
            share = v / total if total else 0.0
            cls = ' class="hit"' if c == matched_col else ""
            style = ""
            if v:  # darker for a larger share of the cluster; white text where the shade is dark
                ink = ";color:#fff" if share > 0.55 else ""
                rgb = "110,118,129" if r == noise_row else "37,99,235"  # noise in grey
                style = f' style="background:rgba({rgb},{0.08 + 0.82 * share:.2f}){ink}"'
            cells.append(f"<td{cls}{style}>{f'{v:,}' if v else ''}</td>")
        matched = "" if matched_col is None else _e(_short(str(label_ids[matched_col]), 24))
        if r == noise_row:
            matched = "(none: not a cluster)"
        row_class = ' class="noise"' if r == noise_row else ""
        body.append(
            f'<tr{row_class}><th class="rowh">{_e(_cluster_name(cluster_ids[r]))}</th><td class="muted">{matched}</td>'
            + "".join(cells) + f'<td class="tot">{total:,}</td></tr>'
        )
    return (
        "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
        + '<div class="scroll"><table class="confusion"><thead><tr><th>cluster</th><th>matched label</th>'
        + head + "<th>total</th></tr></thead><tbody>" + "".join(body) + "</tbody></table></div>"
    )


def _is_noise_id(c: Any) -> bool:
    return is_noise(c.item() if isinstance(c, np.generic) else c)


def _cluster_name(c: Any) -> str:
    return "noise" if _is_noise_id(c) else f"cluster {c}"


# ----------------------------------------------------------------------------------------------------
# Gallery


def _thumbnail_uri(image: Any, size: int) -> str:
    data = thumbnail_jpeg(image, size, quality=72, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _get_thumbnail(thumbnails: Thumbnails, key: str) -> Any:
    if isinstance(thumbnails, Mapping):
        return thumbnails[key]
    return thumbnails(key)


def _gallery_html(
    ids: Sequence[str],
    clusters: np.ndarray,
    labels: np.ndarray | None,
    distances: np.ndarray | None,
    thumbnails: Thumbnails | None,
    *,
    max_clusters: int,
    per_cluster: int,
    thumb_size: int,
) -> str:
    n = len(clusters)
    cluster_ids, inv, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    noise_row = noise_index(cluster_ids)
    n_clusters = len(cluster_ids) - (noise_row is not None)
    order = [int(r) for r in np.argsort(-counts, kind="stable") if r != noise_row][:max_clusters]
    # Members of every cluster, nearest to the centroid first, from one stable sort (noise: no centroid,
    # NaN distances, so input order).
    key = distances if distances is not None else np.arange(n)
    by_cluster = np.lexsort((key, inv))
    starts = np.concatenate([[0], np.cumsum(counts)])
    note = (
        f"Showing {len(order)} of {n_clusters} clusters, largest first; up to {per_cluster} images each, "
        + ("nearest to the cluster centroid first." if distances is not None else "in input order.")
    )
    if noise_row is not None:
        order.append(noise_row)
        note += (f" Then the noise: {int(counts[noise_row]):,} images in no cluster (not a cluster), "
                 f"up to {per_cluster} of them in input order.")
    parts = [f'<p class="note">{_e(note)}</p>']
    failed = 0
    for rank in order:
        c = cluster_ids[rank]
        members = by_cluster[starts[rank]: starts[rank + 1]]
        if rank == noise_row:
            members = np.sort(members)  # input order: noise has no centre to be near
        size = int(counts[rank])
        meta = [f"{size:,} images", f"{100.0 * size / n:.1f}%"]
        if labels is not None:
            labs, lab_counts = np.unique(labels[members], return_counts=True)
            top = int(np.argmax(lab_counts))
            which = "most frequent label" if rank == noise_row else "majority label"
            meta.append(f"{which} {_short(str(labs[top]), 30)} ({100.0 * lab_counts[top] / size:.0f}%)")
        cells = []
        for i in members[:per_cluster]:
            name = str(ids[i])
            tip = name if labels is None else f"{name} \u2014 label {labels[i]}"
            img = ""
            if thumbnails is not None:
                try:
                    uri = _thumbnail_uri(_get_thumbnail(thumbnails, name), thumb_size)
                    img = f'<img src="{uri}" alt="{_e(name)}" width="{thumb_size}" height="{thumb_size}">'
                except (OSError, KeyError, ValueError, TypeError):
                    failed += 1
                    img = f'<div class="noimg" style="width:{thumb_size}px;height:{thumb_size}px">n/a</div>'
            # The caption is the file name (CSS clips it to the thumbnail); the tooltip has the full id.
            caption = _short(display_name(name), 60)  # a WebDataset sample's key, not its shard
            cells.append(f'<figure title="{_e(tip)}">{img}<figcaption>{_e(caption)}</figcaption></figure>')
        parts.append(
            f'<div class="cluster"><h3>{_e(_cluster_name(c))} <span class="muted">{_e(_DOT.join(meta))}'
            f'</span></h3><div class="thumbs" style="--thumb:{thumb_size}px">{"".join(cells)}</div></div>'
        )
    if failed:
        parts.insert(1, f'<p class="note warn">{failed} thumbnail(s) could not be loaded and are shown as n/a.</p>')
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------
# Tables


_SEED_KEYS = ("seeds", "n_runs", "mean", "std")  # the extra keys of a multi-seed run's metrics


def _metrics_html(metrics: Mapping[str, Any] | None) -> str:
    """The metrics table. Accepts: a flat dict (one run: metric -> value); one run scored over several
    seeds (``itae.pipeline.evaluate_assignments``: the first seed's scores at the top level plus ``seeds``,
    ``n_runs``, ``mean`` and ``std``); or a dict of dicts (one row per name, e.g. one per configuration)."""
    if not metrics:
        return '<p class="note">No metrics for this run.</p>'
    if all(isinstance(v, Mapping) for v in metrics.values()):
        columns: list[str] = []
        for row in metrics.values():
            columns += [k for k in row if k not in columns]
        head = "".join(f"<th>{_e(c)}</th>" for c in columns)
        body = "".join(
            f"<tr><th>{_e(name)}</th>" + "".join(f"<td>{_fmt(row.get(c, ''))}</td>" for c in columns) + "</tr>"
            for name, row in metrics.items()
        )
        return f'<table class="metrics"><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>'
    if isinstance(metrics.get("mean"), Mapping) and isinstance(metrics.get("std"), Mapping):
        return _seed_metrics_html(metrics)
    rows, tables = _flat_rows(metrics)
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<table class="metrics"><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>{body}</tbody>'
            "</table>" + tables)


def _flat_rows(metrics: Mapping[str, Any], skip: Sequence[str] = ()) -> tuple[list[tuple[str, str]], str]:
    """(name, formatted value) rows of the scalar entries, nested dicts flattened to "key · sub"; lists of
    dicts become tables of their own (returned as HTML)."""
    rows: list[tuple[str, str]] = []
    tables = ""
    for key, value in metrics.items():
        if key in skip:
            continue
        if isinstance(value, Mapping):
            rows += [(f"{key}{_DOT}{sub}", _fmt(v)) for sub, v in value.items()]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            tables += f"<h3>{_e(key)}</h3>" + _rows_table(value)
        else:
            rows.append((str(key), _fmt(value)))
    return rows, tables


def _seed_metrics_html(metrics: Mapping[str, Any]) -> str:
    seeds = [r for r in metrics.get("seeds") or [] if isinstance(r, Mapping)]
    mean, std = metrics["mean"], metrics["std"]
    n_runs = metrics.get("n_runs", len(seeds))
    first = seeds[0].get("seed") if seeds else None
    shown = "first seed" if first is None else f"seed {first}"
    seed_list = ", ".join(str(r["seed"]) for r in seeds if "seed" in r)
    note = (
        f"The first column is the run of the first seed ({shown}), the one whose clusters the sections below "
        f"show; the second is the mean \u00b1 sample standard deviation over all {n_runs} seeds"
        + (f" ({seed_list})" if seed_list else "") + "."
    )
    rows, tables = _flat_rows(metrics, skip=_SEED_KEYS)
    names = [name for name, _ in rows]
    rows += [(k, "") for k in mean if k not in names]  # a summarised score missing at the top level
    body = []
    for name, value in rows:
        spread = ""
        if name in mean:
            spread = f"{_fmt(mean[name])} \u00b1 {_fmt(std.get(name, float('nan')))}"
        body.append(f"<tr><th>{_e(name)}</th><td>{value}</td><td>{spread}</td></tr>")
    html_ = (
        f'<p class="note">{_e(note)}</p><table class="metrics"><thead><tr><th>metric</th>'
        f"<th>{_e(shown)} (first seed)</th><th>mean \u00b1 std over {_e(n_runs)} seeds</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    if seeds:
        constant = {k for k in seeds[0] if all(r.get(k) == seeds[0][k] for r in seeds)} - {"seed"}
        columns = ["seed"] + [k for k in seeds[0] if k != "seed" and (k in mean or k not in constant)]
        per_seed = [{c: r.get(c, "") for c in columns} for r in seeds]
        html_ += "<h3>Per seed</h3>" + _rows_table(per_seed)
    return html_ + tables


def _self_check_html(check: Mapping[str, Any]) -> str:
    """The ITAE self-check: a line saying what was flagged, and per block (and per candidate) its scores."""
    status = check.get("status")
    if status == "off":
        return ('<p class="note shown">ITAE was off for this run: the figures show the unmodified model, '
                "and nothing is flagged.</p>")
    cls = "note shown" + (" warn" if status == "nothing flagged" else "")
    out = f'<p class="{cls}">{_e(check.get("summary", ""))}</p>'
    columns = ("source", "side", "threshold", "flagged_fraction", "lift", "residual_ratio", "passes", "reason")

    def rows(checks) -> list[dict[str, Any]]:
        return [{"block": c["block"], **{k: c.get(k) for k in columns}} for c in checks]

    blocks = list((check.get("blocks") or {}).values())
    if blocks:
        out += _rows_table(rows(blocks))
    candidates = [c for cs in (check.get("candidates") or {}).values() for c in cs]
    if check.get("chosen_by") == "auto" and candidates:
        out += (f'<p class="note">Candidates tried by source="auto" (bar: {_e(check.get("bar", ""))}); '
                "lift: CLS patch attention share on the flagged patches over their share of the patches "
                "(unmodified model); residual_ratio: their mean residual-stream norm over the others'.</p>")
        out += _rows_table(rows(candidates))
    return out


def _rows_table(rows: Sequence[Any]) -> str:
    rows = list(rows)
    if not rows:
        return '<p class="note">(empty)</p>'
    if all(isinstance(r, Mapping) for r in rows):
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        header, data = columns, [[r.get(c, "") for c in columns] for r in rows]
    else:
        header, data = list(rows[0]), [list(r) for r in rows[1:]]
    head = "".join(f"<th>{_e(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in data)
    return f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _k_selection_html(k_selection: Mapping[str, Any]) -> str:
    """Every k tried by the automatic choice, with its score as a number and a bar; the chosen k marked."""
    criterion = str(k_selection.get("criterion", "score"))
    scores = {int(k): float(v) for k, v in (k_selection.get("scores") or {}).items()}
    chosen = k_selection.get("chosen")
    if not scores:
        return '<p class="note">No scores were kept for the automatic choice of k.</p>'
    higher = criterion != "davies_bouldin"
    finite = [v for v in scores.values() if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    rows = []
    for k in sorted(scores):
        v = scores[k]
        share = 0.0 if not math.isfinite(v) or hi == lo else (v - lo) / (hi - lo)
        if not higher:
            share = 1.0 - share
        bar = f'<span class="kbar" style="width:{4 + 156 * share:.0f}px"></span>' if math.isfinite(v) else ""
        mark = ' class="chosen"' if k == chosen else ""
        rows.append(f"<tr{mark}><td>{k}{' (chosen)' if k == chosen else ''}</td><td>{_fmt(v)}</td>"
                    f'<td class="kcell">{bar}</td></tr>')
    direction = "higher" if higher else "lower"
    note = (f"k was chosen automatically by the {criterion.replace('_', '-')} criterion ({direction} is better; "
            f"ties go to the smaller k). The bar is longer for a better score.")
    return (f'<p class="note">{_e(note)}</p><table class="metrics ktable"><thead><tr><th>k</th>'
            f"<th>{_e(criterion)}</th><th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


# ----------------------------------------------------------------------------------------------------
# Page


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def _read_png(item: PngLike) -> tuple[str, bytes]:
    if isinstance(item, (bytes, bytearray)):
        return "", bytes(item)
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(f"diagnostic image {path} does not exist")
    return path.name, path.read_bytes()


def write_report(
    path: str | Path,
    *,
    title: str,
    metrics: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    ids: Sequence[str],
    cluster_labels: np.ndarray,
    true_labels: Sequence[Any] | None = None,
    embeddings: np.ndarray | None = None,
    centroid_distances: np.ndarray | None = None,
    thumbnails: Thumbnails | None = None,
    diagnostics_pngs: Sequence[PngLike | tuple[str, PngLike]] | None = None,
    extra_tables: Sequence[tuple[str, Sequence[Any]] | tuple[str, Sequence[Any], Sequence[str]]] | None = None,
    layout: EmbeddingMap | None = None,
    k_selection: Mapping[str, Any] | None = None,
    max_points: int = 100_000,
    fit_points: int = 2_500,
    max_map_thumbs: int = 1_500,
    max_thumbs_per_cluster: int = 12,
    max_clusters_shown: int = 50,
    max_confusion: int = 30,
    thumb_size: int = 80,
    map_method: str = "auto",
    seed: int = 0,
    shown_run: str | None = None,
    metrics_note: str | None = None,
    banner: str | None = None,
    self_check: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-contained HTML report of one clustering run; return its path.

    The page only draws: what it shows is computed by the packages that own it, by the caller or, for what
    the caller leaves out, here through the same functions: the map's layout by
    `itae.report.figures.embedding_map`, the distances by `itae.clustering.centroid_distances`, the
    matching of clusters to labels by `itae.metrics.match_clusters`.

    ids, cluster_labels, true_labels and the rows of embeddings / centroid_distances are aligned (n each).
    embeddings: (n, D) features, or an (n, 2) precomputed map; used for the layout and the centroid
    distances when ``layout`` / ``centroid_distances`` are not given. layout: the map's 2-D coordinates
    (an ``EmbeddingMap``); without it the map is laid out from ``embeddings`` with ``map_method``,
    ``max_points`` and ``fit_points``. thumbnails: id -> PIL image, array or image path (callable or
    mapping), called only for the images shown. diagnostics_pngs: PNG bytes or paths, optionally as (caption, png).
    extra_tables: (title, rows) with rows a list of dicts or a list of sequences whose first is the header,
    or (title, rows, notes) with notes printed under the table.
    metrics: see ``_metrics_html`` for the shapes accepted; ``metrics_note`` is printed above its table.
    k_selection: when k was chosen automatically, {"criterion": name, "scores": {k: score}, "chosen": k},
    shown as a table of every k tried.
    shown_run: which run the confusion table, map and gallery show, when the page covers several (e.g. a
    benchmark grid); each of those sections then starts by naming it.
    banner: one line shown under the title (e.g. whether ITAE was on). self_check: the ITAE self-check
    of the run (``itae.pipeline.self_check``), shown as a table at the top of the diagnostics.
    """
    n = len(ids)
    clusters = np.asarray(cluster_labels).reshape(-1)
    if clusters.shape[0] != n:
        raise InputError(f"cluster_labels has {clusters.shape[0]} entries but there are {n} ids")
    if n == 0:
        raise InputError("nothing to report: ids is empty")
    labels = None
    if true_labels is not None:
        if len(true_labels) != n:
            raise InputError(f"true_labels has {len(true_labels)} entries but there are {n} ids")
        labels = _as_label_array(true_labels)
    if embeddings is not None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] != n:
            raise InputError(f"embeddings must be (n, D) with n={n}; got shape {embeddings.shape}")
    if centroid_distances is not None:
        centroid_distances = np.asarray(centroid_distances, dtype=np.float64).reshape(-1)
        if centroid_distances.shape[0] != n:
            raise InputError(f"centroid_distances has {centroid_distances.shape[0]} entries but there are {n} ids")
    elif embeddings is not None:
        from itae import clustering  # scikit-learn comes with it: loaded only when needed

        centroid_distances = clustering.centroid_distances(embeddings, clusters)

    noise = _noise_mask(clusters)
    k = len(np.unique(clusters[~noise]))
    summary = [f"{n:,} images", f"{k:,} clusters"]
    if noise.any():
        summary.append(f"{int(noise.sum()):,} noise images ({100.0 * noise.mean():.1f}%, in no cluster)")
    if labels is not None:
        summary.append(f"{len(np.unique(labels)):,} labels")
    summary.append(f"generated {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z').strip()}")
    summary.append(f"itae {version}")

    metrics_body = _metrics_html(metrics)
    if metrics_note:
        metrics_body = f'<p class="note">{_e(metrics_note)}</p>' + metrics_body
    sections = [_section("metrics", "Metrics", metrics_body)]
    if k_selection:
        sections.append(_section("k", "Choosing k", _k_selection_html(k_selection)))
    shown = f'<p class="note shown">Run shown: {_e(shown_run)}</p>' if shown_run else ""
    for i, (table_title, rows, *notes) in enumerate(extra_tables or []):
        below = "".join(f'<p class="note">{_e(n)}</p>' for n in (notes[0] if notes else ()))
        sections.append(_section(f"table-{i}", str(table_title), _rows_table(rows) + below))

    matching = match_clusters(labels, clusters) if labels is not None else None
    if matching is not None:
        confusion = _confusion_html(matching, max_confusion)
    else:
        confusion = '<p class="note">No ground-truth labels were given for this run.</p>'
    sections.append(_section("confusion", "Clusters against labels", shown + confusion))

    if layout is None and embeddings is not None:
        layout = embedding_map(embeddings, max_points=max_points, method=map_method, seed=seed, fit_points=fit_points)
    if layout is not None:
        if layout.index.size and int(layout.index.max()) >= n:
            raise InputError(f"layout indexes row {int(layout.index.max())} but there are {n} ids")
        matched = None
        if matching is not None:
            matched = matching.class_of()
        payload = map_payload(layout, ids, clusters, labels, centroid_distances, thumbnails, matched=matched,
                              max_thumbs=max_map_thumbs, seed=seed)
        n_thumbs = len(payload["thumbs"]["data"])
        note = (f"{layout.description} Layout: {layout.method}. Thumbnails are embedded for {n_thumbs:,} of the "
                f"{layout.index.size:,} points (a uniform sample); the others show \u201cno thumbnail\u201d.")
        if matching is not None:
            note += " Each cluster is drawn in the colour of its matched label."
        if _noise_mask(clusters).any():
            note += " Noise (in no cluster) is drawn in grey, under the clusters."
        body = map_section_html(payload, note=note)
    else:
        body = '<p class="note">No embeddings were given; no map drawn.</p>'
    sections.append(_section("map", "Embedding map", shown + body))

    sections.append(_section("gallery", "Gallery", shown + _gallery_html(
        ids, clusters, labels, centroid_distances, thumbnails,
        max_clusters=max_clusters_shown, per_cluster=max_thumbs_per_cluster, thumb_size=thumb_size,
    )))

    check_html = _self_check_html(self_check) if self_check is not None else ""
    if diagnostics_pngs:
        figs = []
        for item in diagnostics_pngs:
            caption, png_item = (item if isinstance(item, tuple) else (None, item))
            name, data = _read_png(png_item)
            caption = name if caption is None else str(caption)
            figs.append(f'<figure><img class="figure" src="{_data_uri(data)}" alt="{_e(caption)}">'
                        f"<figcaption>{_e(caption)}</figcaption></figure>")
        body = f'<div class="diag">{"".join(figs)}</div>'
    else:
        body = '<p class="note">No artifact diagnostics for this run.</p>'
    sections.append(_section("diagnostics", "Artifact diagnostics", check_html + body))

    config_text = json.dumps(config, indent=2, default=str, ensure_ascii=False)
    sections.append(_section("config", "Configuration", f"<pre>{_e(config_text)}</pre>"))

    nav = [(sid, sid) for sid in SECTION_IDS[:1] + (("k",) if k_selection else ()) + SECTION_IDS[1:]]
    page = environment().get_template("report.html.j2").render(
        title=title, summary=summary, banner=banner, nav=nav, sections="".join(sections),
    )
    return _write_atomic(Path(path), page + "\n")


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text, errors="backslashreplace")  # a file name that is not UTF-8 shows its bytes
    return path
