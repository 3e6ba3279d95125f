"""itae assign / check / compare: the array functions, then end to end on generated images and demo models."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from itae.clustering import KMeansClusterer, centroid_distances, centroids_from_labels, nearest_centroid
from itae.collection.neighbours import cosine_knn, duplicate_groups, label_disagreement, outlier_scores
from itae.collection.runs import match_runs, matched_correct, per_class_accuracy

from .helpers import csv_rows as _rows
from .helpers import run_cli as _run

COMMON = ("--no-progress", "--workers", "0", "--device", "cpu")


# --------------------------------------------------------------------------------- array functions


def _blobs(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Three well separated blobs of 20 rows in 16-D (directions differ, so cosine separates them)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(16, dtype=np.float32)[:3] * 10
    x = np.concatenate([c + rng.normal(0, 1, (20, 16)) for c in centres]).astype(np.float32)
    return x, [name for name in "abc" for _ in range(20)]


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_cosine_knn_is_exact_and_leaves_out_self(backend):
    x, _ = _blobs()
    x[5] = x[4]  # identical rows: each must still find the other and not itself
    idx, dist = cosine_knn(x, 5, backend=backend)
    assert idx.shape == (60, 5) and not (idx == np.arange(60)[:, None]).any()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = 1 - unit @ unit.T
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :5], atol=1e-5)
    assert idx[4, 0] == 5 and idx[5, 0] == 4 and dist[4, 0] < 1e-6


def test_knn_backends_agree_and_k_is_capped():
    x, _ = _blobs(1)
    a, da = cosine_knn(x, 7, backend="faiss")
    b, db = cosine_knn(x, 7, backend="sklearn")
    np.testing.assert_allclose(da, db, atol=1e-5)
    assert (a[:, 0] == b[:, 0]).mean() > 0.95  # ties aside, the same nearest neighbours
    assert cosine_knn(x[:4], 10)[0].shape == (4, 3)
    with pytest.raises(ValueError, match="at least 2"):
        cosine_knn(x[:1], 3)


def test_duplicate_groups_are_connected_components_within_threshold():
    x, _ = _blobs()
    x[1] = x[0]
    x[2] = x[0] * 1.0001  # same direction: cosine distance ~0
    x[30] = x[31] + 1e-4
    idx, dist = cosine_knn(x, 5)
    groups = duplicate_groups(idx, dist, 0.001)
    members = [set(np.flatnonzero(groups.group == g)) for g in range(groups.n_groups)]
    assert members == [{0, 1, 2}, {30, 31}]  # largest group first
    assert np.isnan(groups.distance[groups.group < 0]).all() and (groups.nearest[groups.group < 0] == -1).all()
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        duplicate_groups(idx, dist, -0.1)


def test_outlier_scores_single_out_a_far_point():
    x, _ = _blobs()
    x[10] = -np.ones(16) * 10  # opposite direction to every blob
    _, dist = cosine_knn(x, 5)
    score, z = outlier_scores(dist)
    assert int(np.argmax(score)) == 10 and z[10] > 10
    assert (z[np.arange(60) != 10] < 3.5).all()


def test_label_disagreement_finds_the_planted_mislabel():
    x, labels = _blobs()
    labels[7] = "c"  # a row of blob "a" labelled c
    idx, _ = cosine_knn(x, 5)
    d = label_disagreement(idx, labels)
    assert np.flatnonzero(d.suspect).tolist() == [7]
    assert d.suggested[7] == "a" and d.knn_margin[7] == pytest.approx(1.0) and d.knn_agreement[7] == 0
    assert np.isnan(d.cluster_margin).all()
    clusters = np.repeat([0, 1, 2], 20)
    d = label_disagreement(idx, labels, clusters)
    assert np.flatnonzero(d.suspect).tolist() == [7]
    assert d.cluster_majority[7] == "a" and d.cluster_agreement[7] == pytest.approx(1 / 20)
    assert d.score[7] == pytest.approx((1.0 + 18 / 20) / 2)


def test_match_runs_sees_only_real_changes():
    a = np.repeat([0, 1, 2], 10)
    b = np.array([2, 0, 1])[a]  # the same partition under other cluster ids
    m = match_runs(a, b)
    assert not m.changed.any() and m.b_to_a == {2: 0, 0: 1, 1: 2}
    b2 = b.copy()
    b2[[3, 14]] = b2[25]  # two images moved into the third cluster
    m = match_runs(a, b2)
    assert np.flatnonzero(m.changed).tolist() == [3, 14] and m.agreement == pytest.approx(28 / 30)
    noisy = b.copy()
    noisy[0] = -1
    m = match_runs(a, noisy)
    assert np.flatnonzero(m.changed).tolist() == [0] and m.b_to_a[-1] == -1


def test_per_class_accuracy_under_hungarian_matching():
    labels = ["x"] * 4 + ["y"] * 4
    clusters = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    correct = matched_correct(labels, clusters)
    assert correct.tolist() == [True, True, True, False, True, True, True, False]
    assert per_class_accuracy(labels, correct) == {"x": (4, 0.75), "y": (4, 0.75)}
    assert not matched_correct(labels, np.full(8, -1)).any()  # noise is never matched


def test_nearest_centroid_reproduces_kmeans():
    x, _ = _blobs()
    km = KMeansClusterer(3, seed=0).fit(x)
    labels, dist = nearest_centroid(x, km.cluster_centers_)
    assert (labels == km.labels_).all()
    np.testing.assert_allclose(dist, km.distances_, rtol=1e-5, atol=1e-5)
    ids, centres = centroids_from_labels(x, km.labels_)
    assert (nearest_centroid(x, centres, cluster_ids=ids)[0] == km.labels_).all()
    sph = KMeansClusterer(3, seed=0, spherical=True).fit(x)
    ids, centres = centroids_from_labels(x, sph.labels_, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1, atol=1e-5)
    assert (nearest_centroid(x, centres, spherical=True, cluster_ids=ids)[0] == sph.labels_).all()
    with pytest.raises(ValueError, match="different models"):
        nearest_centroid(x[:, :8], centres)



def test_centroid_distances_are_each_rows_distance_to_its_cluster_mean(tmp_path):
    x, _ = _blobs()
    km = KMeansClusterer(3, seed=0).fit(x)
    # Lloyd's iterations stop at centres that are the means of their members: the same distances.
    np.testing.assert_allclose(centroid_distances(x, km.labels_), km.distances_, rtol=1e-4, atol=1e-4)
    labels = np.where(np.arange(len(x)) % 7 == 0, -1, km.labels_)  # some noise
    path = tmp_path / "x.npy"
    np.save(path, x)
    dist = centroid_distances(np.load(path, mmap_mode="r"), labels)
    assert dist.dtype == np.float64 and np.isnan(dist[labels == -1]).all()
    for c in range(3):
        members = x[labels == c].astype(np.float64)
        expected = np.linalg.norm(members - members.mean(axis=0), axis=1)
        np.testing.assert_allclose(dist[labels == c], expected, rtol=1e-5, atol=1e-5)
    named = np.array(["a", "b", "c"])[km.labels_]  # any sortable labels; strings have no noise
    np.testing.assert_array_equal(centroid_distances(x, named), centroid_distances(x, km.labels_))
    with pytest.raises(ValueError, match="cluster labels for"):
        centroid_distances(x, labels[:-1])


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Shapes with planted problems, and an ITAE run and a --no-itae run of them (demo:planted, k=5)."""
    from itae.bench.synthetic import make_shapes

    root = tmp_path_factory.mktemp("collection")
    data = make_shapes(root / "shapes", per_class=12, size=32)
    shutil.copy(data / "disc" / "000.png", data / "disc" / "dup_exact.png")
    a = np.array(Image.open(data / "ring" / "003.png")).astype(int)
    a[:4, :4] += 6  # a few pixels a little brighter
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(data / "ring" / "dup_near.png")
    c = (np.indices((32, 32)).sum(0) // 4 % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([c, c, c], -1)).save(data / "bar" / "odd.png")  # stripes among shapes
    other = make_shapes(root / "other", per_class=1, size=32, seed=7)
    shutil.copy(other / "disc" / "000.png", data / "square" / "mislabelled.png")  # a disc filed as a square
    runs = {}
    for name, extra in (("itae", ()), ("base", ("--no-itae",))):
        out = root / name
        rc = _run("run", data, "-k", 5, "-o", out, "--model", "demo:planted", "--labels", "from-folders",
                  "--no-report", *extra, *COMMON)
        assert rc == 0
        runs[name] = out
    return {"root": root, "data": data, **runs}


def test_run_saves_centroids_and_assign_reproduces_the_run(planted, tmp_path, capsys):
    run = planted["itae"]
    centres = np.load(run / "centroids.npy")
    assert centres.shape == (5, np.load(run / "embeddings" / "embeddings.npy").shape[1])
    out = tmp_path / "assigned"
    rc = _run("assign", planted["data"], "--clusters", run, "-o", out, "--labels", "from-folders", *COMMON)
    assert rc == 0, capsys.readouterr().err
    assert "64 images assigned" in capsys.readouterr().out
    before, after = _rows(run / "assignments.csv"), _rows(out / "assignments.csv")
    assert [r["path"] for r in after] == [r["path"] for r in before]
    assert [r["cluster"] for r in after] == [r["cluster"] for r in before]
    assert [r["label"] for r in after] == [r["label"] for r in before]
    np.testing.assert_allclose([float(r["distance"]) for r in after], [float(r["distance"]) for r in before],
                               rtol=1e-4, atol=1e-5)
    # the same embeddings: same model, preprocessing and calibrated ITAE thresholds (not recalibrated)
    np.testing.assert_allclose(np.load(out / "embeddings" / "embeddings.npy"),
                               np.load(run / "embeddings" / "embeddings.npy"), rtol=1e-5, atol=1e-5)
    ref = json.loads((run / "embeddings" / "manifest.json").read_text())
    new = json.loads((out / "embeddings" / "manifest.json").read_text())
    assert new["itae"] == ref["itae"] and new["calibration"] is None and new["preprocess"] == ref["preprocess"]
    record = json.loads((out / "assign.json").read_text())
    assert record["centroids"] == "centroids.npy" and record["n_images"] == 64


def test_assign_to_a_run_without_centroids_recomputes_them(planted, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(planted["itae"], old)
    (old / "centroids.npy").unlink()  # a run made before centroids were saved
    sub = tmp_path / "new"
    (sub / "disc").mkdir(parents=True)
    for name in ("001.png", "002.png"):
        shutil.copy(planted["data"] / "disc" / name, sub / "disc" / name)
    assert _run("assign", sub, "--clusters", old, "-o", tmp_path / "out", *COMMON) == 0
    clusters = {r["path"]: r["cluster"] for r in _rows(planted["itae"] / "assignments.csv")}
    rows = _rows(tmp_path / "out" / "assignments.csv")
    assert [(r["path"], r["cluster"]) for r in rows] == [(f"disc/{n}", clusters[f"disc/{n}"]) for n in
                                                         ("001.png", "002.png")]
    assert all(r["label"] == "" for r in rows)
    assert json.loads((tmp_path / "out" / "assign.json").read_text())["centroids"].startswith("recomputed")


def test_assign_refuses_bad_input(planted, tmp_path, capsys):
    run = planted["itae"]
    assert _run("assign", planted["data"], "--clusters", run, "-o", tmp_path / "a", "--model", "demo:clean",
                *COMMON) == 2
    err = capsys.readouterr().err
    assert "made with model 'demo:planted', not 'demo:clean'" in err and "pass no --model" in err
    assert not (tmp_path / "a").exists()
    assert _run("assign", planted["data"], "--clusters", tmp_path / "nowhere", "-o", tmp_path / "b", *COMMON) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert _run("assign", planted["data"], "--clusters", planted["data"], "-o", tmp_path / "c", *COMMON) == 2
    assert "holds no assignments.csv" in capsys.readouterr().err
    assert _run("assign", planted["data"], "--clusters", run, "-o", run, *COMMON) == 2
    assert "is the reference folder" in capsys.readouterr().err
    assert _run("assign", tmp_path / "missing", "--clusters", run, "-o", tmp_path / "d", *COMMON) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run("assign", planted["data"], "--clusters", run, "-o", tmp_path / "e", "--model", "demo:planted",
                "--labels", "from-folders", *COMMON) == 0  # naming the store's own model is fine


@pytest.mark.parametrize("backend", ["auto", "faiss"])
def test_check_finds_planted_duplicates_outlier_and_mislabel(planted, tmp_path, backend, capsys):
    out = tmp_path / "check"
    # demo models' features are random features of the pixels: distinct shapes sit at cosine distance
    # 0.005-0.02 from each other, hence a tighter threshold than the default for DINOv2 features
    rc = _run("check", planted["itae"], "-o", out, "--dup-threshold", "0.001", "--knn-backend", backend,
              "--no-progress")
    assert rc == 0, capsys.readouterr().err
    assert "2 near-duplicate groups (4 images), 1 outlier," in capsys.readouterr().out
    dups = _rows(out / "duplicates.csv")
    groups = {}
    for r in dups:
        groups.setdefault(r["group"], set()).add(r["path"])
    assert sorted(map(sorted, groups.values())) == [["disc/000.png", "disc/dup_exact.png"],
                                                    ["ring/003.png", "ring/dup_near.png"]]
    outliers = _rows(out / "outliers.csv")
    assert outliers[0]["path"] == "bar/odd.png" and float(outliers[0]["z"]) > 10
    suspects = _rows(out / "mislabels.csv")
    top = {r["path"]: r for r in suspects[:3]}
    assert "square/mislabelled.png" in top and top["square/mislabelled.png"]["suggested"] == "disc"
    assert top["square/mislabelled.png"]["cluster"] != ""  # the run's clusters were used
    summary = json.loads((out / "check.json").read_text())
    assert summary["duplicates"]["threshold"] == 0.001 and summary["knn"]["neighbours"] == 10
    page = (out / "check.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 4 + 1 + 1
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_pages_escape_what_they_show(tmp_path):
    from itae.report.pages import thumb_item, write_compare_page

    item = thumb_item("<b>odd</b>.png", ["<b>odd</b>.png", "A 0 \u2192 B 1"], None, 32)
    write_compare_page(tmp_path / "p.html", {
        "title": "t<script>", "thumb": 32, "summary": ["1 image"], "notes": [], "names": ["A", "B"],
        "runs": [{"name": "A", "title": "<i>a</i>", "facts": [("folder", "a")]},
                 {"name": "B", "title": "b", "facts": [("folder", "b")]}],
        "metrics": [], "n_common": 1, "agreement": "0%", "agreement_rows": [], "classes": [], "n_changed": 1,
        "changed": [item],
    })
    page = (tmp_path / "p.html").read_text()
    assert "&lt;b&gt;odd&lt;/b&gt;.png" in page and "<b>odd" not in page and "t&lt;script&gt;" in page
    assert "<i>a</i>" not in page and 'class="noimg"' in page


def test_check_on_a_store_without_labels_and_bad_input(planted, tmp_path, capsys):
    store = tmp_path / "store"
    assert _run("embed", planted["data"], "-o", store, "--model", "demo:clean", *COMMON) == 0
    capsys.readouterr()
    out = tmp_path / "check"
    assert _run("check", store, "-o", out, "--no-progress", "--no-html") == 0
    assert "no labels to check" in capsys.readouterr().out
    assert not (out / "mislabels.csv").exists() and not (out / "check.html").exists()
    assert (out / "duplicates.csv").is_file() and (out / "outliers.csv").is_file()
    # the labels and clusters of a run over the same images
    assert _run("check", store, "-o", out, "--assignments", planted["itae"], "--no-progress") == 0
    assert (out / "mislabels.csv").is_file() and (out / "check.html").is_file()
    assert _run("check", store, "-o", out, "--no-progress", "--no-html") == 0  # nothing of that check is left
    assert not (out / "mislabels.csv").exists() and not (out / "check.html").exists()
    # a run's store alone: the run's assignments beside it are used
    assert _run("check", planted["itae"] / "embeddings", "-o", tmp_path / "o2", "--no-progress", "--no-html") == 0
    assert json.loads((tmp_path / "o2" / "check.json").read_text())["mislabels"]["clusters_from"].endswith(
        "assignments.csv")
    assert _run("check", tmp_path / "nothing", "-o", tmp_path / "x") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run("check", planted["data"], "-o", tmp_path / "x") == 2
    assert "holds no embedding store" in capsys.readouterr().err
    assert _run("check", store, "-o", tmp_path / "x", "--dup-threshold", "3") == 2
    assert "cosine distance in [0, 2]" in capsys.readouterr().err
    assert _run("check", store, "-o", tmp_path / "x", "--neighbours", "0") == 2
    assert "--neighbours 0 is not a positive integer" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("path,cluster,label,distance\nelsewhere.png,0,a,0.1\n")
    assert _run("check", store, "-o", tmp_path / "x", "--assignments", other) == 2
    assert "does not list" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compare_itae_against_baseline(planted, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _run("compare", planted["base"], planted["itae"], "-o", out) == 0
    line = capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    ma = json.loads((planted["base"] / "metrics.json").read_text())
    mb = json.loads((planted["itae"] / "metrics.json").read_text())
    for s in ("acc", "nmi", "ari", "purity"):
        assert summary["metrics"]["a"][s] == pytest.approx(ma[s])
        assert summary["metrics"]["b_minus_a"][s] == pytest.approx(mb[s] - ma[s])
    assert f"ACC {100 * (mb['acc'] - ma['acc']):+.2f}" in line
    changed = _rows(out / "changed.csv")
    assert len(changed) == summary["n_changed"] > 0
    per_class = summary["per_class"]
    assert set(per_class) == {"bar", "cross", "disc", "ring", "square"}
    assert sum(v["images"] * v["acc_a"] for v in per_class.values()) / 64 == pytest.approx(ma["acc"])
    page = (out / "compare.html").read_text()
    assert "ITAE off" in page and "ITAE on" in page and page.count("data:image/jpeg;base64,") == len(changed)


def test_compare_lists_exactly_the_images_that_changed(planted, tmp_path):
    a = planted["itae"]
    b = tmp_path / "edited"
    b.mkdir()
    rows = _rows(a / "assignments.csv")
    moved = {"bar/000.png", "cross/003.png", "ring/005.png"}
    target = rows[0]["cluster"]
    with open(b / "assignments.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "cluster", "label", "distance"])
        w.writeheader()
        for r in rows:  # cluster ids renamed (c -> 4 - c), and three images moved
            cluster = int(target) if r["path"] in moved and r["cluster"] != target else int(r["cluster"])
            w.writerow({"path": r["path"], "cluster": 4 - cluster, "label": r["label"], "distance": ""})
    moved = {p for p in moved if next(r for r in rows if r["path"] == p)["cluster"] != target}
    assert moved
    page = tmp_path / "page.html"
    assert _run("compare", a, b, "-o", page) == 0
    assert page.is_file() and not (tmp_path / "changed.csv").exists()
    assert _run("compare", a, b, "-o", tmp_path / "dir") == 0
    assert {r["path"] for r in _rows(tmp_path / "dir" / "changed.csv")} == moved


def test_compare_refuses_different_image_sets(planted, tmp_path, capsys):
    a = planted["itae"]
    rows = _rows(a / "assignments.csv")
    part = tmp_path / "part"
    part.mkdir()
    with open(part / "assignments.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:40])
    assert _run("compare", a, part, "-o", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "cover different images: 24 images only in A" in err and "--common" in err
    assert not (tmp_path / "x").exists()
    assert _run("compare", a, part, "-o", tmp_path / "y", "--common") == 0
    summary = json.loads((tmp_path / "y" / "compare.json").read_text())
    assert summary["n_images"] == 40 and summary["common_only"] and summary["n_changed"] == 0
    assert "compared on the 40 they share" in (tmp_path / "y" / "compare.html").read_text()
    assert _run("compare", a, tmp_path / "none", "-o", tmp_path / "z") == 2
    assert "does not exist" in capsys.readouterr().err


def test_cluster_backend_and_criterion_flags(planted, tmp_path, capsys):
    store = planted["itae"] / "embeddings"
    out = tmp_path / "c"
    assert _run("cluster", store, "-o", out, "--criterion", "davies_bouldin", "--k-range", "2:6",
                "--backend", "minibatch") == 0
    params = json.loads((out / "clustering.json").read_text())["params"]
    assert params["k_selection"]["criterion"] == "davies_bouldin" and params["backend"] == "minibatch"
    assert _run("cluster", store, "-o", out, "-k", 3, "--backend", "faiss") == 0
    assert json.loads((out / "clustering.json").read_text())["params"]["backend"] == "faiss"
    capsys.readouterr()
    # refused before any image is read: the data folder does not even exist
    assert _run("run", tmp_path / "no-images", "-o", tmp_path / "r", "--method", "hdbscan", "--backend", "faiss") == 2
    assert "--backend applies to --algorithm kmeans" in capsys.readouterr().err
    assert _run("run", tmp_path / "no-images", "-o", tmp_path / "r", "-k", 3, "--criterion", "silhouette") == 2
    assert "--criterion chooses k when -k is omitted" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
