"""Label-free split of pooled patch norms: find a rare artifact mode on one side of the bulk.

Default method (``calibration="mode"``), on log norms, oriented so that the artifact side
(``side``) points right:

1. Measure the bulk robustly: median and MAD of the log norms (artifacts are at most 25% of the
   patches, so neither moves much), and express every log norm in these robust units.
2. Histogram them (a quarter of a robust unit per bin) and fit, from the bulk's peak outward, the
   best *non-increasing* density (isotonic regression): that is what a single mode, however wide or
   heavy-tailed, looks like on its way out.
3. Where the data rise again after a dip, the fit has to pool the dip and the rise into one flat
   stretch. Each stretch is scored by its Poisson log-likelihood ratio (data against the
   non-increasing fit): a second mode beyond an empty or sparse valley scores high, the sampling
   noise of a single mode's tail scores low.
4. The strongest stretch that scores at least ``MIN_EVIDENCE`` and flags at most
   ``MAX_FLAGGED_FRACTION`` of the patches is the artifact mode; the cut goes in the valley before
   it (the middle of the widest gap between observed norms there). Anything else flags nothing, and
   ``Split.reason`` says why.

Artifacts are rare (about 0.5 to 5% of the patches in DINOv2): a split that would flag more than a
quarter of the patches separates two large populations (for instance dark and bright images), not
artifacts, so it flags nothing.

``calibration="otsu"`` and ``"gmm"`` are the splits of itae 0.1.0 (Otsu's cut or a two-component
mixture, moved to the histogram's valley). They miss rare modes next to a wide bulk; they are kept
for comparison and reproducibility.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from itae.errors import InputError

from ..config import ITAEConfig

log = logging.getLogger(__name__)

MAX_FLAGGED_FRACTION = 0.25
MIN_EVIDENCE = 10.0  # log-likelihood ratio (x2) a mode needs against a non-increasing tail
MIN_MODE_POINTS = 3  # below this a "mode" is a few outliers, whatever its score
_BIN_WIDTH = 0.25  # histogram bin, in robust units (1.4826 MAD of the log norms)
_LINEAR_UNTIL = 3.0  # beyond this many robust units from the median, bins grow with the distance
_BIN_GROWTH = 0.15
_BINS = 256  # otsu/gmm histograms
_VALLEY_RATIO = 0.5  # otsu/gmm: the dip must fall below this fraction of the smaller peak


@dataclass
class Split:
    """Where the pooled norms were split, and why.

    threshold: the norm threshold (flags ``norm <= threshold`` on side "low", ``>=`` on "high");
        when nothing is flagged it lies beyond every finite norm.
    flagged_fraction: share of the finite norms the threshold flags.
    bimodal: whether an artifact mode was found (False means nothing is flagged).
    reason: one line saying what was found, or why nothing is flagged.
    ignored: how many norms were NaN or infinite and left out of the split.
    evidence: the mode's log-likelihood ratio score (method "mode"; 0 otherwise).
    """

    threshold: float
    flagged_fraction: float
    bimodal: bool
    reason: str = ""
    ignored: int = 0
    evidence: float = 0.0


def _smooth(hist: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    radius = int(3 * sigma)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return np.convolve(hist, kernel / kernel.sum(), mode="same")


def otsu_between(hist: np.ndarray) -> np.ndarray:
    """Otsu's between-class variance (in bins squared) of each cut after bin i; -1 where a class is empty."""
    p = hist / hist.sum()
    centers = np.arange(len(hist))
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centers)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return between


def _otsu_bin(hist: np.ndarray) -> int:
    """Index of the last bin of the lower class under Otsu's criterion."""
    return int(np.argmax(otsu_between(hist)[:-1]))


def _gmm_cut(logs: np.ndarray, seed: int = 0) -> float | None:
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=2, random_state=seed).fit(logs.reshape(-1, 1))
    means = gmm.means_.ravel()
    lo, hi = np.sort(means)
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, 2048).reshape(-1, 1)
    post = gmm.predict_proba(grid)
    lo_comp = int(np.argmin(means))
    # first point between the means where the upper component becomes the more probable one
    crossing = np.nonzero(post[:, lo_comp] < 0.5)[0]
    return float(grid[crossing[0], 0]) if len(crossing) else None


def _robust_scale(x: np.ndarray) -> tuple[float, float]:
    """Median and robust spread (1.4826 MAD; the mean absolute deviation if over half the values tie)."""
    med = float(np.median(x))
    dev = np.abs(x - med)
    scale = 1.4826 * float(np.median(dev))
    if scale <= 0.0:
        scale = 1.2533 * float(dev.mean())
    return med, scale


def _mode_cut(z: np.ndarray) -> tuple[float | None, float, str]:
    """Find a rare mode right of the bulk in robust units ``z``.

    Returns (cut, evidence, reason): flag ``z > cut``; cut is None when no mode is found.
    """
    n = z.size
    edges = _edges(max(float(z.min()), -4.0), float(z.max()))
    counts = np.histogram(z, bins=edges)[0].astype(np.float64)
    widths = np.diff(edges)
    centers = 0.5 * (edges[:-1] + edges[1:])
    # the bulk's peak: the highest bin near the median (artifacts, at most a quarter, sit farther out)
    near = np.nonzero(np.abs(centers) <= 3.0)[0]
    start = int(near[np.argmax(_smooth(counts, 1.0)[near])]) if near.size else 0
    tail, tail_widths = counts[start:], widths[start:]
    if tail.size < 3:
        return None, 0.0, "no room for a second mode beyond the bulk"

    from sklearn.isotonic import isotonic_regression

    # the best non-increasing density (per robust unit) from the peak outward, and its expected counts
    expected = isotonic_regression(tail / tail_widths, sample_weight=tail_widths, increasing=False) * tail_widths
    density = expected / tail_widths
    # stretches the non-increasing fit had to pool: where the data rise after a dip
    boundaries = np.flatnonzero(~np.isclose(np.diff(density), 0.0, rtol=1e-9, atol=1e-12)) + 1
    blocks = np.split(np.arange(tail.size), boundaries)
    best: tuple[float, float] | None = None  # (evidence, cut)
    best_rejected: tuple[float, str] | None = None
    strongest = 0.0
    for block in blocks:
        if block.size < 3:
            continue
        c, f = tail[block], expected[block]
        pos = c > 0
        evidence = 2.0 * float(np.sum(c[pos] * np.log(c[pos] / f[pos])))
        strongest = max(strongest, evidence)
        if evidence < MIN_EVIDENCE:
            continue
        # where the mode starts: the step up that best explains the block (two flat pieces, denser outside)
        step = _step_up(c, tail_widths[block])
        if step is None:
            continue
        a = start + int(block[0])
        cut = _widest_gap(z, edges[a], edges[start + int(block[step]) + 1])
        flagged = int(np.count_nonzero(z > cut))
        if flagged < MIN_MODE_POINTS:
            continue
        if flagged > MAX_FLAGGED_FRACTION * n:
            if best_rejected is None or evidence > best_rejected[0]:
                best_rejected = (evidence, f"the strongest second mode would flag {100 * flagged / n:.1f}% of the "
                                 f"patches, more than {100 * MAX_FLAGGED_FRACTION:.0f}%: two large populations "
                                 "(e.g. dark and bright images), not rare artifacts")
            continue
        if best is None or evidence > best[0]:
            best = (evidence, cut)
    if best is not None:
        return best[1], best[0], ""
    if best_rejected is not None:
        return None, best_rejected[0], best_rejected[1]
    return None, strongest, (
        f"no second mode beyond the bulk (strongest rise scores {strongest:.1f}, a mode needs {MIN_EVIDENCE:g})"
    )


def _edges(lo: float, hi: float) -> np.ndarray:
    """Histogram edges in robust units: ``_BIN_WIDTH`` wide near the bulk, then growing by
    ``_BIN_GROWTH`` per bin, so that the sparse far tail of a heavy-tailed bulk is not cut into
    near-empty bins whose chance clusters would look like modes."""
    linear_end = max(lo, min(hi, _LINEAR_UNTIL))
    edges = list(np.arange(lo, linear_end, _BIN_WIDTH))
    edge = edges[-1] + _BIN_WIDTH if edges else lo
    edges.append(edge)
    while edge < hi:
        edge = edge + max(_BIN_WIDTH, _BIN_GROWTH * edge)
        edges.append(edge)
    if len(edges) < 2:
        edges.append(edge + _BIN_WIDTH)
    return np.asarray(edges)


def _step_up(c: np.ndarray, widths: np.ndarray) -> int | None:
    """Index j maximizing the likelihood of ``c`` as two flat densities on c[:j], c[j:], the outer one denser."""
    j = np.arange(1, c.size)
    n1 = np.cumsum(c)[:-1]
    n2 = c.sum() - n1
    l1 = np.cumsum(widths)[:-1]
    l2 = widths.sum() - l1
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = np.where(n1 > 0, n1 * np.log(n1 / l1), 0.0) + np.where(n2 > 0, n2 * np.log(n2 / l2), 0.0)
    ll[n2 / l2 <= n1 / l1] = -np.inf
    if not np.isfinite(ll).any():
        return None
    return int(j[np.argmax(ll)])


def _widest_gap(z: np.ndarray, lo: float, hi: float) -> float:
    """The middle of the widest gap between observed values in [lo, hi] (the valley before a mode)."""
    inside = np.sort(z[(z >= lo) & (z <= hi)])
    below = z[z < lo]
    if below.size:  # the last value before the stretch: the gap may begin there
        inside = np.concatenate([[below.max()], inside])
    if inside.size < 2:
        return 0.5 * (lo + hi)
    gaps = np.diff(inside)
    i = int(np.argmax(gaps))
    return float(0.5 * (inside[i] + inside[i + 1]))


def _valley_cut(logs: np.ndarray, hist: np.ndarray, centers: np.ndarray, cut_bin: int) -> float | None:
    """Move a two-class cut (last bin of the lower class) to the valley between the class peaks.

    Returns the log cut, strictly between the observed classes, or None when there is no valley
    (the dip must fall below ``_VALLEY_RATIO`` of the smaller peak of the smoothed histogram).
    """
    smooth = _smooth(hist)
    left_peak = int(np.argmax(smooth[: cut_bin + 1]))
    right_peak = cut_bin + 1 + int(np.argmax(smooth[cut_bin + 1 :]))
    between = smooth[left_peak : right_peak + 1]
    valley_value = float(between.min())
    if valley_value > _VALLEY_RATIO * min(smooth[left_peak], smooth[right_peak]):
        return None
    flat = np.nonzero(between <= valley_value + 1e-12 * max(1.0, valley_value))[0]
    log_cut = float(centers[left_peak + int(flat[len(flat) // 2])])
    low_side, high_side = logs[logs <= log_cut], logs[logs > log_cut]
    if low_side.size == 0 or high_side.size == 0:
        return None
    return float(np.clip(log_cut, low_side.max(), np.nextafter(high_side.min(), -np.inf)))


def _otsu_gmm_cut(logs: np.ndarray, method: str) -> tuple[float | None, str]:
    """itae 0.1.0's split: Otsu's cut (or a 2-component GMM's) and the valley test."""
    hist, edges = np.histogram(logs, bins=_BINS, range=(float(logs.min()), float(logs.max())))
    hist = hist.astype(np.float64)
    centers = 0.5 * (edges[:-1] + edges[1:])
    if method == "gmm":
        cut = _gmm_cut(logs)
        if cut is None:
            return None, "the mixture found no second component"
        cut_bin = int(np.clip(np.searchsorted(centers, cut), 1, _BINS - 1)) - 1
    else:
        cut, cut_bin = None, _otsu_bin(hist)
    valley = _valley_cut(logs, hist, centers, cut_bin)
    if valley is None:
        return None, "no valley between the two classes"
    return (cut if cut is not None else valley), ""


def find_threshold(norms: np.ndarray, config: ITAEConfig) -> Split:
    """Split 1-D patch norms into bulk and artifacts (see the module docstring).

    NaN and infinite norms are counted in ``Split.ignored``, logged and left out; they never raise.
    ``config.side`` must be fixed ("low" or "high"): ``itae.calibrate`` chooses an "auto" side.
    """
    if config.side not in ("low", "high"):
        raise InputError(f"find_threshold needs a fixed side, 'low' or 'high'; got {config.side!r} "
                         "(an 'auto' side is chosen by itae.calibrate)")
    norms = np.asarray(norms, dtype=np.float64).ravel()
    finite = np.isfinite(norms)
    ignored = int(norms.size - np.count_nonzero(finite))
    if ignored:
        log.warning("itae: %d of %d patch norms are NaN or infinite; the split ignores them", ignored, norms.size)
        norms = norms[finite]
    low = config.side == "low"

    def nothing(reason: str, evidence: float = 0.0) -> Split:
        # a threshold beyond every finite norm on the artifact side
        big = float(np.finfo(np.float64).max)
        if not norms.size:
            threshold = -1.0 if low else big
        elif low:
            threshold = float(norms.min()) / math.e if norms.min() > 0 else -1.0
        else:
            threshold = min(max(float(norms.max()), 0.0) * math.e + 1e-30, big)
        return Split(threshold, 0.0, False, reason, ignored, evidence)

    if norms.size < 2:
        return nothing(f"only {norms.size} finite patch norm(s): nothing to split")
    logs = np.log(np.maximum(norms, np.finfo(np.float64).tiny))  # only exact zeros are clamped
    if float(logs.max() - logs.min()) < 1e-9:
        return nothing("all patch norms are equal")

    evidence = 0.0
    if config.calibration in ("otsu", "gmm"):
        log_cut, reason = _otsu_gmm_cut(logs, config.calibration)
        if log_cut is None:
            return nothing(reason)
    else:
        oriented = -logs if low else logs
        med, scale = _robust_scale(oriented)
        z = (oriented - med) / scale
        cut, evidence, reason = _mode_cut(z)
        if cut is None:
            return nothing(reason, evidence)
        log_cut = med + scale * cut
        log_cut = -log_cut if low else log_cut
    threshold = float(math.exp(log_cut))
    flagged = norms <= threshold if low else norms >= threshold
    share = float(flagged.mean())
    if share > MAX_FLAGGED_FRACTION:
        log.warning(
            "itae: the norm split at %.4g would flag %.1f%% of patches, too many for artifacts; flagging none",
            threshold, 100 * share,
        )
        return nothing(
            f"the split at {threshold:.4g} would flag {100 * share:.1f}% of the patches, more than "
            f"{100 * MAX_FLAGGED_FRACTION:.0f}%: two large populations, not rare artifacts", evidence,
        )
    if not flagged.any():
        return nothing("the split flags no patch", evidence)
    reason = f"{int(flagged.sum())} patches ({100 * share:.2f}%) beyond the valley at {threshold:.4g}"
    return Split(threshold, share, True, reason, ignored, evidence)
