"""The norm split (``find_threshold``): rare modes found on either side, nothing flagged without one."""

import logging

import numpy as np
import pytest

from itae import ITAEConfig
from itae.engine.calibrate import Split, find_threshold

from . import split_grid as grid


def _right(split: Split, norms: np.ndarray, mask: np.ndarray, side: str) -> bool:
    if not split.bimodal:
        return False
    precision, recall = grid.precision_recall(grid.flagged_by(split.threshold, norms, side), mask)
    return precision >= grid.RIGHT and recall >= grid.RIGHT


def test_rare_modes_are_found_over_the_grid():
    """>= 99% of the required planted modes split right (precision and recall >= 0.95), on both sides."""
    cases = grid.positives(sizes=(1_000, 10_000))
    cases += grid.positives(sizes=(100_000,), seeds=(1,), shares=(0.002, 0.01, 0.15), sds=(0.1, 0.4, 0.8),
                            separations=(3.0, 10.0, 100.0), ratios=(0.5,))
    cases += grid.positives(sizes=(1_000_000,), seeds=(2,), shares=(0.002, 0.02), sds=(0.55,),
                            separations=(18.0,), ratios=(0.5,))
    results = {}
    for case in cases:
        norms, mask = case.sample()
        category = grid.category(case, norms, mask)
        if category == "required":
            results[case.label] = _right(find_threshold(norms, ITAEConfig(side=case.side)), norms, mask, case.side)
    assert len(results) > 500
    misses = [label for label, ok in results.items() if not ok]
    assert len(misses) <= 0.01 * len(results), misses
    for side in grid.SIDES:  # both sides are covered
        assert sum(f"side={side}" in label for label in results) > 200


def test_nothing_is_flagged_on_single_modes_or_two_large_populations():
    cases = grid.negatives(sizes=(1_000, 10_000, 100_000))
    cases += [c for c in grid.negatives(sizes=(1_000_000,), seeds=(1,)) if c.kind != "lognormal" or c.sd == 0.8][::4]
    kinds = set()
    for case in cases:
        norms, _ = case.sample()
        split = find_threshold(norms, ITAEConfig(side=case.side))
        assert not split.bimodal and split.flagged_fraction == 0.0, (case.label, split.reason)
        assert not grid.flagged_by(split.threshold, norms, case.side).any(), case.label
        assert split.reason
        kinds.add(case.kind)
    assert kinds == {"lognormal", "student-t", "two-populations"}


def test_rare_long_keys_next_to_a_wide_bulk():
    """0.8% sinks with keys ~144 against a bulk ~8 of log-sd 0.55: Otsu's cut falls inside the bulk."""
    rng = np.random.default_rng(0)
    bulk = rng.lognormal(np.log(8.0), 0.55, 64 * 256 - 128)
    sinks = rng.lognormal(np.log(144.0), 0.1, 128)
    split = find_threshold(np.concatenate([bulk, sinks]), ITAEConfig(source="k", side="high"))
    assert split.bimodal, split.reason
    assert bulk.max() < split.threshold < sinks.min()
    assert split.flagged_fraction == pytest.approx(128 / (64 * 256))
    old = find_threshold(np.concatenate([bulk, sinks]), ITAEConfig(source="k", side="high", calibration="otsu"))
    assert not old.bimodal  # what 0.1.0 did: no valley, nothing flagged


def test_two_populations_flag_nothing_and_say_why():
    rng = np.random.default_rng(1)
    dark = rng.lognormal(0.0, 0.1, 5000)
    bright = rng.lognormal(np.log(3.0), 0.1, 5000)
    split = find_threshold(np.concatenate([dark, bright]), ITAEConfig(side="low"))
    assert not split.bimodal and split.flagged_fraction == 0.0
    assert "25%" in split.reason
    assert split.threshold < dark.min()


def test_single_mode_says_no_mode():
    norms = np.random.default_rng(2).lognormal(2.0, 0.4, 20_000)
    for side in ("low", "high"):
        split = find_threshold(norms, ITAEConfig(side=side))
        assert not split.bimodal and "no second mode" in split.reason
        assert not grid.flagged_by(split.threshold, norms, side).any()


@pytest.mark.parametrize("side", ["low", "high"])
def test_all_equal_and_too_few_norms_flag_nothing(side):
    config = ITAEConfig(side=side)
    for norms, why in ((np.full(1000, 3.0), "equal"), (np.array([1.0, 1.0, 1.0, 50.0]), "second mode"),
                       (np.array([2.0]), "only 1"), (np.array([]), "only 0")):
        split = find_threshold(norms, config)
        assert not split.bimodal and split.flagged_fraction == 0.0, norms
        assert why in split.reason
        assert not grid.flagged_by(split.threshold, norms, side).any()
        assert ITAEConfig(source="v", side=side, threshold=split.threshold).threshold == split.threshold  # a usable, finite threshold


def test_fewer_than_ten_norms_never_flag():
    rng = np.random.default_rng(3)
    for n in range(2, 10):
        norms = np.concatenate([rng.lognormal(0.0, 0.1, n - 1), [1e-3]])
        split = find_threshold(norms, ITAEConfig(side="low"))
        assert not split.bimodal, (n, split.reason)


def test_nan_and_inf_are_ignored_reported_and_logged(caplog):
    rng = np.random.default_rng(4)
    bulk = rng.lognormal(3.0, 0.1, 5000)
    rare = rng.lognormal(0.0, 0.1, 100)
    clean = find_threshold(np.concatenate([bulk, rare]), ITAEConfig(side="low"))
    dirty = np.concatenate([bulk, [np.nan, np.inf, -np.inf], rare, [np.nan]])
    with caplog.at_level(logging.WARNING, logger="itae.engine.split"):
        split = find_threshold(dirty, ITAEConfig(side="low"))
    assert split.ignored == 4 and clean.ignored == 0
    assert "4 of 5104" in caplog.text
    assert split.bimodal and split.threshold == clean.threshold
    assert split.flagged_fraction == pytest.approx(100 / 5100)  # of the finite norms

    for bad in (np.full(10, np.nan), np.array([np.inf, -np.inf])):
        split = find_threshold(bad, ITAEConfig(side="high"))
        assert not split.bimodal and split.ignored == bad.size and "finite" in split.reason
        assert np.isfinite(split.threshold)


def test_zero_norms_are_a_low_mode_not_a_crash():
    rng = np.random.default_rng(5)
    norms = np.concatenate([rng.lognormal(1.0, 0.3, 2000), np.zeros(40)])
    split = find_threshold(norms, ITAEConfig(side="low"))
    assert split.bimodal and split.flagged_fraction == pytest.approx(40 / 2040)
    assert 0.0 <= split.threshold < norms[norms > 0].min()
