"""Diagnostic figures for `itae inspect`, on synthetic LayerDiagnostics-like objects."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import itae
from itae.models import adapt
from itae.report import figures
from itae.report.figures import (
    artifact_map,
    attention_maps,
    cls_patch_attention,
    image_array,
    images_from_pixel_values,
    inspect_grid,
    norm_histograms,
    patch_grid,
    safe_stem,
    write_inspection,
)

from .conftest import build_tiny

GRID = (8, 8)
PREFIX = 5  # CLS + 4 registers


def make_diag(batch: int = 2, grid=GRID, prefix: int = PREFIX, heads: int = 3, seed: int = 0) -> SimpleNamespace:
    """Random diagnostics with a few low-v-norm, high-attention artifact patches per image."""
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    mask = np.zeros((batch, n), dtype=bool)
    for b in range(batch):
        mask[b, rng.choice(n, size=2 + b, replace=False)] = True

    def norms(typical: float, artifact: float) -> torch.Tensor:
        x = rng.lognormal(np.log(typical), 0.1, size=(batch, n))
        x[mask] = artifact
        return torch.tensor(x, dtype=torch.float32)

    logits = rng.normal(size=(batch, heads, prefix + n))
    logits[:, :, prefix:] += 5.0 * mask[:, None, :]
    after = logits.copy()
    patch_min = after[:, :, prefix:].min(axis=-1, keepdims=True)
    after[:, :, prefix:] = np.where(mask[:, None, :], patch_min, after[:, :, prefix:])
    return SimpleNamespace(
        norms={"q": norms(20, 22), "k": norms(15, 40), "v": norms(8, 1.0), "residual": norms(50, 500)},
        cls_attention=torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=-1),
        cls_attention_itae=torch.softmax(torch.tensor(after, dtype=torch.float32), dim=-1),
        artifact_mask=torch.tensor(mask),
        threshold=3.0,
        num_prefix_tokens=prefix,
        grid=grid,
    )


def make_images(batch: int = 2, size: int = 56) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    return [(np.stack([xx, yy, np.full_like(xx, b / max(batch, 1))], -1) * 255).astype(np.uint8) for b in range(batch)]


def _vlines(ax) -> list[float]:
    """x positions of the vertical lines drawn on an axes (axvline)."""
    out = []
    for line in ax.lines:
        xs = np.asarray(line.get_xdata(), dtype=float)
        if xs.size == 2 and xs[0] == xs[1]:
            out.append(float(xs[0]))
    return out


@pytest.mark.parametrize("source, panel", [("v", 2), ("q", 0), ("k", 1)])
def test_norm_histograms_marks_threshold_on_the_source_panel_only(source, panel):
    diag = make_diag()
    fig = norm_histograms(diag, 1, source=source)
    axes = fig.axes
    assert len(axes) == 4
    for i, ax in enumerate(axes):
        assert _vlines(ax) == ([3.0] if i == panel else [])
        assert ax.get_xscale() == "log"
    assert "(detector)" in axes[panel].get_title()
    n_flag = int(diag.artifact_mask[1].sum())
    assert f"{n_flag} of 64 patches flagged" in fig.get_suptitle()


def test_norm_histograms_stacks_flagged_patches():
    diag = make_diag()
    fig = norm_histograms(diag, 0)
    ax_v = fig.axes[2]
    kept, flagged = ax_v.patches  # step patches: kept, then flagged stacked on top of kept
    n_flag = int(diag.artifact_mask[0].sum())
    assert kept.get_data().values.sum() == 64 - n_flag
    top, baseline = flagged.get_data().values, flagged.get_data().baseline
    assert (top - baseline).sum() == n_flag
    np.testing.assert_array_equal(baseline, kept.get_data().values)
    # The flagged v norms (1.0) are all below the threshold (3.0) in this synthetic block.
    edges = flagged.get_data().edges
    assert edges[:-1][(top - baseline) > 0].max() < 3.0


def test_norm_histograms_rejects_bad_source_and_index():
    diag = make_diag()
    with pytest.raises(ValueError, match="source"):
        norm_histograms(diag, 0, source="x")
    with pytest.raises(IndexError, match="out of range"):
        norm_histograms(diag, 5)


def test_patch_grid_is_row_major_and_checks_shapes():
    values = np.arange(12)
    grid = patch_grid(values, (3, 4))
    assert grid.shape == (3, 4)
    assert grid[1, 0] == 4  # token 4 starts the second patch row
    assert patch_grid(np.arange(16)).shape == (4, 4)
    with pytest.raises(ValueError, match="square"):
        patch_grid(np.arange(12))
    with pytest.raises(ValueError, match="does not match"):
        patch_grid(values, (5, 5))


def test_cls_patch_attention_drops_prefix_and_averages_heads():
    att = np.zeros((2, PREFIX + 4))
    att[0, PREFIX + 3] = 1.0  # head 0 looks at the last patch
    att[1, 0] = 1.0  # head 1 looks at CLS (not a patch)
    out = cls_patch_attention(att, PREFIX, (2, 2))
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.0, 0.5]])


def test_artifact_map_overlays_exactly_the_flagged_patches():
    mask = np.zeros(GRID, dtype=bool)
    mask[0, 1] = mask[5, 7] = True
    fig = artifact_map(make_images(1)[0], mask.reshape(-1), GRID)
    ax = fig.axes[0]
    overlay = ax.images[1].get_array()
    np.testing.assert_array_equal(~np.ma.getmaskarray(overlay), mask)
    assert len(ax.patches) == 2  # one outline per flagged patch
    assert "2 of 64" in ax.get_title()


def test_attention_maps_share_colour_scale_and_report_flagged_mass():
    n = 4
    mask = np.array([True, False, False, False])
    before = np.zeros((2, 1 + n))
    before[:, 1] = 0.6  # 60% on the flagged patch in both heads
    before[:, 0] = 0.4
    after = np.zeros((2, 1 + n))
    after[:, 1:] = 0.25
    fig = attention_maps(make_images(1, size=32)[0], before, after, 1, (2, 2), artifact_mask=mask)
    ax_before, ax_after = fig.axes[1], fig.axes[2]
    heat_before, heat_after = ax_before.images[-1], ax_after.images[-1]
    assert heat_before.get_clim() == heat_after.get_clim() == (0.0, pytest.approx(0.6))
    assert "60.0% on flagged" in ax_before.get_title()
    assert "25.0% on flagged" in ax_after.get_title()


def test_attention_maps_per_head_mask():
    n = 4
    before = np.zeros((2, 1 + n))
    before[:, 1] = 0.6
    before[:, 0] = 0.4
    mask = np.zeros((2, n), dtype=bool)
    mask[0, 0] = True  # flagged in head 0 only
    fig = attention_maps(make_images(1, size=32)[0], before, before, 1, (2, 2), artifact_mask=mask)
    assert "30.0% on flagged" in fig.axes[1].get_title()  # (0.6 + 0.0) / 2 heads
    assert "flagged: 1 of 4" in fig.axes[0].get_title()


def test_image_array_accepts_pil_chw_float_and_grey():
    pil = Image.new("RGB", (5, 4), (10, 20, 30))
    assert image_array(pil).shape == (4, 5, 3)
    chw = torch.ones(3, 4, 5) * 0.5
    out = image_array(chw)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and out[0, 0, 0] == 128
    assert image_array(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="image must be"):
        image_array(np.zeros((2, 3, 4, 5)))


def test_images_from_pixel_values_undoes_normalisation():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    original = np.random.default_rng(0).integers(0, 256, size=(2, 6, 7, 3)).astype(np.uint8)
    x = torch.tensor(original.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    back = images_from_pixel_values(x, mean, std)
    assert len(back) == 2
    np.testing.assert_allclose(back[1].astype(int), original[1].astype(int), atol=1)


def test_inspect_grid_has_five_columns_per_image():
    diag = make_diag(batch=3)
    fig = inspect_grid(make_images(3), {11: diag}, names=["a", "b", "c"])
    assert len(fig.axes) == 15
    assert "Block 11" in fig.get_suptitle()
    with pytest.raises(ValueError, match="not in diagnostics"):
        inspect_grid(make_images(3), {11: diag}, layer=3)


def test_safe_stem_strips_markup_and_paths():
    stem = safe_stem("<img src=x onerror=alert(1)>.png")
    assert set(stem) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert safe_stem("a/b/../dog.jpg") == "dog"
    assert safe_stem("...") == "image"


def test_write_inspection_writes_readable_pngs(tmp_path):
    diagnostics = {10: make_diag(batch=1, seed=1), 11: make_diag(batch=1, seed=2)}
    names = ["<img src=x onerror=alert(1)>.png"]
    paths = write_inspection(make_images(1), names, diagnostics, tmp_path / "inspect", dpi=40)
    # 1 image x 2 blocks x 3 figures, one grid per block, and grid.png.
    assert len(paths) == 2 * 3 + 2 + 1
    assert {p.name for p in paths} >= {"grid.png", "grid_block10.png", "grid_block11.png",
                                       "000_img_src_x_onerror_alert_1_block11_norms.png",
                                       "000_img_src_x_onerror_alert_1_block10_attention.png"}
    for p in paths:
        assert p.parent == tmp_path / "inspect"
        assert "<" not in p.name and ">" not in p.name
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
    assert (tmp_path / "inspect" / "grid.png").read_bytes() == (tmp_path / "inspect" / "grid_block11.png").read_bytes()


def test_write_inspection_checks_its_inputs(tmp_path):
    diag = make_diag(batch=2)
    with pytest.raises(ValueError, match="names"):
        write_inspection(make_images(2), ["a"], {11: diag}, tmp_path)
    with pytest.raises(ValueError, match="hold 2 images"):
        write_inspection(make_images(3), ["a", "b", "c"], {11: diag}, tmp_path)
    with pytest.raises(ValueError, match="empty"):
        write_inspection(make_images(2), ["a", "b"], {}, tmp_path)


def test_figures_module_has_no_global_matplotlib_side_effects():
    code = (
        "import sys\n"
        "import itae.report.figures as f\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'\n"
        "import numpy as np\n"
        "f.artifact_map(np.zeros((8, 8, 3), np.uint8), np.zeros(4, bool))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert figures.NORM_KEYS == ("q", "k", "v", "residual")


@pytest.mark.parametrize("granularity", ["token", "head"])
def test_write_inspection_from_real_detect_artifacts(tmp_path, granularity):
    model = build_tiny("hf", registers=4)
    backbone = adapt(model)
    pixel_values = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    config = itae.ITAEConfig(source="v", side="low", threshold=0.5, granularity=granularity)
    diagnostics = itae.detect_artifacts(model, pixel_values, config)
    images = images_from_pixel_values(pixel_values, backbone.preprocess.mean, backbone.preprocess.std)
    paths = write_inspection(images, ["a.jpg"], diagnostics, tmp_path, source=config.source, dpi=40)
    assert (tmp_path / "grid.png").is_file()
    assert len(paths) == len(diagnostics) * 3 + len(diagnostics) + 1
    block = max(diagnostics)
    fig = norm_histograms(diagnostics[block], 0, source="v")
    # The threshold line is drawn only where it is on the scale of the histogram (whole-token norms).
    assert _vlines(fig.axes[2]) == ([] if granularity == "head" else [0.5])


def test_overlays_sit_on_the_photo_pixel_for_pixel_and_end_at_its_edges():
    """Photo and patch overlays share one extent (pixel edges at 0..w, 0..h; imshow's default is half a
    pixel off), and the axes end at the photo's edges, so nothing spills past them."""
    img = np.zeros((28, 42, 3), dtype=np.uint8)
    mask = np.zeros(6, dtype=bool)
    mask[[0, 5]] = True
    fig = artifact_map(img, mask, (2, 3))
    ax = fig.axes[0]
    assert [tuple(im.get_extent()) for im in ax.images] == [(0, 42, 28, 0)] * 2
    assert ax.get_xlim() == (0, 42) and ax.get_ylim() == (28, 0)
    att = figures.attention_maps(img, np.full(7, 1 / 7), np.full(7, 1 / 7), 1, (2, 3))
    for ax in att.axes:
        for im in ax.images:
            assert tuple(im.get_extent()) == (0, 42, 28, 0)


@pytest.mark.parametrize(("lo", "hi"), [(0.5, 0.9), (20, 3000), (3, 40000), (0.01, 500)])
def test_log_norm_axis_labels_are_short_and_do_not_run_together(lo, hi):
    fig = figures._new_figure(10.0, 2.6)
    axes = fig.subplots(1, 4)
    norms = np.geomspace(lo, hi, 200)
    figures._draw_norm_hist(axes[1], norms, norms < lo * 1.1, title="x", threshold=lo * 1.1)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    x0, x1 = axes[1].get_xlim()
    labels = [t for t in axes[1].get_xticklabels() if t.get_text() and x0 <= t.get_position()[0] <= x1]
    assert len(labels) >= 2 and all(len(t.get_text()) <= 4 for t in labels)
    boxes = sorted((b.x0, b.x1) for b in (t.get_window_extent(renderer) for t in labels))
    assert all(a[1] + 2 <= b[0] for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]


def test_captions_name_a_webdataset_sample_by_its_key():
    from itae.data.sources import display_name

    assert display_name("shard-00003.tar#n01440764_10026") == "n01440764_10026"
    assert display_name("shard-00003.tar#train/n01440764_10026") == "n01440764_10026"
    assert display_name("cats/a.jpg") == "a.jpg" and display_name("frgfm/imagenette:train:7") == "imagenette:train:7"
