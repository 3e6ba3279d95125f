"""``itae.run``'s output folder: a new run never leaves an earlier run's files looking like its own,
run.json says whether the run finished, and the store records the labels the run used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import itae
from itae.pipeline import CLUSTERING, METRICS, REPORT, RUN, cluster_store, run

from .helpers import colour_classes
from .helpers.tiny import save_tiny

COMMON = dict(resolution=56, progress=False, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return colour_classes(root / "images", 6, name="{i}.png"), str(save_tiny("hf", root / "tiny"))


def test_a_second_run_in_the_same_folder_leaves_nothing_of_the_first(assets, tmp_path):
    images, model = assets
    out = tmp_path / "out"
    first = run(images, 3, out, model=model, labels="from-folders", **COMMON)
    assert first["status"] == "finished" and (out / METRICS).is_file() and (out / REPORT).is_file()
    assert (out / "inspect").is_dir()
    assert _store_labels(out) == "from-folders"  # the store records the labels the run used
    # no labels and no report this time: the first run's scores and report must not survive
    second = run(images, 2, out, model=model, report=False, overwrite=True, **COMMON)
    assert second["clustering"]["k"] == 2 and second["metrics"] is None
    assert not (out / METRICS).exists() and not (out / REPORT).exists() and not (out / "inspect").exists()
    assert json.loads((out / RUN).read_text())["clustering"]["k"] == 2
    assert json.loads((out / CLUSTERING).read_text())["k"] == 2


def test_run_json_says_failed_when_the_run_stops(assets, tmp_path, monkeypatch):
    images, model = assets
    out = tmp_path / "out"
    run(images, 3, out, model=model, **COMMON)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("itae.pipeline.cluster_store", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(images, 2, out, model=model, **COMMON)
    record = json.loads((out / RUN).read_text())
    assert record["status"] == "failed" and record["error"] == "interrupted"
    assert "clustering" not in record  # not the finished run's k=3
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


# ------------------------------------------------- real collections: locks, names, folders, flags


def test_an_error_after_embedding_leaves_run_json_failed_with_the_error(assets, tmp_path, monkeypatch):
    images, model = assets

    def broken(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr("itae.pipeline.cluster_store", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run(images, 2, tmp_path / "out", model=model, **COMMON)
    record = json.loads((tmp_path / "out" / RUN).read_text())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: disk full" and "ended" in record


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(k=3, method="hdbscan"), "hdbscan.*pass k=None"),
        (dict(k=3, cluster_options={"max_samples": 100}), "method='kmeans' takes no option 'max_samples'"),
        (dict(k=None, cluster_options={"k_range": (5, 2)}), "k_range"),
        (dict(k=3, seeds=(1, 1)), "distinct"),
        (dict(k=3, batch_size=0), "batch_size"),
        (dict(k=3, save_every=0), "save_every"),
        (dict(k=3, save_interval=0), "save_interval"),
        (dict(k=3, feature="max"), "feature"),
        (dict(k=3, resolution=-1), "resolution"),
    ],
)
def test_every_flag_is_checked_before_anything_is_written_or_read(assets, tmp_path, monkeypatch, kw, message):
    images, model = assets

    def no_reading(*args, **kwargs):
        raise AssertionError("an image source was opened before the arguments were checked")

    monkeypatch.setattr("itae.data.sources.open_source", no_reading)
    k = kw.pop("k")
    with pytest.raises((ValueError, TypeError), match=message):
        run(images, k, tmp_path / "out", model=model, **{**COMMON, **kw})
    assert not (tmp_path / "out").exists()  # not even the output folder


def test_a_file_name_that_is_not_utf8_round_trips(assets, tmp_path):
    """b'b_\\xff.jpg' (old disks, archives): the run finishes, and every CSV gives the name back exactly."""
    import os
    import shutil

    images, model = assets
    data = tmp_path / "data"
    shutil.copytree(images, data)
    raw = os.fsencode(data / "class0") + b"/b_\xff.png"
    shutil.copyfile(data / "class0" / "0.png", raw)
    (data / "class1" / "broken_\xe9.png").write_bytes(b"not a png")
    os.rename(os.fsencode(data / "class1" / "broken_\xe9.png"), os.fsencode(data / "class1") + b"/broken_\xe9.png")
    out = tmp_path / "out"
    record = run(data, 3, out, model=model, labels="from-folders", **COMMON)
    assert record["status"] == "finished" and record["n_images"] == 19
    name = os.fsdecode(b"class0/b_\xff.png")
    from itae.data.store import EmbeddingStore
    from itae.pipeline import read_assignments

    store = EmbeddingStore(out / "embeddings")
    assert name in store.ids
    assert os.path.isfile(os.path.join(os.fsencode(data), os.fsencode(name)))  # the id names the file
    assert name in read_assignments(out)["ids"]
    assert [e[1] for e in store.errors] == [os.fsdecode(b"class1/broken_\xe9.png")]
    assert b"class0/b_\xff.png" in (out / "assignments.csv").read_bytes()
    assert (out / "report.html").is_file()


def test_an_output_folder_inside_the_input_is_not_input(assets, tmp_path):
    import shutil

    images, model = assets
    data = tmp_path / "data"
    shutil.copytree(images, data)
    first = run(data, 3, data / "out", model=model, **COMMON)
    assert first["n_images"] == 18 and (data / "out" / "inspect").is_dir()
    # a second run into the same folder, and one into another folder beside it: the first run's PNGs
    # (inspect/) are not images to cluster, and the store is resumed, not refused
    again = run(data, 3, data / "out", model=model, **COMMON)
    other = run(data, 3, data / "out2", model=model, **COMMON)
    assert again["n_images"] == other["n_images"] == 18


def test_a_symlinked_class_folder_is_followed_and_a_link_loop_ends(assets, tmp_path):
    import shutil

    from itae.data.sources import open_source

    images, _ = assets
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(images / "class0", data / "class0")
    (data / "class1").symlink_to(images / "class1", target_is_directory=True)
    (data / "class0" / "loop").symlink_to(data, target_is_directory=True)  # class0/loop -> data
    source = open_source(data, labels="from-folders")
    assert sorted(set(source.labels)) == ["class0", "class1"]
    assert len(source) == 12


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_pid(assets, tmp_path):
    """Two runs into one folder at once: the second stops at once with the first one's pid; the first
    one is not disturbed. Run A is a real second process, held inside its run until told to go on."""
    import os
    import subprocess
    import sys
    import time

    images, model = assets
    out = tmp_path / "out"
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = f"""
import time, pathlib, itae.pipeline as p
real = p._run_steps
def held(*a, **kw):
    pathlib.Path({str(ready)!r}).write_text("x")
    while not pathlib.Path({str(go)!r}).exists():
        time.sleep(0.05)
    return real(*a, **kw)
p._run_steps = held
p.run({str(images)!r}, 3, {str(out)!r}, model={model!r}, resolution=56, progress=False, num_workers=0, device="cpu")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if ready.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), first.stderr.read() if first.poll() is not None else "run A never started"
        from itae._lock import FolderInUseError

        with pytest.raises(FolderInUseError, match=rf"in use by pid {first.pid} \(itae run"):
            run(images, 2, out, model=model, itae=None, **COMMON)
        go.write_text("x")
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    record = json.loads((out / RUN).read_text())
    assert record["status"] == "finished" and record["itae"] is not None  # A's run, A's settings


def test_a_lock_left_by_a_killed_run_is_taken_over(assets, tmp_path, caplog):
    import os
    import signal
    import subprocess
    import sys

    images, model = assets
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
import time, itae._lock as l
with l.folder_lock({str(out)!r}, "itae run"):
    print("locked", flush=True)
    time.sleep(600)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (out / ".itae.lock.owner").is_file()  # what the killed run left
    with caplog.at_level("WARNING", logger="itae"):
        record = run(images, 2, out, model=model, **COMMON)
    assert record["status"] == "finished"
    assert f"left by pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (out / ".itae.lock.owner").exists()
