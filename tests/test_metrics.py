"""Scores against hand-computed cases, brute force and scikit-learn; streaming equals one-shot."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import itae
from itae.metrics import (
    ContingencyAccumulator,
    ari,
    cluster_acc,
    confusion,
    evaluate,
    hungarian,
    match_clusters,
    nmi,
    purity,
    scores_from_table,
    summarize,
)


def _brute_force_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Best accuracy over every one-to-one map from clusters to classes (small label sets only); noise
    (-1) is mapped to no class."""
    classes, clusters = np.unique(y_true), np.unique(np.asarray(y_pred)[np.asarray(y_pred) != -1])
    best = 0
    if len(clusters) <= len(classes):
        maps = (dict(zip(clusters, perm)) for perm in itertools.permutations(classes, len(clusters)))
    else:  # more clusters than classes: each class gets one cluster, the rest map to nothing
        maps = (dict(zip(perm, classes)) for perm in itertools.permutations(clusters, len(classes)))
    for mapping in maps:
        hits = sum(1 for t, p in zip(y_true, y_pred) if mapping.get(p, None) == t)
        best = max(best, hits)
    return best / len(y_true)


def test_hand_computed_more_clusters_than_classes():
    y_true = [0, 0, 0, 0, 1, 1, 1, 1]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 3]
    # Class 0 takes one of its two 2-point clusters, class 1 takes cluster 2 (3 points): 5 of 8.
    assert cluster_acc(y_true, y_pred) == pytest.approx(5 / 8)
    # Every cluster is pure.
    assert purity(y_true, y_pred) == pytest.approx(1.0)


def test_hand_computed_fewer_clusters_than_classes():
    y_true = [0, 1, 2, 2]
    y_pred = [0, 0, 0, 0]
    assert cluster_acc(y_true, y_pred) == pytest.approx(0.5)
    assert purity(y_true, y_pred) == pytest.approx(0.5)
    assert nmi(y_true, y_pred) == 0.0
    assert ari(y_true, y_pred) == 0.0


def test_hand_computed_nmi_and_ari():
    y_true = [0, 0, 1, 1]
    y_pred = [0, 0, 0, 1]
    # MI = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2; H(true) = ln 2; H(pred) = -(3/4 ln 3/4 + 1/4 ln 1/4).
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_true = math.log(2)
    h_pred = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected_nmi = mi / ((h_true + h_pred) / 2)
    # Pairs: same-same 1, expected 2 * 3 / 6 = 1, max (2 + 3) / 2 -> ARI = (1 - 1) / (2.5 - 1) = 0.
    result = evaluate(y_true, y_pred)
    assert result["nmi"] == pytest.approx(expected_nmi, abs=1e-12)
    assert nmi(y_true, y_pred) == pytest.approx(expected_nmi, abs=1e-12)
    assert result["ari"] == pytest.approx(0.0, abs=1e-12)
    assert result["acc"] == pytest.approx(3 / 4)
    assert result["purity"] == pytest.approx(3 / 4)
    assert (result["n_images"], result["n_classes"], result["n_clusters"]) == (4, 2, 2)


def test_perfect_and_permuted_labelling_scores_one():
    y_true = np.repeat(np.arange(5), 7)
    y_pred = (y_true + 3) % 5  # a relabelling
    result = evaluate(y_true, y_pred)
    for key in ("acc", "nmi", "ari", "purity"):
        assert result[key] == pytest.approx(1.0)


def test_random_labelings_match_sklearn_and_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 40))
        y_true = rng.integers(0, int(rng.integers(1, 5)), n)
        y_pred = rng.integers(0, int(rng.integers(1, 6)), n)
        result = evaluate(y_true, y_pred)
        assert result["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
        assert result["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)
        assert result["acc"] == pytest.approx(_brute_force_acc(y_true, y_pred), abs=1e-12)
        assert cluster_acc(y_true, y_pred) == pytest.approx(result["acc"], abs=1e-12)
        assert purity(y_true, y_pred) == pytest.approx(result["purity"], abs=1e-12)
        assert nmi(y_true, y_pred) == pytest.approx(result["nmi"], abs=1e-12)
        assert ari(y_true, y_pred) == pytest.approx(result["ari"], abs=1e-12)


def test_large_labelling_ari_does_not_overflow():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, 300_000)
    y_pred = np.where(rng.random(300_000) < 0.7, y_true, rng.integers(0, 3, 300_000))
    result = evaluate(y_true, y_pred)
    assert result["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)


def test_string_labels_equal_integer_labels():
    names = np.array(["cat", "dog", "ship"])
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 3, 50)
    y_pred = rng.integers(0, 4, 50)
    as_ints = evaluate(y_true, y_pred)
    as_strings = evaluate(names[y_true], [f"c{p}" for p in y_pred])
    assert as_strings == pytest.approx(as_ints)


def test_noise_is_not_a_cluster_and_never_counts_as_correct():
    # Class "c" has 4 noise points and a 1-point cluster. Matching noise as a cluster (the old rule) gave
    # "c" the noise column: acc and purity 10/12. Noise is now never matched nor anyone's majority.
    y_true = ["a", "a", "a", "b", "b", "b", "c", "c", "c", "c", "a", "c"]
    y_pred = [0, 0, 0, 1, 1, 1, -1, -1, -1, -1, -1, 2]
    result = evaluate(y_true, y_pred)
    assert result["acc"] == pytest.approx(7 / 12)  # a->0, b->1, c->2; the 5 noise points are wrong
    assert result["purity"] == pytest.approx(7 / 12)
    assert (result["n_images"], result["n_clusters"], result["n_classes"]) == (12, 3, 3)
    assert result["n_noise"] == 5
    assert result["noise_fraction"] == pytest.approx(5 / 12)
    # NMI and ARI take the noise as one more group: scikit-learn's scores on the raw labels.
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
    assert result["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)
    # The one-score functions follow the same rule.
    assert cluster_acc(y_true, y_pred) == pytest.approx(7 / 12)
    assert purity(y_true, y_pred) == pytest.approx(7 / 12)
    assert nmi(y_true, y_pred) == pytest.approx(result["nmi"], abs=1e-12)
    assert ari(y_true, y_pred) == pytest.approx(result["ari"], abs=1e-12)
    # As does the table path, told which column is noise (-1 sorts first).
    table, _, clusters = confusion(y_true, y_pred)
    assert clusters.tolist() == [-1, 0, 1, 2]
    assert scores_from_table(table, noise_column=0) == pytest.approx(result)


def test_noise_only_and_noise_free_edge_cases():
    everything_noise = evaluate([0, 0, 1, 1], [-1, -1, -1, -1])
    assert everything_noise["acc"] == 0.0 and everything_noise["purity"] == 0.0
    assert (everything_noise["n_clusters"], everything_noise["n_noise"]) == (0, 4)
    assert everything_noise["noise_fraction"] == 1.0
    assert everything_noise["nmi"] == 0.0 and everything_noise["ari"] == 0.0
    # Without noise there are no noise keys; a string "-1" or a true label -1 is not noise.
    assert "n_noise" not in evaluate([0, 1], [1, 0]) and "noise_fraction" not in evaluate([0, 1], [1, 0])
    as_string = evaluate(["x", "x", "y"], ["-1", "-1", "3"])
    assert as_string["acc"] == 1.0 and as_string["n_clusters"] == 2 and "n_noise" not in as_string
    true_minus_one = evaluate([-1, -1, 2], [0, 0, 1])
    assert true_minus_one["acc"] == 1.0 and "n_noise" not in true_minus_one


def test_noise_free_scores_are_unchanged_by_the_noise_rule():
    # Numbers from the implementation before noise was set apart (noise was then one more cluster).
    rng = np.random.default_rng(20240611)
    y_true = rng.integers(0, 6, 300)
    y_pred = np.where(rng.random(300) < 0.6, (y_true * 3 + 1) % 7, rng.integers(0, 7, 300))
    assert evaluate(y_true, y_pred) == {
        "acc": 0.6533333333333333, "nmi": 0.38691205118378824, "ari": 0.37922473868335194,
        "purity": 0.6766666666666666, "n_images": 300, "n_clusters": 7, "n_classes": 6,
    }
    assert cluster_acc(y_true, y_pred) == 0.6533333333333333
    assert purity(y_true, y_pred) == 0.6766666666666666
    y_true = rng.integers(0, 8, 120)
    y_pred = rng.integers(0, 4, 120)
    assert evaluate(y_true, y_pred) == {
        "acc": 0.21666666666666667, "nmi": 0.04890538134694596, "ari": -0.00691181015049551,
        "purity": 0.225, "n_images": 120, "n_clusters": 4, "n_classes": 8,
    }


def test_random_noisy_labelings_match_brute_force_and_sklearn():
    rng = np.random.default_rng(5)
    for _ in range(60):
        n = int(rng.integers(1, 30))
        y_true = rng.integers(0, int(rng.integers(1, 5)), n)
        y_pred = rng.integers(-1, int(rng.integers(1, 5)), n)
        result = evaluate(y_true, y_pred)
        real = y_pred >= 0
        assert result["acc"] == pytest.approx(_brute_force_acc(y_true, y_pred), abs=1e-12)
        assert cluster_acc(y_true, y_pred) == pytest.approx(result["acc"], abs=1e-12)
        # Purity: the majority of every real cluster, over all n points.
        majority = sum(np.bincount(y_true[y_pred == c]).max() for c in np.unique(y_pred[real]))
        assert result["purity"] == pytest.approx(majority / n, abs=1e-12)
        assert purity(y_true, y_pred) == pytest.approx(result["purity"], abs=1e-12)
        assert result["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
        assert result["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)
        assert result["n_clusters"] == len(np.unique(y_pred[real]))
        if real.all():
            assert "n_noise" not in result
        else:
            assert result["n_noise"] == int((~real).sum())
            assert result["noise_fraction"] == pytest.approx((~real).mean())


def test_accumulator_sets_noise_apart_when_it_appears_in_a_later_chunk():
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [4, 4, 5, 5, -1, -1, 5]
    acc = ContingencyAccumulator().update(y_true[:4], y_pred[:4])
    assert "n_noise" not in acc.result() and acc.noise_column is None
    acc.update(y_true[4:], y_pred[4:])
    assert acc.noise_column == 2
    assert acc.result() == pytest.approx(evaluate(y_true, y_pred), abs=1e-12)
    assert acc.result()["acc"] == pytest.approx(4 / 7)
    assert acc.result()["n_noise"] == 2


def test_confusion_orders_rows_and_columns_by_label():
    table, classes, clusters = confusion(["b", "a", "a", "b"], [2, 1, 2, 2])
    assert classes.tolist() == ["a", "b"]
    assert clusters.tolist() == [1, 2]
    np.testing.assert_array_equal(table, [[1, 1], [0, 2]])
    assert scores_from_table(table) == evaluate(["b", "a", "a", "b"], [2, 1, 2, 2])


def test_accumulator_equals_one_shot_on_random_chunks():
    rng = np.random.default_rng(3)
    for _ in range(10):
        n = int(rng.integers(50, 2000))
        y_true = rng.integers(0, int(rng.integers(2, 12)), n)
        y_pred = rng.integers(-1, int(rng.integers(2, 15)), n)
        # Labels sorted so that later chunks introduce classes and clusters the earlier ones never saw.
        order = np.argsort(y_true, kind="stable")
        y_true, y_pred = y_true[order], y_pred[order]
        acc = ContingencyAccumulator()
        edges = np.sort(rng.choice(np.arange(1, n), size=5, replace=False))
        for t, p in zip(np.split(y_true, edges), np.split(y_pred, edges)):
            acc.update(t, p)
        assert acc.n_samples == n
        assert acc.result() == pytest.approx(evaluate(y_true, y_pred), abs=1e-12)
        assert acc.result()["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
        assert acc.result()["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)


def test_accumulator_reports_table_in_first_appearance_order():
    acc = ContingencyAccumulator().update(["x", "y"], [1, 1]).update(["z"], [0])
    assert acc.classes == ["x", "y", "z"]
    assert acc.clusters == [1, 0]
    np.testing.assert_array_equal(acc.table.toarray(), [[1, 0], [1, 0], [0, 1]])


def test_summarize_mean_and_sample_std():
    runs = [{"acc": 0.5, "nmi": 0.2, "tag": "a"}, {"acc": 0.7, "nmi": 0.4, "tag": "b"}]
    summary = summarize(runs)
    assert summary["n_runs"] == 2
    assert summary["acc"]["mean"] == pytest.approx(0.6)
    assert summary["acc"]["std"] == pytest.approx(math.sqrt(0.02))  # ddof=1
    assert summarize(runs, ddof=0)["acc"]["std"] == pytest.approx(0.1)
    assert "tag" not in summary
    single = summarize(runs[:1])
    assert single["nmi"] == {"mean": 0.2, "std": 0.0}


def test_itae_evaluate_is_exported():
    assert itae.evaluate([0, 1], [1, 0])["acc"] == 1.0


def test_no_labels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no labels to score against \(embed with labels=\.\.\., e\.g\. labels='from-folders'\)"):
        itae.evaluate(None, [0, 1])
    with pytest.raises(ValueError, match="no labels to score against"):
        ContingencyAccumulator().update(None, [0, 1])


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([0, 1, 2], [0, 1], "must match"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([], [], "empty"),
    ],
)
def test_bad_labels_raise_value_error(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        evaluate(y_true, y_pred)


def test_summarize_and_accumulator_refuse_nothing():
    with pytest.raises(ValueError, match="at least one run"):
        summarize([])
    with pytest.raises(ValueError, match="no labels"):
        ContingencyAccumulator().result()


def test_match_clusters_is_the_best_matching_and_never_matches_noise():
    rng = np.random.default_rng(7)
    for trial in range(40):
        n_classes, k = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        y_true = rng.integers(0, n_classes, 60)
        y_pred = rng.integers(-1 if trial % 2 else 0, k, 60)  # every other trial has noise (-1)
        m = match_clusters(y_true, y_pred)
        table, classes, clusters = confusion(y_true, y_pred)
        np.testing.assert_array_equal(m.table, table.T)  # rows are clusters
        np.testing.assert_array_equal(m.cluster_ids, clusters)
        np.testing.assert_array_equal(m.class_ids, classes)
        assert m.accuracy == pytest.approx(_brute_force_acc(y_true, y_pred), abs=1e-12)
        assert m.accuracy == pytest.approx(cluster_acc(y_true, y_pred), abs=1e-12)
        noise = (y_pred == -1).any()
        assert (m.noise_row is not None) == noise and m.n_clusters == len(clusters) - noise
        assert m.noise_row not in m.rows.tolist()
        assert len(m.rows) == min(m.n_clusters, len(classes)) and len(set(m.cols.tolist())) == len(m.cols)
        assert m.class_of() == {r: c for c, r in m.cluster_of().items()}


def test_match_clusters_pairs_each_cluster_with_its_class_by_value():
    y_true = np.array(["cat"] * 5 + ["dog"] * 4 + ["ship"] * 3)
    y_pred = np.array([7] * 5 + [-1, 3, 3, 3] + [5, 5, 5])
    m = match_clusters(y_true, y_pred)
    pairs = {int(m.cluster_ids[r]): str(m.class_ids[c]) for r, c in m.class_of().items()}
    assert pairs == {7: "cat", 3: "dog", 5: "ship"}
    assert m.accuracy == pytest.approx(11 / 12) and int(m.cluster_ids[m.noise_row]) == -1
    with pytest.raises(ValueError, match="y_true has 2 labels"):
        match_clusters([0, 1], [0, 1, 1])


def test_hungarian_only_matches_the_allowed_rows_and_columns():
    table = np.array([[9, 0, 0], [0, 8, 1], [0, 7, 6]])
    rows, cols = hungarian(table)
    assert (rows.tolist(), cols.tolist()) == ([0, 1, 2], [0, 1, 2])
    rows, cols = hungarian(table, row_ok=np.array([False, True, True]), col_ok=np.array([True, True, False]))
    assert dict(zip(rows.tolist(), cols.tolist())) == {1: 1, 2: 0}  # 8 + 0 beats 0 + 7; row 0 and column 2 left out
    rows, cols = hungarian(table, row_ok=np.zeros(3, bool))
    assert rows.size == 0 and cols.size == 0 and rows.dtype == np.int64
