"""Tiny random-weight models in the three families, and the adapters' view of them."""

from __future__ import annotations

import json

import pytest
import torch

from itae.models import adapt

from .helpers.tiny import FAMILIES, save_tiny, tiny_model


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapt_recognises_tiny_models(family, registers):
    model = tiny_model(family, registers=registers)
    backbone = adapt(model)
    assert backbone.family == family
    assert backbone.num_register_tokens == registers and backbone.num_prefix_tokens == 1 + registers
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_heads, backbone.num_blocks) == (14, 32, 4, 2)
    assert len(backbone.sites) == 2 and backbone.sites[-1].head_dim == 8
    with torch.no_grad():
        feats = backbone.forward_features(_images(2, 56))
    assert feats.cls.shape == (2, 32)
    assert feats.patches.shape == (2, 16, 32)
    assert feats.registers is not None and feats.registers.shape == (2, registers, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_run_at_the_preprocess_resolution(family):
    backbone = adapt(tiny_model(family, registers=1))
    size = backbone.preprocess.image_size
    with torch.no_grad():
        feats = backbone.forward_features(_images(1, size))
    assert feats.patches.shape == (1, (size // 14) ** 2, 32)


@pytest.mark.parametrize("registers", [0, 3])
def test_the_three_families_compute_the_same_function(registers):
    x = _images(2, 56)
    with torch.no_grad():
        feats = {f: adapt(tiny_model(f, registers=registers, seed=5)).forward_features(x) for f in FAMILIES}
    for family in ("hf", "timm"):
        assert torch.allclose(feats[family].cls, feats["hub"].cls, atol=1e-5)
        assert torch.allclose(feats[family].patches, feats["hub"].patches, atol=1e-5)
        assert torch.allclose(feats[family].registers, feats["hub"].registers, atol=1e-5)


def test_register_models_interpolate_alike_in_all_families():
    """With registers every family resamples position embeddings by size with antialiasing (as the
    official *_reg models do), so they agree away from the native size too."""
    x = _images(1, 112)
    with torch.no_grad():
        cls = {f: adapt(tiny_model(f, registers=4)).forward_features(x).cls for f in FAMILIES}
    assert torch.allclose(cls["hf"], cls["hub"], atol=1e-5)
    assert torch.allclose(cls["timm"], cls["hub"], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_for_a_seed_and_eval_mode(family):
    state_before = torch.random.get_rng_state()
    a, b, c = tiny_model(family, seed=1), tiny_model(family, seed=1), tiny_model(family, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the caller's stream is untouched
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_sizes_are_configurable():
    model = tiny_model("hub", depth=3, embed_dim=48, num_heads=6, img_size=28, registers=2)
    backbone = adapt(model)
    assert (backbone.num_blocks, backbone.embed_dim, backbone.num_heads) == (3, 48, 6)
    assert model.pos_embed.shape == (1, 1 + 4, 48)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="family"):
        tiny_model("onnx")
    with pytest.raises(ValueError, match="divisible"):
        tiny_model("hub", embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_model("hub", img_size=50)


def test_save_tiny_layouts(tmp_path):
    hf = save_tiny("hf", tmp_path / "hf", registers=4)
    assert (hf / "config.json").is_file()
    assert json.loads((hf / "config.json").read_text())["model_type"] == "dinov2_with_registers"

    st = save_tiny("timm", tmp_path / "t.safetensors", registers=4)
    from safetensors import safe_open

    with safe_open(str(st), framework="pt") as f:
        spec = json.loads(f.metadata()["itae"])
    assert spec["family"] == "timm" and spec["arch"] == "vit_small_patch14_reg4_dinov2"
    assert spec["model_kwargs"]["reg_tokens"] == 4

    pth = save_tiny("hub", tmp_path / "h.pth")
    sidecar = json.loads((tmp_path / "h.pth.json").read_text())
    assert sidecar["family"] == "hub" and sidecar["model_kwargs"]["embed_dim"] == 32
    assert set(torch.load(pth, weights_only=True)) == set(tiny_model("hub").state_dict())

    with pytest.raises(ValueError, match=".safetensors or .pth"):
        save_tiny("hub", tmp_path / "h.onnx")
