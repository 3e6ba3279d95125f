"""``itae bench --paper`` on a stand-in grid, offline: generated save_to_disk data sets under the paper's names
and tiny random models in place of the DINOv2 sizes; cost first, interruption and resume, missing cells, and
the published figures beside ours."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import itae.extraction.local
import itae.metrics
from itae.bench import (
    KNOWN_DATASETS,
    PRESETS,
    compare,
    model_names,
    preset_spec,
    reference_set,
    reference_sets,
)
from itae.cli.main import main

from .helpers import csv_rows as _rows
from .helpers import spy
from .helpers.tiny import save_tiny

datasets = pytest.importorskip("datasets")

COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230))


def _images(seed: int, per_class: int = 6) -> tuple[list[Image.Image], list[int]]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, colour in enumerate(COLOURS):
        for _ in range(per_class):
            im = Image.fromarray(rng.integers(90, 160, size=(32, 32, 3), dtype=np.uint8))
            x, y = (int(v) for v in rng.integers(2, 14, size=2))
            ImageDraw.Draw(im).rectangle([x, y, x + 14, y + 14], fill=colour)
            images.append(im)
            labels.append(label)
    return images, labels


def _save(root: Path, name: str, seed: int, splits: bool = False) -> None:
    """A save_to_disk copy of the evaluation split (or, with ``splits``, a DatasetDict with a train split
    too), with the columns of the hub data set of that name."""
    known = KNOWN_DATASETS[name]
    features = datasets.Features({known.image_column: datasets.Image(),
                                  known.label_column: datasets.ClassLabel(names=["red", "green", "blue"])})

    def split(seed: int, per_class: int = 6):
        images, labels = _images(seed, per_class)
        return datasets.Dataset.from_dict({known.image_column: images, known.label_column: labels}, features=features)

    data = datasets.DatasetDict({known.split: split(seed), "train": split(seed + 10, 2)}) if splits else split(seed)
    data.save_to_disk(str(root / name))


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standin")
    _save(root / "data", "cifar10", seed=0)
    _save(root / "data", "stl10", seed=1, splits=True)  # a whole DatasetDict: the test split is taken
    save_tiny("hf", root / "models" / "dinov2-base", seed=0)
    save_tiny("hf", root / "models" / "dinov2-with-registers-base", registers=4, seed=1)
    return {"data": root / "data", "models": root / "models"}


def _argv(standin, out: Path, *extra: str) -> list[str]:
    return ["bench", "--paper", "--models", "b", "--data-root", str(standin["data"]), "--model-root",
            str(standin["models"]), "--workers", "0", "--batch-size", "8", "--calibration-images", "8",
            "-o", str(out), *extra]


def test_paper_grid_costs_first_survives_interruption_and_resumes(standin, hub_offline, monkeypatch, capsys, tmp_path):
    out = tmp_path / "out"
    argv = _argv(standin, out, "--datasets", "cifar10,stl10", "--seeds", "0,1")
    evaluate = spy(monkeypatch, itae.metrics, "evaluate", interrupt_at=2)  # the grid is stopped after its first row
    assert main(argv) == 130
    err = capsys.readouterr().err
    # cost first: 2 data sets x 18 images x 3 methods, and 8 calibration images per data set for ITAE
    cost = err.index("bench: to do: 108 images to embed in 6 embedding pass(es) over 2 data set(s) and 2 model(s), "
                     "plus 16 calibration images: 124 forward passes")
    timed = err.index("bench: timed batch: 8 images through facebook/dinov2-base in ")
    assert cost < timed < err.index("bench: embeddings ")
    assert "img/s, model only); estimate for the grid: about " in err
    first = _rows(out / "results.csv")
    assert [(r["dataset"], r["model"], r["method"], r["seed"]) for r in first] == [
        ("cifar10", "facebook/dinov2-base", "baseline", "0")]
    assert first[0]["weights"] == str((standin["models"] / "dinov2-base").resolve())

    # resume: the finished row and the finished embedding are reused, the rest of the grid runs
    monkeypatch.setattr(itae.metrics, "evaluate", evaluate.real)
    embed = spy(monkeypatch, itae.extraction.local, "embed")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "bench: 1 of 12 runs already in results.csv, skipped" in captured.err
    assert "bench: to do: 90 images to embed in 5 embedding pass(es)" in captured.err
    assert embed.calls == 5
    rows = _rows(out / "results.csv")
    assert len(rows) == 12 and rows[0] == first[0]
    assert {r["method"] for r in rows} == {"baseline", "itae", "registers"}
    assert {r["backbone"] for r in rows if r["method"] == "registers"} == {"facebook/dinov2-with-registers-base"}
    assert all(r["n_images"] == "18" and r["k"] == "3" for r in rows)
    assert "12 runs done" not in captured.out and "11 runs done, 1 already there" in captured.out

    # the published ITAE ViT-B/14 figures of both data sets beside ours, each with its difference and verdict
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "## Published figures beside ours" in md and "arXiv:2410.04801" in md
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
             if line.startswith("| cifar10 | facebook/dinov2-base | itae | ")
             or line.startswith("| stl10 | facebook/dinov2-base | itae | ")]
    cells = [c for c in cells if c[3] in ("ACC", "NMI", "ARI")]
    assert len(cells) == 6
    published = {(f.dataset, f.score.upper()): f.value for f in reference_set("paper").figures}
    for dataset, _model, _method, score, ours, pub, diff, verdict in cells:
        mean, std = (float(v) for v in re.findall(r"-?\d+\.\d+", ours))
        values = [100 * float(r[score.lower()]) for r in rows if (r["dataset"], r["method"]) == (dataset, "itae")]
        assert mean == pytest.approx(np.mean(values), abs=0.006) and std == pytest.approx(np.std(values, ddof=1), abs=0.006)
        assert float(pub) == published[dataset, score]
        assert float(diff) == pytest.approx(mean - float(pub), abs=0.011)
        assert verdict == ("yes" if abs(float(pub) - mean) <= std + 1 else "no")
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Published figures beside ours" in report and "84.49" in report

    # a finished grid runs nothing and embeds nothing
    assert main(argv) == 0
    assert "every embedding is cached" not in capsys.readouterr().err
    assert embed.calls == 5 and _rows(out / "results.csv") == rows


def test_unavailable_data_set_and_model_stop_or_are_marked_missing(standin, hub_offline, capsys, caplog, tmp_path):
    out = tmp_path / "out"
    # cifar100 has no local copy and the hub is out of reach: one line naming it and the way to a local copy
    assert main(_argv(standin, out, "--datasets", "cifar10,cifar100", "--seeds", "0", "--no-report")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'cifar100'" in err[0] and "--data-root DIR with DIR/cifar100 a save_to_disk folder" in err[0]

    # --keep-going: cifar100 is missing, and so is every ViT-S cell (no local copy of dinov2-small)
    argv = _argv(standin, out, "--datasets", "cifar10,cifar100", "--models", "s,b", "--seeds", "0", "--no-report",
                 "--keep-going")
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("itae bench: ")]  # warnings
    assert len(lines) == 3  # cifar100, then dinov2-small and its registers counterpart, one line each
    assert "'cifar100'" in lines[0] and "--data-root" in lines[0]
    assert "'facebook/dinov2-small'" in lines[1] and "--model-root DIR with DIR/dinov2-small " in lines[1]
    assert "'facebook/dinov2-with-registers-small'" in lines[2]
    rows = _rows(out / "results.csv")
    assert {(r["dataset"], r["model"]) for r in rows} == {("cifar10", "facebook/dinov2-base")} and len(rows) == 3
    md = (out / "results.md").read_text(encoding="utf-8")
    missing = md[md.index("## Missing cells"):]
    assert "| cifar100 | facebook/dinov2-base | itae | data set cifar100 could not be loaded |" in missing
    assert "| cifar10 | facebook/dinov2-small | baseline | model facebook/dinov2-small could not be loaded |" in missing
    assert "| cifar10 | facebook/dinov2-small | registers | model facebook/dinov2-with-registers-small could not " \
           "be loaded |" in missing
    # the published cifar100 cell says why it has no number
    assert "| cifar100 | facebook/dinov2-base | itae | ACC | — | 65.02 | — | missing: data set cifar100 could not be " \
           "loaded |" in md
    assert "3 runs done, 0 already there, 9 cell(s) missing" in captured.out


def test_mteb_preset_runs_minibatch_kmeans_beside_mteb_figures(standin, hub_offline, capsys, tmp_path):
    out = tmp_path / "out"
    argv = ["bench", "--preset", "mteb", "--models", "b", "--datasets", "cifar10", "--seeds", "0",
            "--data-root", str(standin["data"]), "--model-root", str(standin["models"]), "--workers", "0",
            "--batch-size", "8", "--calibration-images", "8", "--no-report", "-o", str(out)]
    assert main(argv) == 0
    rows = _rows(out / "results.csv")
    assert [r["method"] for r in rows] == ["baseline", "itae"]
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "MiniBatchKMeans" in md and "| cifar10 | facebook/dinov2-base | baseline | NMI |" in md
    assert "| 82.60 |" in md


def test_published_figures_are_pinned():
    """The figures as published (ITAE: the paper; baseline: MTEB's results), so that a typo cannot slip in."""
    sets = reference_sets()
    assert set(sets) == {"paper", "mteb"}

    def table(name):
        out = {}
        for f in sets[name].figures:
            out.setdefault((f.dataset, f.model, f.method), {})[f.score] = f.value
        return out

    b = "facebook/dinov2-base"
    assert table("paper") == {
        ("cifar10", b, "itae"): {"acc": 84.49, "nmi": 86.82, "ari": 79.46},
        ("cifar100", b, "itae"): {"acc": 65.02, "nmi": 77.10, "ari": 50.53},
        ("stl10", b, "itae"): {"acc": 82.76, "nmi": 88.18, "ari": 75.94},
        ("tiny-imagenet", b, "itae"): {"acc": 68.23, "nmi": 81.78, "ari": 52.27},
    }
    assert table("mteb") == {
        ("cifar10", b, "baseline"): {"nmi": 82.6, "ari": 70.4, "acc": 75.4},
        ("cifar100", b, "baseline"): {"nmi": 77.2, "ari": 38.8, "acc": 60.2},
        ("tiny-imagenet", b, "baseline"): {"nmi": 74.3, "ari": 19.2, "acc": 55.5},
        ("cifar10", "facebook/dinov2-large", "baseline"): {"nmi": 79.9, "ari": 60.4, "acc": 72.8},
        ("cifar10", "facebook/dinov2-giant", "baseline"): {"nmi": 76.8, "ari": 54.4, "acc": 69.2},
    }
    assert "arXiv:2410.04801" in sets["paper"].source
    assert "embeddings-benchmark/results" in sets["mteb"].source and "MiniBatchKMeans" in sets["mteb"].source


def test_reproduced_means_within_our_spread_plus_one_point():
    ref = reference_set("paper")
    cell = ("cifar10", "facebook/dinov2-base", "itae")

    def verdicts(mean_acc: float, std_acc: float) -> dict[str, bool]:
        summary = [{"dataset": cell[0], "model": cell[1], "method": cell[2], "runs": 3,
                    "acc": (mean_acc / 100, std_acc / 100), "nmi": (0.8682, 0.0), "ari": (0.70, 0.0)}]
        return {c["score"]: c["reproduced"] for c in compare(ref, summary, [cell])}

    assert verdicts(84.49 - 1.5, 0.6) == {"acc": True, "nmi": True, "ari": False}  # 1.5 <= 0.6 + 1
    assert verdicts(84.49 - 1.5, 0.4)["acc"] is False  # 1.5 > 0.4 + 1
    assert verdicts(84.49 + 0.9, 0.0)["acc"] is True
    out = compare(ref, [], [cell], {cell: "model not there"})
    assert {c["status"] for c in out} == {"missing: model not there"} and all(c["reproduced"] is None for c in out)
    assert compare(ref, [], [("cifar10", "facebook/dinov2-small", "itae")]) == []  # no published figure there


def test_presets_name_the_papers_grid_and_narrow_it(tmp_path):
    spec = preset_spec("paper", models="b")
    assert spec.models == ("facebook/dinov2-base",)
    assert [d.name for d in spec.datasets] == ["cifar10", "cifar100", "stl10", "tiny-imagenet"]
    assert [m.name for m in spec.methods] == ["baseline", "itae", "registers"]
    assert spec.cluster_method == "kmeans" and spec.feature == "cls" and spec.protocol == "test"
    assert len(spec.seeds) == 5 and spec.reference == "paper"
    itae_cfg = spec.methods[1].itae
    assert (itae_cfg.source, itae_cfg.side, itae_cfg.threshold, itae_cfg.mode) == ("v", "low", "auto", "min")
    d = {ds.name: ds for ds in spec.datasets}
    assert (d["cifar10"].source, d["cifar10"].split, d["cifar10"].image_column) == ("uoft-cs/cifar10", "test", "img")
    assert (d["cifar100"].label_column, d["stl10"].source, d["stl10"].split) == ("fine_label", "tanganke/stl10", "test")
    assert (d["tiny-imagenet"].source, d["tiny-imagenet"].split) == ("zh-plus/tiny-imagenet", "valid")
    assert model_names(None) == tuple(f"facebook/dinov2-{s}" for s in ("small", "base", "large", "giant"))
    assert model_names("s,giant") == ("facebook/dinov2-small", "facebook/dinov2-giant")
    with pytest.raises(ValueError, match="unknown model 'x'"):
        model_names("x")
    with pytest.raises(ValueError, match="unknown data set"):
        preset_spec("paper", datasets="cifar11")
    mteb = preset_spec("mteb", datasets="cifar10,imagenet10")
    assert mteb.cluster_method == "minibatch-kmeans" and mteb.minibatch_size == 500 and mteb.reference == "mteb"
    assert PRESETS["mteb"].datasets == ("cifar10", "cifar100", "imagenet10", "imagenet-dog15", "tiny-imagenet")
    assert mteb.settings_key() != preset_spec("paper", datasets="cifar10,imagenet10").settings_key()
    # a local copy under the data set's name replaces the hub source; the rest stays on the hub
    (tmp_path / "stl10").mkdir()
    local = preset_spec("paper", datasets="cifar10,stl10", data_root=tmp_path)
    assert [ds.source for ds in local.datasets] == ["uoft-cs/cifar10", str((tmp_path / "stl10").resolve())]


def test_paper_grid_killed_mid_run_resumes(standin, tmp_path):
    """kill -9 between two runs (the child waits after its first row, so that the kill lands there) leaves
    results.csv whole; the same command then finishes the grid with the killed run's row and embedding."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    argv = _argv(standin, out, "--datasets", "cifar10", "--seeds", "0", "--no-report")
    child = (
        "import sys, time\n"
        "import itae.metrics\n"
        "real = itae.metrics.evaluate\n"
        "def evaluate(*a, **k):\n"
        "    if evaluate.calls:\n"
        "        time.sleep(600)  # the first row is saved: wait here for the kill\n"
        "    evaluate.calls += 1\n"
        "    return real(*a, **k)\n"
        "evaluate.calls = 0\n"
        "itae.metrics.evaluate = evaluate\n"
        "from itae.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", child, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "results.csv").is_file() and len(_rows(out / "results.csv")) >= 1):
            assert proc.poll() is None, "the child ended before its first row"
            assert time.monotonic() < deadline, "no row within 240 s"
            time.sleep(0.1)
        time.sleep(0.5)  # well inside the child's wait
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = _rows(out / "results.csv")
    assert len(first) == 1 and first[0]["method"] == "baseline"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        embed = spy(mp, itae.extraction.local, "embed")
        assert main(argv) == 0
    rows = _rows(out / "results.csv")
    assert rows[0] == first[0] and [r["method"] for r in rows] == ["baseline", "itae", "registers"]
    # the baseline embedding of the killed run is reused (and the ITAE one, when the kill came after it was
    # finished): at most the two other methods are embedded again
    assert 1 <= embed.calls <= 2
