"""Images per second of the model alone: unmodified, ITAE through hooks, and the fast CLS-only path.

Random weights, DINOv2-shaped models (S/B/L/g at patch 14), random pixels, one process.
Variants (all in the same run, interleaved, median of repeats):
  hf-eager      HF Dinov2Model with eager attention (what editing attention maps in eager mode costs)
  hf-sdpa       HF Dinov2Model with SDPA, weights in the benchmark dtype
  hf-sdpa-autocast  the same with fp32 weights under bf16/fp16 autocast (GPU only): the plain baseline
  hooked        the same model inside itae.attenuate (the general engine), full forward
  fast          itae's CLS-only path without ITAE (same pipeline, no change)
  fast-itae     itae's CLS-only path with ITAE (the published setting)
  *-compiled    the same with every block compiled by torch.compile (regional compilation)
Further ways to compile the ITAE path, each on its own model instance (--extra):
  cudnn         fast-itae-cudnn (uncompiled) and fast-itae-cudnn-compiled (regional): SDPA asked for
                the cuDNN attention kernel first (--profile shows which attention kernel really ran)
  autotune      fast-itae-autotune-compiled: regional, mode="max-autotune-no-cudagraphs" (Triton GEMM
                templates with fused epilogues compete with cuBLAS; compiling takes minutes)
  whole         fast-itae-whole-compiled: the whole forward_cls as one graph (fusion across blocks)
  fp8           fast-itae-fp8-compiled: regional, FP8 matrix products in every block but the last
                (precision "fp8", itae.models.fp8; needs --dtype bf16 and compute capability 8.9+)
--profile VARIANT[,VARIANT...] prints where each one's time goes (matrix products, attention, fused
element-wise kernels, other) and its longest kernels, from torch.profiler over a few batches.

  python benchmarks/bench_engine.py --device cpu --size s --batch 16
  python benchmarks/bench_engine.py --device cuda --size l --batch 256 --dtype bf16 --compile
  python benchmarks/bench_engine.py --device cuda --size l --batch 256 --dtype bf16 --compile \
      --variants hf-sdpa-autocast,hf-sdpa --extra cudnn,autotune,whole --profile fast-itae-compiled
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict

import torch

import itae
from itae import ITAEConfig
from itae.engine.fast import compiled_blocks, forward_cls

SIZES = {  # hidden, layers, heads, mlp hidden (DINOv2 ViT-S/B/L/g at patch 14)
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
    "g": (1536, 40, 24, 6144),  # SwiGLU 2 x 4096 in + 4096 out: the same FLOPs as a 6144 MLP
}


def flops_per_image(size: str, resolution: int, patch: int = 14, registers: int = 0) -> float:
    """Multiply-adds x 2 of the matrix products (projections, attention, MLP, patch embedding)."""
    d, layers, _, mlp = SIZES[size]
    n = (resolution // patch) ** 2
    t = n + 1 + registers
    per_layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * mlp
    return layers * per_layer + 2 * n * 3 * patch * patch * d


def build_hf(size: str, attn: str, dtype: torch.dtype, device: str):
    from transformers import Dinov2Config, Dinov2Model

    d, layers, heads, _ = SIZES[size]
    cfg = Dinov2Config(
        hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
        patch_size=14, image_size=518, use_swiglu_ffn=size == "g",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a ViT-L's init takes seconds on a CPU
        model = Dinov2Model(cfg).eval()
    model.set_attn_implementation(attn)
    return model.to(dtype=dtype)


def build_hub(size: str, dtype: torch.dtype, device: str):
    """The official DINOv2 structure (fused qkv linear), as torch.hub returns it, random weights."""
    from itae.models.dinov2_arch import hub_model

    torch.manual_seed(0)
    with torch.device(device):
        model = hub_model(f"dinov2_vit{size}14").eval()
    return model.to(dtype=dtype)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a large square matrix product: the chip's practical ceiling."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        times.append(_timed(lambda: a @ b, device))
    return 2 * n**3 / statistics.median(times) / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


EXTRA = ("cudnn", "autotune", "whole", "fp8")


def kernel_category(name: str) -> str:
    """Coarse kind of a GPU kernel or CPU operator, from its name."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "nvjet", "cutlass", "scaled_mm", "aten::mm", "aten::addmm", "aten::bmm",
                            "aten::matmul", "aten::linear", "mm_", "sm90_", "sm80_", "wgmma")):
        return "matrix products"
    if "conv" in n:
        return "patch embedding (conv)"
    if any(k in n for k in ("triton", "cpp_fused", "fused", "layer_norm", "gelu", "elementwise", "reduce",
                            "softmax", "aten::add", "aten::mul", "norm")):
        return "element-wise / norms"
    return "other"


def profile_breakdown(fn, device: str, steps: int = 3) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Milliseconds per call by kernel category (GPU kernels on CUDA, operators' own time on CPU), and
    the five longest kernels as (category, name, ms per call)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    totals: dict[str, float] = defaultdict(float)
    kernels: list[tuple[str, str, float]] = []
    for evt in prof.key_averages():
        if device == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            kind = kernel_category(evt.key)
            totals[kind] += us / 1e3 / steps
            kernels.append((kind, evt.key, us / 1e3 / steps))
    top = sorted(kernels, key=lambda k: -k[2])[:5]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])), top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="add torch.compile variants")
    ap.add_argument("--variants", default="hf-eager,hf-sdpa,hooked,fast,fast-itae")
    ap.add_argument("--family", choices=["hf", "hub"], default="hf",
                    help="structure of the model behind the itae variants (hub: fused qkv, as torch.hub loads it)")
    ap.add_argument("--extra", default="", help=f"further compiled ITAE variants: any of {','.join(EXTRA)}")
    ap.add_argument("--profile", default="", help="variants (comma list) whose time to break down by kernel kind")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sdpa_model = build_hf(args.size, "sdpa", dtype, device)
    engine_model = sdpa_model if args.family == "hf" else build_hub(args.size, dtype, device)
    backbone = itae.adapt(engine_model)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device, dtype=dtype)

    # a threshold that flags about 2% of patches on this input, so ITAE really changes rows
    with torch.no_grad():
        diag = itae.detect_artifacts(backbone, x[: min(8, args.batch)], ITAEConfig(source="v", side="low", threshold=1.0))
    v = diag[backbone.num_blocks - 1].norms["v"].flatten()
    cfg = ITAEConfig(source="v", side="low", threshold=float(torch.quantile(v.float(), 0.02)))

    variants: dict[str, callable] = {}
    wanted = args.variants.split(",")
    if "hf-eager" in wanted:
        eager = build_hf(args.size, "eager", dtype, device)
        variants["hf-eager"] = lambda: eager(pixel_values=x).pooler_output
    if "hf-sdpa-autocast" in wanted and device == "cuda" and dtype != torch.float32:
        # what people commonly write: fp32 weights under autocast
        autocast_model = build_hf(args.size, "sdpa", torch.float32, device)
        x32 = x.float()

        def hf_autocast():
            with torch.autocast("cuda", dtype=dtype):
                return autocast_model(pixel_values=x32).pooler_output
        variants["hf-sdpa-autocast"] = hf_autocast
    if "hf-sdpa" in wanted:
        variants["hf-sdpa"] = lambda: sdpa_model(pixel_values=x).pooler_output
    if "hooked" in wanted:
        def hooked():
            with itae.attenuate(sdpa_model, cfg):
                return sdpa_model(pixel_values=x).pooler_output
        variants["hooked"] = hooked
    if "fast" in wanted:
        variants["fast"] = lambda: forward_cls(backbone, x)[0]
    if "fast-itae" in wanted:
        variants["fast-itae"] = lambda: forward_cls(backbone, x, cfg)[0]
    if args.compile:
        # a second instance with its blocks compiled ("regional" compilation: one block's compile time)
        compiled_model = build_hf(args.size, "sdpa", dtype, device)
        compiled_bb = itae.adapt(compiled_model if args.family == "hf" else build_hub(args.size, dtype, device))
        compiled_blocks(compiled_bb).__enter__()  # kept compiled for the rest of this process
        if args.family != "hf":
            compiled_blocks(itae.adapt(compiled_model)).__enter__()
        variants["hf-sdpa-compiled"] = lambda: compiled_model(pixel_values=x).pooler_output
        variants["fast-compiled"] = lambda: forward_cls(compiled_bb, x)[0]
        variants["fast-itae-compiled"] = lambda: forward_cls(compiled_bb, x, cfg)[0]

    extra = [e for e in args.extra.split(",") if e]
    unknown = sorted(set(extra) - set(EXTRA))
    if unknown:
        ap.error(f"unknown --extra {unknown}; choose from {list(EXTRA)}")
    for kind in extra:
        if kind == "cudnn":  # uncompiled too: eager SDPA picks its kernel at run time, under the context
            variants["fast-itae-cudnn"] = _extra_variant("cudnn-eager", args, dtype, device, x, cfg)
        variants[f"fast-itae-{kind}-compiled"] = _extra_variant(kind, args, dtype, device, x, cfg)
    profiled = [v for v in args.profile.split(",") if v]
    missing = [v for v in profiled if v not in variants]
    if missing:
        ap.error(f"--profile {missing} not among the variants run: {list(variants)}")

    times: dict[str, list[float]] = {name: [] for name in variants}
    first_call: dict[str, float] = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            first_call[name] = _timed(fn, device)  # includes compilation for compiled variants
            for _ in range(args.warmup - 1):
                fn()
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            for name, fn in variants.items():
                times[name].append(_timed(fn, device))

    rate = matmul_rate(device, dtype)  # the ceiling in the dtype the model runs in
    flops = flops_per_image(args.size, args.resolution)
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "itae": itae.__version__,
        "size": args.size, "family": args.family, "batch": args.batch, "resolution": args.resolution, "dtype": args.dtype,
        "gflop_per_image": flops / 1e9, "matmul_tflops": rate,
    }
    print(json.dumps(env))
    rows = []
    print(f"{'variant':<30}{'img/s':>10}{'ms/batch':>11}{'TFLOP/s':>10}{'of matmul':>11}{'spread':>9}{'1st call':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        ips = args.batch / med
        tf = ips * flops / 1e12
        rows.append({"variant": name, "img_per_s": ips, "ms_per_batch": 1e3 * med, "tflops": tf,
                     "spread": (max(ts) - min(ts)) / med, "first_call_s": first_call[name]})
        print(f"{name:<30}{ips:>10.1f}{1e3 * med:>11.2f}{tf:>10.2f}{100 * tf / rate:>10.1f}%"
              f"{100 * rows[-1]['spread']:>8.1f}%{first_call[name]:>9.1f}s")
    by = {r["variant"]: r["img_per_s"] for r in rows}
    for base, test in (("hf-sdpa", "hooked"), ("fast", "fast-itae"), ("fast-compiled", "fast-itae-compiled")):
        if base in by and test in by:
            print(f"ITAE overhead {test} vs {base}: {100 * (by[base] / by[test] - 1):+.2f}%")
    for test in [n for n in by if n.startswith("fast-itae-") and n.endswith("compiled")]:
        for base in ("hf-sdpa", "hf-sdpa-autocast"):
            if base in by:
                print(f"{test} vs {base}: {by[test] / by[base]:.2f}x")
    profiles = {}
    for name in profiled:
        try:
            with torch.inference_mode():
                breakdown, top = profile_breakdown(variants[name], device)
        except Exception as e:  # a profiler problem must not lose the timings above
            print(f"profiling {name} failed: {type(e).__name__}: {e}")
            continue
        profiles[name] = {"by_kind_ms": breakdown, "top_kernels": top}
        total = sum(breakdown.values())
        print(f"where {name}'s time goes ({'GPU kernels' if device == 'cuda' else 'CPU operators'},"
              f" ms per batch of {args.batch}):")
        for kind, ms in breakdown.items():
            print(f"  {kind:<26}{ms:>9.2f} ms {100 * ms / total:>6.1f}%")
        for kind, kernel, ms in top:
            print(f"    {ms:>8.2f} ms  {kind:<22} {kernel[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "profiles": profiles}, f, indent=1)


def _extra_variant(kind: str, args, dtype: torch.dtype, device: str, x: torch.Tensor, cfg: ITAEConfig):
    """One more compiled ITAE variant on its own model instance (compiled state is per module)."""
    model = build_hf(args.size, "sdpa", dtype, device) if args.family == "hf" else build_hub(args.size, dtype, device)
    bb = itae.adapt(model)
    if kind == "whole":
        whole = torch.compile(forward_cls)
        return lambda: whole(bb, x, cfg)[0]
    if kind == "fp8":
        from itae.models.fp8 import quantize_fp8

        if dtype != torch.bfloat16:
            raise SystemExit("--extra fp8 needs --dtype bf16")
        bb = quantize_fp8(bb)
        compiled_blocks(bb).__enter__()
        return lambda: forward_cls(bb, x, cfg)[0]
    if kind == "autotune":
        compiled_blocks(bb, mode="max-autotune-no-cudagraphs").__enter__()
        return lambda: forward_cls(bb, x, cfg)[0]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kind == "cudnn":
        compiled_blocks(bb).__enter__()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def cudnn_first():
        try:
            context = sdpa_kernel(order, set_priority=True)
        except TypeError:  # torch without set_priority: cuDNN only
            context = sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        with context:
            return forward_cls(bb, x, cfg)[0]
    return cudnn_first


if __name__ == "__main__":
    main()
