"""Which norm split finds rare artifact modes? Every candidate over the grid of ``tests/split_grid.py``.

    python benchmarks/bench_threshold.py            # the grid at 10^3 and 10^4 norms, subsets at 10^5, 10^6
    python benchmarks/bench_threshold.py --quick    # 10^3 and 10^4 norms only
(gmm and the mixture take up to seconds per call: they run on the 10^3-norm cases only.)

Prints, per candidate: the share of required positives split right (precision and recall >= 0.95
against the planted mode), the same over the overlapping and small cells (reported, not required),
the share of negatives with nothing flagged, per family, and the median time per call at 10^6 norms.

Candidates: ``mode`` (itae's default: a rare mode against a non-increasing tail), itae 0.1.0's
``otsu`` and ``gmm`` (a cut moved to the valley), valley-emphasis Otsu (Ng 2006) and
Kittler-Illingworth minimum-error thresholding (each with the same valley test), a two-component
mixture with a small-weight prior, and a robust gap test on log norms (median and MAD).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from itae import ITAEConfig  # noqa: E402
from itae.engine.split import (  # noqa: E402
    _BINS,
    MAX_FLAGGED_FRACTION,
    _robust_scale,
    _valley_cut,
    find_threshold,
    otsu_between,
)
from tests import split_grid as grid  # noqa: E402

# --- candidates: each returns a norm threshold that flags (side-wise) the artifacts, or None -----------


def _itae(method: str):
    def split(norms: np.ndarray, side: str) -> float | None:
        s = find_threshold(norms, ITAEConfig(side=side, calibration=method))
        return s.threshold if s.bimodal else None

    return split


def _histogram(logs: np.ndarray):
    hist, edges = np.histogram(logs, bins=_BINS, range=(float(logs.min()), float(logs.max())))
    hist = hist.astype(np.float64)
    return hist, 0.5 * (edges[:-1] + edges[1:])


def _capped(threshold: float | None, norms: np.ndarray, side: str) -> float | None:
    if threshold is None:
        return None
    flagged = grid.flagged_by(threshold, norms, side)
    return threshold if 0 < flagged.sum() <= MAX_FLAGGED_FRACTION * norms.size else None


def valley_emphasis_otsu(norms: np.ndarray, side: str) -> float | None:
    """Ng (2006): maximise (1 - p(t)) * (w0 mu0^2 + w1 mu1^2), then the valley test. The bracket is Otsu's
    between-class variance plus the constant mu_T^2, so split's Otsu statistic serves."""
    logs = np.log(norms)
    hist, centers = _histogram(logs)
    p = hist / hist.sum()
    between = otsu_between(hist)
    total = float((p * np.arange(len(hist))).sum())
    score = np.where(between < 0, -1.0, (1.0 - p) * (between + total**2))
    cut = _valley_cut(logs, hist, centers, int(np.argmax(score[:-1])))
    return _capped(None if cut is None else float(np.exp(cut)), norms, side)


def kittler_illingworth(norms: np.ndarray, side: str) -> float | None:
    """Minimum-error thresholding: min over t of w0 ln(s0/w0) + w1 ln(s1/w1), then the valley test."""
    logs = np.log(norms)
    hist, centers = _histogram(logs)
    p = hist / hist.sum()
    x = np.arange(len(hist), dtype=np.float64)
    w0, m0, q0 = np.cumsum(p), np.cumsum(p * x), np.cumsum(p * x * x)
    w1, m1, q1 = 1.0 - w0, m0[-1] - m0, q0[-1] - q0
    with np.errstate(divide="ignore", invalid="ignore"):
        v0 = q0 / w0 - (m0 / w0) ** 2
        v1 = q1 / w1 - (m1 / w1) ** 2
        j = w0 * np.log(np.sqrt(v0) / w0) + w1 * np.log(np.sqrt(v1) / w1)
    j[~np.isfinite(j) | (v0 <= 0.05) | (v1 <= 0.05)] = np.inf  # a class narrower than a bin is degenerate
    if not np.isfinite(j[:-1]).any():
        return None
    cut = _valley_cut(logs, hist, centers, int(np.argmin(j[:-1])))
    return _capped(None if cut is None else float(np.exp(cut)), norms, side)


def small_weight_mixture(norms: np.ndarray, side: str, prior: float = 0.05, iters: int = 200) -> float | None:
    """Two Gaussians on log norms by EM (on a fine histogram), the second one started in the artifact-side
    tail, with a Beta(1, 1 + prior * n) prior on its weight; kept when Ashman's D > 2."""
    logs = np.log(norms)
    sign = -1.0 if side == "low" else 1.0
    y = sign * logs
    hist, edges = np.histogram(y, bins=4096)
    x = 0.5 * (edges[:-1] + edges[1:])
    keep = hist > 0
    x, c = x[keep], hist[keep].astype(np.float64)
    n = c.sum()
    q = np.quantile(y, [0.5, 0.99])
    mu = np.array([q[0], np.max(y)])
    sd = np.full(2, max(float(np.std(y)), 1e-6))
    w = np.array([0.99, 0.01])
    floor = 0.25 * (edges[1] - edges[0])
    for _ in range(iters):
        dens = w / (sd * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2)
        resp = dens / np.maximum(dens.sum(1, keepdims=True), 1e-300)
        nk = (resp * c[:, None]).sum(0)
        if nk[1] < 1:
            return None
        mu = (resp * (c * x)[:, None]).sum(0) / nk
        sd = np.sqrt(np.maximum((resp * c[:, None] * (x[:, None] - mu) ** 2).sum(0) / nk, floor**2))
        small = nk[1] / (n + prior * n)  # MAP weight under the Beta(1, 1 + prior n) prior
        w = np.array([1.0 - small, small])
    if mu[1] <= mu[0] or np.sqrt(2) * (mu[1] - mu[0]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2) <= 2.0:
        return None
    grid_x = np.linspace(mu[0], mu[1], 2048)
    d = w / sd * np.exp(-0.5 * ((grid_x[:, None] - mu) / sd) ** 2)
    cross = np.nonzero(d[:, 1] > d[:, 0])[0]
    if not len(cross):
        return None
    return _capped(float(np.exp(sign * grid_x[cross[0]])), norms, side)


def mad_gap(norms: np.ndarray, side: str, gap: float = 1.0, start: float = 2.0) -> float | None:
    """Robust gap test: in robust units (median, 1.4826 MAD of log norms) beyond ``start``, the widest
    spacing between sorted values; flag what lies beyond it when it spans at least ``gap`` units."""
    y = (-1.0 if side == "low" else 1.0) * np.log(norms)
    med, scale = _robust_scale(y)
    if scale <= 0:
        return None
    z = np.sort((y - med) / scale)
    i0 = max(int(np.searchsorted(z, start)) - 1, 0)
    tail = z[i0:]
    if tail.size < 2:
        return None
    spacings = np.diff(tail)
    i = int(np.argmax(spacings))
    if spacings[i] < gap or tail.size - (i + 1) < 3:
        return None
    cut = med + scale * 0.5 * (tail[i] + tail[i + 1])
    return _capped(float(np.exp(cut if side == "high" else -cut)), norms, side)


CANDIDATES = {
    "mode (new default)": _itae("mode"),
    "otsu (0.1.0 default)": _itae("otsu"),
    "gmm (0.1.0)": _itae("gmm"),
    "valley-emphasis Otsu": valley_emphasis_otsu,
    "Kittler-Illingworth": kittler_illingworth,
    "small-weight mixture": small_weight_mixture,
    "MAD gap": mad_gap,
}

SLOW = {"gmm (0.1.0)", "small-weight mixture"}  # up to seconds per call: run at 10^3 norms only
SLOW_MAX_N = 1_000

# --- evaluation ------------------------------------------------------------------------------------


def _right(threshold: float | None, norms: np.ndarray, mask: np.ndarray, side: str) -> bool:
    if threshold is None:
        return False
    precision, recall = grid.precision_recall(grid.flagged_by(threshold, norms, side), mask)
    return precision >= grid.RIGHT and recall >= grid.RIGHT


def _nothing(threshold: float | None, norms: np.ndarray, side: str) -> bool:
    return threshold is None or not grid.flagged_by(threshold, norms, side).any()


def cases(quick: bool) -> tuple[list[grid.Case], list[grid.Case]]:
    """The full grid at 10^3 and 10^4 norms (3 seeds for the negatives); without ``quick``, a subset at
    10^5 and 10^6 too (each 10^6 call costs a second or more on two shared cores)."""
    pos = grid.positives(sizes=(1_000, 10_000))
    neg = grid.negatives(sizes=(1_000, 10_000), seeds=(0, 1, 2))
    if not quick:
        pos += grid.positives(sizes=(100_000,), seeds=(1,), shares=(0.002, 0.01, 0.15), sds=(0.1, 0.4, 0.8),
                              separations=(3.0, 10.0, 100.0), ratios=(0.5,))
        neg += grid.negatives(sizes=(100_000,), seeds=(3,))
        pos += grid.positives(sizes=(1_000_000,), seeds=(2,), shares=(0.002, 0.02), sds=(0.1, 0.8),
                              separations=(10.0, 100.0), ratios=(0.5,))
        neg += grid.negatives(sizes=(1_000_000,), seeds=(4,))[::7]
    return pos, neg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10^3 and 10^4 norms only")
    ap.add_argument("--only", nargs="*", help="candidate names to run (substring match)")
    ap.add_argument("--show-misses", type=int, default=5, help="print this many failing cases per candidate")
    args = ap.parse_args()
    names = [n for n in CANDIDATES if not args.only or any(o in n for o in args.only)]
    pos, neg = cases(args.quick)
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{len(pos)} planted cases, {len(neg)} negatives")

    right = {name: defaultdict(list) for name in names}
    nothing = {name: defaultdict(list) for name in names}
    misses = {name: [] for name in names}
    counts = defaultdict(int)
    for case in pos:  # each case is sampled once and given to every candidate
        norms, mask = case.sample()
        cat = grid.category(case, norms, mask)
        counts[cat] += 1
        for name in names:
            if name in SLOW and case.n > SLOW_MAX_N:
                continue
            thr = CANDIDATES[name](norms, case.side)
            ok = _right(thr, norms, mask, case.side)
            right[name][cat].append(ok)
            if cat == "small":
                right[name]["small-nothing"].append(_nothing(thr, norms, case.side))
            if cat == "required" and not ok:
                misses[name].append(case.label)
    print("planted cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    for case in neg:
        norms, _ = case.sample()
        for name in names:
            if name in SLOW and case.n > SLOW_MAX_N:
                continue
            ok = _nothing(CANDIDATES[name](norms, case.side), norms, case.side)
            nothing[name][case.kind].append(ok)
            if not ok:
                misses[name].append("NEGATIVE " + case.label)
    # time per call at 10^6 norms: candidates interleaved, 3 rounds, median and spread
    big = grid.positives(sizes=(1_000_000,), shares=(0.01,), sds=(0.55,), separations=(18.0,), ratios=(0.5,))[1]
    norms, _ = big.sample()
    times = defaultdict(list)
    for round_ in range(3):
        for name in names:
            if name in SLOW and round_:
                continue  # one call is enough to see seconds
            t0 = time.perf_counter()
            CANDIDATES[name](norms, big.side)
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name in names:
        t = float(np.median(times[name]))
        rows.append((name, right[name], nothing[name], t, (max(times[name]) - min(times[name])) / t))
        for m in misses[name][: args.show_misses]:
            print(f"  miss [{name}]: {m}")
        print(f"  ({name}: {len(misses[name])} misses)", flush=True)

    def pct(values: list[bool]) -> str:
        return f"{100 * np.mean(values):.1f}%" if values else "-"

    print()
    print("| split | required positives right | faint right | overlapping right | small (<20 pts) right / nothing | "
          "lognormal nothing | Student-t nothing | two populations nothing | ms per call at 10^6 (spread) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, right, nothing, t, spread in rows:
        print(f"| {name} | {pct(right['required'])} | {pct(right['faint'])} | {pct(right['overlapping'])} | "
              f"{pct(right['small'])} / {pct(right['small-nothing'])} | {pct(nothing['lognormal'])} | "
              f"{pct(nothing['student-t'])} | {pct(nothing['two-populations'])} | {1000 * t:.0f} ({100 * spread:.0f}%) |")


if __name__ == "__main__":
    main()
