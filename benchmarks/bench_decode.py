"""How fast one CPU core turns JPEG files into model input, with and without reduced-scale decoding.

Each row: generated photo-like JPEGs of one size on local disk -> ``ImageDataset`` (decode, EXIF,
resize the shorter side to 256, centre crop 224, uint8), one process, one thread. ``full`` decodes every
pixel; ``fast`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= 256
(``fast_decode=True``, ``itae embed --fast-decode``). "cores for 2,800 img/s" is how many such decoding
processes a GPU running ViT-L/14 at that rate would need. |diff| is the mean and largest absolute
difference of the 224 x 224 x 3 uint8 crops between the two, in grey levels of 255.

  python benchmarks/bench_decode.py
  python benchmarks/bench_decode.py --sizes 500x375,1024x768,4032x3024 --images 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def photo(width: int, height: int, seed: int):
    """Smooth colour fields plus sensor-like noise: a photo's JPEG size and decode cost."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = base + rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def rate(dataset, n: int, min_seconds: float) -> float:
    """Images per second over whole passes of the dataset, at least ``min_seconds`` long."""
    dataset[0]  # warm the caches and the decoder
    done, start = 0, time.perf_counter()
    while True:
        for i in range(n):
            assert dataset[i][2] is None, dataset[i][2]
        done += n
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500x375,1024x768,2048x1536,4032x3024")
    ap.add_argument("--images", type=int, default=24, help="distinct files per size")
    ap.add_argument("--seconds", type=float, default=4.0, help="timing per size and mode")
    ap.add_argument("--target", type=float, default=2800.0, help="GPU rate to feed, img/s")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import PIL
    import torch

    from itae.data.dataset import ImageDataset
    from itae.data.decode import build_transform
    from itae.data.sources import ListSource
    from itae.models.base import Preprocess

    torch.set_num_threads(1)
    transform = build_transform(Preprocess(image_size=224, resize_size=256))
    env = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "pillow": PIL.__version__,
           "torch": torch.__version__, "quality": 90}
    print(json.dumps(env))
    print(f"{'size':<11}{'KiB':>6}{'full img/s':>12}{'fast img/s':>12}{'speed-up':>10}"
          f"{'cores for ' + format(args.target, ',.0f'):>22}{'|diff| mean':>13}{'max':>5}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="itae-decode-") as tmp:
        for spec in args.sizes.split(","):
            w, h = (int(v) for v in spec.lower().split("x"))
            folder = Path(tmp) / spec
            folder.mkdir()
            for i in range(args.images):
                photo(w, h, i).save(folder / f"{i:04d}.jpg", quality=90)
            (folder / "list.txt").write_text("\n".join(f"{i:04d}.jpg" for i in range(args.images)))
            source = ListSource(folder / "list.txt")
            full = ImageDataset(source, transform, uint8=True)
            fast = ImageDataset(source, transform, uint8=True, fast_decode=True)
            r_full, r_fast = rate(full, args.images, args.seconds), rate(fast, args.images, args.seconds)
            diffs = [(full[i][1].int() - fast[i][1].int()).abs() for i in range(args.images)]
            row = {
                "size": spec, "kib": sum(p.stat().st_size for p in folder.glob("*.jpg")) / args.images / 1024,
                "full_img_per_s": r_full, "fast_img_per_s": r_fast,
                "cores_full": args.target / r_full, "cores_fast": args.target / r_fast,
                "diff_mean": float(torch.stack(diffs).float().mean()), "diff_max": int(max(d.max() for d in diffs)),
            }
            rows.append(row)
            print(f"{spec:<11}{row['kib']:>6.0f}{r_full:>12.1f}{r_fast:>12.1f}{r_fast / r_full:>9.2f}x"
                  f"{row['cores_full']:>11.0f} -> {row['cores_fast']:<7.0f}{row['diff_mean']:>13.2f}{row['diff_max']:>5}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
