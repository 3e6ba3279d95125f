"""The bench grid on generated images and the demo models: rows, summary, reuse and restart."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import itae.extraction.local
import itae.metrics
from itae.bench import (
    KNOWN_DATASETS,
    BenchSpec,
    DatasetLoadError,
    dataset_from_value,
    load_spec,
    open_dataset,
    registers_counterpart,
    run_bench,
)

from .helpers import csv_rows as _csv_rows
from .helpers import spy

CLASSES = {"red-square": ((220, 40, 40), "square"), "green-disc": ((40, 200, 60), "disc"),
           "blue-bar": ((50, 70, 230), "bar")}


def _make_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """<root>/<class>/<i>.png: coloured shapes at random places on noisy grey backgrounds, 32 x 32."""
    rng = np.random.default_rng(seed)
    for name, (colour, shape) in CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            bg = rng.integers(90, 160, size=(32, 32, 3), dtype=np.uint8)
            im = Image.fromarray(bg)
            d = ImageDraw.Draw(im)
            x, y = (int(v) for v in rng.integers(4, 14, size=2))
            s = int(rng.integers(10, 16))
            if shape == "square":
                d.rectangle([x, y, x + s, y + s], fill=colour)
            elif shape == "disc":
                d.ellipse([x, y, x + s, y + s], fill=colour)
            else:
                d.rectangle([x, y, x + s, y + 4], fill=colour)
            im.save(folder / f"{i}.png")
    return root


def _spec(folder: Path, **kw) -> dict:
    spec = {
        "datasets": [{"name": "shapes", "source": str(folder)}],
        "models": ["demo:planted"],
        "methods": {"baseline": None, "itae": {}},
        "seeds": [0, 1],
        "calibration_images": 8,
        "num_workers": 0,
        "batch_size": 8,
    }
    spec.update(kw)
    return spec


def _md_cells(path: Path) -> dict[tuple[str, str], list[str]]:
    """(model, method) -> the cells of its results.md row."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| demo:"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0], cells[1].split(" (")[0]] = cells[2:]
    return rows


def test_quick_preset_writes_rows_and_a_summary_that_matches_them(tmp_path):
    folder = _make_folder(tmp_path / "shapes")
    out = tmp_path / "out"
    result = run_bench(folder, out, quick=True, progress=False)
    rows = _csv_rows(out / "results.csv")
    # 2 models x 6 methods (none, itae auto, itae v/low, ttr, itae+ttr, registers) x 3 seeds, one row each
    assert len(rows) == 36 and result.ran == 36 and result.skipped == 0
    keys = {(r["dataset"], r["model"], r["method"], r["seed"], r["protocol"]) for r in rows}
    assert len(keys) == 36
    assert [r["method"] for r in rows[::3][:6]] == ["none", "itae", "itae-v-low", "ttr", "itae+ttr", "registers"]
    assert {r["backbone"] for r in rows if r["method"] == "registers"} == {"demo:registers"}
    assert all(r["n_images"] == "18" and r["k"] == "3" for r in rows)
    # the ITAE calibration found the planted sinks: 2 of 64 patches
    planted_itae = [r for r in rows if r["model"] == "demo:planted" and r["method"] == "itae"]
    assert float(planted_itae[0]["flagged_fraction"]) == pytest.approx(2 / 64)
    # test-time registers: the sinks are the outliers (2 of 64 patches) and the planted nuisance units of the
    # first MLP, gated on the sinks, lead the neurons
    for method in ("ttr", "itae+ttr"):
        planted_ttr = [r for r in rows if r["model"] == "demo:planted" and r["method"] == method]
        assert float(planted_ttr[0]["outlier_fraction"]) == pytest.approx(2 / 64)
        assert int(planted_ttr[0]["neurons"]) > 0
    (manifest,) = (out / "cache").glob("*/*/demo_planted/cls/ttr-*/manifest.json")
    found = json.loads(manifest.read_text())["ttr"]["neurons"]
    assert sorted(map(tuple, found[:6])) == [(0, n) for n in range(768 - 6, 768)]  # demo's _NUISANCE_UNITS

    # results.md equals mean and sample std of the rows, and deltas of means against the baseline
    cells = _md_cells(out / "results.md")
    for (model, method), row_cells in cells.items():
        members = [r for r in rows if r["model"] == model and r["method"] == method]
        assert int(row_cells[0]) == len(members)
        for j, score in enumerate(("acc", "nmi", "ari")):
            values = np.array([100 * float(r[score]) for r in members])
            mean, std = (float(v) for v in re.findall(r"-?\d+\.\d+", row_cells[1 + j]))
            assert mean == pytest.approx(values.mean(), abs=0.006)
            assert std == pytest.approx(values.std(ddof=1), abs=0.006)
            base = np.array([100 * float(r[score]) for r in rows if r["model"] == model and r["method"] == "none"])
            delta = row_cells[4 + j]
            if method == "none":
                assert delta == "—"
            else:
                assert float(delta) == pytest.approx(values.mean() - base.mean(), abs=0.006)
    assert len(cells) == 12
    assert result.summary[0]["acc"][0] == pytest.approx(np.mean([float(r["acc"]) for r in rows[:3]]))
    _check_report(out / "report.html", rows)


def _check_report(path: Path, rows: list[dict]) -> None:
    """report.html names the run it shows, gives scores in % only, and explains the shared registers rows."""
    text = path.read_text(encoding="utf-8")
    visible = re.sub(r"<[^>]+>", " ", re.sub(r'src="data:[^"]+"', "", text))
    # the shown run: planted ITAE (it flags the most patches), seed 0, with its own scores in %
    shown = next(r for r in rows if (r["model"], r["method"], r["seed"]) == ("demo:planted", "itae", "0"))
    name = (f"Run shown: data set shapes · model demo:planted · method itae · seed 0 "
            f"(ACC {100 * float(shown['acc']):.2f}%")
    for sid in ("confusion", "map", "gallery"):
        section = text[text.index(f'<section id="{sid}">'):]
        assert name in section[: section.index("</section>")], sid
    # the confusion table's matching accuracy is that run's ACC
    assert f"accuracy under this matching: {100 * float(shown['acc']):.2f}%" in visible
    metrics = text[text.index('<section id="metrics">'):]
    metrics = metrics[: metrics.index("</section>")]
    assert "ACC %" in metrics and f"<td>{100 * float(shown['acc']):.2f}</td>" in metrics
    assert "shapes · demo:planted · itae · seed 0" in metrics
    # percent everywhere: no score is printed as a fraction with 4 decimals
    tables = text[text.index('<section id="metrics">'):text.index('<section id="confusion">')]
    assert not re.search(r"<td>-?0\.\d{4}</td>", tables), tables
    # the registers rows of both demo models come from the same reference model, and the page says so
    assert visible.count("registers (demo:registers)") == 2
    # the shown run's artifact diagnostics are drawn (inspect/grid.png), embedded in the page
    diagnostics = text[text.index('<section id="diagnostics">'):]
    assert diagnostics[: diagnostics.index("</section>")].count('<img class="figure"') == 1
    assert (path.parent / "inspect" / "grid.png").is_file()
    assert "the registers rows of demo:clean and demo:planted are one and the same reference model, " \
           "demo:registers" in html.unescape(visible)


def test_restart_after_interruption_skips_finished_runs_and_reuses_embeddings(tmp_path, monkeypatch):
    folder = _make_folder(tmp_path / "shapes")
    out = tmp_path / "out"
    evaluate = spy(monkeypatch, itae.metrics, "evaluate", interrupt_at=3)  # the grid is interrupted in its third run
    with pytest.raises(KeyboardInterrupt):
        run_bench(_spec(folder), out, progress=False)
    first = _csv_rows(out / "results.csv")
    assert [(r["method"], r["seed"]) for r in first] == [("baseline", "0"), ("baseline", "1")]

    monkeypatch.setattr(itae.metrics, "evaluate", evaluate.real)
    embed = spy(monkeypatch, itae.extraction.local, "embed")
    result = run_bench(_spec(folder), out, progress=False)
    assert result.skipped == 2 and result.ran == 2
    assert embed.calls == 0  # both embeddings were finished before the interruption: reused
    run_bench(_spec(folder, seeds=[0]), tmp_path / "fresh", progress=False)
    assert embed.calls == 2  # the counter sees embeddings that are computed
    rows = _csv_rows(out / "results.csv")
    assert rows[:2] == first
    assert [(r["method"], r["seed"]) for r in rows] == [("baseline", "0"), ("baseline", "1"), ("itae", "0"), ("itae", "1")]

    # a complete grid runs nothing; a grid with other settings in the same folder is refused
    again = run_bench(_spec(folder), out, progress=False)
    assert again.ran == 0 and again.skipped == 4 and _csv_rows(out / "results.csv") == rows
    with pytest.raises(ValueError, match="other settings"):
        run_bench(_spec(folder, k=2), out, progress=False)


def test_uninterrupted_and_restarted_grids_agree(tmp_path):
    folder = _make_folder(tmp_path / "shapes")
    one = run_bench(_spec(folder, seeds=[0]), tmp_path / "a", progress=False)
    both = run_bench(_spec(folder, seeds=[0, 1]), tmp_path / "a", progress=False)  # extends the grid
    fresh = run_bench(_spec(folder, seeds=[0, 1]), tmp_path / "b", progress=False)
    assert both.ran == 2 and both.skipped == 2
    scores = [[(r["acc"], r["nmi"], r["ari"]) for r in res.rows] for res in (both, fresh)]
    assert scores[0] == scores[1]
    assert one.rows[0]["acc"] == both.rows[0]["acc"]


def test_train_test_protocol(tmp_path):
    _make_folder(tmp_path / "data" / "train", seed=1)
    _make_folder(tmp_path / "data" / "test", seed=2, per_class=4)
    spec = _spec(tmp_path / "data", protocol="train-test", seeds=[0], methods={"baseline": None})
    result = run_bench(spec, tmp_path / "out", progress=False)
    (row,) = result.rows
    assert row["protocol"] == "train-test" and int(row["n_images"]) == 12
    assert (tmp_path / "out" / "cache" / "shapes" / "train").is_dir()


def test_spec_parsing(tmp_path):
    folder = _make_folder(tmp_path / "shapes", per_class=2)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_spec(folder, methods={"base": None, "itae-k": {"source": "k"}, "reg": "registers"})))
    spec = load_spec(path)
    assert isinstance(spec, BenchSpec)
    assert [m.name for m in spec.methods] == ["base", "itae-k", "reg"]
    assert spec.methods[1].itae.source == "k" and spec.methods[2].registers
    assert load_spec(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown bench spec field"):
        load_spec({**_spec(folder), "seed": 1})
    with pytest.raises(ValueError, match="protocol"):
        load_spec(_spec(folder, protocol="val"))
    with pytest.raises(ValueError, match="unknown ITAEConfig field"):
        load_spec(_spec(folder, methods={"x": {"sourse": "k"}}))
    with pytest.raises(FileNotFoundError):
        load_spec(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="quick=True"):
        run_bench(None, tmp_path / "o")

    cifar100_20 = dataset_from_value({"name": "cifar100-20", "source": "/data/c100"})
    assert cifar100_20.label_column == "coarse_label" and cifar100_20.source == "/data/c100"
    assert KNOWN_DATASETS["tiny-imagenet"].split == "valid"
    assert dataset_from_value(str(folder)).name == "shapes"
    with pytest.raises(ValueError, match="unknown data set"):
        dataset_from_value("no-such-set")

    assert registers_counterpart("facebook/dinov2-giant") == "facebook/dinov2-with-registers-giant"
    assert registers_counterpart("dinov2_vits14") == "dinov2_vits14_reg"
    assert registers_counterpart("timm/vit_large_patch14_dinov2.lvd142m") == "timm/vit_large_patch14_reg4_dinov2.lvd142m"
    assert registers_counterpart("demo:planted") == "demo:registers"
    with pytest.raises(ValueError, match="registers counterpart"):
        registers_counterpart("my/vit")


@pytest.mark.parametrize("name", ["facebook/dinov3-vitb16-pretrain-lvd1689m", "timm/vit_small_patch16_dinov3.lvd1689m",
                                  "facebook/dinov3-vit7b16-pretrain-lvd1689m"])
def test_dinov3_is_its_own_registers_counterpart(name):
    assert registers_counterpart(name) == name


@pytest.mark.parametrize("name, family", [
    ("openai/clip-vit-base-patch16", "CLIP"), ("open_clip:ViT-B-16/laion2b_s34b_b88k", "CLIP"),
    ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIP"), ("google/siglip-base-patch16-224", "SigLIP"),
    ("google/siglip2-base-patch16-224", "SigLIP"), ("timm/deit3_base_patch16_224.fb_in22k_ft_in1k", "DeiT-III"),
])
def test_families_without_a_registers_counterpart_say_so(name, family):
    with pytest.raises(ValueError, match=f"no registers counterpart exists for .*no {family}.* does not apply"):
        registers_counterpart(name)


def test_hub_data_set_offline_fails_with_one_line(hub_offline):
    with pytest.raises(DatasetLoadError) as err:
        open_dataset(KNOWN_DATASETS["cifar10"], "test")
    message = str(err.value)
    assert "\n" not in message and "cifar10" in message and "save_to_disk" in message


def test_unlabelled_local_folder_is_refused(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(DatasetLoadError, match="flat"):
        open_dataset(dataset_from_value({"name": "flat", "source": str(folder)}), "test")


def test_hub_configuration_reaches_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    data = datasets.Dataset.from_dict({"image": [{"bytes": b"x", "path": None}] * 2, "label": [0, 1]},
                                      features=features)

    def load_dataset(path, name=None, *, split=None, **kw):  # offline stand-in for the hub
        calls.append((path, name, split))
        return data

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    imagenette = KNOWN_DATASETS["imagenette"]
    assert (imagenette.source, imagenette.hf_config, imagenette.split) == ("frgfm/imagenette", "320px", "validation")
    src = open_dataset(imagenette, imagenette.split)
    assert calls == [("frgfm/imagenette", "320px", "validation")]
    assert src.ids == ["frgfm/imagenette:320px:validation:0", "frgfm/imagenette:320px:validation:1"]
    # a grid spec can choose another configuration; a local copy of the data set ignores it
    other = dataset_from_value({"name": "imagenette", "hf_config": "160px"})
    assert other.to_dict()["hf_config"] == "160px"
    open_dataset(other, "validation")
    assert calls[-1] == ("frgfm/imagenette", "160px", "validation")
    data.save_to_disk(str(tmp_path / "copy"))
    local = open_dataset(dataset_from_value({"name": "imagenette", "source": str(tmp_path / "copy")}), None)
    assert len(local) == 2 and len(calls) == 2
    with pytest.raises(ValueError, match="hf_config must be a configuration name"):
        dataset_from_value({"name": "imagenette", "hf_config": ""})


def test_a_data_set_name_pointing_at_other_images_is_refused_not_reused(tmp_path):
    """Results and cached embeddings are kept under the data set's name; pointing that name at other
    images (another source, configuration or max_images) must not reuse either of them."""
    first, second = _make_folder(tmp_path / "first"), _make_folder(tmp_path / "second", seed=5)
    out = tmp_path / "out"
    methods = {"baseline": None}
    done = run_bench(_spec(first, seeds=[0], methods=methods), out, progress=False)
    assert done.ran == 1 and _csv_rows(out / "results.csv")[0]["data"]
    # finished runs made on other data
    with pytest.raises(ValueError, match="other data"):
        run_bench(_spec(second, seeds=[0], methods=methods), out, progress=False)
    # a new run (seed 1) would take the cached embeddings of the first folder
    with pytest.raises(ValueError, match="cached embeddings .* other images"):
        run_bench(_spec(second, seeds=[1], methods=methods), out, progress=False)
    # the same data under the same name still extends the grid from the cache
    again = run_bench(_spec(first, seeds=[0, 1], methods=methods), out, progress=False)
    assert again.ran == 1 and again.skipped == 1
