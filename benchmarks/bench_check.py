"""Speed of ``itae check``'s computations: exact cosine kNN (faiss and scikit-learn), then the duplicate
groups, outlier scores and label disagreement, on synthetic clustered embeddings.

    python benchmarks/bench_check.py --n 10000 20000 --dim 768 --backends faiss sklearn --repeats 3

Prints one line per (n, backend): the median and spread of the kNN time over the repeats, and the
median time of the three analyses after it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from itae.collection.neighbours import cosine_knn, duplicate_groups, label_disagreement, outlier_scores


def synthetic(n: int, dim: int, classes: int = 100, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    label = rng.integers(0, classes, n)
    x = centres[label] + rng.normal(0, 0.8, (n, dim)).astype(np.float32)
    x[1::1000] = x[0::1000][: len(x[1::1000])]  # some exact duplicates
    return x, [str(v) for v in label]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[10_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--neighbours", type=int, default=10)
    p.add_argument("--backends", nargs="+", default=["faiss", "sklearn"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import faiss
    import sklearn
    import torch

    print(f"faiss {faiss.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
          f"torch threads {torch.get_num_threads()}")
    for n in args.n:
        x, labels = synthetic(n, args.dim)
        clusters = np.array([int(v) for v in labels])
        times: dict[str, tuple[list[float], list[float]]] = {b: ([], []) for b in args.backends}
        groups = None
        for _ in range(args.repeats):
            for backend in args.backends:  # interleaved, so that a busy moment hits every backend alike
                t0 = time.perf_counter()
                idx, dist = cosine_knn(x, args.neighbours, backend=backend)
                t1 = time.perf_counter()
                groups = duplicate_groups(idx, dist)
                outlier_scores(dist)
                label_disagreement(idx, labels, clusters)
                t2 = time.perf_counter()
                times[backend][0].append(t1 - t0)
                times[backend][1].append(t2 - t1)
        for backend, (knn_times, rest_times) in times.items():
            med = statistics.median(knn_times)
            spread = (max(knn_times) - min(knn_times)) / med
            print(f"n={n:>7,} d={args.dim} k={args.neighbours} {backend:>7}: kNN {med:7.2f} s (spread "
                  f"{100 * spread:.0f}%), {n / med:,.0f} img/s; groups+outliers+mislabels "
                  f"{statistics.median(rest_times):.2f} s; {groups.n_groups} duplicate groups")

if __name__ == "__main__":
    main()
