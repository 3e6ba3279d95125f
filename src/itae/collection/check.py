"""``itae check STORE -o OUT``: near-duplicates, outliers and likely mislabels of a collection.

Reads any finished store (or a run folder, whose ``embeddings/`` and ``assignments.csv`` are used), finds
the exact k nearest neighbours of every image (``itae.collection.neighbours``, where the rules and
defaults are explained) and writes, each whole or not at all:

- ``duplicates.csv``: group, size, path, label, cluster, nearest, distance (one row per grouped image);
- ``outliers.csv``: rank, path, label, cluster, score, z (the images at or above the z cut-off);
- ``mislabels.csv``: rank, path, label, suggested, score, knn_agreement, cluster, cluster_majority,
  cluster_agreement (the suspects; only when labels are known);
- ``check.json``: the settings and counts; ``check.html``: thumbnails of the groups, outliers, suspects.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itae.errors import InputError

from .._io import atomic_write_text
from ..data.store import EmbeddingStore, StoreError, prepare_output
from ..pipeline import ASSIGNMENTS, STORE_DIR, read_assignments
from ._images import store_images
from .neighbours import (
    DUP_THRESHOLD,
    NEIGHBOURS,
    OUTLIER_Z,
    cosine_knn,
    duplicate_groups,
    knn_backend,
    label_disagreement,
    outlier_scores,
)

DUPLICATES = "duplicates.csv"
OUTLIERS = "outliers.csv"
MISLABELS = "mislabels.csv"
CHECK_RECORD = "check.json"
CHECK_PAGE = "check.html"
DUPLICATE_COLUMNS = ["group", "size", "path", "label", "cluster", "nearest", "distance"]
OUTLIER_COLUMNS = ["rank", "path", "label", "cluster", "score", "z"]
MISLABEL_COLUMNS = ["rank", "path", "label", "suggested", "score", "knn_agreement", "cluster", "cluster_majority",
                    "cluster_agreement"]


@dataclass
class CheckResult:
    """The three tables (lists of rows, as in the CSV files) and the summary written to check.json.

    ``mislabels`` is None when no labels are known.
    """

    duplicates: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    mislabels: list[dict[str, Any]] | None
    summary: dict[str, Any] = field(default_factory=dict)


def open_store(path: str | os.PathLike) -> tuple[EmbeddingStore, Path | None]:
    """The store at ``path``, or in ``path/embeddings`` for a run folder; and the run's assignments.csv
    (a run folder's, also when ``path`` is its ``embeddings/``, or the one that itae cluster wrote beside a
    store), when there is one."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        store = EmbeddingStore(path)
        beside = path / ASSIGNMENTS
        if not beside.is_file() and path.name == STORE_DIR:  # the store of a run: OUT/embeddings
            beside = path.parent / ASSIGNMENTS
        return store, beside if beside.is_file() else None
    if (path / STORE_DIR / "manifest.json").is_file():
        run_assign = path / ASSIGNMENTS
        return EmbeddingStore(path / STORE_DIR), run_assign if run_assign.is_file() else None
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; give an embedding store or a run folder")
    raise FileNotFoundError(f"{str(path)!r} holds no embedding store (no manifest.json, nor embeddings/"
                            "manifest.json); give a folder written by itae embed or itae run")


def _aligned_assignments(store: EmbeddingStore, path: Path) -> dict[str, Any]:
    """Clusters and labels of ``path`` (assignments.csv or its folder) in the store's row order."""
    data = read_assignments(path)
    row = {ident: i for i, ident in enumerate(data["ids"])}
    missing = [ident for ident in store.ids if ident not in row]
    if missing:
        raise StoreError(f"{str(path)!r} does not list {len(missing)} of the store's {len(store.ids)} images "
                         f"(e.g. {missing[0]!r}); give the assignments made from this store")
    order = np.array([row[ident] for ident in store.ids], dtype=np.int64)
    labels = None if data["labels"] is None else [data["labels"][i] for i in order]
    return {"clusters": data["clusters"][order], "labels": labels}


def _csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _num(x: float, digits: int = 6) -> float | str:
    return "" if x is None or not np.isfinite(x) else float(f"{x:.{digits}g}")


def check(
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    assignments: str | os.PathLike | None = None,
    dup_threshold: float = DUP_THRESHOLD,
    neighbours: int = NEIGHBOURS,
    outlier_z: float = OUTLIER_Z,
    backend: str = "auto",
    data: str | os.PathLike | None = None,
    html: bool = True,
    max_shown: int = 60,
    max_groups: int = 50,
    progress: bool = True,
) -> CheckResult:
    """Check the collection in ``store`` (a store or a run folder) and write the results under ``out``.

    assignments: an assignments.csv (or its folder) with the clusters and labels to check; default: the
    run's own, when ``store`` is a run folder or a store that itae cluster wrote into. Labels otherwise come
    from the store. dup_threshold: cosine distance for near-duplicates; neighbours: k of the kNN;
    outlier_z: robust z-score cut-off; backend: "auto", "faiss" or "sklearn" (exact either way).
    data: where the images are, for thumbnails (default: the source recorded in the store).
    """
    if not (0.0 <= float(dup_threshold) <= 2.0):
        raise InputError(f"dup_threshold is a cosine distance in [0, 2]; got {dup_threshold}")
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
        raise InputError(f"neighbours={neighbours!r} is not a positive integer")
    if not float(outlier_z) > 0:
        raise InputError(f"outlier_z must be positive; got {outlier_z}")
    which = knn_backend(backend)
    st, run_assignments = open_store(store)
    emb = st.embeddings(mmap=True)
    n = emb.shape[0]
    if n < 3:
        raise InputError(f"the store {str(st.path)!r} holds {n} images; checks need at least 3")
    assign_path = Path(assignments) if assignments is not None else run_assignments
    clusters = None
    labels = st.labels
    labels_from = "store" if labels is not None else None
    if assign_path is not None:
        aligned = _aligned_assignments(st, assign_path)
        clusters = aligned["clusters"]
        if aligned["labels"] is not None:
            labels, labels_from = aligned["labels"], str(assign_path)
    out = prepare_output(out)

    from tqdm.auto import tqdm

    with tqdm(total=n, desc="neighbours", unit="img", disable=not progress, leave=False) as bar:
        idx, dist = cosine_knn(emb, neighbours, backend=which, progress=bar.update)
    k = idx.shape[1]
    ids = st.ids

    def lab(i: int) -> str:
        return "" if labels is None else labels[i]

    def clu(i: int) -> Any:
        return "" if clusters is None else int(clusters[i])

    dups = duplicate_groups(idx, dist, float(dup_threshold))
    grouped = np.flatnonzero(dups.group >= 0)
    sizes = np.bincount(dups.group[grouped]) if grouped.size else np.zeros(0, np.int64)
    grouped = grouped[np.lexsort((np.array([ids[i] for i in grouped]), dups.group[grouped]))]
    duplicates = [{
        "group": int(dups.group[i]), "size": int(sizes[dups.group[i]]), "path": ids[i], "label": lab(i),
        "cluster": clu(i), "nearest": ids[int(dups.nearest[i])], "distance": _num(float(dups.distance[i])),
    } for i in grouped]

    score, z = outlier_scores(dist)
    flagged = np.flatnonzero(z >= float(outlier_z))
    flagged = flagged[np.argsort(-score[flagged], kind="stable")]
    outliers = [{"rank": r + 1, "path": ids[i], "label": lab(i), "cluster": clu(i), "score": _num(score[i]),
                 "z": _num(z[i], 4)} for r, i in enumerate(flagged)]

    mislabels = None
    if labels is not None:
        dis = label_disagreement(idx, labels, clusters)
        sus = np.flatnonzero(dis.suspect)
        sus = sus[np.argsort(-dis.score[sus], kind="stable")]
        mislabels = [{
            "rank": r + 1, "path": ids[i], "label": labels[i], "suggested": dis.suggested[i],
            "score": _num(dis.score[i], 4), "knn_agreement": _num(dis.knn_agreement[i], 4), "cluster": clu(i),
            "cluster_majority": dis.cluster_majority[i], "cluster_agreement": _num(dis.cluster_agreement[i], 4),
        } for r, i in enumerate(sus)]

    nearest = dist[:, 0]
    summary: dict[str, Any] = {
        "store": str(st.path), "n_images": n, "model": st.model, "itae": st.manifest.get("itae") is not None,
        "knn": {"backend": which, "metric": "cosine distance (1 - cosine similarity)", "neighbours": k},
        "duplicates": {"threshold": float(dup_threshold), "groups": dups.n_groups, "images": len(duplicates)},
        "outliers": {"score": f"mean cosine distance to the {k} nearest", "z": float(outlier_z),
                     "median_score": float(np.median(score)), "images": len(outliers)},
        "mislabels": None if mislabels is None else {"images": len(mislabels), "labels_from": labels_from,
                                                     "clusters_from": None if clusters is None else str(assign_path)},
        "nn_distance_quantiles": {f"q{q:g}": float(np.quantile(nearest, q / 100)) for q in (1, 5, 25, 50, 75, 95)},
    }

    # tables first, summary last: a check.json says the check finished
    atomic_write_text(out / DUPLICATES, _csv(DUPLICATE_COLUMNS, duplicates))
    atomic_write_text(out / OUTLIERS, _csv(OUTLIER_COLUMNS, outliers))
    if mislabels is not None:
        atomic_write_text(out / MISLABELS, _csv(MISLABEL_COLUMNS, mislabels))
    else:
        (out / MISLABELS).unlink(missing_ok=True)  # an earlier check's, with labels, must not look like this one's
    if not html:
        (out / CHECK_PAGE).unlink(missing_ok=True)  # likewise an earlier check's page
    else:
        _write_page(out / CHECK_PAGE, st, summary, duplicates, outliers, mislabels, data=data, size=96,
                    max_shown=max_shown, max_groups=max_groups, has_clusters=clusters is not None)
    atomic_write_text(out / CHECK_RECORD, json.dumps(summary, indent=2) + "\n")
    return CheckResult(duplicates, outliers, mislabels, summary)


def _write_page(path: Path, st: EmbeddingStore, summary: dict[str, Any], duplicates, outliers, mislabels, *,
                data, size: int, max_shown: int, max_groups: int, has_clusters: bool) -> None:
    from ..report.pages import thumb_item, write_check_page

    images = store_images(st, data)
    groups: list[dict[str, Any]] = []
    for row in duplicates:
        if row["group"] >= max_groups:
            break
        if not groups or groups[-1]["group"] != row["group"]:
            groups.append({"group": row["group"], "size": row["size"], "items": []})
        if len(groups[-1]["items"]) < 12:
            groups[-1]["items"].append(thumb_item(row["path"], [row["path"], f"distance {row['distance']}"],
                                                  images, size))

    def extra(row) -> list[str]:
        return [f"label {row['label']}"] if row["label"] != "" else []

    top_outliers = [thumb_item(r["path"], [r["path"], f"score {r['score']}  z {r['z']}", *extra(r)], images, size)
                    for r in outliers[:max_shown]]
    suspects = [thumb_item(r["path"], [r["path"], f"{r['label']} \u2192 {r['suggested']}", f"score {r['score']}"],
                           images, size) for r in (mislabels or [])[:max_shown]]
    knn = summary["knn"]
    facts = [
        ("images", summary["n_images"]), ("store", summary["store"]), ("model", summary["model"]),
        ("ITAE", "on" if summary["itae"] else "off"),
        ("neighbours", f"{knn['neighbours']} exact ({knn['backend']}), cosine distance"),
        ("median nearest-neighbour distance", f"{summary['nn_distance_quantiles']['q50']:.4g}"),
        ("near-duplicate groups", f"{summary['duplicates']['groups']} ({summary['duplicates']['images']} images)"),
        ("outliers", summary["outliers"]["images"]),
        ("likely mislabels", "no labels" if mislabels is None else len(mislabels)),
    ]
    write_check_page(path, {
        "title": f"itae check: {Path(summary['store']).name}", "thumb": size,
        "summary": [f"{summary['n_images']:,} images", f"{summary['duplicates']['groups']} duplicate groups",
                    f"{summary['outliers']['images']} outliers"]
                   + ([] if mislabels is None else [f"{len(mislabels)} likely mislabels"]),
        "facts": facts,
        "method_note": "Near-duplicates: connected components of neighbours within the threshold. Outliers: mean "
                       "cosine distance to the nearest neighbours, robust z-score (median and MAD). Mislabels: the "
                       "label most of the neighbours (and of the cluster) hold differs from the image's own.",
        "n_groups": summary["duplicates"]["groups"], "groups": groups,
        "dup_threshold": summary["duplicates"]["threshold"],
        "n_outliers": len(outliers), "outliers": top_outliers, "neighbours": knn["neighbours"],
        "outlier_z": summary["outliers"]["z"],
        "has_labels": mislabels is not None, "has_clusters": has_clusters,
        "n_suspects": 0 if mislabels is None else len(mislabels), "suspects": suspects,
    })
