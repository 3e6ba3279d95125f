"""What ITAE costs end to end: ``itae.embed`` with ITAE (threshold calibrated, the default) against
``itae=None`` (``itae embed --no-itae``), on the same generated JPEGs, in the same process, alternating
the two (ITAE first in even repeats, second in odd ones) so that a machine shared with other jobs slows
both alike. Prints each run, then per mode the median and the range, and the median and range of the
per-repeat ratio ITAE / no ITAE, of wall time and of CPU time (this process and its decoding workers:
the work done, which other jobs on a shared machine disturb far less than the wall time).

  python benchmarks/bench_embed_cost.py --images 400 --repeats 3
  python benchmarks/bench_embed_cost.py --images 10000 --width 96 --heads 3 --repeats 3   # ViT-S depth, narrower

Random-weight HF DINOv2 models (``--width``/``--depth``/``--heads``; default ViT-S/14: 384, 12, 6),
224 px crops, CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import _side, generate  # noqa: E402  (the same generated photo-like JPEGs)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_model(width: int, depth: int, heads: int):
    import torch
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4,
                       patch_size=14, image_size=518)
    torch.manual_seed(0)
    model = Dinov2Model(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="how many JPEGs to generate")
    ap.add_argument("--side", type=_side, default=(320, 240), help="size of the generated JPEGs")
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default: itae's)")
    ap.add_argument("--calibration-images", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import torch

    import itae
    from itae.extraction.local import embed

    tmp = Path(tempfile.mkdtemp(prefix="itae-cost-"))
    try:
        folder = tmp / "images"
        t0 = time.perf_counter()
        generate(folder, args.images, args.side, os.cpu_count() or 2)
        print(f"generated {args.images} JPEGs ({args.side[0]}x{args.side[1]}) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        model = build_model(args.width, args.depth, args.heads)
        common = dict(batch_size=args.batch, num_workers=args.workers, device="cpu", progress=False,
                      calibration_images=args.calibration_images)
        embed(str(folder), model, out=tmp / "warmup", itae=None, **common)  # first-call costs out of the figures
        runs: dict[str, list[float]] = {"itae": [], "no-itae": []}
        cpu: dict[str, list[float]] = {"itae": [], "no-itae": []}
        for r in range(args.repeats):
            for mode in ("itae", "no-itae") if r % 2 == 0 else ("no-itae", "itae"):
                out = tmp / f"{mode}-{r}"
                c0, t0 = _cpu_seconds(), time.perf_counter()
                store = embed(str(folder), model, out=out, itae=itae.ITAEConfig() if mode == "itae" else None, **common)
                runs[mode].append(time.perf_counter() - t0)
                cpu[mode].append(_cpu_seconds() - c0)
                print(json.dumps({"repeat": r, "mode": mode, "images": len(store), "seconds": round(runs[mode][-1], 2),
                                  "cpu_seconds": round(cpu[mode][-1], 2)}), flush=True)
                shutil.rmtree(out)
        ratios = [a / b for a, b in zip(runs["itae"], runs["no-itae"], strict=True)]
        cpu_ratios = [a / b for a, b in zip(cpu["itae"], cpu["no-itae"], strict=True)]
        env = {"itae": itae.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "images": args.images, "side": list(args.side), "width": args.width,
               "depth": args.depth, "heads": args.heads, "batch": args.batch,
               "calibration_images": args.calibration_images}
        print(json.dumps(env))
        for what, figures in (("wall", runs), ("cpu", cpu)):
            for mode, secs in figures.items():
                print(f"{what:<5}{mode:<8} median {statistics.median(secs):8.2f} s   range {min(secs):8.2f} - "
                      f"{max(secs):8.2f} s")
        for what, rs in (("wall", ratios), ("cpu", cpu_ratios)):
            print(f"{what:<5}ratio itae / no-itae: median {statistics.median(rs):.3f}   range {min(rs):.3f} - {max(rs):.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"env": env, "wall": runs, "cpu": cpu, "wall_ratios": ratios,
                                                   "cpu_ratios": cpu_ratios}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
