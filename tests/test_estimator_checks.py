"""scikit-learn's own estimator suite on the four clustering estimators, and what it asks of them:
a default ``n_clusters``, ``random_state``, ``n_iter_``, ``NotFittedError``, scikit-learn's input checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from itae.clustering import AgglomerativeClusterer, AutoK, HDBSCANClusterer, KMeansClusterer, cluster

ESTIMATORS = [
    KMeansClusterer(n_init=2),
    AgglomerativeClusterer(),
    HDBSCANClusterer(),
    AutoK(k_range=(2, 4), params={"n_init": 2}),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_defaults_and_names_follow_scikit_learn():
    assert KMeansClusterer().n_clusters == 8 and AgglomerativeClusterer().n_clusters == 2
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    km = KMeansClusterer(3, random_state=5, n_init=1).fit(x)
    assert km.n_iter_ >= 1
    np.testing.assert_array_equal(km.labels_, KMeansClusterer(3, seed=5, n_init=1).fit(x).labels_)  # old name
    with pytest.raises(NotFittedError):
        KMeansClusterer(3).predict(x)
    with pytest.raises(TypeError, match="(?i)sparse"):
        from scipy import sparse

        KMeansClusterer(2).fit(sparse.csr_matrix(x))


def test_k_larger_than_the_distinct_points_reports_the_clusters_it_made(caplog, recwarn):
    """16 images, 3 of them identical, k=16: 14 distinct points can fill at most 14 clusters. Every output
    counts the same non-empty clusters, and the warning is the library's, not scikit-learn's."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    x[1] = x[2] = x[0]
    with caplog.at_level(logging.WARNING, logger="itae"):
        result = cluster(x, 16)
    assert result.k == len(np.unique(result.labels)) == result.centers.shape[0] == 14
    assert result.labels.max() == 13 and result.params["k"] == 14
    assert "asked for k=16" in caplog.text and "using k=14" in caplog.text
    assert not [w for w in recwarn if "ConvergenceWarning" in type(w.message).__name__]
