"""Published figures (package data, ``published.json``) and how ours compare with them.

Each reference set holds figures in % for (data set, model, method) cells, with its source. A published
figure counts as reproduced when it lies within our spread plus one point:
``|published - our mean| <= our sample std + 1`` (all in %).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from itae.errors import InputError

SCORES = ("acc", "nmi", "ari")
TOLERANCE_POINTS = 1.0


@dataclass(frozen=True)
class PublishedFigure:
    dataset: str
    model: str
    method: str
    score: str  # "acc", "nmi" or "ari"
    value: float  # in %


@dataclass(frozen=True)
class ReferenceSet:
    name: str
    title: str
    source: str
    protocol: str
    figures: tuple[PublishedFigure, ...]


@lru_cache(maxsize=1)
def reference_sets() -> dict[str, ReferenceSet]:
    """Every reference set of ``published.json``, by name ("paper", "mteb")."""
    data = json.loads(resources.files("itae.bench").joinpath("published.json").read_text(encoding="utf-8"))
    sets = {}
    for name, entry in data.items():
        figures = tuple(
            PublishedFigure(f["dataset"], f["model"], f["method"], score, float(f[score]))
            for f in entry["figures"] for score in SCORES if score in f
        )
        sets[name] = ReferenceSet(name, entry["title"], entry["source"], entry["protocol"], figures)
    return sets


def reference_set(name: str) -> ReferenceSet:
    sets = reference_sets()
    if name not in sets:
        raise InputError(f"unknown reference {name!r}; known: {', '.join(sets)}")
    return sets[name]


def compare(reference: ReferenceSet, summary: Sequence[dict[str, Any]], cells: Iterable[tuple[str, str, str]],
            missing: dict[tuple[str, str, str], str] | None = None) -> list[dict[str, Any]]:
    """One entry per published figure whose (data set, model, method) cell is in ``cells`` (the grid):
    our mean and std (%, from ``summary``), the difference, and whether it counts as reproduced
    (None while the cell has no finished run; ``status`` then says why)."""
    cells = set(cells)
    missing = missing or {}
    ours = {(e["dataset"], e["model"], e["method"]): e for e in summary}
    out = []
    for fig in reference.figures:
        cell = (fig.dataset, fig.model, fig.method)
        if cell not in cells:
            continue
        entry: dict[str, Any] = {"dataset": fig.dataset, "model": fig.model, "method": fig.method,
                                 "score": fig.score, "published": fig.value, "mean": None, "std": None,
                                 "runs": 0, "difference": None, "reproduced": None}
        e = ours.get(cell)
        if e is not None:
            mean, std = (100 * v for v in e[fig.score])
            entry.update(mean=mean, std=std, runs=e["runs"], difference=mean - fig.value,
                         reproduced=abs(fig.value - mean) <= std + TOLERANCE_POINTS)
            entry["status"] = "reproduced" if entry["reproduced"] else "not reproduced"
        else:
            entry["status"] = f"missing: {missing[cell]}" if cell in missing else "not run yet"
        out.append(entry)
    return out


def verdict(entry: dict[str, Any]) -> str:
    """The per-cell word of results.md and the report."""
    if entry["reproduced"] is None:
        return entry["status"]
    return "yes" if entry["reproduced"] else "no"


def comparison_note(reference: ReferenceSet) -> str:
    return (f"Published: {reference.title}. Source: {reference.source}. Ours: mean ± sample std over seeds, in %; "
            f"Δ = ours − published, in points. Reproduced: the published figure lies within our spread plus "
            f"{TOLERANCE_POINTS:g} point (|published − mean| ≤ std + {TOLERANCE_POINTS:g}).")
