"""results.csv (one row per run) and results.md (mean +- std per data set, model and method)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from itae._io import atomic_write_text
from itae.errors import InputError

from .published import verdict

KEY_COLUMNS = ("dataset", "model", "method", "seed", "protocol")
COLUMNS = KEY_COLUMNS + (
    "backbone", "k", "n_images", "n_classes", "acc", "nmi", "ari", "purity", "threshold", "flagged_fraction",
    "source", "side", "lift", "residual_ratio", "embedding", "settings", "data", "seconds", "weights", "neurons",
    "outlier_fraction",
)
SCORES = ("acc", "nmi", "ari")
BASELINES = ("baseline", "none")  # method names of the unmodified model, the reference of the deltas


def run_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[c]) for c in KEY_COLUMNS)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in KEY_COLUMNS + SCORES if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{str(path)!r} is not a bench results file (no column {missing[0]!r}); use another out_dir")
        return list(reader)


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _fmt(row.get(c)) for c in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: results.md is recomputed from these
    return str(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run), as ``itae.metrics.summarize``."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def summarize_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (dataset, protocol, model, method), in first-seen order, with mean/std (fractions) and
    the difference of means against the 'baseline' method of the same data set, protocol and model."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["protocol"], row["model"], row["method"]), []).append(row)
    out = []
    for (dataset, protocol, model, method), members in groups.items():
        entry: dict[str, Any] = {"dataset": dataset, "protocol": protocol, "model": model, "method": method,
                                 "runs": len(members), "backbone": members[0].get("backbone", model)}
        for s in SCORES:
            entry[s] = _mean_std([float(r[s]) for r in members])
        out.append(entry)
    base = {(e["dataset"], e["protocol"], e["model"]): e for e in out if e["method"] in BASELINES}
    for e in out:
        b = base.get((e["dataset"], e["protocol"], e["model"]))
        e["delta"] = None if b is None or b is e else {s: e[s][0] - b[s][0] for s in SCORES}
    return out


def shared_backbone_notes(summary: list[dict[str, Any]]) -> list[str]:
    """Notes for rows of different models that were embedded by one same model (the registers method maps
    every model of a family to one counterpart, e.g. all demo:* models to demo:registers): those rows are
    the same runs, so their numbers are identical by construction."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for e in summary:
        backbone = e.get("backbone") or e["model"]
        if backbone != e["model"]:
            groups.setdefault((e["dataset"], e["protocol"], e["method"], backbone), []).append(e["model"])
    notes = []
    for (dataset, _protocol, method, backbone), models in groups.items():
        if len(models) > 1:
            notes.append(
                f"On {dataset}, the {method} rows of {' and '.join(models)} are one and the same reference model, "
                f"{backbone} (the {method} method replaces each model by its with-registers counterpart, and "
                f"these models share it): the same runs, so the same numbers. Only their Δ differ, as each is "
                "taken against its own model's baseline."
            )
    return notes


def markdown(summary: Sequence[dict[str, Any]], *, title: str = "Benchmark results",
             comparison: Sequence[dict[str, Any]] | None = None, comparison_note: str = "",
             missing: dict[tuple[str, str, str], str] | None = None, notes: Sequence[str] = ()) -> str:
    """results.md: per data set and protocol, a table of mean +- std (%, over seeds) and deltas (points);
    then, when given, our numbers beside the published ones (``published.compare``) and the grid's cells
    that could not be run (``missing``: (data set, model, method) -> why)."""
    lines = [f"# {title}", "",
             "ACC / NMI / ARI in %, mean ± sample std over seeds; Δ = difference of means against the "
             "unmodified model's row (`none`, or `baseline`) of the same data set, protocol and model, in points.", ""]
    sections: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in summary:
        sections.setdefault((e["dataset"], e["protocol"]), []).append(e)
    for (dataset, protocol), entries in sections.items():
        lines += [f"## {dataset} (protocol: {protocol})", "",
                  "| model | method | runs | ACC | NMI | ARI | ΔACC | ΔNMI | ΔARI |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for e in entries:
            method = e["method"] if e["backbone"] == e["model"] else f"{e['method']} ({e['backbone']})"
            scores = [f"{100 * e[s][0]:.2f} ± {100 * e[s][1]:.2f}" for s in SCORES]
            deltas = ["—"] * 3 if e["delta"] is None else [f"{100 * e['delta'][s]:+.2f}" for s in SCORES]
            lines.append(f"| {e['model']} | {method} | {e['runs']} | " + " | ".join(scores + deltas) + " |")
        lines.append("")
        lines += [f"{note}\n" for note in shared_backbone_notes(entries)]
    if not summary:
        lines += ["No run has finished yet.", ""]
    if comparison:
        lines += ["## Published figures beside ours", "", comparison_note, "",
                  "| data set | model | method | score | ours | published | Δ | reproduced |",
                  "|---|---|---|---|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(comparison_cells(c)) + " |" for c in comparison]
        lines.append("")
    if missing:
        lines += ["## Missing cells", "", "Cells of the grid that could not be run (the rest of the grid went on).", "",
                  "| data set | model | method | why |", "|---|---|---|---|"]
        lines += [f"| {d} | {m} | {meth} | {why} |" for (d, m, meth), why in missing.items()]
        lines.append("")
    lines += [f"{note}\n" for note in notes]
    return "\n".join(lines)


def comparison_cells(c: dict[str, Any]) -> list[str]:
    """One row of the published-figures table: data set, model, method, score, ours, published, Δ, verdict."""
    ours = "—" if c["mean"] is None else f"{c['mean']:.2f} ± {c['std']:.2f}"
    diff = "—" if c["difference"] is None else f"{c['difference']:+.2f}"
    return [c["dataset"], c["model"], c["method"], c["score"].upper(), ours, f"{c['published']:.2f}", diff, verdict(c)]
