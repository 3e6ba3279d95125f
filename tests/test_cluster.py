"""Clusterers: recovery of well-separated blobs, backend agreement, spherical k-means, chunked and
memory-mapped input, automatic k, HDBSCAN noise, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import itae
from itae.clustering import (
    HDBSCAN_MAX_SAMPLES,
    AgglomerativeClusterer,
    AutoK,
    HDBSCANClusterer,
    KMeansClusterer,
    _arrays,
    cluster,
    faiss_available,
    resolve_backend,
)


def blobs(n_per: int = 60, k: int = 4, dim: int = 8, spread: float = 0.3, seed: int = 0):
    """k tight Gaussian blobs far apart; returns (x float32 (n, dim), labels (n,))."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 10
    labels = np.repeat(np.arange(k), n_per)
    x = centers[labels] + rng.normal(scale=spread, size=(k * n_per, dim))
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


def rays(n_per: int = 80, seed: int = 0):
    """Three directions in 2-D with radii from 0.5 to 20: clusters by angle, not by position."""
    rng = np.random.default_rng(seed)
    angles = np.array([0.0, 0.6, 1.2])
    labels = np.repeat(np.arange(3), n_per)
    theta = angles[labels] + rng.normal(scale=0.03, size=labels.size)
    radius = rng.uniform(0.5, 20, size=labels.size)
    x = np.stack([np.cos(theta), np.sin(theta)], axis=1) * radius[:, None]
    return x.astype(np.float32), labels


BACKENDS = [
    "sklearn",
    "minibatch",
    pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss not installed")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_recovers_blobs(backend):
    x, y = blobs()
    km = KMeansClusterer(4, backend=backend, n_init=3, random_state=0)
    assert km.fit(x) is km
    assert km.backend_ == backend
    assert adjusted_rand_score(y, km.labels_) > 0.99
    assert km.cluster_centers_.shape == (4, 8) and km.n_clusters_ == 4
    assert km.labels_.dtype == np.int64
    np.testing.assert_array_equal(km.predict(x), km.labels_)
    # distances_ and inertia_ are those of each row to its own centroid.
    own = np.linalg.norm(x - km.cluster_centers_[km.labels_], axis=1)
    np.testing.assert_allclose(km.distances_, own, rtol=1e-4, atol=1e-4)
    assert km.inertia_ == pytest.approx(float(np.sum(own.astype(np.float64) ** 2)), rel=1e-4)
    np.testing.assert_array_equal(KMeansClusterer(4, backend=backend, n_init=3).fit_predict(x), km.labels_)


def test_faiss_and_sklearn_agree_on_separated_blobs():
    pytest.importorskip("faiss")
    x, _ = blobs(n_per=150, k=6, dim=16, seed=1)
    for spherical in (False, True):
        a = KMeansClusterer(6, backend="faiss", n_init=5, spherical=spherical).fit_predict(x)
        b = KMeansClusterer(6, backend="sklearn", n_init=5, spherical=spherical).fit_predict(x)
        assert adjusted_rand_score(a, b) > 0.99


def test_same_seed_same_result_and_params_roundtrip():
    x, _ = blobs(spread=3.0)
    a = KMeansClusterer(5, n_init=1, random_state=7).fit(x)
    b = KMeansClusterer(5, n_init=1, random_state=7).fit(x)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert KMeansClusterer(**a.get_params()).get_params() == a.get_params()


def test_chunked_assignment_equals_brute_force():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 6)).astype(np.float32)
    centers = rng.normal(size=(7, 6)).astype(np.float32)
    for spherical in (False, True):
        labels, dist, inertia = _arrays.assign(x, centers, spherical=spherical, chunk_size=97)
        pts = x / np.linalg.norm(x, axis=1, keepdims=True) if spherical else x
        full = np.linalg.norm(pts[:, None, :] - centers[None], axis=2)  # (n, k)
        np.testing.assert_array_equal(labels, full.argmin(axis=1))
        np.testing.assert_allclose(dist, full.min(axis=1), rtol=1e-5)
        assert inertia == pytest.approx(float(np.sum(full.min(axis=1).astype(np.float64) ** 2)), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spherical_kmeans_clusters_by_direction(backend):
    x, y = rays()
    km = KMeansClusterer(3, spherical=True, backend=backend, n_init=5).fit(x)
    assert adjusted_rand_score(y, km.labels_) > 0.99
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1.0, rtol=1e-5)
    # Each point goes to the centroid of highest cosine.
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(km.labels_, np.argmax(unit @ km.cluster_centers_.T, axis=1))
    # Plain k-means on the same data splits by distance from the origin instead.
    assert adjusted_rand_score(y, KMeansClusterer(3, backend="sklearn").fit_predict(x)) < 0.9


def test_spherical_sklearn_backend_is_a_fixed_point():
    x, _ = blobs(spread=4.0, seed=5)
    km = KMeansClusterer(4, spherical=True, backend="sklearn", n_init=2).fit(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for j in range(4):
        mean = unit[km.labels_ == j].sum(axis=0)
        np.testing.assert_allclose(km.cluster_centers_[j], mean / np.linalg.norm(mean), atol=1e-5)


@pytest.mark.parametrize("backend", ["minibatch"] + (["faiss"] if faiss_available() else []))
def test_memory_mapped_input_matches_in_memory(tmp_path, backend):
    x, y = blobs(n_per=200, k=5, dim=12, seed=6)
    path = tmp_path / "emb.npy"
    np.save(path, x)
    mapped = np.load(path, mmap_mode="r")
    # A training sample smaller than n and tiny chunks exercise the sampled and chunked paths.
    params = dict(backend=backend, n_init=2, train_size=300, chunk_size=64, seed=3)
    from_disk = KMeansClusterer(5, **params).fit(mapped)
    in_memory = KMeansClusterer(5, **params).fit(np.array(x))
    np.testing.assert_array_equal(from_disk.labels_, in_memory.labels_)
    np.testing.assert_array_equal(from_disk.cluster_centers_, in_memory.cluster_centers_)
    assert adjusted_rand_score(y, from_disk.labels_) > 0.99
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(np.load(path), x)  # input left untouched
    result = cluster(mapped, 5, seeds=(0, 1), backend=backend, train_size=300)
    assert set(result.per_seed_labels) == {0, 1} and result.labels.shape == (1000,)


def test_auto_backend_thresholds():
    assert resolve_backend("auto", 1000) == "sklearn"
    assert resolve_backend("auto", 10**6) == ("faiss" if faiss_available() else "minibatch")
    assert resolve_backend("minibatch", 10) == "minibatch"


def test_autok_chooses_true_k_and_records_scores():
    x, y = blobs(n_per=50, k=4, seed=8)
    auto = AutoK((2, 8), random_state=0).fit(x)
    assert auto.n_clusters_ == 4
    assert sorted(auto.scores_) == list(range(2, 9))
    assert max(auto.scores_, key=auto.scores_.get) == 4
    assert adjusted_rand_score(y, auto.labels_) > 0.99
    np.testing.assert_array_equal(auto.predict(x), auto.labels_)


@pytest.mark.parametrize("criterion", ["calinski_harabasz", "davies_bouldin"])
def test_autok_other_criteria_on_a_sample(criterion):
    x, _ = blobs(n_per=100, k=3, seed=9)
    auto = AutoK((2, 6), criterion=criterion, sample_size=120, random_state=1).fit(x)
    assert auto.n_clusters_ == 3
    assert auto.labels_.shape == (300,)


def test_cluster_function_seeds_and_auto_k():
    x, y = blobs(n_per=40, k=3, seed=10)
    result = cluster(x, 3, seeds=(0, 1, 2), n_init=2)
    assert result.k == 3 and result.centers.shape == (3, 8)
    assert list(result.per_seed_labels) == [0, 1, 2]
    np.testing.assert_array_equal(result.per_seed_labels[0], result.labels)
    assert result.params["k_source"] == "given" and result.params["backend"] == "sklearn"
    assert result.distances.shape == (120,)
    auto = cluster(x, k_range=(2, 6))
    assert auto.k == 3 and set(auto.k_scores) == set(range(2, 7))
    assert auto.params["k_source"] == "auto"
    assert itae.evaluate(y, auto.labels)["acc"] == 1.0


def test_itae_cluster_is_the_function_in_any_import_order():
    import itae.clustering as package  # the package has its own name: itae.cluster stays the function

    x, _ = blobs(n_per=10, k=2)
    assert itae.cluster(x, 2).k == 2
    assert package.cluster(x, 2).k == 2


def test_agglomerative_recovers_blobs_and_refuses_large_inputs():
    x, y = blobs(n_per=30, k=3, seed=11)
    agg = AgglomerativeClusterer(3).fit(x)
    assert adjusted_rand_score(y, agg.labels_) > 0.99
    for j in range(3):
        np.testing.assert_allclose(
            agg.cluster_centers_[j], x[agg.labels_ == j].mean(axis=0), rtol=1e-4, atol=1e-4
        )
    with pytest.raises(ValueError, match="KMeansClusterer"):
        AgglomerativeClusterer(3, max_samples=50).fit(x)
    auto = cluster(x, method="agglomerative", k_range=(2, 5))
    assert auto.k == 3


def test_hdbscan_refuses_inputs_above_max_samples():
    x, _ = blobs(n_per=20, k=3, seed=13)  # 60 rows
    assert HDBSCANClusterer().max_samples == HDBSCAN_MAX_SAMPLES == 10_000
    with pytest.raises(ValueError, match=r"HDBSCAN of 60 samples.*max_samples=59.*method='kmeans'.*raise max_samples"):
        HDBSCANClusterer(min_cluster_size=5, max_samples=59).fit(x)
    assert HDBSCANClusterer(min_cluster_size=5, max_samples=60).fit(x).n_clusters_ == 3  # at the limit: fine
    with pytest.raises(ValueError, match="max_samples=10"):
        cluster(x, method="hdbscan", min_cluster_size=5, max_samples=10)  # passed through by the one-call API
    result = cluster(x, method="hdbscan", min_cluster_size=5, max_samples=60)
    assert result.k == 3 and result.params["estimator_params"]["max_samples"] == 60


def test_hdbscan_keeps_noise_label():
    x, y = blobs(n_per=40, k=3, spread=0.2, seed=12)
    outliers = np.array([[200.0] * 8, [-200.0] * 8, [200.0, -200.0] * 4], dtype=np.float32)
    data = np.concatenate([x, outliers])
    hdb = HDBSCANClusterer(min_cluster_size=10).fit(data)
    assert hdb.n_clusters_ == 3
    assert (hdb.labels_[-3:] == -1).all()
    assert adjusted_rand_score(y, hdb.labels_[:-3]) > 0.99
    assert np.isnan(hdb.distances_[-3:]).all() and np.isfinite(hdb.distances_[:-3]).all()
    assert hdb.cluster_centers_.shape == (3, 8)
    assert hdb.noise_fraction_ == pytest.approx(3 / len(data))
    result = cluster(data, method="hdbscan", min_cluster_size=10)
    assert result.k == 3 and result.params["k_source"] == "hdbscan"
    scores = itae.evaluate(np.concatenate([y, [9, 9, 9]]), result.labels)
    # noise (-1) is not a cluster for the metrics (n_clusters counts the real ones), but is reported as such
    assert scores["n_clusters"] == 3 and scores["n_noise"] == 3


@pytest.mark.parametrize(
    ("k", "error", "message"),
    [
        (0, ValueError, ">= 1"),
        (-3, ValueError, ">= 1"),
        (1000, ValueError, "exceeds"),
        (2.5, TypeError, "integer"),
    ],
)
def test_bad_k(k, error, message):
    x, _ = blobs(n_per=10, k=2)
    with pytest.raises(error, match=message):
        KMeansClusterer(k).fit(x)
    with pytest.raises(error, match=message):
        cluster(x, k)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["kmeans", "agglomerative", "hdbscan"])
def test_non_finite_embeddings(bad, method):
    x, _ = blobs(n_per=10, k=2)
    x[7, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf.*row 7"):
        cluster(x, None if method == "hdbscan" else 2, method=method)


def test_other_bad_inputs():
    x, _ = blobs(n_per=10, k=2)
    with pytest.raises(ValueError, match="2-D"):
        cluster(x[0], 2)
    with pytest.raises(TypeError, match="real numbers"):
        cluster(np.array([["a", "b"], ["c", "d"]]), 1)
    with pytest.raises(ValueError, match="empty"):
        cluster(np.zeros((0, 4), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="backend"):
        KMeansClusterer(2, backend="gpu").fit(x)
    with pytest.raises(ValueError, match="method"):
        cluster(x, 2, method="spectral")
    with pytest.raises(ValueError, match="k=None"):
        cluster(x, 2, method="hdbscan")
    with pytest.raises(ValueError, match="distinct"):
        cluster(x, 2, seeds=(1, 1))
    with pytest.raises(ValueError, match="k_range"):
        AutoK((5, 2)).fit(x)
    zero = x.copy()
    zero[4] = 0
    with pytest.raises(ValueError, match="row 4 is all zeros"):
        cluster(zero, 2, spherical=True)
    with pytest.raises(ValueError, match="init"):
        KMeansClusterer(2, backend="sklearn", init="afk-mc2").fit(x)
    with pytest.raises(ValueError, match="not fitted"):
        KMeansClusterer(2).predict(x)
    with pytest.raises(ValueError, match="features"):
        KMeansClusterer(2).fit(x).predict(x[:, :3])
