"""`itae.write_diagnostics`: the one function behind `itae inspect` and the reports' artifact diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import itae
from itae.data.sources import open_source
from itae.diagnostics import read_images, write_diagnostics
from itae.models import adapt

from .conftest import build_tiny

FIXED = itae.ITAEConfig(source="v", side="low", threshold=0.5)


@pytest.fixture(scope="module")
def backbone():
    return adapt(build_tiny("hf", registers=4))


def _photos(folder, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_files_are_drawn_and_the_unreadable_ones_named(backbone, tmp_path):
    good = _photos(tmp_path / "in", 2)
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    missing = tmp_path / "in" / "missing.png"
    drawn = write_diagnostics(backbone, [good[0], broken, good[1], missing], tmp_path / "out", itae=FIXED)
    assert drawn.names == ["img0.png", "img1.png"]
    assert [p for p, _ in drawn.failed] == [str(broken), str(missing)]
    assert dict(drawn.failed)[str(missing)] == "file not found"
    assert drawn.grid == tmp_path / "out" / "grid.png" and drawn.grid in drawn.figures
    layers = sorted(drawn.blocks)
    # Per image and block: norms, artifacts, attention; one grid per block; grid.png.
    assert len(drawn.figures) == 2 * 3 * len(layers) + len(layers) + 1
    assert all(p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in drawn.figures)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {p.name for p in drawn.figures}
    for d in drawn.blocks.values():
        assert d.artifact_mask.shape[0] == 2 and d.source == "v" and d.threshold == 0.5
    lines = drawn.check_lines(chosen="fixed")
    assert [line.split(":")[0] for line in lines] == [f"block {layer}" for layer in layers]
    assert all("(fixed)" in line for line in lines)
    assert itae.write_diagnostics is write_diagnostics


def test_a_source_gives_its_first_readable_images(backbone, tmp_path):
    paths = _photos(tmp_path / "data", 4)
    paths[0].write_bytes(b"broken")  # the first in order cannot be read: the next ones are drawn
    source = open_source(tmp_path / "data")
    drawn = write_diagnostics(backbone, source, tmp_path / "out", itae=FIXED, max_images=2)
    assert drawn.names == ["img1.png", "img2.png"]
    assert [p for p, _ in drawn.failed] == [source.ids[0]]
    batch = read_images(backbone, source, limit=3, order=[3, 2, 1, 0])
    assert batch.names == ["img3.png", "img2.png", "img1.png"] and batch.pixels.shape[0] == 3
    assert batch.failed == []


def test_itae_off_draws_the_unmodified_model_only(backbone, tmp_path):
    paths = _photos(tmp_path / "in", 2)
    drawn = write_diagnostics(backbone, paths, tmp_path / "out", itae=None)
    assert drawn.figures == [drawn.grid] and drawn.grid.name == "grid.png"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["grid.png"]
    for d in drawn.blocks.values():
        assert math.isnan(d.threshold) and not d.artifact_mask.any() and d.source is None
    assert drawn.check_lines(chosen="fixed") == [f"block {layer}: ITAE off, nothing flagged" for layer in drawn.blocks]


def test_nothing_readable_is_one_clear_error(backbone, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"cannot inspect '.*bad.jpg': .*\(and 1 more image\(s\)"):
        write_diagnostics(backbone, [bad, tmp_path / "gone.png"], tmp_path / "out", itae=FIXED)
    with pytest.raises(ValueError, match="no images"):
        write_diagnostics(backbone, [], tmp_path / "out", itae=FIXED)
    assert not (tmp_path / "out").exists()
