"""The ITAE self-check: every run records and says what ITAE flagged, and whether those are sinks."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from itae.engine.selfcheck import MIN_LIFT, attention_share, check_split, choose

from .helpers import colour_classes
from .helpers import run_cli as _run

COMMON = ("--no-progress", "--workers", "0", "--device", "cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return colour_classes(tmp_path_factory.mktemp("selfcheck") / "images", 6, size=(32, 32), noise=30, name="{i}.png")


def _section(html: str, sid: str) -> str:
    part = html[html.index(f'<section id="{sid}">'):]
    return re.sub(r'src="data:[^"]+"', "", part[: part.index("</section>")])


def test_no_itae_report_says_itae_was_off_and_shows_the_unmodified_model(data, tmp_path, capsys):
    """Issue 12, defect 6: a --no-itae report looked like an ITAE report ("after ITAE", a threshold)."""
    out = tmp_path / "base"
    assert _run("run", data, "-k", 3, "-o", out, "--model", "demo:planted", "--no-itae", *COMMON) == 0
    assert "ITAE off" in capsys.readouterr().out
    html = (out / "report.html").read_text(encoding="utf-8")
    banner = re.search(r'<p class="banner" id="itae-banner">([^<]*)</p>', html)
    assert banner and "ITAE off" in banner.group(1)
    diagnostics = _section(html, "diagnostics")
    assert "after ITAE" not in diagnostics and "threshold" not in diagnostics.lower()
    assert "ITAE was off" in diagnostics and "<img" in diagnostics
    record = json.loads((out / "run.json").read_text())
    assert record["itae"] is None and record["self_check"]["status"] == "off"


def test_a_threshold_that_flags_nothing_is_said_plainly(data, tmp_path, capsys, caplog):
    """Issue 12, defect 9: --threshold -1 flags nothing, was accepted silently and recorded as ITAE on."""
    out = tmp_path / "none"
    with caplog.at_level(logging.WARNING, logger="itae"):
        rc = _run("run", data, "-k", 3, "-o", out, "--model", "demo:planted", "--threshold", "-1",
                  "--source", "v", "--side", "low", *COMMON)
    assert rc == 0
    assert any("flag no patch" in r.getMessage() and "ITAE changes nothing" in r.getMessage() for r in caplog.records)
    printed = capsys.readouterr().out
    assert "ITAE on, but nothing flagged" in printed
    record = json.loads((out / "run.json").read_text())
    check = record["self_check"]
    assert check["status"] == "nothing flagged" and check["flagged"] is False
    assert check["blocks"]["1"]["flagged_fraction"] == 0.0 and check["images"] == 18
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "nothing flagged" in re.search(r'id="itae-banner">([^<]*)<', html).group(1)


def test_an_itae_run_records_and_shows_its_self_check(data, tmp_path, capsys):
    out = tmp_path / "itae"
    assert _run("run", data, "-k", 3, "-o", out, "--model", "demo:planted", *COMMON) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ITAE self-check"))
    assert "v/low (chosen by auto)" in line and "3.12% of patches flagged" in line
    record = json.loads((out / "run.json").read_text())
    check = record["self_check"]
    assert check["status"] == "flagging" and check["chosen_by"] == "auto"
    block = check["blocks"]["1"]
    assert (block["source"], block["side"]) == ("v", "low") and block["passes"]
    assert block["lift"] > 10 and block["residual_ratio"] > 10
    assert len(check["candidates"]["1"]) == 6
    assert record["itae"]["source"] == "v" and record["itae"]["side"] == "low"
    manifest = json.loads((out / "embeddings" / "manifest.json").read_text())
    assert manifest["calibration"]["self_check"]["blocks"] == check["blocks"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "ITAE self-check" in re.search(r'id="itae-banner">([^<]*)<', html).group(1)
    diagnostics = _section(html, "diagnostics")
    assert "residual_ratio" in diagnostics and "Candidates tried" in diagnostics


def test_embed_and_inspect_print_the_self_check(data, tmp_path, capsys):
    assert _run("embed", data, "-o", tmp_path / "store", "--model", "demo:clean", *COMMON) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("ITAE on, but nothing flagged") and "no (source, side) split passes" in lines[1]
    images = sorted(data.glob("class0/*.png"))[:2]
    assert _run("inspect", *images, "-o", tmp_path / "fig", "--model", "demo:planted", "--device", "cpu") == 0
    line = capsys.readouterr().out.splitlines()[0]
    # the planted sinks have both the lowest values and the longest keys: v/low and k/high flag the same
    # patches, and which of the two wins is decided by rounding
    assert line.startswith(("block 1: v/low, threshold", "block 1: k/high, threshold")), line
    assert "3.12% of patches flagged" in line and "attention lift" in line and "(auto)" in line


def test_check_split_against_brute_force():
    rng = np.random.default_rng(0)
    attention = attention_share(rng.random((5, 3, 20)))  # (B, H, N)
    residual = rng.random((5, 20)) + 1.0
    mask = np.zeros((5, 20), dtype=bool)
    mask[:, [2, 7]] = True
    residual[:, [2, 7]] *= 10
    check = check_split(0, "v", "low", 1.0, mask, attention.mean(1), residual)
    mass = np.mean([attention.mean(1)[b, [2, 7]].sum() for b in range(5)])
    assert check.flagged_fraction == pytest.approx(0.1)
    assert check.lift == pytest.approx(mass / 0.1)
    assert check.residual_ratio == pytest.approx(residual[mask].mean() / residual[~mask].mean())
    # per-head masks: mass per head on that head's flagged patches
    head_mask = np.zeros((5, 3, 20), dtype=bool)
    head_mask[:, 0, 4] = True
    per_head = check_split(0, "k", "high", 1.0, head_mask, attention, residual)
    assert per_head.lift == pytest.approx(attention[:, 0, 4].sum() / 5 / 3 / head_mask.mean())
    none = check_split(0, "v", "low", 0.0, np.zeros((5, 20), bool), attention.mean(1), residual)
    assert none.lift is None and not none.passes and none.reason == "the threshold flags no patch"


def test_choose_prefers_more_passing_blocks_then_excess_attention_then_order():
    def c(lift, share=0.02, passes=True):
        return check_split(0, "v", "low", 1.0, _mask(share), _attention(lift * share), np.ones((10, 100)) * 2)

    def _mask(share):
        m = np.zeros((10, 100), bool)
        m[:, : int(round(share * 100))] = True
        return m

    def _attention(mass):
        a = np.full((10, 100), (1 - mass) / 98)
        a[:, :2] = mass / 2
        return a

    strong, weak = c(40), c(MIN_LIFT / 2)
    assert strong.passes and not weak.passes and "lift" in weak.reason
    assert choose([[weak], [strong]]) == 1
    assert choose([[strong], [strong]]) == 0  # a tie keeps the earlier (published-first) candidate
    assert choose([[weak], [weak]]) is None
