"""Synthetic patch norms for judging a norm split: planted rare modes (positives) and single or
balanced populations (negatives). Shared by ``tests/test_split.py`` and ``benchmarks/bench_threshold.py``.

Positives: a lognormal bulk (median 8, log-sd ``sd``) and an artifact mode of ``share`` of the norms,
its median ``separation`` times lower (side "low") or higher ("high"), its log-sd ``ratio * sd``.
A split is right on a positive when what it flags has precision and recall >= 0.95 against the
planted mode. Not every grid cell can be right, so a positive is *required* only when
- the mode has at least ``MIN_POINTS`` norms (smaller ones: "small"),
- some threshold, knowing the labels, reaches min(precision, recall) >= 0.99 on the sample (else
  "overlapping": a 3x mode next to a bulk of log-sd 0.8 overlaps it, no threshold separates them),
- the mode stands out of the valley before it: the expected count within one sd of its centre is at
  least ``MIN_CONTRAST`` times the expected count in an equally wide window at the lowest point of the
  mixture density between the two centres (else "faint": a heavy tail would look the same).
The other cells are reported, not required.

Negatives (nothing may be flagged): lognormal single modes, Student-t log norms (heavy tails), and
two large populations (e.g. half the images dark: 50/50 or 65/35 mixtures a few x apart).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import ndtr

SHARES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.15)
SDS = (0.1, 0.2, 0.4, 0.6, 0.8)
SEPARATIONS = (3.0, 5.0, 10.0, 30.0, 100.0)
SIDES = ("low", "high")
SIZES = (1_000, 10_000, 100_000, 1_000_000)
RATIOS = (0.5, 1.0)  # artifact log-sd / bulk log-sd
MIN_POINTS = 20  # smaller planted modes are reported, not required
REQUIRED_ORACLE = 0.99
MIN_CONTRAST = 3.0
RIGHT = 0.95  # precision and recall a split needs to be right

T_DOFS = (2.0, 3.0, 5.0, 10.0)
# two populations: (share of the one on the artifact side, separation)
MIXTURES = ((0.5, 1.5), (0.5, 2.0), (0.5, 3.0), (0.5, 20.0), (0.35, 2.0), (0.35, 3.0), (0.65, 2.0), (0.65, 3.0))
MIXTURE_SDS = (0.1, 0.2, 0.4)
_CENTRE = np.log(8.0)


@dataclass(frozen=True)
class Case:
    kind: str  # "planted", "lognormal", "student-t" or "two-populations"
    side: str
    n: int
    sd: float
    seed: int
    share: float = 0.0
    separation: float = 1.0
    ratio: float = 1.0
    dof: float = 0.0
    weight: float = 0.0

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(norms, planted mask); the mask is all False for negatives."""
        rng = np.random.default_rng(self.seed)
        sign = -1.0 if self.side == "low" else 1.0
        if self.kind == "planted":
            k = int(round(self.share * self.n))
            bulk = rng.normal(_CENTRE, self.sd, self.n - k)
            mode = rng.normal(_CENTRE + sign * np.log(self.separation), self.ratio * self.sd, k)
            logs = np.concatenate([bulk, mode])
            mask = np.zeros(self.n, dtype=bool)
            mask[self.n - k :] = True
            return np.exp(logs), mask
        if self.kind == "lognormal":
            logs = rng.normal(_CENTRE, self.sd, self.n)
        elif self.kind == "student-t":
            t = rng.standard_t(self.dof, 2 * self.n)
            t = t[np.abs(self.sd * t) < 600.0][: self.n]  # norms within float64 range
            logs = _CENTRE + self.sd * t
        elif self.kind == "two-populations":
            k = int(round(self.weight * self.n))
            other = _CENTRE + sign * np.log(self.separation)
            logs = np.concatenate([rng.normal(_CENTRE, self.sd, self.n - k), rng.normal(other, self.sd, k)])
        else:
            raise ValueError(self.kind)
        return np.exp(logs), np.zeros(self.n, dtype=bool)

    @property
    def label(self) -> str:
        if self.kind == "planted":
            return (f"planted share={self.share:g} sd={self.sd:g} sep={self.separation:g}x ratio={self.ratio:g} "
                    f"side={self.side} n={self.n} seed={self.seed}")
        extra = {"student-t": f" dof={self.dof:g}", "two-populations": f" weight={self.weight:g} sep={self.separation:g}x"}
        return f"{self.kind} sd={self.sd:g}{extra.get(self.kind, '')} side={self.side} n={self.n} seed={self.seed}"


def positives(sizes=SIZES, seeds=(0,), shares=SHARES, sds=SDS, separations=SEPARATIONS, ratios=RATIOS) -> list[Case]:
    grid = itertools.product(seeds, sizes, shares, sds, separations, ratios, SIDES)
    return [Case("planted", side, n, sd, _seed(seed, i), share, sep, ratio)
            for i, (seed, n, share, sd, sep, ratio, side) in enumerate(grid)]


def negatives(sizes=SIZES, seeds=(0,)) -> list[Case]:
    cases = []
    for seed, n, side in itertools.product(seeds, sizes, SIDES):
        cases += [Case("lognormal", side, n, sd, seed) for sd in SDS]
        cases += [Case("student-t", side, n, sd, seed, dof=dof) for sd in (0.1, 0.4, 0.8) for dof in T_DOFS]
        cases += [Case("two-populations", side, n, sd, seed, separation=sep, weight=w)
                  for sd in MIXTURE_SDS for w, sep in MIXTURES]
    return [replace(c, seed=_seed(1000 + c.seed, i)) for i, c in enumerate(cases)]


def _seed(base: int, i: int) -> int:
    return int(np.random.SeedSequence([base, i]).generate_state(1)[0])


def precision_recall(flagged: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    tp = int(np.count_nonzero(flagged & mask))
    fp = int(np.count_nonzero(flagged & ~mask))
    fn = int(np.count_nonzero(~flagged & mask))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall


def oracle(norms: np.ndarray, mask: np.ndarray, side: str) -> float:
    """Best min(precision, recall) of any threshold on this sample, knowing the planted mask."""
    order = np.argsort(norms if side == "low" else -norms, kind="stable")
    hits = np.cumsum(mask[order])  # true positives when flagging the first m
    m = np.arange(1, norms.size + 1)
    k = int(mask.sum())
    return float(np.max(np.minimum(hits / m, hits / k))) if k else 0.0


def contrast(case: Case) -> float:
    """How clearly the planted mode stands out of the valley before it, in expected counts: the
    expected number of norms within one sd of the mode's centre over the number in an equally wide
    window at the lowest point of the mixture density between the two centres (inf: an empty valley)."""
    k = int(round(case.share * case.n))
    sd_a = case.ratio * case.sd
    d = np.log(case.separation)

    def count(lo, hi):  # expected norms with log offset (artifact side > 0) in [lo, hi]
        bulk = (case.n - k) * (ndtr(hi / case.sd) - ndtr(lo / case.sd))
        return bulk + k * (ndtr((hi - d) / sd_a) - ndtr((lo - d) / sd_a))

    xs = np.linspace(0.0, d, 400)
    valley = float(np.min(count(xs - sd_a, xs + sd_a)))
    peak = float(count(d - sd_a, d + sd_a))
    return float("inf") if valley <= 0 else peak / valley


def category(case: Case, norms: np.ndarray, mask: np.ndarray) -> str:
    """'required', 'small' (fewer than MIN_POINTS planted), 'overlapping' (no threshold separates the
    sample's two modes) or 'faint' (separable, but the mode barely rises out of the valley before it:
    a heavy tail would look the same)."""
    if int(mask.sum()) < MIN_POINTS:
        return "small"
    if oracle(norms, mask, case.side) < REQUIRED_ORACLE:
        return "overlapping"
    return "required" if contrast(case) >= MIN_CONTRAST else "faint"



def flagged_by(threshold: float, norms: np.ndarray, side: str) -> np.ndarray:
    return norms <= threshold if side == "low" else norms >= threshold
