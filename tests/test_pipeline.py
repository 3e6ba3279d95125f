"""``itae.run``'s output folder: a new run never leaves an earlier run's files looking like its own,
run.json says whether the run finished, and the store records the labels the run used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import itae
from itae.pipeline import CLUSTERING, METRICS, REPORT, RUN, cluster_store, run

COMMON = dict(resolution=56, progress=False, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from itae.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(220, 40, 40), (40, 200, 40), (40, 40, 220)]):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            a = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / "images" / f"class{c}" / f"{i}.png")
    return root / "images", str(save_tiny("hf", root / "tiny"))


def test_a_second_run_in_the_same_folder_leaves_nothing_of_the_first(assets, tmp_path):
    images, model = assets
    out = tmp_path / "out"
    first = run(images, 3, out, model=model, labels="from-folders", **COMMON)
    assert first["status"] == "complete" and (out / METRICS).is_file() and (out / REPORT).is_file()
    assert (out / "inspect").is_dir()
    assert _store_labels(out) == "from-folders"  # the store records the labels the run used
    # no labels and no report this time: the first run's scores and report must not survive
    second = run(images, 2, out, model=model, report=False, overwrite=True, **COMMON)
    assert second["clustering"]["k"] == 2 and second["metrics"] is None
    assert not (out / METRICS).exists() and not (out / REPORT).exists() and not (out / "inspect").exists()
    assert json.loads((out / RUN).read_text())["clustering"]["k"] == 2
    assert json.loads((out / CLUSTERING).read_text())["k"] == 2


def test_run_json_says_running_until_the_run_finishes(assets, tmp_path, monkeypatch):
    images, model = assets
    out = tmp_path / "out"
    run(images, 3, out, model=model, **COMMON)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("itae.pipeline.cluster_store", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(images, 2, out, model=model, **COMMON)
    record = json.loads((out / RUN).read_text())
    assert record["status"] == "running" and "clustering" not in record  # not the finished run's k=3
    assert not (out / "assignments.csv").exists()


def test_user_files_in_a_fresh_output_folder_are_left_alone(assets, tmp_path):
    images, model = assets
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text("my own notes")
    run(images, 2, out, model=model, report=False, **COMMON)  # no labels: it writes no metrics.json
    assert (out / "metrics.json").read_text() == "my own notes"


def test_cluster_store_keeps_how_k_was_chosen(assets, tmp_path):
    images, model = assets
    store = itae.embed(images, model, out=tmp_path / "store", itae=None, **COMMON)
    result = cluster_store(store, None, out=tmp_path / "clusters", k_range=(2, 4))
    saved = json.loads((tmp_path / "clusters" / CLUSTERING).read_text())
    assert saved["k"] == result.k and saved["k_requested"] is None
    assert sorted(int(k) for k in saved["k_scores"]) == [2, 3, 4]


def test_an_output_path_that_is_a_file_is_refused_in_one_line(assets, tmp_path):
    images, model = assets
    (tmp_path / "afile").write_text("x")
    from itae.data.store import StoreError

    with pytest.raises(StoreError, match="is a file, not a folder"):
        run(images, 2, tmp_path / "afile", model=model, **COMMON)


def _store_labels(out: Path) -> str:
    return json.loads((out / "embeddings" / "manifest.json").read_text())["source"]["labels"]
