"""The command line end to end, on a tiny local model and generated images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itae.cli.main import main

from .helpers import colour_classes
from .helpers import run_cli as _run
from .helpers.tiny import save_tiny

COLORS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny("hf", root / "tiny-hf")
    data = colour_classes(root / "images", 8, colours=COLORS)
    (data / "class0" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    return {"root": root, "model": str(model), "data": str(data)}


COMMON = ("--resolution", "56", "--no-progress", "--workers", "0", "--device", "cpu")


def test_run_writes_every_output(assets, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _run("run", assets["data"], "-k", 3, "-o", out, "--model", assets["model"], "--labels", "from-folders",
              "--seeds", "0,1", *COMMON)
    assert rc == 0, capsys.readouterr().err
    for name in ("assignments.csv", "metrics.json", "errors.csv", "run.json", "report.html"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 24 and metrics["n_clusters"] == 3
    assert {"acc", "nmi", "ari", "purity", "mean", "std"} <= set(metrics)
    assert metrics["acc"] > 0.9  # three flat colours: any sane embedding separates them
    rows = list(csv.DictReader(open(out / "assignments.csv")))
    assert len(rows) == 24 and {"path", "cluster", "label", "distance", "cluster_seed1"} <= set(rows[0])
    assert all(r["label"] == r["path"].split("/")[0] for r in rows)
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert [e["id"] for e in errors] == ["class0/broken.jpg"]
    run = json.loads((out / "run.json").read_text())
    assert run["itae"]["source"] == "v" and isinstance(run["itae"]["threshold"], list)
    assert {"torch", "itae"} <= set(run["versions"]) and run["timings"]["embed_s"] > 0
    # cluster + evaluate again from the store, as separate commands
    assert _run("cluster", out / "embeddings", "-k", 3, "-o", tmp_path / "again") == 0
    assert _run("evaluate", tmp_path / "again") == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["acc"] == pytest.approx(metrics["acc"])


def test_baseline_and_config_file(assets, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": assets["model"], "labels": "from-folders", "resolution": 56,
                               "no_progress": True, "workers": 0, "device": "cpu", "no_itae": True}))
    out = tmp_path / "base"
    assert _run("--config", cfg, "run", assets["data"], "-k", 3, "-o", out, "--no-report") == 0
    assert json.loads((out / "run.json").read_text())["itae"] is None
    assert not (out / "report.html").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"modle": "x"}))
    assert _run("--config", bad, "run", assets["data"], "-k", 3, "-o", out) != 0


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "no images"),
        ("corrupt", "could be decoded"),
        ("k0", "at least 1"),
        ("k_too_big", "larger than the number of images"),
        ("unknown_model", "model"),
        ("unwritable", "cannot create output folder"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(assets, tmp_path, capsys, case, expected):
    data, k, model, out = assets["data"], 3, assets["model"], tmp_path / "out"
    if case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "corrupt":
        data = tmp_path / "corrupt"
        (data / "a").mkdir(parents=True)
        for i in range(3):
            (data / "a" / f"{i}.png").write_bytes(b"\x89PNG broken")
    elif case == "k0":
        k = 0
    elif case == "k_too_big":
        k = 1000
    elif case == "unknown_model":
        model = "no-such-model-anywhere"
    elif case == "unwritable":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        out = blocker / "out"
    rc = _run("run", data, "-k", k, "-o", out, "--model", model, "--labels", "from-folders", *COMMON)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("itae: error:") and len(err.splitlines()) == 1, err
    assert expected.lower() in err.lower(), err
    if case in ("k0", "k_too_big", "unknown_model"):
        assert not (out / "assignments.csv").exists() and not (out / "metrics.json").exists()


def test_nan_embedding_is_refused(assets, tmp_path, capsys):
    import torch

    from itae.models.loading import load_backbone

    backbone = load_backbone(assets["model"])
    with torch.no_grad():
        backbone.model.base_model.layernorm.weight.fill_(float("nan"))
    backbone.model.save_pretrained(tmp_path / "nan-model")
    rc = _run("run", assets["data"], "-k", 3, "-o", tmp_path / "out", "--model", tmp_path / "nan-model",
              "--no-itae", *COMMON)
    err = capsys.readouterr().err
    assert rc != 0 and "nan" in err.lower()
    assert not (tmp_path / "out" / "assignments.csv").exists()


def test_embed_hub_data_set_configuration(assets, tmp_path, monkeypatch, capsys):
    """--hf-config reaches datasets.load_dataset and the ids; another configuration cannot resume the store."""
    datasets = pytest.importorskip("datasets")
    from itae.data.store import EmbeddingStore

    calls = []

    def load_dataset(path, name=None, *, split=None, **kw):  # offline stand-in for the hub
        calls.append((path, name, split))
        images = sorted(Path(assets["data"]).glob("class*/*.png"))[:4]
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": p.read_bytes(), "path": None} for p in images], "label": [0, 0, 1, 1]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    store = tmp_path / "store"
    args = ("--model", assets["model"], "--no-itae", "--split", "validation", "--labels", "column", *COMMON)
    assert _run("embed", "hf:owner/set", "--hf-config", "320px", "-o", store, *args) == 0, capsys.readouterr().err
    assert calls == [("owner/set", "320px", "validation")]
    assert EmbeddingStore(store).ids == [f"owner/set:320px:validation:{i}" for i in range(4)]
    assert _run("embed", "hf:owner/set:320px", "-o", store, *args) == 0  # the same source, in the spec
    assert calls[-1] == ("owner/set", "320px", "validation")
    capsys.readouterr()
    assert _run("embed", "hf:owner/set:160px", "-o", store, *args) != 0  # same rows, another configuration
    err = capsys.readouterr().err.strip()
    assert err.startswith("itae: error:") and len(err.splitlines()) == 1, err
    assert "source.fingerprint" in err, err
    assert _run("embed", "hf:owner/set:320px", "--hf-config", "160px", "-o", tmp_path / "s2", *args) != 0
    assert "names configuration '320px' but --hf-config 160px" in capsys.readouterr().err


def test_inspect_writes_figures(assets, tmp_path):
    images = sorted(Path(assets["data"]).glob("class1/*.png"))[:2]
    rc = _run("inspect", *images, "-o", tmp_path / "fig", "--model", assets["model"], "--resolution", 56,
              "--threshold", "0.5", "--source", "v", "--side", "low")
    assert rc == 0
    pngs = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    assert "grid.png" in pngs and len(pngs) >= 7
    assert Image.open(tmp_path / "fig" / "grid.png").size[0] > 200


def test_inspect_bad_image_is_one_line(assets, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    assert _run("inspect", bad, "-o", tmp_path / "fig", "--model", assets["model"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("itae: error: cannot inspect") and len(err.splitlines()) == 1, err


def test_help_and_missing_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("run", "embed", "cluster", "evaluate", "inspect", "bench"))
    assert main([]) != 0


def test_outputs_have_ordinary_permissions(assets, tmp_path):
    import os
    import stat

    out = tmp_path / "perm"
    assert _run("run", assets["data"], "-k", 3, "-o", out, "--model", assets["model"], "--no-report", *COMMON) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("assignments.csv", "run.json", "errors.csv", "embeddings/embeddings.npy", "embeddings/manifest.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


def test_bench_quick_runs_offline_on_generated_images(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _run("bench", "--quick", "-o", out, "--no-progress") == 0
    text = capsys.readouterr().out
    assert "demo:planted" in text and "itae" in text
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 6 * 3  # models x methods (none, itae auto, itae v/low, ttr, itae+ttr, registers) x seeds
    assert (out / "report.html").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert all(f'id="{s}"' in html for s in ("metrics", "map", "gallery", "diagnostics", "config"))

    def mean_acc(model, method):
        return np.mean([float(r["acc"]) for r in rows if r["model"] == model and r["method"] == method])

    # the planted sinks hurt the baseline and ITAE takes most of it back
    assert mean_acc("demo:planted", "none") < mean_acc("demo:clean", "none") - 0.1
    assert mean_acc("demo:planted", "itae") > mean_acc("demo:planted", "none") + 0.1
    # auto against the published fixed choice; the self-check columns say what each flagged
    auto = next(r for r in rows if (r["model"], r["method"]) == ("demo:planted", "itae"))
    fixed = next(r for r in rows if (r["model"], r["method"]) == ("demo:planted", "itae-v-low"))
    assert (fixed["source"], fixed["side"]) == ("v", "low")
    assert float(auto["lift"]) > 2 and float(auto["residual_ratio"]) > 1
    clean = next(r for r in rows if (r["model"], r["method"]) == ("demo:clean", "itae"))
    assert float(clean["flagged_fraction"]) == 0.0 and clean["lift"] == ""
    # restart: nothing left to run
    assert _run("bench", "--quick", "-o", out, "--no-progress") == 0
    assert "0 runs done, 36 already there" in capsys.readouterr().out


def test_embed_fast_decode_and_compile_flags_reach_the_store(assets, tmp_path, capsys, monkeypatch):
    from itae.engine.fast import compiled_blocks

    entered = []
    original = compiled_blocks.__enter__
    monkeypatch.setattr(compiled_blocks, "__enter__", lambda self: entered.append(self) or original(self))
    out = tmp_path / "store"
    rc = _run("embed", assets["data"], "-o", out, "--model", assets["model"], "--no-itae", "--fast-decode",
              "--compile", *COMMON)
    first = capsys.readouterr()
    assert rc == 0, first.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocess"]["fast_decode"] is True
    assert len(entered) == 1  # --compile compiled the blocks
    # resuming the same store without --fast-decode would mix two decodings: refused in one line
    rc = _run("embed", assets["data"], "-o", out, "--model", assets["model"], "--no-itae", *COMMON)
    err = capsys.readouterr().err
    assert rc != 0 and "preprocess" in err and len(err.strip().splitlines()) == 1


def test_cluster_max_samples_for_pairwise_methods(assets, tmp_path, capsys):
    store = tmp_path / "store"
    assert _run("embed", assets["data"], "-o", store, "--model", assets["model"], "--no-itae", *COMMON) == 0
    capsys.readouterr()
    # 24 embeddings: above a limit of 10, so refused in one line that names the option ...
    assert _run("cluster", store, "-k", 3, "-o", tmp_path / "a", "--method", "agglomerative", "--max-samples", 10) != 0
    err = capsys.readouterr().err
    assert "--max-samples" in err and len(err.strip().splitlines()) == 1
    # ... fine within it, and meaningless for k-means
    assert _run("cluster", store, "-k", 3, "-o", tmp_path / "b", "--method", "agglomerative", "--max-samples", 30) == 0
    assert _run("cluster", store, "-k", 3, "-o", tmp_path / "c", "--max-samples", 30) != 0
    assert "k-means has no size limit" in capsys.readouterr().err


# ------------------------------------------------------------------------------ usability details


@pytest.mark.parametrize("layers", [("--layers", "-2,-1"), ("--layers=-2,-1",), ("--layers", "-1")])
def test_negative_layer_lists_parse_in_every_spelling(layers):
    from itae.cli.main import build_parser, join_number_lists

    args = build_parser().parse_args(join_number_lists(["run", "data", "-o", "out", *layers]))
    assert args.layers == ((-2, -1) if "-2" in "".join(layers) else (-1,))


def test_negative_threshold_lists_and_non_numbers_are_left_alone():
    from itae.cli.main import build_parser, join_number_lists

    argv = join_number_lists(["run", "d", "-o", "o", "--threshold", "-0.5,-1e-3", "--layers", "-2,-1", "--seeds", "0,1"])
    assert "--threshold=-0.5,-1e-3" in argv and "--seeds" in argv  # a list without a leading '-' needs no help
    args = build_parser().parse_args(argv)
    assert args.threshold == (-0.5, -1e-3) and args.layers == (-2, -1) and args.seeds == (0, 1)
    # an option after --layers is not swallowed, and nothing after "--" is touched
    assert join_number_lists(["--layers", "--model", "x"]) == ["--layers", "--model", "x"]
    assert join_number_lists(["--", "--layers", "-1,-2"]) == ["--", "--layers", "-1,-2"]


def test_documented_layers_example_runs(assets, tmp_path, capsys):
    out = tmp_path / "two-layers"
    rc = _run("run", assets["data"], "-k", 3, "-o", out, "--model", assets["model"], "--layers", "-2,-1",
              "--no-report", *COMMON)
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["itae"]["layers"] == [-2, -1]


@pytest.mark.parametrize("case", ["missing_data", "unknown_model", "nested"])
def test_failed_command_removes_the_output_folder_it_created(assets, tmp_path, capsys, case):
    data, model, out = assets["data"], assets["model"], tmp_path / "e1"
    if case == "missing_data":
        data = tmp_path / "missing_folder"
    elif case == "unknown_model":
        model = "no-such-model-anywhere"
    else:
        out = tmp_path / "a" / "b" / "e1"
        model = "no-such-model-anywhere"
    assert _run("run", data, "-k", 3, "-o", out, "--model", model, *COMMON) != 0
    assert "itae: error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # the embed command too
    assert _run("embed", data, "-o", out, "--model", model, *COMMON) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_command_keeps_an_existing_output_folder_and_files(assets, tmp_path):
    out = tmp_path / "mine"
    (out / "empty-sub").mkdir(parents=True)
    assert _run("run", tmp_path / "missing", "-k", 3, "-o", out, *COMMON) != 0
    assert (out / "empty-sub").is_dir()  # existed before: not ours to remove
    # a folder the failed command created, but that holds more than its run.json, stays with everything in it
    new = tmp_path / "new"
    rc = _run("run", assets["data"], "-k", 1000, "-o", new, "--model", assets["model"], *COMMON)
    assert rc != 0 and not new.exists()  # k checked before anything is written
    rc = _run("run", assets["data"], "-k", 3, "-o", new, "--model", assets["model"], "--method", "hdbscan", *COMMON)
    assert rc != 0 and not new.exists()  # a flag error is found before anything is written
    # a failure that only the data can show (24 images > --max-samples 5) comes after the embedding
    rc = _run("run", assets["data"], "-k", 3, "-o", new, "--model", assets["model"], "--method", "agglomerative",
              "--max-samples", 5, *COMMON)
    assert rc != 0
    assert (new / "embeddings" / "manifest.json").is_file()  # the store, to be resumed, is kept
    record = json.loads((new / "run.json").read_text())
    assert record["status"] == "failed" and "max_samples=5" in record["error"]


def test_global_flags_after_the_subcommand(assets, tmp_path, capsys):
    store = tmp_path / "store"
    rc = _run("embed", assets["data"], "-o", store, "--model", assets["model"], "--no-itae", *COMMON, "-v")
    assert rc == 0, capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):  # --traceback after the subcommand re-raises
        _run("run", tmp_path / "missing", "-k", 3, "-o", tmp_path / "o", *COMMON, "--traceback")
    with pytest.raises(ValueError, match="larger than the number of images"):
        _run("--traceback", "cluster", tmp_path / "store", "-k", 1000)
    # ... and before it, as ever; a flag given neither place stays off
    from itae.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "evaluate", "x"]).verbose is True
    assert parser.parse_args(["evaluate", "x", "-v"]).verbose is True
    assert parser.parse_args(["evaluate", "x"]).verbose is False
    assert parser.parse_args(["evaluate", "x"]).traceback is False
    assert parser.parse_args(["evaluate", "x", "--config", "c.json"]).config == "c.json"


def test_inspect_does_not_offer_no_itae(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "--no-itae" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["inspect", "x.png", "-o", "fig", "--no-itae"])
    assert e.value.code != 0


def test_evaluate_prints_the_metrics_file_headline(assets, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = _run("run", assets["data"], "-k", 3, "-o", out, "--model", assets["model"], "--labels", "from-folders",
              "--seeds", "0,1,2", "--no-report", *COMMON)
    assert rc == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    # the run's line names the seed of the headline scores, the mean over the seeds and the undecodable image
    assert "seed 0: ACC" in summary and "mean over 3 seeds: ACC" in summary
    assert "1 more could not be decoded, see errors.csv" in summary
    assert _run("evaluate", out) == 0
    printed = capsys.readouterr().out
    shown = json.loads(printed)
    written = json.loads((out / "metrics.json").read_text())
    assert shown == {k: v for k, v in written.items() if k != "seeds"}
    assert {"acc", "nmi", "ari", "purity", "n_images", "n_clusters", "n_classes", "mean", "std"} <= set(shown)
    assert '\n  "acc"' in printed  # indented as the file is


def test_run_summary_with_one_seed_and_no_labels(assets, tmp_path, capsys):
    rc = _run("run", assets["data"], "-k", 3, "-o", tmp_path / "one", "--model", assets["model"], "--no-report",
              "--no-itae", *COMMON)
    assert rc == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line == "24 images -> 3 clusters (1 more could not be decoded, see errors.csv)"


def test_embed_summary_is_true_for_fresh_and_complete_stores(assets, tmp_path, capsys):
    store = tmp_path / "store"
    args = ("embed", assets["data"], "-o", store, "--model", assets["model"], "--no-itae", *COMMON)
    assert _run(*args) == 0
    fresh = capsys.readouterr().out.strip()
    assert fresh.splitlines() == [f"store {store}: 24 images embedded, 1 could not be decoded (listed in errors.csv)",
                                  "ITAE off: the unmodified model (baseline)"]
    assert _run(*args) == 0  # already complete: the same true sentence
    assert capsys.readouterr().out.strip() == fresh


def test_resume_refusal_says_plainly_that_labels_differ(assets, tmp_path, capsys):
    import re

    store = tmp_path / "store"
    args = ("embed", assets["data"], "-o", store, "--model", assets["model"], "--no-itae", *COMMON)
    assert _run(*args) == 0
    capsys.readouterr()
    assert _run(*args, "--labels", "from-folders") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "labels: store has none, asked from-folders" in err, err
    assert "--overwrite" in err and "has_labels" not in err
    assert not re.search(r"[0-9a-f]{13,}", err), err  # fingerprints shortened to 12 characters


def test_store_output_that_is_a_file(assets, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _run("embed", assets["data"], "-o", afile, "--model", assets["model"], *COMMON) != 0
    assert f"{str(afile)!r} is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_hdbscan_with_k_names_the_flag(assets, tmp_path, capsys):
    store = tmp_path / "store"
    assert _run("embed", assets["data"], "-o", store, "--model", assets["model"], "--no-itae", *COMMON) == 0
    capsys.readouterr()
    assert _run("cluster", store, "-k", 3, "--method", "hdbscan") != 0
    assert "omit -k" in capsys.readouterr().err


def test_capped_k_range_is_logged(assets, tmp_path, capsys):
    import logging

    store = tmp_path / "store"
    assert _run("embed", assets["data"], "-o", store, "--model", assets["model"], "--no-itae", *COMMON) == 0
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("itae.clustering.autok")
    logger.addHandler(handler)
    try:
        assert _run("cluster", store, "--k-range", "5:300", "-o", tmp_path / "auto") == 0
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert messages == ["k range 5:300 capped to 5:23: choosing k on 24 rows allows at most 23 clusters"]


def test_k_above_the_distinct_images_says_the_same_k_everywhere(assets, tmp_path, capsys, caplog):
    """-k 16 on 16 images, 3 of them identical: the terminal, clustering.json, assignments.csv and the
    report count the same clusters, with a warning in the library's words and no scikit-learn warning."""
    data = tmp_path / "sixteen"
    data.mkdir()
    for i in range(16):
        seed = 0 if i < 3 else i  # three identical images
        a = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(a).save(data / f"{i:02d}.png")
    out = tmp_path / "out"
    rc = _run("run", data, "-k", 16, "-o", out, "--model", assets["model"], "--no-itae", *COMMON)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = list(csv.DictReader(open(out / "assignments.csv")))
    k = len({r["cluster"] for r in rows})
    assert k == 14 and max(int(r["cluster"]) for r in rows) == 13
    assert json.loads((out / "clustering.json").read_text())["k"] == k
    assert json.loads((out / "run.json").read_text())["clustering"]["k"] == k
    assert f"16 images -> {k} clusters" in captured.out
    assert "asked for k=16" in caplog.text and f"using k={k}" in caplog.text  # logged to stderr by the CLI
    assert "ConvergenceWarning" not in captured.err + caplog.text


def test_inspect_draws_the_good_images_and_names_the_bad(assets, tmp_path, capsys):
    good = Path(assets["data"]) / "class0" / "00.png"
    rc = _run("inspect", good, tmp_path / "missing.jpg", "-o", tmp_path / "fig", "--model", assets["model"],
              "--resolution", 56, "--device", "cpu")
    captured = capsys.readouterr()
    assert rc != 0
    assert (tmp_path / "fig" / "grid.png").is_file() and list((tmp_path / "fig").glob("000_00_*_norms.png"))
    assert "missing.jpg" in captured.err and "file not found" in captured.err
    assert "1 of 2 image(s) could not be inspected" in captured.err


def test_run_report_has_title_k_scores_and_its_map_layout(assets, tmp_path, capsys):
    import html as html_lib

    out = tmp_path / "out"
    title = "Colours <b>&</b> shapes"
    rc = _run("run", assets["data"], "-o", out, "--model", assets["model"], "--labels", "from-folders",
              "--k-range", "2:5", "--title", title, *COMMON)
    assert rc == 0, capsys.readouterr().err
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"<title>{html_lib.escape(title)}</title>" in page and "<b>&</b>" not in page
    # Every k tried is a row of the k table, with its score as written to clustering.json.
    clustering = json.loads((out / "clustering.json").read_text())
    scores = {int(k): v for k, v in clustering["k_scores"].items()}
    assert sorted(scores) == [2, 3, 4, 5]
    k_section = page[page.index('<section id="k">'):]
    k_section = k_section[: k_section.index("</section>")]
    for k, v in scores.items():
        chosen = " (chosen)" if k == clustering["k"] else ""
        assert f"<td>{k}{chosen}</td><td>{v:.4f}</td>" in k_section
    run = json.loads((out / "run.json").read_text())
    assert run["report"]["title"] == title
    assert run["report"]["map_layout"] in ("tsne", "umap", "pca")
    assert f"Layout: {run['report']['map_layout']}." in page


def test_run_with_given_k_has_no_k_table(assets, tmp_path):
    out = tmp_path / "out"
    assert _run("run", assets["data"], "-k", 3, "-o", out, "--model", assets["model"], *COMMON) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<section id="k">' not in page and "<title>itae run: images</title>" in page
