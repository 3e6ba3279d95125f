"""One interface for the artifact fixes: the method names in the Python API, the CLI and the bench spec."""

from __future__ import annotations

import json
import logging

import pytest

import itae
from itae.bench.spec import BenchSpec, method_from_value
from itae.methods import resolve_method

from .helpers import colour_classes
from .helpers import run_cli as _run
from .helpers.tiny import save_tiny

COMMON = ("--resolution", "56", "--no-progress", "--workers", "0", "--device", "cpu")
TTR_AUTO = ("--ttr-norm-threshold", "auto", "--ttr-outlier-layer", "0", "--ttr-max-layer", "0", "--ttr-top-k", "4")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    model = save_tiny("hf", root / "tiny-hf")
    data = colour_classes(root / "images", 4)
    return {"model": str(model), "data": str(data)}


def test_resolve_method():
    cfg = itae.ITAEConfig(source="k")
    assert resolve_method(None, cfg, None) == (cfg, None)
    assert resolve_method("none", cfg, None) == (None, None)
    assert resolve_method("itae", None, None) == (itae.ITAEConfig(), None)
    assert resolve_method("ttr", cfg, None) == (None, itae.TTRConfig())
    both = resolve_method("itae+ttr", cfg, itae.TTRConfig(top_k=3))
    assert both == (cfg, itae.TTRConfig(top_k=3))
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_method("kmeans", None, None)
    with pytest.raises(TypeError, match="ttr must be a TTRConfig"):
        resolve_method(None, None, {"top_k": 3})


def test_bench_method_values_round_trip():
    for value in ("none", "itae", "ttr", "itae+ttr", "registers"):
        m = method_from_value(value, value)
        assert m.registers == (value == "registers")
        assert (m.itae is not None) == ("itae" in value) and (m.ttr is not None) == ("ttr" in value)
        again = method_from_value(value, m.to_value())
        assert again == m
    custom = method_from_value("x", {"itae": {"source": "k"}, "ttr": {"top_k": 7, "norm_threshold": "auto"}})
    assert custom.itae.source == "k" and custom.ttr.top_k == 7
    spec = BenchSpec.from_dict({"datasets": [{"name": "d", "source": "s"}], "models": ["demo:planted"],
                                "methods": {"a": "ttr", "b": custom.to_value()}})
    assert BenchSpec.from_dict(spec.to_dict()).methods == spec.methods
    with pytest.raises(ValueError, match="must be one of"):
        method_from_value("x", "kmeans")


def test_run_with_test_time_registers_records_method_neurons_and_check(assets, tmp_path, capsys):
    out = tmp_path / "ttr"
    rc = _run("run", assets["data"], "-k", 3, "-o", out, "--model", assets["model"], "--labels", "from-folders",
              "--method", "ttr", *TTR_AUTO, *COMMON)
    assert rc == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "ttr" and run["itae"] is None
    assert run["ttr"]["top_k"] == 4 and run["ttr"]["norm_threshold"] == "auto"
    assert isinstance(run["ttr"]["neurons"], list) and len(run["ttr"]["neurons"]) <= 4
    check = run["ttr_check"]
    assert {"cls_attention_on_outliers_before", "cls_attention_on_outliers_after", "outlier_fraction"} <= set(check)
    assert check["num_neurons"] == len(run["ttr"]["neurons"])
    assert "cls_attention_on_outliers_before" in (out / "report.html").read_text()

    both = tmp_path / "both"
    assert _run("run", assets["data"], "-k", 3, "-o", both, "--model", assets["model"], "--method", "itae+ttr",
                *TTR_AUTO, "--no-report", *COMMON) == 0
    run = json.loads((both / "run.json").read_text())
    assert run["method"] == "itae+ttr" and run["itae"] is not None and run["ttr"] is not None


def test_no_itae_is_method_none_and_conflicts_are_refused(assets, tmp_path, capsys):
    out = tmp_path / "none"
    assert _run("embed", assets["data"], "-o", out, "--model", assets["model"], "--no-itae", *COMMON) == 0
    assert itae.data.store.EmbeddingStore(out).method == "none"
    assert _run("embed", assets["data"], "-o", tmp_path / "x", "--model", assets["model"], "--no-itae",
                "--method", "ttr", *COMMON) != 0
    assert "disagree" in capsys.readouterr().err
    assert _run("embed", assets["data"], "-o", tmp_path / "x", "--model", assets["model"], "--method", "kmeans",
                *COMMON) != 0
    assert "does not cluster" in capsys.readouterr().err
    assert _run("embed", assets["data"], "-o", tmp_path / "x", "--model", assets["model"], "--method", "registers",
                *COMMON) != 0
    assert "--method must be one of none, itae, ttr, itae+ttr" in capsys.readouterr().err
    assert _run("embed", assets["data"], "-o", tmp_path / "x", "--model", assets["model"], "--method", "ttr",
                "--engine", "ray", *COMMON) != 0
    assert "--engine local only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_old_method_for_the_clustering_algorithm_still_works_with_a_warning(assets, tmp_path, caplog):
    out = tmp_path / "old"
    with caplog.at_level(logging.WARNING, logger="itae"):
        rc = _run("run", assets["data"], "-k", 3, "-o", out, "--model", assets["model"], "--method", "agglomerative",
                  "--no-report", *COMMON)
    assert rc == 0
    assert "deprecated; use --algorithm agglomerative" in caplog.text
    run = json.loads((out / "run.json").read_text())
    assert run["clustering"]["method"] == "agglomerative" and run["method"] == "itae"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="itae"):
        assert _run("cluster", out / "embeddings", "-o", tmp_path / "c", "--method", "hdbscan") == 0
        assert "deprecated" in caplog.text
    assert json.loads((tmp_path / "c" / "clustering.json").read_text())["method"] == "hdbscan"
    assert _run("cluster", out / "embeddings", "-k", 3, "-o", tmp_path / "d", "--algorithm", "agglomerative") == 0
    assert _run("run", assets["data"], "-k", 3, "-o", tmp_path / "e", "--model", assets["model"],
                "--method", "hdbscan", "--algorithm", "kmeans", *COMMON) != 0
    with pytest.warns(DeprecationWarning, match="algorithm='agglomerative'"):
        record = itae.run(assets["data"], 3, tmp_path / "api", model=assets["model"], method="agglomerative",
                          report=False, progress=False, num_workers=0, device="cpu", resolution=56)
    assert record["clustering"]["method"] == "agglomerative" and record["method"] == "itae"
