"""The report's explorable map: a canvas with pan, zoom, hover, colour toggle and cluster filter.

Everything the page needs is packed into one JSON block: coordinates quantised to uint16, cluster and
label indices, distances as float32 (all base64), paths split into a folder table and file names, and
small JPEG thumbnails for a sample of the points only. The drawing and picking code is a short inline
script in ``templates/map.html.j2``; it loads nothing, so the page stays one self-contained file.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from itae.report.figures import EmbeddingMap, thumbnail_jpeg

NOISE_COLOUR = "#b8b8b8"


def _packed(values: np.ndarray, dtype: str) -> dict[str, str]:
    """A numeric array as {"dtype", "b64"} (little-endian), decoded by the page into a typed array."""
    kinds = {"u1": "<u1", "u2": "<u2", "u4": "<u4", "f4": "<f4"}
    return {"dtype": dtype, "b64": base64.b64encode(np.ascontiguousarray(values, dtype=kinds[dtype]).tobytes()).decode()}


def _index_dtype(n_values: int) -> str:
    return "u1" if n_values <= 256 else "u2" if n_values <= 65536 else "u4"


def category_colours(k: int) -> list[str]:
    """k distinct colours as hex: tab10 / tab20, then spread hues interleaved so neighbours differ."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if k <= 10:
        rgba = colormaps["tab10"](np.arange(k))
    elif k <= 20:
        rgba = colormaps["tab20"](np.arange(k))
    else:
        hues = colormaps["turbo"](np.linspace(0.05, 0.95, k))
        rgba = hues[np.argsort((np.arange(k) * 7) % k, kind="stable")]
    return [to_hex(c) for c in rgba]


def _thumbnail(image: Any, size: int) -> str | None:
    """base64 JPEG of the image fitted in size x size, or None when there is no usable image.

    JPEG rather than WebP: WebP is 20% smaller here but 4-8 times slower to encode, and encoding is most
    of the time the map's thumbnails take."""
    try:
        data = thumbnail_jpeg(image, size, quality=70, optimize=True)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return base64.b64encode(data).decode("ascii")


def map_payload(
    emap: EmbeddingMap,
    ids: Sequence[str],
    clusters: np.ndarray,
    labels: np.ndarray | None,
    distances: np.ndarray | None,
    thumbnails: Callable[[str], Any] | Mapping[str, Any] | None,
    *,
    matched: Mapping[int, int] | None = None,
    max_thumbs: int = 1500,
    thumb_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """The JSON-ready data of the map (see the module docstring) for the points ``emap.index``.

    matched: cluster index -> label index (indices into the sorted distinct values), so that a cluster
    takes its matched label's colour and the two colourings compare at a glance.
    """
    idx = emap.index
    m = idx.shape[0]
    xy = np.asarray(emap.coords, dtype=np.float64)
    lo = xy.min(axis=0)
    span = float(max((xy.max(axis=0) - lo).max(), 1e-12))
    # One scale for both axes (the layout's aspect ratio is kept), centred in the unit square.
    unit = (xy - lo) / span + (1.0 - (xy.max(axis=0) - lo) / span) / 2.0
    q = np.clip(np.rint(unit * 65535.0), 0, 65535)

    cluster_ids, c_inv = np.unique(clusters, return_inverse=True)
    c_inv = c_inv.reshape(-1)
    noise = [i for i, c in enumerate(cluster_ids.tolist()) if c == -1] if clusters.dtype.kind in "iuf" else []
    c_counts = np.bincount(c_inv, minlength=len(cluster_ids))
    label_ids = l_inv = None
    if labels is not None:
        label_ids, l_inv = np.unique(labels, return_inverse=True)
        l_inv = l_inv.reshape(-1)
    n_label_colours = 0 if label_ids is None else len(label_ids)
    label_colours = category_colours(n_label_colours)

    # Cluster colours: the matched label's colour, else colours after the labels' own; noise grey.
    real = [r for r in range(len(cluster_ids)) if r not in noise]
    colour_slot: dict[int, int] = {}
    spare = n_label_colours if matched else 0
    for r in real:
        if matched and r in matched:
            colour_slot[r] = matched[r]
        else:
            colour_slot[r] = spare
            spare += 1
    palette = category_colours(max([n_label_colours, *[s + 1 for s in colour_slot.values()]]))
    cluster_meta = []
    for r, c in enumerate(cluster_ids.tolist()):
        is_noise = r in noise
        cluster_meta.append({
            "name": "noise" if is_noise else str(c),
            "colour": NOISE_COLOUR if is_noise else palette[colour_slot[r]],
            "count": int(c_counts[r]),
            "noise": is_noise,
        })
    payload: dict[str, Any] = {
        "n": int(m), "total": int(len(ids)), "method": emap.method, "description": emap.description,
        "x": _packed(q[:, 0], "u2"), "y": _packed(65535 - q[:, 1], "u2"),  # screen y grows downwards
        "cluster": _packed(c_inv[idx], _index_dtype(len(cluster_ids))), "clusters": cluster_meta,
        "label": None, "labels": None, "dist": None,
    }
    if label_ids is not None:
        l_counts = np.bincount(l_inv, minlength=len(label_ids))
        payload["label"] = _packed(l_inv[idx], _index_dtype(len(label_ids)))
        payload["labels"] = [{"name": str(v), "colour": label_colours[j], "count": int(l_counts[j])}
                             for j, v in enumerate(label_ids.tolist())]
    if distances is not None:
        payload["dist"] = _packed(np.asarray(distances, dtype=np.float32)[idx], "f4")

    # Paths: folder table + file names (most images share a few folders).
    folders: dict[str, int] = {}
    folder_of = np.empty(m, dtype=np.int64)
    names = []
    for j, i in enumerate(idx.tolist()):
        head, sep, tail = str(ids[i]).rpartition("/")
        folder_of[j] = folders.setdefault(head + sep, len(folders))
        names.append(tail)
    payload["folders"] = list(folders)
    payload["folder"] = _packed(folder_of, _index_dtype(len(folders)))
    payload["names"] = names

    # Thumbnails for a uniform sample of the drawn points.
    with_thumb: list[int] = []
    data: list[str] = []
    if thumbnails is not None and max_thumbs > 0:
        rng = np.random.default_rng(seed + 1)
        chosen = np.sort(rng.choice(m, size=max_thumbs, replace=False)) if m > max_thumbs else np.arange(m)
        for j in chosen.tolist():
            key = str(ids[idx[j]])
            try:
                image = thumbnails[key] if isinstance(thumbnails, Mapping) else thumbnails(key)
            except (KeyError, OSError, ValueError):
                continue
            uri = None if image is None else _thumbnail(image, thumb_size)
            if uri is not None:
                with_thumb.append(j)
                data.append(uri)
    payload["thumbs"] = {"index": _packed(np.asarray(with_thumb, dtype=np.int64), "u4"), "mime": "image/jpeg",
                         "data": data}
    return payload


def map_section_html(payload: Mapping[str, Any], *, note: str) -> str:
    """The map section's body (controls, canvas, info panel, data and script), rendered with Jinja2."""
    from itae.report.templates import environment

    return environment().get_template("map.html.j2").render(data=payload, note=note)
