"""Cluster a large synthetic embedding file read through a memory map; print time and peak memory.

    python benchmarks/bench_cluster.py                       # 1,000,000 x 1,024 float32 -> 1,000 clusters
    python benchmarks/bench_cluster.py --n 100000 --dim 256 --k 100

The data (Gaussian blobs around `--k` random centres, float32) is written to a .npy file by a child
process, so the pages it touches while writing do not count towards this process's peak RSS. The
benchmark then opens the file with ``np.load(mmap_mode="r")``, fits :class:`itae.clustering.KMeansClusterer`
and scores the labels against the generating blobs with the streaming contingency table.

Peak RSS comes from ``resource.getrusage``; on Linux it includes the pages of the memory-mapped file that
were read (file-backed, shared with the page cache), so it is at most the file size plus what clustering
itself allocates.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(path: Path, n: int, dim: int, k: int, seed: int, chunk: int = 65536) -> None:
    """Write (n, dim) float32 blobs to `path` and their labels to `path` with suffix .labels.npy."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim), dtype=np.float32)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    labels = rng.integers(0, k, size=n)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # Noise of norm ~0.35 sqrt(dim) around centres ~sqrt(2 dim) apart: separated, not trivially so.
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block *= 0.35
        block += centers[labels[start:stop]]
        x[start:stop] = block
    x.flush()
    del x
    np.save(labels_path(path), labels)


def labels_path(path: Path) -> Path:
    return path.with_name(path.stem + ".labels.npy")


def status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status in KiB (Linux only)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def gib(kib: float) -> str:
    return f"{kib / 2**20:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of vectors")
    parser.add_argument("--dim", type=int, default=1024, help="dimension")
    parser.add_argument("--k", type=int, default=1000, help="clusters (also the number of generating blobs)")
    parser.add_argument("--backend", default="auto", choices=["auto", "sklearn", "minibatch", "faiss"])
    parser.add_argument("--n-init", type=int, default=1, help="restarts (faiss nredo)")
    parser.add_argument("--max-iter", type=int, default=20, help="iterations per restart")
    parser.add_argument("--init", default="auto", help="auto, k-means++, random, or afk-mc2 (faiss)")
    parser.add_argument("--spherical", action="store_true", help="cosine k-means")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", type=Path, default=None, help=".npy file to use or create")
    parser.add_argument("--keep", action="store_true", help="keep a generated file")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    path = args.path or Path(tempfile.gettempdir()) / f"itae_bench_{args.n}x{args.dim}_k{args.k}.npy"
    if args.generate_only:
        generate(path, args.n, args.dim, args.k, args.seed)
        return

    generated = False
    if not path.exists():
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--generate-only", "--path", str(path)]
        cmd += ["--n", str(args.n), "--dim", str(args.dim), "--k", str(args.k), "--seed", str(args.seed)]
        subprocess.run(cmd, check=True)
        generated = True
        print(f"generated {path.name} in {time.perf_counter() - t0:.1f} s (child process)")

    from itae.clustering import KMeansClusterer, resolve_backend
    from itae.metrics import ContingencyAccumulator

    x = np.load(path, mmap_mode="r")
    truth = np.load(labels_path(path), mmap_mode="r") if labels_path(path).exists() else None
    n, dim = x.shape
    print(f"data      {n} x {dim} {x.dtype}, {x.nbytes / 2**30:.2f} GiB, memory-mapped")
    print(f"cpus      {os.cpu_count()} visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    backend = resolve_backend(args.backend, n)
    print(
        f"k-means   k={args.k} backend={backend} n_init={args.n_init} max_iter={args.max_iter} "
        f"init={args.init} spherical={args.spherical}"
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0 = time.perf_counter()
    km = KMeansClusterer(
        args.k,
        backend=args.backend,
        n_init=args.n_init,
        max_iter=args.max_iter,
        init=args.init,
        spherical=args.spherical,
        random_state=args.seed,
    ).fit(x)
    fit_s = time.perf_counter() - t0

    scores = None
    score_s = 0.0
    if truth is not None:
        t0 = time.perf_counter()
        acc = ContingencyAccumulator()
        for start in range(0, n, 262144):
            acc.update(truth[start : start + 262144], km.labels_[start : start + 262144])
        scores = acc.result()
        score_s = time.perf_counter() - t0

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"fit       {fit_s:.1f} s (validate, sample, train, assign all rows)")
    if scores is not None:
        print(
            f"scores    {score_s:.1f} s streamed: acc {scores['acc']:.4f} nmi {scores['nmi']:.4f} "
            f"ari {scores['ari']:.4f} vs the generating blobs"
        )
    print(f"inertia   {km.inertia_:.4g}")
    print(f"peak RSS  {gib(peak)} (before fit {gib(rss_before)}; embeddings file {x.nbytes / 2**30:.2f} GiB)")
    anon, file_backed = status_kib("RssAnon"), status_kib("RssFile")
    if anon is not None and file_backed is not None:
        print(
            f"RSS now   anonymous {gib(anon)}, file-backed {gib(file_backed)} (mapped embeddings, libraries)"
        )

    if generated and not args.keep:
        del x, truth
        path.unlink()
        labels_path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
