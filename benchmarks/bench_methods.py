"""Images per second of each artifact fix relative to none, on one model, in one run.

The methods run as ``itae.embed`` runs them for CLS embeddings: the CLS-only fast path
(``forward_cls``), with ITAE's calibrated threshold on the last block, with test-time registers'
hooks around it, or both. Random weights of DINOv2 shape (HF ``Dinov2Model``), random pixels.

Test-time registers need register neurons; random weights have no outliers to find them from, so the
run takes ``--neurons`` (block, neuron) pairs drawn at random among the blocks up to ``--max-layer``
(the cost depends on how many neurons and blocks are edited, not on which). The default is the
published DINOv2-L count, 50, in blocks 0..9 of 12 (as 0..17 of 24). Random weights have no artifacts
either, and calibration rightly flags nothing there; so that ITAE's row includes its engineering, not only
its detection, ITAE runs with the value norms' low side fixed and a threshold that flags ``--flagged``
of the batch's patches (default 5%; 0 runs the calibrated config instead).

Methods are interleaved (one batch each, round after round, the order reversed every other round) so
that the machine's load drifts over all of them alike. Each step is timed twice: wall time
(``time.perf_counter``) and this process's CPU time over all its threads (``time.process_time``), which
other jobs on a shared machine disturb far less. "relative to none" is the median over rounds of that
round's ratio time(none) / time(method) (paired within a round), with its range; a method's throughput
is the median wall rate, its spread (max - min) / median.

  python benchmarks/bench_methods.py --size s --batch 16 --repeats 11
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from contextlib import ExitStack

import torch

import itae
from itae.engine.fast import forward_cls

SIZES = {"s": (384, 12, 6), "b": (768, 12, 12)}  # hidden, layers, heads (DINOv2 at patch 14)
METHODS = ("none", "itae", "ttr", "itae+ttr")


def build(size: str):
    from transformers import Dinov2Config, Dinov2Model

    d, layers, heads = SIZES[size]
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                     mlp_ratio=4, patch_size=14, image_size=518)).eval()
    model.set_attn_implementation("sdpa")
    return itae.adapt(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--neurons", type=int, default=50)
    ap.add_argument("--max-layer", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flagged", type=float, default=0.05, help="share of patches ITAE flags (0: calibrated)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = build(args.size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g)
    with torch.inference_mode():
        cal = itae.calibrate(backbone, [x], itae.ITAEConfig())
    itae_config, itae_note = cal.config, cal.summary()
    if args.flagged > 0:
        probe = itae.ITAEConfig(source="v", side="low", threshold=1.0)
        norms = itae.detect_artifacts(backbone, x, probe)[backbone.num_blocks - 1].norms["v"]
        threshold = float(torch.quantile(norms.flatten().double(), args.flagged))
        itae_config = itae.ITAEConfig(source="v", side="low", threshold=threshold)
        itae_note = (f"v/low fixed, threshold {threshold:.4g} flags {100 * args.flagged:.0f}% of patches "
                     f"(calibration: {cal.summary()})")
    hidden = backbone.mlp_sites[0].hidden_dim
    flat = torch.randperm((args.max_layer + 1) * hidden, generator=g)[: args.neurons]
    ttr = itae.TTRConfig(neurons=tuple((int(i) // hidden, int(i) % hidden) for i in flat))

    def step(method: str) -> tuple[float, float]:
        with ExitStack() as stack, torch.inference_mode():
            bb = backbone
            if "ttr" in method:
                bb = stack.enter_context(itae.test_time_registers(backbone, ttr)).backbone
            cfg = itae_config if "itae" in method else None
            t0, c0 = time.perf_counter(), time.process_time()
            forward_cls(bb, x, cfg)
            return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(args.warmup):
        for m in METHODS:
            step(m)
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.repeats):
        order = METHODS if r % 2 == 0 else METHODS[::-1]  # alternate the order too
        for m in order:
            w, c = step(m)
            wall[m].append(w)
            cpu[m].append(c)

    print(f"# bench_methods: ViT-{args.size.upper()}/14 random weights, {args.resolution} px, batch {args.batch}, "
          f"fp32, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print(f"# torch {torch.__version__}, itae {itae.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"# ITAE: {itae_note}")
    print(f"# test-time registers: {len(ttr.neurons)} neurons in blocks "
          f"{', '.join(str(b) for b in ttr.by_block())} (random picks, see the docstring)")
    print("| method | img/s (wall, median) | wall spread | CPU s per batch (median) | CPU spread "
          "| relative to none, CPU (median, range) | relative to none, wall (median, range) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for m in METHODS:
        w_med, c_med = statistics.median(wall[m]), statistics.median(cpu[m])
        cells = [f"{args.batch / w_med:.2f}", _spread(wall[m]), f"{c_med:.2f}", _spread(cpu[m])]
        for times in (cpu, wall):
            ratios = [a / b for a, b in zip(times["none"], times[m], strict=True)]  # paired within each round
            cells.append(f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
        print(f"| {m} | " + " | ".join(cells) + " |")


def _spread(values: list[float]) -> str:
    return f"{100 * (max(values) - min(values)) / statistics.median(values):.0f}%"


if __name__ == "__main__":
    main()
