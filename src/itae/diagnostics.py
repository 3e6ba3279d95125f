"""Artifact diagnostics of a few images, drawn as PNG figures: what ``itae inspect`` writes, and the figures
that the run report and the benchmark report show.

`write_diagnostics` reads the images, runs the model through ``itae.engine.detect_artifacts`` and draws
with ``itae.report.figures``. It sits above the engine and the models and below the pipeline, the
benchmark and the CLI: the engine knows nothing about files, and the report only draws.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from itae.config import ITAEConfig
from itae.data.decode import DecodeError, build_transform, load_rgb
from itae.data.sources import ImageSource, display_name
from itae.engine.detect import LayerDiagnostics, detect_artifacts
from itae.engine.selfcheck import attention_share, check_split
from itae.errors import InputError
from itae.models.base import Backbone
from itae.report.figures import images_from_pixel_values, write_inspection, write_unmodified_grid

Images = ImageSource | Sequence[str | os.PathLike] | str | os.PathLike
REPORT_IMAGES = 4  # images the run and benchmark reports draw: the first that decode


@dataclass(frozen=True)
class ImageBatch:
    """Images read and preprocessed for a model.

    pixels: (B, 3, H, W), or None when no image could be read; names: the B images' names (a file's
    name, or a source's display name); failed: (image, reason) for each image that could not be read
    (the path as given, or the source's id).
    """

    pixels: torch.Tensor | None
    names: list[str]
    failed: list[tuple[str, str]]


def read_images(
    backbone: Backbone, images: Images, *, limit: int | None = None, order: Sequence[int] | None = None
) -> ImageBatch:
    """Decode ``images`` (image files, one file, or an ``ImageSource``) and preprocess them for ``backbone``.

    They are read in order (a source's positions in ``order``, when given) until ``limit`` of them are
    read (all when None); one that cannot be read is listed in ``failed`` and the next one is tried.
    """
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of images or None; got {limit!r}")
    if isinstance(images, (str, os.PathLike)):
        images = [images]  # one file
    transform = build_transform(backbone.preprocess)
    is_source = isinstance(images, ImageSource)
    positions = range(len(images)) if order is None else order
    pixels: list[torch.Tensor] = []
    names: list[str] = []
    failed: list[tuple[str, str]] = []
    for i in positions:
        if is_source:
            shown, name = images.ids[i], display_name(images.ids[i])
        else:
            shown, name = str(images[i]), Path(images[i]).name
        try:
            image = load_rgb(images.read(i) if is_source else images[i])
        except FileNotFoundError:
            failed.append((shown, "file not found"))
            continue
        except (DecodeError, OSError) as e:
            failed.append((shown, getattr(e, "reason", None) or str(e)))
            continue
        pixels.append(transform(image))
        names.append(name)
        if limit is not None and len(pixels) == limit:
            break
    return ImageBatch(torch.stack(pixels) if pixels else None, names, failed)


@dataclass(frozen=True)
class Diagnostics:
    """What `write_diagnostics` drew.

    figures: every PNG written; grid: ``grid.png``, the summary the reports show (the last engineered
    block, one row per image); names: the images drawn, in order; failed: (image, reason) for the images
    that could not be read; blocks: the per-block diagnostics drawn (``itae.engine.detect_artifacts``).
    """

    figures: list[Path]
    grid: Path
    names: list[str]
    failed: list[tuple[str, str]]
    blocks: dict[int, LayerDiagnostics]

    def check_lines(self, chosen: str) -> list[str]:
        """The self-check of each block on the images drawn, one line each: what was flagged and how
        sink-like it is (``itae.engine.selfcheck``); ``chosen`` says how source and side were chosen."""
        lines = []
        for layer, d in self.blocks.items():
            if d.source is None:
                lines.append(f"block {layer}: ITAE off, nothing flagged")
                continue
            patches = d.cls_attention[:, :, d.num_prefix_tokens:].float().numpy()
            mask = d.artifact_mask.numpy()
            attention = attention_share(patches if mask.ndim == 3 else patches.mean(1))
            check = check_split(layer, d.source, d.side, d.threshold, mask, attention, d.norms["residual"].numpy())
            line = f"{check.describe()} ({chosen})"
            if not check.flags_nothing:
                line += f"; CLS attention on them {100 * float(d.attention_on_artifacts.mean()):.1f}% before ITAE"
            lines.append(line)
        return lines


def write_diagnostics(
    backbone: Backbone,
    images: Images,
    out_dir: str | os.PathLike,
    *,
    itae: ITAEConfig | None,
    max_images: int | None = None,
) -> Diagnostics:
    """Draw the artifact diagnostics of ``images`` (image files, or an ``ImageSource``) into ``out_dir``.

    The first ``max_images`` images that can be read are drawn (all when None); the others that could
    not be read are listed in ``failed``. With ``itae`` (numeric or calibrated thresholds, fixed or
    "auto" source and side), per image and engineered block: the patch-norm histograms, the flagged
    patches, and the CLS attention before and after ITAE; then one grid per block and ``grid.png``
    (``itae.report.figures.write_inspection``). With ``itae=None``, the unmodified model: ``grid.png``
    alone, with its CLS attention and residual norms (nothing flagged, no "after").

    Raises ValueError, naming the images, when none can be read.
    """
    batch = read_images(backbone, images, limit=max_images)
    if batch.pixels is None:
        if not batch.failed:
            raise InputError("no images to inspect")
        shown, reason = batch.failed[0]
        more = f" (and {len(batch.failed) - 1} more image(s) could not be inspected)" if len(batch.failed) > 1 else ""
        raise InputError(f"cannot inspect {shown!r}: {reason}{more}")
    drawn = images_from_pixel_values(batch.pixels, backbone.preprocess.mean, backbone.preprocess.std)
    if itae is None:
        blocks = detect_artifacts(backbone, batch.pixels, itae=False)
        grid = write_unmodified_grid(drawn, batch.names, blocks, out_dir)
        return Diagnostics([grid], grid, batch.names, batch.failed, blocks)
    blocks = detect_artifacts(backbone, batch.pixels, itae)
    source = next(iter(blocks.values())).source  # the source calibration chose, for an "auto" one
    figures = write_inspection(drawn, batch.names, blocks, out_dir, source=source)
    grid = next(p for p in figures if p.name == "grid.png")
    return Diagnostics(figures, grid, batch.names, batch.failed, blocks)
