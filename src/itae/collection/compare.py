"""``itae compare OUT_A OUT_B -o OUT``: two runs over the same images, side by side.

Typical use: an ITAE run against a ``--no-itae`` run. Scores are computed here, from both runs'
assignments on the images they share, so they are comparable; the clusters of B are matched to those of A
(``itae.collection.runs``) to list the images whose cluster changed.

``OUT`` ending in ``.html`` is the page alone; any other ``OUT`` is a folder that gets ``compare.html``,
``changed.csv`` (path, label, cluster_a, cluster_b, matched_a, correct_a, correct_b) and ``compare.json``.
Runs over different image sets are refused, unless ``common=True`` (``--common``) compares them on the
images they share, which the page then says.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from itae.errors import InputError

from .._io import atomic_write_text
from ..data.store import prepare_output
from ..pipeline import ASSIGNMENTS, RUN, read_assignments
from ._images import store_images
from .assign import find_reference_store
from .runs import match_runs, matched_correct, per_class_accuracy

COMPARE_PAGE = "compare.html"
CHANGED = "changed.csv"
COMPARE_RECORD = "compare.json"
CHANGED_COLUMNS = ["path", "label", "cluster_a", "cluster_b", "matched_a", "correct_a", "correct_b"]
SCORES = ("acc", "nmi", "ari", "purity")


def _load_run(path: str | os.PathLike, name: str) -> dict[str, Any]:
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    assignments = p / ASSIGNMENTS if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"run {name} {str(p)!r} does not exist; give a run folder or its assignments.csv")
    if not assignments.is_file():
        raise FileNotFoundError(f"run {name} {str(p)!r} holds no {ASSIGNMENTS}; give the folder of itae run or "
                                "itae cluster")
    data = read_assignments(assignments)
    if len(set(data["ids"])) != len(data["ids"]):
        raise InputError(f"{str(assignments)!r} lists some images twice")
    record: dict[str, Any] = {}
    if (folder / RUN).is_file():
        try:
            record = json.loads((folder / RUN).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
    try:  # for thumbnails only: a run without its store is compared all the same
        store = find_reference_store(folder)
    except (OSError, ValueError):
        store = None
    return {"name": name, "folder": folder, "data": data, "record": record, "store": store}


def _describe(run: dict[str, Any]) -> tuple[str, list[tuple[str, Any]]]:
    rec, store = run["record"], run["store"]
    itae = rec.get("itae", "?") if rec else ("?" if store is None else store.manifest.get("itae"))
    on = "ITAE on" if itae not in (None, "?") else ("ITAE off" if itae is None else "ITAE unknown")
    facts: list[tuple[str, Any]] = [("folder", str(run["folder"]))]
    model = rec.get("model") or (store.model if store is not None else None)
    if model:
        facts.append(("model", model))
    facts.append(("ITAE", on.split(" ", 1)[1]))
    if isinstance(itae, dict):
        facts.append(("ITAE thresholds", itae.get("threshold")))
    clustering = rec.get("clustering") or {}
    if clustering:
        facts.append(("clustering", f"{clustering.get('method')} k={clustering.get('k')}"))
    facts.append(("images", len(run["data"]["ids"])))
    return f"{run['folder'].name or run['folder']} ({on})", facts


def compare(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    out: str | os.PathLike,
    *,
    common: bool = False,
    data: str | os.PathLike | None = None,
    max_changed: int = 200,
    thumb_size: int = 80,
) -> dict[str, Any]:
    """Compare two runs (folders or assignments.csv files); write the page (and tables) at ``out``.

    Returns the summary written to compare.json: metrics of each run and their difference (with labels),
    per-class accuracy, the agreement between the runs and the number of images whose cluster changed.
    data: where the images are, for thumbnails (default: run A's store's source, else run B's).
    """
    a, b = _load_run(run_a, "A"), _load_run(run_b, "B")
    ids_a, ids_b = a["data"]["ids"], b["data"]["ids"]
    set_a, set_b = set(ids_a), set(ids_b)
    notes: list[str] = []
    if set_a != set_b:
        shared = set_a & set_b
        only_a, only_b = sorted(set_a - set_b), sorted(set_b - set_a)
        detail = (f"{len(only_a)} images only in A" + (f" (e.g. {only_a[0]!r})" if only_a else "")
                  + f", {len(only_b)} only in B" + (f" (e.g. {only_b[0]!r})" if only_b else ""))
        if not shared:
            raise InputError(f"the runs share no image ({detail}); compare runs over the same images")
        if not common:
            raise InputError(f"the runs cover different images: {detail}, {len(shared)} shared; compare runs over "
                             "the same images, or pass common=True to compare on the shared ones")
        notes.append(f"The runs cover different images ({detail}): compared on the {len(shared)} they share.")
    ids = [i for i in ids_a if i in set_b]
    pos_a = {ident: i for i, ident in enumerate(ids_a)}
    pos_b = {ident: i for i, ident in enumerate(ids_b)}
    ca = a["data"]["clusters"][[pos_a[i] for i in ids]]
    cb = b["data"]["clusters"][[pos_b[i] for i in ids]]

    labels = None
    la, lb = a["data"]["labels"], b["data"]["labels"]
    if la is not None:
        labels = [la[pos_a[i]] for i in ids]
        if lb is not None:
            differ = sum(1 for i, lab in zip(ids, labels) if lb[pos_b[i]] != lab)
            if differ:
                raise InputError(f"the runs give different labels to {differ} of the {len(ids)} shared images; "
                                 "compare runs made from the same labelled data")
    elif lb is not None:
        labels = [lb[pos_b[i]] for i in ids]
    if labels is not None and any(v == "" for v in labels):
        notes.append("Some images have no label: scores and per-class figures are left out.")
        labels = None

    from ..metrics import ari, evaluate, nmi

    matching = match_runs(ca, cb)
    summary: dict[str, Any] = {
        "run_a": str(a["folder"]), "run_b": str(b["folder"]), "n_images": len(ids), "common_only": set_a != set_b,
        "agreement": {"matched": matching.agreement, "ari": float(ari(ca, cb)), "nmi": float(nmi(ca, cb))},
        "n_changed": int(matching.changed.sum()), "metrics": None, "per_class": None,
    }
    correct_a = correct_b = None
    if labels is not None:
        ma, mb = evaluate(labels, ca), evaluate(labels, cb)
        summary["metrics"] = {"a": ma, "b": mb, "b_minus_a": {s: mb[s] - ma[s] for s in SCORES}}
        correct_a, correct_b = matched_correct(labels, ca), matched_correct(labels, cb)
        pa, pb = per_class_accuracy(labels, correct_a), per_class_accuracy(labels, correct_b)
        summary["per_class"] = {c: {"images": n, "acc_a": acc, "acc_b": pb[c][1], "change": pb[c][1] - acc}
                                for c, (n, acc) in pa.items()}

    changed = np.flatnonzero(matching.changed)
    if correct_a is not None:  # fixed by B first, then broken by B, then the rest
        rank = np.where(~correct_a[changed] & correct_b[changed], 0, np.where(correct_a[changed] & ~correct_b[changed],
                                                                               1, 2))
        changed = changed[np.lexsort((np.array([ids[i] for i in changed]), rank))]
    rows = [{
        "path": ids[i], "label": "" if labels is None else labels[i], "cluster_a": int(ca[i]), "cluster_b": int(cb[i]),
        "matched_a": matching.b_to_a.get(int(cb[i]), ""),
        "correct_a": "" if correct_a is None else int(correct_a[i]),
        "correct_b": "" if correct_b is None else int(correct_b[i]),
    } for i in changed]

    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        prepare_output(out.parent if str(out.parent) else Path("."))
        page = out
    else:
        out = prepare_output(out)
        page = out / COMPARE_PAGE
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CHANGED_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / CHANGED, buf.getvalue())
    _write_page(page, a, b, summary, rows, notes, data=data, max_changed=max_changed, size=thumb_size)
    if page.parent == out:
        atomic_write_text(out / COMPARE_RECORD, json.dumps(summary, indent=2) + "\n")
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def _write_page(page: Path, a, b, summary, rows, notes, *, data, max_changed: int, size: int) -> None:
    from ..report.pages import thumb_item, write_compare_page

    stores = [run["store"] for run in (a, b) if run["store"] is not None]
    images = store_images(stores[0] if stores else None, data)
    title_a, facts_a = _describe(a)
    title_b, facts_b = _describe(b)
    metrics_rows = []
    if summary["metrics"]:
        ma, mb = summary["metrics"]["a"], summary["metrics"]["b"]
        metrics_rows = [(s.upper() if s != "purity" else "purity", _pct(ma[s]), _pct(mb[s]), _signed(mb[s] - ma[s]))
                        for s in SCORES]
        metrics_rows.append(("clusters", ma["n_clusters"], mb["n_clusters"], mb["n_clusters"] - ma["n_clusters"]))
    classes = []
    if summary["per_class"]:
        classes = [(c, v["images"], _pct(v["acc_a"]), _pct(v["acc_b"]), _signed(v["change"]))
                   for c, v in summary["per_class"].items()]
    ag = summary["agreement"]
    agreement_rows = [("same cluster (clusters matched)", f"{_pct(ag['matched'])}%"),
                      ("ARI between the runs", f"{ag['ari']:.4f}"), ("NMI between the runs", f"{ag['nmi']:.4f}")]
    items = []
    for r in rows[:max_changed]:
        lines = [r["path"], f"A {r['cluster_a']} \u2192 B {r['cluster_b']}"]
        if r["label"] != "":
            verdict = {(0, 1): "fixed by B", (1, 0): "broken by B"}.get((r["correct_a"], r["correct_b"]), "")
            lines.append(f"{r['label']}" + (f" \u00b7 {verdict}" if verdict else ""))
        items.append(thumb_item(r["path"], lines, images, size))
    write_compare_page(page, {
        "title": f"itae compare: {a['folder'].name or a['folder']} vs {b['folder'].name or b['folder']}",
        "thumb": size,
        "summary": [f"{summary['n_images']:,} images", f"{summary['n_changed']:,} changed cluster",
                    f"agreement {_pct(ag['matched'])}%"],
        "runs": [{"name": "A", "title": title_a, "facts": facts_a}, {"name": "B", "title": title_b, "facts": facts_b}],
        "notes": notes, "names": ["A", "B"], "metrics": metrics_rows, "n_common": summary["n_images"],
        "agreement": f"{_pct(ag['matched'])}%", "agreement_rows": agreement_rows, "classes": classes,
        "n_changed": summary["n_changed"], "changed": items,
    })
