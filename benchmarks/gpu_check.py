"""Correctness on an accelerator: the fast paths against the naive reference, in fp32 and bf16.

For DINOv2-shaped random-weight models: the hooked model (attenuate) and the fast CLS-only path
against a float64 replay with the naive reference attention, on fresh random inputs, as
||out - ref|| / ||ref||. Prints one line per check; exits non-zero when a check fails.
Then what precision "fp8" changes (FP8 matrix products in every block but the last; GPUs of compute
capability 8.9+): the CLS embedding against the fp32 model's, next to bf16's, and whether the two
flag the same patches. Reported, not pass/fail: it is an approximation by design.

  python benchmarks/gpu_check.py --size l --device cuda
  python benchmarks/gpu_check.py --size s --device cpu --batch 4     (slowly, the same checks on a CPU)
"""

from __future__ import annotations

import argparse
import sys

import torch

import itae
from itae import ITAEConfig
from itae.engine.fast import forward_cls
from itae.engine.functional import reference_attention, split_heads

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def reference_cls(backbone, x: torch.Tensor, cfg: ITAEConfig) -> torch.Tensor:
    """float64 CPU replay of the last block for the CLS token, with the naive reference attention."""
    h = {}
    handle = backbone.blocks[-1].register_forward_pre_hook(lambda _m, a: h.update(x=a[0]))
    try:
        with torch.no_grad():
            backbone.forward_features(x)
    finally:
        handle.remove()
    site, parts = backbone.sites[-1], backbone.parts[-1]
    tok = h["x"].double().cpu()

    def lin(m, t):
        return t @ m.weight.double().cpu().T + m.bias.double().cpu()

    def ln(m, t):
        return torch.nn.functional.layer_norm(t, m.normalized_shape, m.weight.double().cpu(), m.bias.double().cpu(), m.eps)

    z = ln(parts.norm1, tok)
    q, k, v = lin(site.q, z), lin(site.k, z), lin(site.v, z)
    p = backbone.num_prefix_tokens
    src = {"q": q, "k": k, "v": v}[cfg.source][:, p:].norm(dim=-1)
    mask = src <= cfg.threshold_for(0)
    att = reference_attention(*(split_heads(t, site.num_heads) for t in (q, k, v)), mask, num_prefix=p)
    ctx = att[:, :, :1].transpose(1, 2).reshape(tok.shape[0], -1)
    out = tok[:, 0] + lin(site.out_proj, ctx) * parts.ls1.lambda1.double().cpu()
    mlp = parts.mlp
    hidden = torch.nn.functional.gelu(lin(mlp.fc1, ln(parts.norm2, out)))
    out = out + lin(mlp.fc2, hidden) * parts.ls2.lambda1.double().cpu()
    final = backbone.final_norm
    return ln(final, out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="l", choices=["s", "b", "l"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from bench_engine import build_hf

    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        model = build_hf(args.size, "sdpa", dtype, args.device)
        backbone = itae.adapt(model)
        g = torch.Generator(device="cpu").manual_seed(int(dtype == torch.bfloat16))
        x = torch.randn(args.batch, 3, 224, 224, generator=g).to(args.device, dtype)
        with torch.no_grad():
            diag = itae.detect_artifacts(model, x, ITAEConfig(source="v", side="low", threshold=1.0))[backbone.num_blocks - 1]
        cfg = ITAEConfig(source="v", side="low", threshold=float(torch.quantile(diag.norms["v"].float().flatten(), 0.05)))
        ref = reference_cls(backbone, x, cfg)
        with torch.no_grad(), itae.attenuate(model, cfg) as state:
            hooked = backbone.forward_features(x).cls
        with torch.no_grad():
            fast, mask = forward_cls(backbone, x, cfg)
            plain = backbone.forward_features(x).cls
        flagged = float(state.last[backbone.num_blocks - 1].artifact_mask.float().mean())
        for name, out in (("hooked", hooked), ("fast", fast)):
            err = rel(out.cpu(), ref.to(out.dtype).cpu())
            ok = err < TOLERANCE[dtype] and torch.isfinite(out).all()
            failures += not ok
            print(f"{str(dtype):<16}{name:<8} rel err vs float64 reference {err:.2e} "
                  f"(flagged {100 * flagged:.1f}%, change vs plain {rel(out.cpu(), plain.cpu()):.2e}) {'ok' if ok else 'FAIL'}")
        same_mask = torch.equal(mask.cpu(), state.last[backbone.num_blocks - 1].artifact_mask.cpu())
        failures += not same_mask
        print(f"{str(dtype):<16}masks of fast and hooked paths equal: {same_mask}")
    if args.device == "cpu" or (args.device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)):
        failures += fp8_report(args)
    return 1 if failures else 0


@torch.no_grad()
def fp8_report(args) -> int:
    """CLS embeddings of the same weights in fp32, bf16 and fp8; the fast ITAE path's masks in bf16/fp8."""
    from bench_engine import build_hf

    from itae.models.fp8 import quantize_fp8

    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(args.batch, 3, 224, 224, generator=g).to(args.device)
    fp32 = itae.adapt(build_hf(args.size, "sdpa", torch.float32, args.device))
    ref = forward_cls(fp32, x)[0].double()
    del fp32
    bf16 = itae.adapt(build_hf(args.size, "sdpa", torch.bfloat16, args.device))
    fp8 = quantize_fp8(itae.adapt(build_hf(args.size, "sdpa", torch.bfloat16, args.device)))
    xb = x.bfloat16()
    diag = itae.detect_artifacts(bf16, xb, ITAEConfig(source="v", side="low", threshold=1.0))[bf16.num_blocks - 1]
    cfg = ITAEConfig(source="v", side="low", threshold=float(torch.quantile(diag.norms["v"].float().flatten(), 0.05)))
    failures = 0
    masks = {}
    for name, bb in (("bf16", bf16), ("fp8", fp8)):
        out = forward_cls(bb, xb)[0].double()
        err = (out - ref).norm(dim=1) / ref.norm(dim=1)
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
        itae_out, masks[name] = forward_cls(bb, xb, cfg)
        finite = bool(torch.isfinite(out).all() and torch.isfinite(itae_out).all())
        failures += not finite
        print(f"{name:<6} CLS vs fp32: rel err mean {err.mean():.2e} max {err.max():.2e}, cosine min {cos.min():.5f}"
              f"{'' if finite else ' NON-FINITE'}")
    agree = float((masks["fp8"] == masks["bf16"]).float().mean())
    print(f"fp8 flags the same patches as bf16 for {100 * agree:.2f}% of patches "
          f"(bf16 flags {100 * float(masks['bf16'].float().mean()):.1f}%)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
