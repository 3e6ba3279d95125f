"""The report's share of an ``itae run``, before and after the explorable map; and the page's size.

``--data``: times whole ``itae run`` commands (tiny random-weight model, ITAE on, k-means k=10, labels
from folders) with two versions of the code, interleaved (A B A B ...) so that a busy machine slows both
alike, and prints each phase from the run's own ``run.json`` timings: model loading, embedding,
clustering, scoring, report; then the report's share of the wall time, median and spread per version.
The "before" version is the source tree given by ``--before-src`` (e.g. ``git archive <ref> src | tar -x``).

``--sizes``: writes reports of 10,000 and 100,000 generated points (thumbnails available for every
point, as in a run) and prints the HTML size, split into map data, thumbnails and the rest; with
Chromium installed, also the time the page takes to draw the map once.

  python benchmarks/bench_report.py --data path/to/cifar10-test/test --before-src /tmp/before/src --repeats 3
  python benchmarks/bench_report.py --sizes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
AFTER_SRC = HERE.parent / "src"
PHASES = ("load_model_s", "embed_s", "cluster_s", "evaluate_s", "report_s")


def time_run(src: Path, data: str, model: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "itae.cli.main", "run", data, "-k", "10", "-o", str(out), "--model", str(model),
           "--labels", "from-folders", "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    record = json.loads((out / "run.json").read_text())
    row = {p: float(record["timings"].get(p) or 0.0) for p in PHASES}
    row["wall_s"] = wall
    row["report_share"] = row["report_s"] / wall
    row["layout"] = (record.get("report") or {}).get("map_layout", "t-SNE (scikit-learn), 5,000 points")
    return row


def summary(rows: list[dict]) -> str:
    lines = []
    for key in ("wall_s", *PHASES, "report_share"):
        values = [r[key] for r in rows]
        med = statistics.median(values)
        spread = (max(values) - min(values)) / med if med else 0.0
        shown = f"{100 * med:.1f} %" if key == "report_share" else f"{med:.1f} s"
        lines.append(f"  {key:<13} median {shown:>9}  spread {100 * spread:.0f}%  ({', '.join(f'{v:.3g}' for v in values)})")
    return "\n".join(lines)


def bench_runs(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE.parent))  # the repository root: the test helpers build the tiny model
    from tests.helpers.tiny import save_tiny

    work = Path(tempfile.mkdtemp(prefix="itae-bench-report-"))
    try:
        model = save_tiny("hf", work / "tiny-hf")
        versions = {"before": Path(args.before_src), "after": Path(args.after_src)}
        rows: dict[str, list[dict]] = {name: [] for name in versions}
        for rep in range(args.repeats):
            for name, src in versions.items():
                row = time_run(src, args.data, model, work / name)
                rows[name].append(row)
                print(f"repeat {rep} {name}: wall {row['wall_s']:.1f} s, report {row['report_s']:.1f} s "
                      f"({100 * row['report_share']:.1f} %), layout {row['layout']}", flush=True)
        for name, r in rows.items():
            print(f"\n{name} ({versions[name]}):\n{summary(r)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _synthetic(n: int, k: int = 10, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    emb = (rng.normal(0, 3, (k, dim))[labels] + rng.normal(0, 1, (n, dim))).astype(np.float32)
    clusters = np.where(rng.random(n) < 0.15, rng.integers(0, k, n), labels)
    ids = [f"cifar10-test/class{labels[i]}/{i:06d}.jpg" for i in range(n)]
    return ids, clusters, [f"class{j}" for j in labels], emb


def _photo(name: str) -> np.ndarray:
    """A 96 x 96 smooth noisy image, so thumbnails compress like photos, not like flat colours."""
    from PIL import Image

    rng = np.random.default_rng(int(name[-10:-4]))
    img = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((96, 96), Image.BICUBIC)
    return np.clip(np.asarray(img, np.float32) + rng.normal(0, 10, (96, 96, 3)), 0, 255).astype(np.uint8)


def _draw_ms(html_path: Path) -> float | None:
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if binary is None:
        return None
    probe = ('<script>window.addEventListener("load",()=>{const d=document.createElement("pre");d.id="ms";'
             'd.textContent=String(window.itaeMap.drawMs());document.body.appendChild(d);});</script>')
    page = html_path.with_name("probe.html")
    page.write_text(html_path.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                              "--window-size=1280,1000", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    match = re.search(r'<pre id="ms">([0-9.]+)</pre>', out)
    return float(match.group(1)) if match else None


def bench_sizes(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(AFTER_SRC))
    from itae.report.html import write_report

    with tempfile.TemporaryDirectory() as tmp:
        for n in (10_000, 100_000):
            ids, clusters, labels, emb = _synthetic(n)
            t0 = time.perf_counter()
            path = write_report(Path(tmp) / f"r{n}.html", title=f"{n}", metrics={"acc": 0.5}, config={}, ids=ids,
                                cluster_labels=clusters, true_labels=labels, embeddings=emb, thumbnails=_photo,
                                map_method=args.map_method)
            seconds = time.perf_counter() - t0
            text = path.read_text(encoding="utf-8")
            data = re.search(r'<script type="application/json" id="map-data">(.*?)</script>', text, re.S).group(1)
            payload = json.loads(data)
            thumbs = sum(len(t) for t in payload["thumbs"]["data"])
            size = path.stat().st_size
            draw = _draw_ms(path)
            print(f"{n:>7,} points: {size / 1e6:.2f} MB (map data {(len(data) - thumbs) / 1e6:.2f} MB, "
                  f"{len(payload['thumbs']['data']):,} map thumbnails {thumbs / 1e6:.2f} MB, "
                  f"rest of the page {(size - len(data)) / 1e6:.2f} MB); written in {seconds:.1f} s "
                  f"({args.map_method} layout)"
                  + ("" if draw is None else f"; one full draw of the map in Chromium: {draw:.0f} ms"), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="labelled image folder (<class>/<image>) for the run timings")
    ap.add_argument("--before-src", help="the 'before' version's src folder")
    ap.add_argument("--after-src", default=str(AFTER_SRC), help="the 'after' version's src folder (default: this tree's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", action="store_true", help="HTML size at 10,000 and 100,000 points")
    ap.add_argument("--map-method", default="pca", help="layout for --sizes (pca: the size does not depend on it)")
    args = ap.parse_args()
    if args.sizes:
        bench_sizes(args)
    if args.data:
        if not args.before_src:
            ap.error("--data needs --before-src")
        bench_runs(args)
    if not (args.sizes or args.data):
        ap.error("give --data (with --before-src) and/or --sizes")


if __name__ == "__main__":
    main()
