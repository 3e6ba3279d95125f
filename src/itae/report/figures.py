"""The figures of the reports and of `itae inspect`.

- Diagnostic figures: norm histograms, artifact maps and CLS attention maps. Every function takes plain
  arrays or tensors plus the fields of ``itae.engine`` LayerDiagnostics (``norms``, ``cls_attention``,
  ``cls_attention_itae``, ``artifact_mask``, ``threshold``, ``num_prefix_tokens``, ``grid``), so any
  object carrying those attributes works. They are built with the object-oriented matplotlib API on an
  Agg canvas: nothing here touches pyplot's global state or the process-wide backend, at import or at
  call time.
- The map of the embeddings (the report's scatter plot): `embedding_map` lays the points out in 2-D.
  The layout is fitted on a uniform sample of at most ``fit_points`` points, with openTSNE's
  FFT-accelerated t-SNE (``pip install 'itae[maps]'``), UMAP (``itae[umap]``) or scikit-learn's PCA (no
  extra). Every other drawn point is then placed at the median position of its nearest fitted neighbours
  (in the 50-dimensional PCA space that the fit also uses), openTSNE's own rule for placing new points
  before any optimisation. That keeps the cost of a map nearly flat in the number of images: the fit is
  capped, the placement is one nearest-neighbour query.
- Thumbnails: `thumbnail_jpeg`, the small JPEG of an image that every page embeds.

matplotlib, scikit-learn and the layout libraries are imported inside the functions that use them, so
importing this module stays light.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from itae.errors import InputError, InputIndexError, MissingDependencyError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("itae")

NORM_KEYS = ("q", "k", "v", "residual")
_FLAG_COLOR = "#d62728"
_KEPT_COLOR = "#4c72b0"


class LayerDiagnosticsLike(Protocol):
    """The fields of ``itae.engine`` LayerDiagnostics that the figures read."""

    norms: Mapping[str, Any]  # "q", "k", "v", "residual" -> (B, N)
    cls_attention: Any  # (B, H, T)
    cls_attention_itae: Any  # (B, H, T)
    artifact_mask: Any  # (B, N) bool, or (B, H, N) per head
    threshold: float
    num_prefix_tokens: int
    grid: tuple[int, int]


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device/dtype) or array-like as a numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().to("cpu")
        if x.dtype.is_floating_point:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def image_array(image: Any) -> np.ndarray:
    """A PIL image or array as an (H, W, 3) uint8 array.

    Accepts (H, W), (H, W, 1|3|4), and channel-first (3, H, W) arrays; float arrays are taken to be in [0, 1].
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = to_numpy(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise InputError(f"image must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.asarray(arr, dtype=np.float64)
        if arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


def images_from_pixel_values(
    pixel_values: Any, mean: Sequence[float], std: Sequence[float]
) -> list[np.ndarray]:
    """Undo the model's normalisation: (B, 3, H, W) pixel values -> B arrays (H, W, 3) uint8.

    Use it to draw overlays on exactly the crop the model saw.
    """
    x = to_numpy(pixel_values).astype(np.float64)
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"pixel_values must have shape (B, 3, H, W); got {x.shape}")
    m = np.asarray(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    x = np.clip((x * s + m) * 255.0, 0, 255)
    return [np.rint(im).astype(np.uint8).transpose(1, 2, 0) for im in x]  # (3, H, W) -> (H, W, 3)


def _grid_of(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise InputError(f"{n} patch values do not form a square grid; pass grid=(rows, cols)")
        return side, side
    rows, cols = int(grid[0]), int(grid[1])
    if rows * cols != n:
        raise InputError(f"grid {rows}x{cols} does not match {n} patch values")
    return rows, cols


def patch_grid(values: Any, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Per-patch values (N,) or (h, w) as an (h, w) array."""
    arr = to_numpy(values)
    if arr.ndim == 2:
        if grid is not None and tuple(arr.shape) != (int(grid[0]), int(grid[1])):
            raise InputError(f"patch map has shape {arr.shape}, expected grid {tuple(grid)}")
        return arr
    if arr.ndim != 1:
        raise InputError(f"patch values must be (N,) or (h, w); got shape {arr.shape}")
    return arr.reshape(_grid_of(arr.shape[0], grid))  # (N,) -> (h, w), row-major like the patch sequence


def cls_patch_attention(cls_attention: Any, num_prefix: int, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Head-mean CLS attention on the patch tokens: (H, T) -> (h, w)."""
    att = to_numpy(cls_attention).astype(np.float64)
    if att.ndim == 1:
        att = att[None]
    if att.ndim != 2:
        raise InputError(f"cls_attention must be (H, T) for one image; got shape {att.shape}")
    if not 0 <= num_prefix < att.shape[1]:
        raise InputError(f"num_prefix={num_prefix} is out of range for {att.shape[1]} tokens")
    return patch_grid(att.mean(axis=0)[num_prefix:], grid)


def figure_to_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")  # constrained layout already fits the figure
    return buf.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches an Agg canvas to this figure only
    return fig


def _hide_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_image(ax: Axes, image: np.ndarray, *, dim: bool = False) -> None:
    shown = image
    if dim:  # a grey, faded photo under a heat map keeps the map readable
        grey = image.astype(np.float64).mean(axis=-1, keepdims=True)
        shown = np.repeat(grey * 0.6 + 255 * 0.4, 3, axis=-1).astype(np.uint8)
    h, w = image.shape[:2]
    # Pixel edges at 0..w and 0..h, like the patch overlays drawn over it (imshow's default puts pixel
    # centres there, half a pixel off the overlays); the axes end at the photo's edges.
    ax.imshow(shown, interpolation="bilinear", extent=(0, w, h, 0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    _hide_ticks(ax)


def _draw_mask(ax: Axes, image: np.ndarray, mask_hw: np.ndarray) -> None:
    from matplotlib.colors import ListedColormap

    h, w = image.shape[:2]
    _draw_image(ax, image)
    overlay = np.ma.masked_where(~mask_hw, np.ones(mask_hw.shape))
    ax.imshow(
        overlay, cmap=ListedColormap([_FLAG_COLOR]), alpha=0.55, vmin=0, vmax=1,
        extent=(0, w, h, 0), interpolation="nearest",
    )
    # A white outline keeps single flagged patches visible on red or busy parts of the image.
    rows, cols = mask_hw.shape
    ph, pw = h / rows, w / cols
    from matplotlib.patches import Rectangle

    for r, c in zip(*np.nonzero(mask_hw), strict=True):
        ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="white", linewidth=1.0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)


def _draw_attention(ax: Axes, image: np.ndarray, att_hw: np.ndarray, vmax: float) -> Any:
    h, w = image.shape[:2]
    _draw_image(ax, image, dim=True)
    im = ax.imshow(
        att_hw, cmap="inferno", alpha=0.75, vmin=0.0, vmax=vmax, extent=(0, w, h, 0), interpolation="nearest"
    )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return im


def _flagged_mass(cls_attention: Any, mask: np.ndarray | None, num_prefix: int) -> float | None:
    """Head-mean share of the CLS attention row (H, T) that lands on flagged patches.

    mask: (N,) for all heads, or (H, N) per head (granularity "head").
    """
    if mask is None:
        return None
    att = to_numpy(cls_attention).astype(np.float64)
    att = att[None] if att.ndim == 1 else att
    patches = att[:, num_prefix:]  # (H, N)
    mask = mask.astype(bool)
    per_head = mask if mask.shape == patches.shape else mask.reshape(1, -1)
    return float((patches * per_head).sum(axis=-1).mean())


def _split_mask(mask: np.ndarray, cls_attention: Any, num_prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask as given, per-token mask (N,)): a per-head mask (H, N) counts a patch flagged in any head."""
    att = to_numpy(cls_attention)
    n_heads, n_patches = (1, att.shape[-1] - num_prefix) if att.ndim == 1 else (att.shape[0], att.shape[1] - num_prefix)
    mask = np.asarray(mask).astype(bool)
    if mask.shape == (n_heads, n_patches) and mask.ndim == 2 and mask.shape[0] > 1:
        return mask, mask.any(axis=0)
    return mask, mask.reshape(-1)


def _draw_norm_hist(
    ax: Axes, norms: np.ndarray, mask: np.ndarray | None, *, title: str, threshold: float | None = None
) -> None:
    norms = np.asarray(norms, dtype=np.float64).reshape(-1)
    norms = norms[np.isfinite(norms)]
    positive = norms[norms > 0]
    if positive.size == 0:
        ax.text(0.5, 0.5, "no positive norms", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        return
    lo, hi = float(positive.min()), float(positive.max())
    if threshold is not None and threshold > 0:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo * 1.0001:
        lo, hi = lo / 1.5, hi * 1.5
    bins = np.geomspace(lo * 0.98, hi * 1.02, 41)
    values = np.clip(norms, bins[0], None)
    flagged = np.zeros(values.shape, dtype=bool)
    if mask is not None:
        flagged = mask.reshape(-1).astype(bool)[: values.size]
    # Step patches rather than ax.hist: one artist per series instead of one rectangle per bin.
    kept_counts, _ = np.histogram(values[~flagged], bins=bins)
    ax.stairs(kept_counts, bins, fill=True, color=_KEPT_COLOR, label="kept")
    if flagged.any():
        flag_counts, _ = np.histogram(values[flagged], bins=bins)
        ax.stairs(kept_counts + flag_counts, bins, baseline=kept_counts, fill=True, color=_FLAG_COLOR,
                  label="flagged")
    ax.set_xscale("log")
    _log_ticks(ax)
    if threshold is not None and np.isfinite(threshold) and threshold > 0:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3g}")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_ylabel("patches", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts


def _log_ticks(ax: Axes) -> None:
    """Few, short, plain-number labels on a log axis: at 1, 2, 5 x 10^k within a decade or so, 1 and 3 x 10^k
    over two, powers of ten beyond (at most about five); matplotlib's defaults label minor ticks, which
    run together into strings like "5001002000" on a narrow panel."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = ax.get_xlim()
    decades = np.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    if decades < np.log10(8):  # within one decade a log locator has too few ticks; space them evenly
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    elif decades <= 1.3:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=6))
    elif decades <= 2.5:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0), numticks=6))
    else:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,), numticks=5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _short_number(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _short_number(x: float) -> str:
    """1.5, 300, 2k, 1M, 1e-03: at most four or five characters."""
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    if x >= 1e-2 or x == 0:
        return f"{x:.3g}"
    return f"{x:.0e}"


def _pick(diag: LayerDiagnosticsLike, name: str, image_index: int) -> np.ndarray:
    arr = to_numpy(getattr(diag, name))
    if image_index >= arr.shape[0] or image_index < -arr.shape[0]:
        raise InputIndexError(f"image_index {image_index} is out of range for a batch of {arr.shape[0]}")
    return arr[image_index]


def _check_source(source: str) -> None:
    if source not in ("q", "k", "v"):
        raise InputError(f"source must be 'q', 'k' or 'v'; got {source!r}")


def norm_histograms(
    diag: LayerDiagnosticsLike, image_index: int = 0, *, source: str = "v", title: str | None = None
) -> Figure:
    """Four log-x histograms of patch norms (q, k, v, residual) for one image of a block.

    Flagged patches are stacked in red on every panel; the threshold is drawn on the ``source`` panel.
    """
    _check_source(source)
    raw_mask, mask = _split_mask(_pick(diag, "artifact_mask", image_index), _pick(diag, "cls_attention", image_index),
                                 diag.num_prefix_tokens)
    # A per-head threshold applies to per-head norms, not to these whole-token norms: say so, draw no line.
    per_head = raw_mask.shape != mask.shape
    fig = _new_figure(10.0, 2.6)
    axes = fig.subplots(1, 4)
    for ax, key in zip(axes, NORM_KEYS, strict=True):
        if key not in diag.norms:
            ax.set_axis_off()
            ax.set_title(f"{key}: not recorded", fontsize=9)
            continue
        norms = to_numpy(diag.norms[key])[image_index]
        is_source = key == source
        label = "residual stream" if key == "residual" else f"{key} projection"
        suffix = ""
        if is_source:
            suffix = f" (detector, per-head threshold {float(diag.threshold):.3g})" if per_head else " (detector)"
        _draw_norm_hist(
            ax, norms, mask, title=label + suffix,
            threshold=float(diag.threshold) if is_source and not per_head else None,
        )
        ax.set_xlabel("L2 norm (log)", fontsize=8)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    n_flag, n = int(mask.sum()), mask.size
    fig.suptitle(title or f"Patch norms: {n_flag} of {n} patches flagged ({100.0 * n_flag / max(n, 1):.1f}%)",
                 fontsize=10)
    return fig


def artifact_map(
    image: Any, mask: Any, grid: tuple[int, int] | None = None, *, title: str | None = None
) -> Figure:
    """The image with its flagged patches (mask (N,) or (h, w)) drawn over it in red."""
    img = image_array(image)
    mask_hw = patch_grid(mask, grid).astype(bool)
    fig = _new_figure(4.0, 4.0 * img.shape[0] / img.shape[1] + 0.4)
    ax = fig.subplots()
    _draw_mask(ax, img, mask_hw)
    n_flag = int(mask_hw.sum())
    ax.set_title(title or f"artifacts: {n_flag} of {mask_hw.size} patches", fontsize=10)
    return fig


def attention_maps(
    image: Any,
    cls_attention_before: Any,
    cls_attention_after: Any,
    num_prefix: int,
    grid: tuple[int, int] | None = None,
    *,
    artifact_mask: Any = None,
    title: str | None = None,
) -> Figure:
    """CLS attention over the patches (head mean, (H, T) each) before and after ITAE, on one colour scale.

    With ``artifact_mask`` ((N,), (h, w), or (H, N) per head) the titles give the attention mass on the
    flagged tokens; the map marks a patch flagged in any head.
    """
    img = image_array(image)
    before = cls_patch_attention(cls_attention_before, num_prefix, grid)
    after = cls_patch_attention(cls_attention_after, num_prefix, before.shape)
    raw_mask, mask = None, None
    if artifact_mask is not None:
        raw_mask, token_mask = _split_mask(to_numpy(artifact_mask), cls_attention_before, num_prefix)
        mask = patch_grid(token_mask, before.shape)
    vmax = float(max(before.max(), after.max(), 1e-12))
    fig = _new_figure(8.6, 3.0 * img.shape[0] / img.shape[1] + 0.6)
    axes = fig.subplots(1, 3)
    if mask is not None:
        _draw_mask(axes[0], img, mask)
        axes[0].set_title(f"flagged: {int(mask.sum())} of {mask.size}", fontsize=9)
    else:
        _draw_image(axes[0], img)
        axes[0].set_title("image", fontsize=9)
    im = None
    for ax, att, raw, name in (
        (axes[1], before, cls_attention_before, "before ITAE"),
        (axes[2], after, cls_attention_after, "after ITAE"),
    ):
        im = _draw_attention(ax, img, att, vmax)
        mass = _flagged_mass(raw, raw_mask, num_prefix)
        ax.set_title(name if mass is None else f"{name}: {100.0 * mass:.1f}% on flagged", fontsize=9)
    fig.colorbar(im, ax=axes[1:], shrink=0.8, label="CLS attention (head mean)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _source_norms(diag: LayerDiagnosticsLike, source: str, image_index: int) -> np.ndarray:
    key = source if source in diag.norms else next(iter(diag.norms))
    return to_numpy(diag.norms[key])[image_index]


def inspect_grid(
    images: Sequence[Any],
    diagnostics: Mapping[int, LayerDiagnosticsLike],
    *,
    layer: int | None = None,
    names: Sequence[str] | None = None,
    source: str = "v",
    max_images: int = 8,
) -> Figure:
    """A paper-style grid for one block: one row per image; columns image, artifact map,
    CLS attention before, CLS attention after, and the ``source`` norm histogram with its threshold.

    ``layer`` defaults to the last block in ``diagnostics``. Shows at most ``max_images`` rows.
    """
    _check_source(source)
    if not diagnostics:
        raise InputError("diagnostics is empty; run itae.detect_artifacts first")
    layer = max(diagnostics) if layer is None else layer
    if layer not in diagnostics:
        raise InputError(f"block {layer} is not in diagnostics (have {sorted(diagnostics)})")
    diag = diagnostics[layer]
    n = min(len(images), max_images)
    if n == 0:
        raise InputError("no images to draw")
    first = image_array(images[0])
    aspect = first.shape[0] / first.shape[1]
    fig = _new_figure(12.5, n * 2.4 * aspect + 0.6)
    axes = np.atleast_2d(fig.subplots(n, 5))
    headers = ("image", "artifact map", "CLS attention, before", "CLS attention, after", f"{source} norms")
    for col, header in enumerate(headers):
        axes[0, col].annotate(
            header, xy=(0.5, 1.12), xycoords="axes fraction", ha="center", va="bottom", fontsize=10,
            fontweight="bold",
        )
    for i in range(n):
        img = image_array(images[i])
        raw_mask, mask = _split_mask(_pick(diag, "artifact_mask", i), _pick(diag, "cls_attention", i),
                                     diag.num_prefix_tokens)
        mask_hw = patch_grid(mask, diag.grid)
        before = cls_patch_attention(_pick(diag, "cls_attention", i), diag.num_prefix_tokens, diag.grid)
        after = cls_patch_attention(_pick(diag, "cls_attention_itae", i), diag.num_prefix_tokens, diag.grid)
        vmax = float(max(before.max(), after.max(), 1e-12))
        _draw_image(axes[i, 0], img)
        if names is not None and i < len(names):
            axes[i, 0].set_ylabel(_short(str(names[i]), 22), fontsize=8)
        _draw_mask(axes[i, 1], img, mask_hw)
        axes[i, 1].set_title(f"{int(mask.sum())} of {mask.size} flagged", fontsize=8)
        for col, att, key in ((2, before, "cls_attention"), (3, after, "cls_attention_itae")):
            _draw_attention(axes[i, col], img, att, vmax)
            mass = _flagged_mass(_pick(diag, key, i), raw_mask, diag.num_prefix_tokens)
            axes[i, col].set_title(f"{100.0 * mass:.1f}% on flagged", fontsize=8)
        per_head = raw_mask.shape != mask.shape  # per-head thresholds are not on the whole-token scale
        _draw_norm_hist(
            axes[i, 4], _source_norms(diag, source, i), mask,
            title=f"{'per-head ' if per_head else ''}threshold {float(diag.threshold):.3g}",
            threshold=None if per_head else float(diag.threshold),
        )
    fig.suptitle(f"Block {layer}: artifact detection from {source} norms", fontsize=11)
    return fig


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def safe_stem(name: str, limit: int = 60) -> str:
    """A file-system-safe stem from an arbitrary image name (path parts and odd characters removed)."""
    stem = Path(str(name).replace("\\", "/")).stem or "image"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return stem[:limit]


def write_inspection(
    images: Sequence[Any],
    names: Sequence[str],
    diagnostics: Mapping[int, LayerDiagnosticsLike],
    out_dir: str | Path,
    *,
    source: str = "v",
    dpi: int = 110,
    max_grid_images: int = 8,
) -> list[Path]:
    """Write the inspection figures of a batch and return their paths.

    For image i and block L: ``{i:03d}_{name}_block{L}_norms.png``, ``..._artifacts.png`` and
    ``..._attention.png``; then one ``grid_block{L}.png`` per block and ``grid.png`` (the last block).
    ``images`` are the crops the model saw (see ``images_from_pixel_values``), in batch order.
    """
    _check_source(source)
    if len(images) != len(names):
        raise InputError(f"got {len(images)} images but {len(names)} names")
    if not diagnostics:
        raise InputError("diagnostics is empty; run itae.detect_artifacts first")
    for layer, diag in diagnostics.items():
        batch = to_numpy(diag.artifact_mask).shape[0]
        if batch != len(images):
            raise InputError(f"diagnostics of block {layer} hold {batch} images but {len(images)} were given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, filename: str) -> None:
        path = out / filename
        fig.savefig(path, dpi=dpi, facecolor="white")
        written.append(path)

    for i, (image, name) in enumerate(zip(images, names, strict=True)):
        stem = f"{i:03d}_{safe_stem(name)}"
        for layer in sorted(diagnostics):
            diag = diagnostics[layer]
            raw_mask, mask = _split_mask(_pick(diag, "artifact_mask", i), _pick(diag, "cls_attention", i),
                                         diag.num_prefix_tokens)
            label = f"{_short(str(name), 40)}, block {layer}"
            save(norm_histograms(diag, i, source=source, title=f"{label}: patch norms"), f"{stem}_block{layer}_norms.png")
            save(artifact_map(image, mask, diag.grid, title=f"{label}: {int(mask.sum())} flagged"),
                 f"{stem}_block{layer}_artifacts.png")
            save(
                attention_maps(
                    image, _pick(diag, "cls_attention", i), _pick(diag, "cls_attention_itae", i),
                    diag.num_prefix_tokens, diag.grid, artifact_mask=raw_mask, title=f"{label}: CLS attention",
                ),
                f"{stem}_block{layer}_attention.png",
            )
    for layer in sorted(diagnostics):
        fig = inspect_grid(images, diagnostics, layer=layer, names=names, source=source, max_images=max_grid_images)
        save(fig, f"grid_block{layer}.png")
    last = max(diagnostics)
    grid_path = out / "grid.png"
    grid_path.write_bytes((out / f"grid_block{last}.png").read_bytes())
    written.append(grid_path)
    return written


def unmodified_grid(
    images: Sequence[Any], diagnostics: Mapping[int, LayerDiagnosticsLike], *, layer: int | None = None,
    names: Sequence[str] | None = None, max_images: int = 8,
) -> Figure:
    """The grid of a run without ITAE: per image the photo, the unmodified CLS attention, and the
    residual-stream norms of the patches (where artifacts show as a separate high mode). Nothing flagged,
    no threshold, no "after"."""
    if not diagnostics:
        raise InputError("diagnostics is empty; run itae.detect_artifacts first")
    layer = max(diagnostics) if layer is None else layer
    diag = diagnostics[layer]
    n = min(len(images), max_images)
    if n == 0:
        raise InputError("no images to draw")
    first = image_array(images[0])
    fig = _new_figure(7.5, n * 2.4 * first.shape[0] / first.shape[1] + 0.6)
    axes = np.atleast_2d(fig.subplots(n, 3))
    for col, header in enumerate(("image", "CLS attention (unmodified)", "residual norms")):
        axes[0, col].annotate(header, xy=(0.5, 1.12), xycoords="axes fraction", ha="center", va="bottom",
                              fontsize=10, fontweight="bold")
    for i in range(n):
        img = image_array(images[i])
        att = cls_patch_attention(_pick(diag, "cls_attention", i), diag.num_prefix_tokens, diag.grid)
        _draw_image(axes[i, 0], img)
        if names is not None and i < len(names):
            axes[i, 0].set_ylabel(_short(str(names[i]), 22), fontsize=8)
        _draw_attention(axes[i, 1], img, att, float(max(att.max(), 1e-12)))
        _draw_norm_hist(axes[i, 2], to_numpy(diag.norms["residual"])[i], None, title="")
    fig.suptitle(f"Block {layer}, ITAE off: the unmodified model", fontsize=11)
    return fig


def write_unmodified_grid(
    images: Sequence[Any], names: Sequence[str], diagnostics: Mapping[int, LayerDiagnosticsLike],
    out_dir: str | Path, *, dpi: int = 110,
) -> Path:
    """``unmodified_grid`` of the last block as ``out_dir/grid.png``; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "grid.png"
    unmodified_grid(images, diagnostics, names=names).savefig(path, dpi=dpi, facecolor="white")
    return path


# ----------------------------------------------------------------------------------------------------
# The map of the embeddings (2-D layout)

MAP_METHODS = ("auto", "tsne", "umap", "pca")
PCA_DIMS = 50  # the space that t-SNE / UMAP fit in and that places the points not fitted
PLACE_NEIGHBOURS = 10


@dataclass(frozen=True)
class EmbeddingMap:
    """2-D coordinates ``coords`` (m, 2) of the rows ``index`` (m,) of the embeddings."""

    coords: np.ndarray
    index: np.ndarray
    method: str
    description: str


def _available(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def resolve_method(method: str) -> str:
    """"auto" -> "tsne" with openTSNE installed, else "umap" with umap-learn, else "pca"."""
    if method not in MAP_METHODS:
        raise InputError(f"map method must be one of {', '.join(MAP_METHODS)}; got {method!r}")
    if method != "auto":
        return method
    if _available("openTSNE"):
        return "tsne"
    return "umap" if _available("umap") else "pca"


def embedding_map(
    embeddings: np.ndarray,
    *,
    max_points: int = 100_000,
    method: str = "auto",
    seed: int = 0,
    fit_points: int = 2_500,
) -> EmbeddingMap:
    """Project a uniform sample of at most ``max_points`` rows of the embeddings (n, D) to 2-D.

    The layout is fitted on at most ``fit_points`` of them; the others are placed by their nearest fitted
    neighbours (see the module docstring). A (n, 2) input is taken as a precomputed map and only sampled.
    """
    method = resolve_method(method)
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"embeddings must be a non-empty (n, D) array; got shape {x.shape}")
    if max_points < 1 or fit_points < 1:
        raise InputError(f"max_points and fit_points must be >= 1; got {max_points}, {fit_points}")
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    m = index.shape[0]
    drawn = f"{m:,} of {n:,} points" + (f" (uniform random sample, seed {seed})" if m < n else "")
    if x.shape[1] == 2:
        return EmbeddingMap(x[index].astype(np.float64), index, "precomputed", f"Precomputed 2-D map; {drawn}.")

    if method == "tsne" and not _available("openTSNE"):
        raise MissingDependencyError("map method 'tsne' needs openTSNE: pip install 'itae[maps]'")
    if method == "umap" and not _available("umap"):
        raise MissingDependencyError("map method 'umap' needs umap-learn: pip install 'itae[umap]'")
    if method != "pca" and m < 10:
        method = "pca"  # too few points for a neighbourhood graph

    t0 = time.perf_counter()
    reduced = _pca(x[index], PCA_DIMS, seed)  # (m, <=50)
    fit = np.sort(rng.choice(m, size=fit_points, replace=False)) if m > fit_points else np.arange(m)
    if method != "pca":
        log.info("itae: map layout: %s on %s of %s points, then placing the rest", method, f"{fit.size:,}", f"{m:,}")
    if method == "pca":
        coords = np.zeros((m, 2))
        coords[:, : min(2, reduced.shape[1])] = reduced[:, :2]
        return EmbeddingMap(coords, index, "pca", f"PCA (first two components) of {drawn}.")

    if method == "tsne":
        fitted, how = _tsne(reduced[fit], seed)
    else:
        fitted, how = _umap(reduced[fit], seed)
    coords = np.empty((m, 2))
    coords[fit] = fitted
    rest = np.setdiff1d(np.arange(m), fit, assume_unique=True)
    placed = ""
    if rest.size:
        coords[rest] = _place(reduced[fit], fitted, reduced[rest])
        placed = (f" Fitted on {fit.size:,} of them; the other {rest.size:,} are placed at the median position "
                  f"of their {PLACE_NEIGHBOURS} nearest fitted points.")
    log.info("itae: map layout done in %.1f s", time.perf_counter() - t0)
    return EmbeddingMap(coords, index, method, f"{how} of {drawn}.{placed}")


def _pca(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(m, D) -> (m, min(k, D, m - 1)) principal components (zeros for a single point)."""
    from sklearn.decomposition import PCA

    k = min(k, x.shape[1], x.shape[0] - 1)
    if k < 1:
        return np.zeros((x.shape[0], 1))
    return PCA(n_components=k, random_state=seed).fit_transform(x.astype(np.float32)).astype(np.float32)


def _tsne(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    from openTSNE import TSNE

    perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
    # Shorter schedules than openTSNE's 250 + 500 iterations: a few thousand points settle well before that.
    tsne = TSNE(perplexity=perplexity, negative_gradient_method="fft", neighbors="exact",
                early_exaggeration_iter=125, n_iter=250, initialization="pca", random_state=seed, n_jobs=1,
                verbose=False)
    coords = np.asarray(tsne.fit(x), dtype=np.float64)
    return coords, f"t-SNE (openTSNE, FFT, perplexity {perplexity:g}, after PCA to {x.shape[1]} dimensions)"


def _umap(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    import umap

    coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    return np.asarray(coords, dtype=np.float64), f"UMAP (after PCA to {x.shape[1]} dimensions)"


def _place(fitted_x: np.ndarray, fitted_2d: np.ndarray, rest_x: np.ndarray) -> np.ndarray:
    """(r, 2) positions of the rows ``rest_x``: median 2-D position of their nearest fitted rows."""
    from sklearn.neighbors import NearestNeighbors

    k = min(PLACE_NEIGHBOURS, fitted_x.shape[0])
    nn = NearestNeighbors(n_neighbors=k).fit(fitted_x)
    out = np.empty((rest_x.shape[0], 2))
    for start in range(0, rest_x.shape[0], 8192):  # bounded memory for the distance blocks
        _, idx = nn.kneighbors(rest_x[start: start + 8192])
        out[start: start + idx.shape[0]] = np.median(fitted_2d[idx], axis=1)
    return out


# ----------------------------------------------------------------------------------------------------
# Thumbnails


def thumbnail_jpeg(image: Any, size: int, *, quality: int, optimize: bool = False) -> bytes:
    """JPEG bytes of ``image`` fitted in size x size (aspect kept, bilinear).

    image: a PIL image, an (H, W, C) or (C, H, W) array (see `image_array`), an image file's path, or its
    encoded bytes. Raises OSError or ValueError when it cannot be read.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    elif isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            im = opened.convert("RGB")
    else:
        im = Image.fromarray(image_array(image))
    im.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=optimize)
    return buf.getvalue()
