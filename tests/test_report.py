"""The self-contained HTML report: content, escaping, sampling caps, and rendering in headless Chromium."""

from __future__ import annotations

import html
import io
import itertools
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itae.report.figures import artifact_map, embedding_map, figure_to_png, resolve_method
from itae.report.html import SECTION_IDS, write_report


def _has(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None

EVIL = "<img src=x onerror=alert(1)>.png"
EVIL_LABEL = "<script>1</script>"


class Page(HTMLParser):
    """Collects what the checks need from a page: elements with attributes, and the visible text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def tags(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for tag, attrs in self.elements if tag == name]

    @property
    def ids(self) -> set[str]:
        return {attrs["id"] for _, attrs in self.elements if attrs.get("id")}

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def _assert_only_the_map_scripts(page: Page, text: str) -> None:
    """The page's only scripts are the map's data block and its inline code: nothing loaded, nothing fetched."""
    scripts = page.tags("script")
    assert scripts == [{"type": "application/json", "id": "map-data"}, {}], scripts
    code = text[text.index('<script type="application/json" id="map-data">'):]
    code = code[: code.rindex("</script>")]
    for needle in ("fetch(", "XMLHttpRequest", "WebSocket", "import(", "http://", "https://"):
        assert needle not in code, needle
    assert "<" not in code.split(">", 1)[1].split("</script>", 1)[0]  # the JSON block escapes every "<"


def tiny_image(color, size: int = 12) -> Image.Image:
    return Image.new("RGB", (size, size), tuple(int(c) for c in color))


def make_run(n: int = 240, k: int = 4, dim: int = 8, seed: int = 0):
    """Synthetic run: k well separated blobs, clusters = labels with a little noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    embeddings = rng.normal(0, 5, (k, dim))[labels] + rng.normal(0, 1, (n, dim))
    clusters = np.where(rng.random(n) < 0.1, rng.integers(0, k, n), (labels + 1) % k)
    ids = [f"img/{i:05d}.jpg" for i in range(n)]
    ids[0] = EVIL
    names = np.array(["cat", "dog", "ship", EVIL_LABEL] + [f"class{j}" for j in range(4, k)])
    return ids, clusters, names[labels].tolist(), embeddings.astype(np.float32)


def write_small_report(path: Path, **overrides) -> Path:
    ids, clusters, labels, embeddings = make_run()
    distances = np.linalg.norm(embeddings, axis=1)
    distances[0] = -1.0  # the evil-named image is the first one shown in its cluster's gallery
    colors = np.random.default_rng(1).integers(0, 256, (len(ids), 3))
    thumbs = {name: tiny_image(colors[i]) for i, name in enumerate(ids)}
    diag_png = figure_to_png(artifact_map(np.zeros((16, 16, 3), np.uint8), np.eye(4, dtype=bool).reshape(-1)), dpi=40)
    kwargs = dict(
        title=f"Run on {EVIL}",
        metrics={"baseline": {"acc": 0.5, "nmi": 0.4}, "itae": {"acc": 0.75, "nmi": 0.6}},
        config={"model": "tiny", "itae": {"source": "v", "threshold": 1.5}, "note": "<b>bold?</b>"},
        ids=ids,
        cluster_labels=clusters,
        true_labels=labels,
        embeddings=embeddings,
        centroid_distances=distances,
        thumbnails=thumbs,
        diagnostics_pngs=[("block 1 <diagnostics>", diag_png)],
        extra_tables=[("Sweep", [{"setting": "v/min", "acc": 0.75}, {"setting": EVIL, "acc": 0.7}])],
        map_method="pca",
    )
    kwargs.update(overrides)
    return write_report(path, **kwargs)


def test_report_has_all_sections_and_is_self_contained(tmp_path):
    path = write_small_report(tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert set(SECTION_IDS) <= page.ids
    _assert_only_the_map_scripts(page, text)
    assert page.tags("link") == []  # CSS is inline
    for img in page.tags("img"):
        assert img["src"].startswith("data:image/")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    # One diagnostic figure and thumbnails are embedded; the map is a canvas.
    assert len(page.tags("img")) > 1 + 4
    assert "map-canvas" in page.ids
    assert "0.7500" in page.all_text and "itae" in page.all_text


def test_report_escapes_every_string_from_data(tmp_path):
    text = write_small_report(tmp_path / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    for _tag, attrs in page.elements:
        assert not any(name.startswith("on") for name in attrs), attrs
    _assert_only_the_map_scripts(page, text)  # a label "<script>..." did not become a third one
    assert page.tags("b") == []  # the config value stayed text
    visible = page.all_text
    assert EVIL in visible  # the file name is shown, as text (gallery caption, title, sweep table)
    assert EVIL_LABEL in visible  # a label full of markup too, as text and in attributes
    assert any(EVIL_LABEL in (value or "") for _tag, attrs in page.elements for value in attrs.values())
    assert "<b>bold?</b>" in visible
    assert "block 1 <diagnostics>" in visible
    assert html.escape(EVIL, quote=False) in text
    # The gallery captions it with its file name, as text.
    assert f"<figcaption>{html.escape(EVIL, quote=False)}</figcaption>" in text


def test_confusion_matches_clusters_to_labels_by_hungarian(tmp_path):
    rng = np.random.default_rng(3)
    k, n = 3, 90
    labels = rng.integers(0, k, n)
    clusters = np.where(rng.random(n) < 0.3, rng.integers(0, k, n), (labels + 2) % k)
    # Best accuracy over all one-to-one matchings, by brute force.
    best = max(sum(int(np.sum((clusters == c) & (labels == perm[c]))) for c in range(k))
               for perm in itertools.permutations(range(k))) / n
    path = write_report(
        tmp_path / "r.html", title="t", metrics=None, config={}, ids=[str(i) for i in range(n)],
        cluster_labels=clusters, true_labels=labels.tolist(),
    )
    text = Page(path.read_text(encoding="utf-8")).all_text
    assert f"accuracy under this matching: {100 * best:.2f}%" in text
    # Cluster c is matched to label (c + 1) % k, its majority.
    rows = re.findall(r"cluster (\d)(\d)", text)  # the row header then the matched-label cell
    assert len(rows) == k, text
    for cluster, label in rows:
        assert int(label) == (int(cluster) + 1) % k


def test_confusion_and_gallery_are_capped(tmp_path):
    n, k = 1200, 60
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k, n)
    calls = []

    def thumb(name: str) -> Image.Image:
        calls.append(name)
        return tiny_image((10, 20, 30))

    path = write_report(
        tmp_path / "r.html", title="t", metrics=None, config={}, ids=[f"{i}" for i in range(n)],
        cluster_labels=labels, true_labels=labels.tolist(), thumbnails=thumb,
        max_confusion=10, max_clusters_shown=7, max_thumbs_per_cluster=3,
    )
    page = Page(path.read_text(encoding="utf-8"))
    assert "Showing 10 of 60 clusters and 10 of 60 labels" in page.all_text
    assert "Showing 7 of 60 clusters" in page.all_text
    assert len(calls) == 7 * 3
    assert sum(1 for attrs in page.tags("tr")) == 1 + 10  # header + capped rows


def test_gallery_shows_nearest_to_centroid_first(tmp_path):
    n = 20
    clusters = np.zeros(n, dtype=int)
    distances = np.arange(n, 0, -1).astype(float)  # the last id is nearest
    path = write_report(
        tmp_path / "r.html", title="t", metrics=None, config={}, ids=[f"id{i}" for i in range(n)],
        cluster_labels=clusters, centroid_distances=distances, max_thumbs_per_cluster=3,
        thumbnails=lambda name: tiny_image((0, 0, 0)),
    )
    page = Page(path.read_text(encoding="utf-8"))
    shown = [attrs["title"] for attrs in page.tags("figure")]
    assert shown == ["id19", "id18", "id17"]


def test_large_run_is_sampled_and_stays_small(tmp_path):
    n, k = 100_000, 50
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k, n)
    embeddings = (rng.normal(0, 4, (k, 16))[labels] + rng.normal(0, 1, (n, 16))).astype(np.float32)
    clusters = np.where(rng.random(n) < 0.2, rng.integers(0, k, n), labels)
    colors = rng.integers(0, 256, (n, 3))

    def thumb(name: str) -> Image.Image:
        i = int(name.rsplit("_", 1)[1])
        arr = np.zeros((24, 24, 3), np.uint8) + colors[i].astype(np.uint8)
        arr[4:20, i % 8: i % 8 + 8] = 255
        return Image.fromarray(arr)

    path = write_report(
        tmp_path / "big.html", title="big", metrics={"acc": 0.8}, config={"k": k},
        ids=[f"image_{i}" for i in range(n)], cluster_labels=clusters,
        true_labels=[f"class {j}" for j in labels], embeddings=embeddings, thumbnails=thumb,
        map_method="pca", max_points=5000,
    )
    size = path.stat().st_size
    assert size < 4_000_000, size
    text = Page(path.read_text(encoding="utf-8")).all_text
    assert "5,000 of 100,000 points" in text
    assert "Showing 30 of 50 clusters and 30 of 50 labels" in text
    assert "Showing 50 of 50 clusters" in text


def test_embedding_map_samples_and_picks_a_method():
    x = np.random.default_rng(0).normal(size=(500, 12)).astype(np.float32)
    emap = embedding_map(x, max_points=100, method="pca", seed=1)
    assert emap.coords.shape == (100, 2) and emap.method == "pca"
    assert len(np.unique(emap.index)) == 100 and np.all(np.diff(emap.index) > 0) and emap.index.max() < 500
    assert "100 of 500 points" in emap.description
    again = embedding_map(x, max_points=100, method="pca", seed=1)
    np.testing.assert_array_equal(emap.index, again.index)

    assert resolve_method("auto") == ("tsne" if _has("openTSNE") else "umap" if _has("umap") else "pca")
    if not _has("umap"):
        with pytest.raises(ImportError, match="itae\\[umap\\]"):
            embedding_map(x[:40], method="umap")
    if not _has("openTSNE"):
        with pytest.raises(ImportError, match="itae\\[maps\\]"):
            embedding_map(x[:40], method="tsne")

    pre = embedding_map(x[:, :2], max_points=50)
    assert pre.method == "precomputed"
    np.testing.assert_allclose(pre.coords, x[pre.index, :2], rtol=1e-6)
    with pytest.raises(ValueError, match="map method"):
        embedding_map(x, method="mds")


@pytest.mark.skipif(not _has("openTSNE"), reason="needs openTSNE (itae[maps])")
def test_tsne_map_fits_a_sample_and_places_the_rest_near_their_neighbours():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    x = (rng.normal(0, 8, (3, 20))[labels] + rng.normal(0, 1, (600, 20))).astype(np.float32)
    emap = embedding_map(x, method="tsne", fit_points=200, seed=0)
    assert emap.method == "tsne" and emap.coords.shape == (600, 2) and np.isfinite(emap.coords).all()
    assert "Fitted on 200 of them; the other 400 are placed" in emap.description
    # Blobs stay apart: each point is nearer its own blob's centre on the map than any other blob's.
    centres = np.stack([emap.coords[labels == j].mean(axis=0) for j in range(3)])
    nearest = np.argmin(np.linalg.norm(emap.coords[:, None] - centres[None], axis=2), axis=1)
    assert (nearest == labels).mean() > 0.99


def test_report_write_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "out" / "report.html"
    write_small_report(path)
    first = path.read_text(encoding="utf-8")
    write_small_report(path, title="second run")
    assert "second run" in path.read_text(encoding="utf-8") and first != path.read_text(encoding="utf-8")
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no temp file left


def test_report_rejects_misaligned_inputs(tmp_path):
    ids = ["a", "b", "c"]
    with pytest.raises(ValueError, match="cluster_labels"):
        write_report(tmp_path / "r.html", title="t", metrics=None, config={}, ids=ids, cluster_labels=[0, 1])
    with pytest.raises(ValueError, match="true_labels"):
        write_report(tmp_path / "r.html", title="t", metrics=None, config={}, ids=ids, cluster_labels=[0, 1, 1],
                     true_labels=["x"])
    with pytest.raises(ValueError, match="embeddings"):
        write_report(tmp_path / "r.html", title="t", metrics=None, config={}, ids=ids, cluster_labels=[0, 1, 1],
                     embeddings=np.zeros((2, 4)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "r.html", title="t", metrics=None, config={}, ids=ids, cluster_labels=[0, 1, 1],
                     diagnostics_pngs=[tmp_path / "missing.png"])
    assert not (tmp_path / "r.html").exists()


def test_missing_thumbnails_show_a_placeholder(tmp_path):
    path = write_report(
        tmp_path / "r.html", title="t", metrics=None, config={}, ids=["a", "b"], cluster_labels=[0, 0],
        thumbnails={"a": tiny_image((1, 2, 3))},
    )
    page = Page(path.read_text(encoding="utf-8"))
    assert len(page.tags("img")) == 1
    assert "1 thumbnail(s) could not be loaded" in page.all_text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        # A page that runs script can block headless Chromium (an alert() from unescaped markup does).
        pytest.fail("chromium did not finish rendering the report within 90 s; is a script blocking it?")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium)")
    path = write_small_report(tmp_path / "report.html")
    url = path.resolve().as_uri()

    result = _run_chromium(binary, tmp_path / "profile", "--dump-dom", url)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = Page(result.stdout)
    assert set(SECTION_IDS) <= dom.ids
    _assert_only_the_map_scripts(dom, result.stdout)
    for tag, attrs in dom.elements:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    imgs = dom.tags("img")
    assert imgs and all(img["src"].startswith("data:image/") for img in imgs)
    assert EVIL in dom.all_text  # rendered as text by the browser, not parsed as an element
    assert f"<figcaption>{html.escape(EVIL, quote=False)}</figcaption>" in result.stdout
    assert EVIL_LABEL in dom.all_text

    shot = tmp_path / "shot.png"
    result = _run_chromium(binary, tmp_path / "profile", "--window-size=1280,2000", f"--screenshot={shot}", url)
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(io.BytesIO(shot.read_bytes())) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 10  # something was drawn, not a blank page


def _visible(path: Path) -> str:
    return Page(path.read_text(encoding="utf-8")).all_text


def _section_text(path: Path, sid: str) -> str:
    text = path.read_text(encoding="utf-8")
    section = text[text.index(f'<section id="{sid}">'):]
    return Page(section[: section.index("</section>")]).all_text


def test_noise_is_a_noise_group_not_a_cluster_matched_to_a_label(tmp_path):
    # 6 real clusters of 10 images each (labels l0..l5) and 40 noise images, 30 of them of class l5: a
    # matching that took noise for a cluster would give it l5.
    clusters = np.concatenate([np.repeat(np.arange(6), 10), np.full(40, -1)])
    labels = [f"l{c}" for c in np.repeat(np.arange(6), 10)] + ["l5"] * 30 + ["l0"] * 10
    n = len(clusters)
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(n, 6)).astype(np.float32)
    path = write_report(
        tmp_path / "r.html", title="t", metrics=None, config={}, ids=[f"id{i}" for i in range(n)],
        cluster_labels=clusters, true_labels=labels, embeddings=embeddings, map_method="pca",
        thumbnails=lambda name: tiny_image((0, 0, 0)), max_thumbs_per_cluster=2,
    )
    text = path.read_text(encoding="utf-8")
    visible = _visible(path)
    assert "100 images · 6 clusters · 40 noise images (40.0%, in no cluster)" in visible
    assert "7 clusters" not in visible and "of 7 clusters" not in visible
    # Accuracy: the 60 clustered images are all matched correctly; the 40 noise images count as wrong.
    assert "accuracy under this matching: 60.00%" in visible
    noise_row = re.search(r'<tr class="noise">(.*?)</tr>', text).group(1)
    assert ">noise<" in noise_row and "(none: not a cluster)" in noise_row
    assert "cluster -1" not in visible
    # Gallery: six clusters, then the noise group.
    assert "Showing 6 of 6 clusters" in visible and "Then the noise: 40 images in no cluster" in visible
    headings = re.findall(r"<h3>(.*?) <span", text)
    assert headings == [f"cluster {c}" for c in range(6)] + ["noise"]
    assert "most frequent label l5 (75%)" in visible
    assert "Noise (in no cluster) is drawn in grey" in visible


def test_noise_row_is_shown_even_when_clusters_are_capped(tmp_path):
    clusters = np.concatenate([np.repeat(np.arange(8), 5), np.full(3, -1)])
    labels = np.concatenate([np.repeat(np.arange(8), 5), [0, 1, 2]]).tolist()
    path = write_report(
        tmp_path / "r.html", title="t", metrics=None, config={}, ids=[str(i) for i in range(len(clusters))],
        cluster_labels=clusters, true_labels=labels, max_confusion=4, max_clusters_shown=3,
    )
    visible = _visible(path)
    assert "Showing 4 of 8 clusters and 4 of 8 labels" in visible
    assert "Showing 3 of 8 clusters" in visible
    assert path.read_text(encoding="utf-8").count('<tr class="noise">') == 1


def test_multi_seed_metrics_are_a_table_not_python_reprs(tmp_path):
    # The shape itae.pipeline.evaluate_assignments writes with several seeds.
    runs = [{"acc": 0.245 + 0.01 * s, "nmi": 0.3, "ari": 0.1, "purity": 0.4, "n_images": 200, "n_clusters": 10,
             "n_classes": 10, "seed": s} for s in (0, 1, 2)]
    metrics = {k: v for k, v in runs[0].items() if k != "seed"}
    metrics.update(seeds=runs, n_runs=3, mean={"acc": 0.255, "nmi": 0.3, "ari": 0.1, "purity": 0.4},
                   std={"acc": 0.01, "nmi": 0.0, "ari": 0.0, "purity": 0.0})
    path = write_report(tmp_path / "r.html", title="t", metrics=metrics, config={}, ids=["a", "b"],
                        cluster_labels=[0, 1])
    text = path.read_text(encoding="utf-8")
    visible = _visible(path)
    shown = _section_text(path, "metrics")
    for raw in ("{", "}", "[", "]", "'"):
        assert raw not in shown, raw
    assert "seed 0 (first seed)" in visible and "mean ± std over 3 seeds" in visible
    assert "first seed (seed 0)" in visible and "over all 3 seeds (0, 1, 2)" in visible
    rows = {m.group(1): m.group(2) for m in re.finditer(r"<tr><th>(\w+)</th>(.*?)</tr>", text)}
    assert rows["acc"] == "<td>0.2450</td><td>0.2550 ± 0.0100</td>"
    assert rows["n_clusters"] == "<td>10</td><td></td>"
    assert "seeds" not in rows and "mean" not in rows and "std" not in rows
    # The per-seed table: one row per seed, the scores that vary or are summarised.
    assert "Per seed" in visible
    per_seed = text[text.index("Per seed"):]
    assert re.search(r"<th>seed</th><th>acc</th><th>nmi</th><th>ari</th><th>purity</th></tr>", per_seed)
    assert "<td>2</td><td>0.2650</td>" in per_seed


def test_nested_metric_values_are_spelled_out(tmp_path):
    path = write_report(tmp_path / "r.html", title="t", config={}, ids=["a"], cluster_labels=[0],
                        metrics={"acc": 0.5, "extra": {"x": 1, "y": 0.25}, "tags": ["a", "b"],
                                 "runs": [{"seed": 0, "acc": 0.5}]})
    visible = _section_text(path, "metrics")
    assert "extra · x" in visible and "0.2500" in visible and "a, b" in visible
    assert "{" not in visible and "[" not in visible


def test_shown_run_is_named_in_each_section_it_concerns(tmp_path):
    path = write_small_report(tmp_path / "r.html", shown_run="c10 · demo:planted · itae · seed 1",
                              metrics_note="Scores in %.")
    text = path.read_text(encoding="utf-8")
    for sid in ("confusion", "map", "gallery"):
        section = text[text.index(f'<section id="{sid}">'):]
        section = section[: section.index("</section>")]
        assert "Run shown: c10 · demo:planted · itae · seed 1" in section, sid
    metrics = text[text.index('<section id="metrics">'):]
    assert metrics[: metrics.index("</section>")].count("Scores in %.") == 1


# ----------------------------------------------------------------------------------------------------
# The explorable map, driven in headless Chromium

# Appended to a copy of the report by the test (the report itself holds no test code): it plays a user's
# moves through real DOM events at the canvas coordinates of known points, and writes what the page
# showed into <pre id="probe"> for --dump-dom to print.
PROBE = """
<script>
window.addEventListener("load", () => setTimeout(() => {
  const out = {}, map = window.itaeMap, canvas = document.getElementById("map-canvas");
  const at = (type, i) => {
    const [x, y] = map.clientPosition(i);
    canvas.dispatchEvent(new MouseEvent(type, {clientX: x, clientY: y, bubbles: true}));
  };
  const text = (id) => document.getElementById(id).textContent;
  const pic = () => { const img = document.querySelector("#map-pic img"); return img ? img.src.slice(0, 30) : text("map-pic"); };
  document.getElementById("map").scrollIntoView();
  out.count = map.count;
  const withThumb = map.withThumbnail(), all = [...Array(map.count).keys()];
  const target = PICK_TARGET;
  out.target = target;
  at("mousemove", target);
  out.hover = {pic: pic(), path: text("map-path"), cluster: text("map-cluster"), label: text("map-label"),
               dist: text("map-dist"), hovered: map.state().hover};
  const bare = all.find((i) => !withThumb.includes(i));
  if (bare !== undefined) { at("mousemove", bare); out.bare = {pic: pic(), hovered: map.state().hover, index: bare}; }
  at("mousedown", target);
  at("mouseup", target);
  out.pinned = map.state().pinned;
  const colour = document.getElementById("map-colour");
  out.clusterColours = all.map((i) => map.colourOf(i));
  colour.value = "label"; colour.dispatchEvent(new Event("change"));
  out.labelColours = all.map((i) => map.colourOf(i));
  out.colourBy = map.state().colourBy;
  const filter = document.getElementById("map-filter");
  const keep = map.cluster(target);
  filter.value = String(keep); filter.dispatchEvent(new Event("change"));
  const far = (i) => all.every((j) => map.cluster(j) !== keep ||
      Math.hypot(...map.clientPosition(i).map((v, a) => v - map.clientPosition(j)[a])) > 15);
  const other = all.find((i) => map.cluster(i) !== keep && far(i));
  out.other = other === undefined ? null : other;
  at("mousemove", other);
  out.hiddenHover = map.state().hover;
  out.shownAfterFilter = all.filter((i) => map.colourOf(i) !== null).length;
  out.inKept = all.filter((i) => map.cluster(i) === keep).length;
  out.state = document.getElementById("map-state").textContent;
  out.resources = performance.getEntriesByType("resource").map((e) => e.name);
  filter.value = "-1"; filter.dispatchEvent(new Event("change"));
  at("mousemove", target);
  const pre = document.createElement("pre");
  pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 50));
</script>
"""


def _probe(binary: str, report: Path, tmp_path: Path, target: str = "map.withThumbnail()[0]") -> dict:
    import json

    page = tmp_path / "probed.html"
    text = report.read_text(encoding="utf-8")
    page.write_text(text.replace("</body>", PROBE.replace("PICK_TARGET", target) + "</body>"), encoding="utf-8")
    # No network: every host resolves to nothing, so a request would fail and show in the probe's list.
    result = _run_chromium(binary, tmp_path / "profile", "--window-size=1280,1000",
                           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000",
                           "--dump-dom", page.resolve().as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, "the probe did not run: " + result.stderr[-2000:]
    return json.loads(html.unescape(match.group(1)))


def _map_report(path: Path, n: int = 400, max_map_thumbs: int = 150) -> Path:
    ids, clusters, labels, embeddings = make_run(n=n)
    colors = np.random.default_rng(1).integers(0, 256, (len(ids), 3))
    thumbs = {name: tiny_image(colors[i], 24) for i, name in enumerate(ids)}
    return write_report(path, title="map", metrics=None, config={}, ids=ids, cluster_labels=clusters,
                        true_labels=labels, embeddings=embeddings, thumbnails=thumbs, map_method="pca",
                        max_map_thumbs=max_map_thumbs)


@pytest.mark.browser
def test_map_hover_colour_and_filter_in_headless_chromium(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium)")
    ids, clusters, labels, _ = make_run(n=400)
    report = _map_report(tmp_path / "report.html")
    got = _probe(binary, report, tmp_path)
    assert got["count"] == 400
    t = got["target"]
    # Hovering a point with a thumbnail shows that thumbnail and the point's own facts.
    assert got["hover"]["hovered"] == t
    assert got["hover"]["pic"].startswith("data:image/jpeg;base64,")
    assert got["hover"]["path"] == ids[t]
    assert got["hover"]["cluster"] == str(clusters[t])
    assert got["hover"]["label"] == labels[t]
    assert float(got["hover"]["dist"]) > 0
    # A point without one says so; a click pins.
    assert got["bare"]["hovered"] == got["bare"]["index"] and got["bare"]["pic"] == "no thumbnail"
    assert got["pinned"] == t
    # Colour by label: points of one label share a colour, and the colouring differs from the clusters'.
    assert got["colourBy"] == "label"
    by_label: dict[str, set] = {}
    for i, colour in enumerate(got["labelColours"]):
        by_label.setdefault(labels[i], set()).add(colour)
    assert all(len(c) == 1 for c in by_label.values()) and len(set(got["labelColours"])) == len(by_label)
    assert got["labelColours"] != got["clusterColours"]
    # The filter keeps one cluster: others are not drawn in colour and cannot be picked.
    assert got["shownAfterFilter"] == got["inKept"] == int((clusters == clusters[t]).sum())
    assert got["other"] is not None and clusters[got["other"]] != clusters[t]
    assert got["hiddenHover"] == -1  # the pointer is on a filtered-out point, away from the kept cluster
    assert got["state"].endswith(f"{got['inKept']:,} points shown")
    # Nothing was fetched: no resource entries at all (data: URIs are not requests).
    assert got["resources"] == []


def _unpack(spec: dict) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(spec["b64"]), dtype={"u1": "<u1", "u2": "<u2", "u4": "<u4", "f4": "<f4"}[spec["dtype"]])


def test_map_payload_round_trips_every_point():
    from itae.report.figures import EmbeddingMap
    from itae.report.mapview import map_payload

    ids, clusters, labels, embeddings = make_run(n=300)
    ids[5] = "deep/folder/x.jpg"
    clusters = clusters.copy()
    clusters[:7] = -1  # noise
    index = np.arange(0, 300, 2)  # a sample of the rows
    coords = np.random.default_rng(0).normal(size=(index.size, 2)) * [10.0, 1.0]
    dist = np.linspace(0.5, 3.0, 300)
    thumbs = {name: tiny_image((i, 0, 0)) for i, name in enumerate(ids) if i % 3}  # some have none
    payload = map_payload(EmbeddingMap(coords, index, "pca", "d"), ids, clusters, np.asarray(labels), dist, thumbs,
                          max_thumbs=40)
    assert payload["n"] == index.size and payload["total"] == 300
    x, y = _unpack(payload["x"]).astype(float), _unpack(payload["y"]).astype(float)
    # One scale for both axes: positions come back up to a shift and a flip of y (screen coordinates).
    scale = (coords[:, 0].max() - coords[:, 0].min()) / 65535
    np.testing.assert_allclose(x * scale + coords[:, 0].min(), coords[:, 0], atol=2 * scale)
    np.testing.assert_allclose(np.ptp(y) * scale, np.ptp(coords[:, 1]), atol=2 * scale)
    np.testing.assert_allclose(-y * scale - (-y * scale).mean() + coords[:, 1].mean(), coords[:, 1], atol=2 * scale)
    cats = [c["name"] for c in payload["clusters"]]
    assert [cats[c] for c in _unpack(payload["cluster"])] == [
        "noise" if c == -1 else str(c) for c in clusters[index]]
    assert payload["clusters"][0]["noise"] and payload["clusters"][0]["colour"] == "#b8b8b8"
    names = [payload["labels"][j]["name"] for j in _unpack(payload["label"])]
    assert names == [labels[i] for i in index]
    paths = [payload["folders"][f] + n for f, n in zip(_unpack(payload["folder"]), payload["names"])]
    assert paths == [ids[i] for i in index]
    np.testing.assert_allclose(_unpack(payload["dist"]), dist[index], rtol=1e-6)
    with_thumb = _unpack(payload["thumbs"]["index"])
    assert 0 < len(with_thumb) == len(payload["thumbs"]["data"]) <= 40
    assert all(index[j] % 3 for j in with_thumb)  # only points whose image could be had
    # A cluster takes its matched label's colour when a matching is given.
    matched = map_payload(EmbeddingMap(coords, index, "pca", "d"), ids, clusters, np.asarray(labels), None, None,
                          matched={1: 2})
    assert matched["clusters"][1]["colour"] == matched["labels"][2]["colour"]
    assert matched["thumbs"]["data"] == [] and matched["dist"] is None
