"""FP8 matrix products (precision "fp8"): the layer's arithmetic, what quantize_fp8 replaces and keeps,
the engine's exactness on a quantized model, and the extraction records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import itae
from itae import ITAEConfig
from itae.engine.fast import forward_cls
from itae.models import adapt
from itae.models.fp8 import E4M3, Float8Linear, is_fp8, quantize_fp8

from .conftest import FAMILIES, FAMILY_IDS, build_tiny


def _linear(k: int = 64, n: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n).to(torch.bfloat16)


def test_float8_linear_is_the_product_of_its_quantized_operands():
    lin = _linear()
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16) * torch.logspace(-2, 2, 7).view(1, 7, 1).bfloat16()
    y = f8(x)
    assert y.shape == (5, 7, 48) and y.dtype == torch.bfloat16
    # the same arithmetic by hand: per-token input scales (the input scaled in its own bf16, as the layer
    # does), per-output weight scales, then the products in float64
    x2 = x.reshape(-1, 64)
    x_scale = x2.abs().amax(dim=1, keepdim=True).float() / 448.0
    xq = (x2 * (1.0 / x_scale).bfloat16()).to(E4M3).double() * x_scale.double()
    wq = f8.weight_fp8.double() * f8.weight_scale.double().t()
    ref = (xq @ wq.t() + lin.bias.double()).reshape(5, 7, 48)
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    # and close to the bf16 layer itself: e4m3 keeps about 2 significant digits per operand
    exact = lin(x).double()
    rel = (y.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert rel.max() < 0.08, rel.max()
    # tokens 10,000x apart in size each keep their own scale: no token is crushed to zero
    assert (y.double().norm(dim=-1) > 0.5 * exact.norm(dim=-1)).all()


def test_float8_linear_survives_module_dtype_and_device_moves():
    f8 = Float8Linear.from_linear(_linear())
    bits = f8.weight_bits.clone()
    f8.to(torch.float32)
    f8.to(torch.bfloat16)
    assert torch.equal(f8.weight_bits, bits) and f8.weight_bits.dtype == torch.uint8
    assert f8.weight_fp8.dtype == E4M3
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.isfinite(f8(x)).all()


def test_float8_linear_refuses_sizes_fp8_products_cannot_take():
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear.from_linear(nn.Linear(40, 48))


@pytest.mark.parametrize("family, registers, attn", FAMILIES, ids=FAMILY_IDS)
def test_quantize_replaces_every_linear_but_the_last_blocks(family, registers, attn):
    bb = adapt(build_tiny(family, registers, attn).to(torch.bfloat16))
    linears_per_block = sum(type(m) is nn.Linear for m in bb.blocks[0].modules())
    q = quantize_fp8(bb)
    assert is_fp8(q)
    for block in q.blocks[:-1]:
        assert sum(isinstance(m, Float8Linear) for m in block.modules()) == linears_per_block
        assert not any(type(m) is nn.Linear for m in block.modules())
    assert not any(isinstance(m, Float8Linear) for m in q.blocks[-1].modules())
    # the new description points at the new modules (hooks land on what runs)
    for site, block in zip(q.sites[:-1], q.blocks[:-1], strict=True):
        proj = site.qkv if site.qkv is not None else site.q
        assert isinstance(proj, Float8Linear) and any(m is proj for m in block.modules())
    assert quantize_fp8(q) is q  # nothing left to replace


@pytest.mark.parametrize("family", ["hf", "timm", "hub"])
def test_the_engine_is_exact_on_a_quantized_model(family, images):
    """ITAE on an FP8 model: the fast CLS path equals the hooked full forward on that same model, and
    the plain quantized model stays within FP8 error of the bf16 one."""
    bb = quantize_fp8(adapt(build_tiny(family).to(torch.bfloat16)))
    x = images.bfloat16()
    with torch.no_grad():
        plain = bb.forward_features(x).cls.float()
        norms = itae.detect_artifacts(bb, x, ITAEConfig(source="v", side="low", threshold=1.0))[bb.num_blocks - 1].norms["v"]
        cfg = ITAEConfig(source="v", side="low", threshold=float(torch.quantile(norms.float().flatten(), 0.2)))
        fast, mask = forward_cls(bb, x, cfg)
        with itae.attenuate(bb, cfg) as state:
            hooked = bb.forward_features(x).cls.float()
    assert mask.any() and torch.equal(mask, state.last[bb.num_blocks - 1].artifact_mask)
    torch.testing.assert_close(fast.float(), hooked, rtol=0.02, atol=0.02)
    assert not torch.allclose(hooked, plain, atol=1e-3)  # ITAE did change the output
    ref = adapt(build_tiny(family).to(torch.bfloat16))
    with torch.no_grad():
        bf16 = ref.forward_features(x).cls.float()
    rel = (plain - bf16).norm(dim=1) / bf16.norm(dim=1)
    assert rel.max() < 0.15, rel


def _image_folder(folder, n: int, seed: int):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


EMBED = dict(itae=None, batch_size=4, num_workers=0, resolution=56, progress=False, device="cpu")


def test_fp8_extraction_is_recorded_and_needs_a_bf16_capable_setting(tmp_path):
    folder = _image_folder(tmp_path / "imgs", 6, seed=0)
    model = build_tiny("hf")
    fp8 = itae.embed(folder, model, out=tmp_path / "fp8", precision="fp8", **EMBED)
    assert fp8.manifest["precision"] == "fp8" and is_fp8(adapt(model))  # the instance was quantized in place
    bf16 = itae.embed(folder, build_tiny("hf"), out=tmp_path / "bf16", precision="bf16", **EMBED)
    a, b = np.asarray(fp8.embeddings()), np.asarray(bf16.embeddings())
    assert not np.array_equal(a, b)
    assert (np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max() < 0.15
    with pytest.raises(ValueError, match="bf16 model"):
        quantize_fp8(adapt(build_tiny("hf")))  # still fp32


def test_the_same_instance_embedded_twice_in_fp8_gives_the_same_embeddings(tmp_path):
    # The second run casts the already quantized instance to bf16 again: that cast must leave the FP8
    # linears (their float32 scales) as they are.
    folder = _image_folder(tmp_path / "imgs", 5, seed=1)
    common = dict(EMBED, precision="fp8")
    model = build_tiny("hf")
    first = np.asarray(itae.embed(folder, model, out=tmp_path / "a", **common).embeddings())
    scales = [m.weight_scale.dtype for m in model.modules() if isinstance(m, Float8Linear)]
    second = np.asarray(itae.embed(folder, model, out=tmp_path / "b", **common).embeddings())
    assert scales and set(scales) == {torch.float32}
    assert [m.weight_scale.dtype for m in model.modules() if isinstance(m, Float8Linear)] == scales
    np.testing.assert_array_equal(first, second)
