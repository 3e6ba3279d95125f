"""The planted-artifact demo models: deterministic, sinks where planted, ITAE undoes them."""

from __future__ import annotations

import pytest
import torch

import itae
from itae.models.demo import (
    DEMO_MODELS,
    IMAGE_SIZE,
    SINK_POSITIONS,
    demo_backbone,
    demo_model,
    is_demo_name,
    load_demo,
)


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) normalised images: smooth colour fields with a textured square, different per image."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(base, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    for i in range(n):
        r, c = torch.randint(4, 20, (2,), generator=g).tolist()
        x[i, :, r : r + 10, c : c + 10] += 0.8 * torch.randn(3, 10, 10, generator=g)
    return x


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def test_names_and_loading_errors():
    assert all(is_demo_name(n) for n in DEMO_MODELS)
    assert not is_demo_name("facebook/dinov2-base")
    backbone = load_demo("demo:planted")
    assert backbone.name == "demo:planted"
    assert backbone.preprocess.image_size == IMAGE_SIZE and backbone.patch_size == 4
    with pytest.raises(ValueError, match="unknown demo model"):
        load_demo("demo:nope")
    with pytest.raises(ValueError, match="32 x 32"):
        load_demo("demo:clean", resolution=224)
    with pytest.raises(ValueError, match="kind"):
        demo_model("dirty")
    with pytest.raises(ValueError, match="sink_positions"):
        demo_model("planted", sink_positions=[64])


def test_deterministic_and_variants_share_the_random_features():
    a, b = demo_model("planted", seed=3), demo_model("planted", seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    clean, other_seed = demo_model("clean", seed=3), demo_model("clean", seed=4)
    assert torch.equal(clean.patch_embed.proj.weight, a.patch_embed.proj.weight)
    assert not torch.equal(clean.patch_embed.proj.weight, other_seed.patch_embed.proj.weight)


def test_planted_sinks_hold_the_cls_attention_and_have_low_value_norm():
    x = _images()
    diag = itae.detect_artifacts(demo_backbone("planted"), x, itae.ITAEConfig(source="v", side="low", threshold=1.0))[1]
    cls_to_patches = diag.cls_attention[:, :, diag.num_prefix_tokens :].mean(dim=1)  # (B, N)
    sinks = list(SINK_POSITIONS)
    assert (cls_to_patches[:, sinks].sum(dim=1) > 0.9).all()
    v = diag.norms["v"]
    others = [i for i in range(v.shape[1]) if i not in sinks]
    assert v[:, sinks].max() < 0.5 * v[:, others].min()
    # the clean model has no sinks: its CLS row spreads over the patches
    clean = itae.detect_artifacts(demo_backbone("clean"), x, itae.ITAEConfig(source="v", side="low", threshold=1.0))[1]
    assert clean.cls_attention[:, :, clean.num_prefix_tokens :].mean(dim=1).max() < 0.1


def test_calibration_flags_exactly_the_sinks_and_itae_restores_the_clean_embedding():
    x = _images(32)
    planted, clean = demo_backbone("planted"), demo_backbone("clean")
    cal = itae.calibrate(planted, x, itae.ITAEConfig())
    with torch.no_grad(), itae.attenuate(planted, cal.config) as state:
        engineered = planted.forward_features(x).cls
    mask = state.last[1].artifact_mask
    expected = torch.zeros_like(mask)
    expected[:, list(SINK_POSITIONS)] = True
    assert torch.equal(mask, expected)
    with torch.no_grad():
        reference = clean.forward_features(x).cls
        broken = planted.forward_features(x).cls
    # the sinks pull the embedding away from the clean one; ITAE brings it back
    assert _cos(engineered, reference).min() > 0.95
    assert _cos(broken, reference).mean() < _cos(engineered, reference).mean() - 0.2
    # nothing to flag in the clean model
    assert not any(itae.calibrate(clean, x, itae.ITAEConfig()).bimodal.values())


def test_registers_take_the_sink_role():
    x = _images(8)
    backbone = demo_backbone("registers")
    assert backbone.num_register_tokens == 2
    diag = itae.detect_artifacts(backbone, x, itae.ITAEConfig(source="v", side="low", threshold=1e-6))[1]
    to_registers = diag.cls_attention[:, :, 1 : diag.num_prefix_tokens].sum(dim=-1).mean(dim=1)
    assert (to_registers > 0.5).all()
    with torch.no_grad():
        cls = backbone.forward_features(x).cls
        clean = demo_backbone("clean").forward_features(x).cls
    # registers hand the CLS token a constant: image-to-image differences are the clean model's
    centred = _cos(cls - cls.mean(0), clean - clean.mean(0))
    assert centred.min() > 0.9
