"""End to end: JPEG files on local disk -> embedding store, through ``itae.embed``.

Measures what a user gets: decoding in DataLoader workers, preprocessing, host-to-device copies,
the model (ITAE on, calibrated first, or off) and the store's chunk writes. Random-weight models of
DINOv2 shapes; generated or real images.

  python benchmarks/bench_pipeline.py --images path/to/folder --size s --device cpu
  python benchmarks/bench_pipeline.py --generate 20000 --size l --device cuda --precision bf16 --batch 256
  python benchmarks/bench_pipeline.py --generate 8000 --side 2048x1536 --fast-decode --modes itae ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}


def _write_images(args: tuple[str, int, int, tuple[int, int]]) -> None:
    from PIL import Image

    folder, start, stop, (width, height) = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        # smooth colour fields with noise: decode cost like a photo's, not like a flat image's
        base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(height, width, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        sub = Path(folder) / f"class{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(sub / f"{i:07d}.jpg", quality=90)


def generate(folder: Path, n: int, side: tuple[int, int], workers: int) -> None:
    step = max(1, n // (workers * 4))
    jobs = [(str(folder), s, min(n, s + step), side) for s in range(0, n, step)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_images, jobs))


def _side(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def build_model(size: str, device: str):
    import torch
    from transformers import Dinov2Config, Dinov2Model

    d, layers, heads = SIZES[size]
    cfg = Dinov2Config(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                       patch_size=14, image_size=518, use_swiglu_ffn=size == "g")
    torch.manual_seed(0)
    with torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"):
        model = Dinov2Model(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", help="an image folder (labels from subfolders are ignored)")
    ap.add_argument("--generate", type=int, default=0, help="write this many JPEGs to a temporary folder first")
    ap.add_argument("--side", type=_side, default=(320, 320), help="size of generated JPEGs: 320 or 2048x1536")
    ap.add_argument("--fast-decode", action="store_true", help="reduced-scale JPEG decoding (itae embed --fast-decode)")
    ap.add_argument("--size", choices=sorted(SIZES), default="s")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16", "fp8"], default="fp32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--modes", default="itae,baseline", help="comma list of itae, baseline")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import torch

    import itae
    from itae.extraction.local import embed

    tmp = Path(tempfile.mkdtemp(prefix="itae-bench-"))
    try:
        if args.generate:
            folder = tmp / "images"
            t0 = time.perf_counter()
            generate(folder, args.generate, args.side, os.cpu_count() or 2)
            print(f"generated {args.generate} JPEGs ({args.side[0]}x{args.side[1]}) in {time.perf_counter() - t0:.1f} s")
        elif args.images:
            folder = Path(args.images)
        else:
            ap.error("give --images or --generate N")
        rows = []
        for mode in args.modes.split(","):
            model = build_model(args.size, args.device)
            cfg = itae.ITAEConfig() if mode == "itae" else None
            extra = {"compile": args.compile, "fast_decode": args.fast_decode}
            # cold: pays for calibration and compilation; warm: a second pass over the same files with
            # the calibrated thresholds and compiled graphs reused, the steady state of a long run
            for phase in ("cold", "warm"):
                out = tmp / f"store-{mode}-{phase}"
                t0 = time.perf_counter()
                store = embed(str(folder), model, out=out, itae=cfg, batch_size=args.batch, num_workers=args.workers,
                              device=args.device, precision=args.precision, progress=False, **extra)
                wall = time.perf_counter() - t0
                cfg = store.itae_config
                n = len(store)
                row = {
                    "mode": mode, "phase": phase, "images": n, "seconds": wall, "img_per_s": n / wall,
                    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                    "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            del model
        env = {"torch": torch.__version__, "itae": itae.__version__, "size": args.size, "batch": args.batch,
               "precision": args.precision, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "cpus": os.cpu_count(), "workers": args.workers, "compile": args.compile,
               "fast_decode": args.fast_decode, "side": list(args.side) if args.generate else None}
        print(json.dumps(env))
        print(f"{'mode':<10}{'phase':<6}{'images':>8}{'seconds':>10}{'img/s':>10}")
        for r in rows:
            print(f"{r['mode']:<10}{r['phase']:<6}{r['images']:>8}{r['seconds']:>10.1f}{r['img_per_s']:>10.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
