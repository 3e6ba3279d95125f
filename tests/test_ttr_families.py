"""Test-time registers on the ViT families beyond DINOv2 (DINOv3 in HF and timm, CLIP, OpenCLIP, SigLIP,
SigLIP2, DeiT-III), on tiny random-weight models (64 px, 16 px patches)."""

from __future__ import annotations

import copy

import pytest
import torch

import itae

from .helpers.tiny import TINY_KINDS, tiny_vit
from .test_ttr import (
    NEURONS,
    _features,
    _folder,
    check_batch_equals_single_images,
    check_mlp_sites,
    check_no_neurons_changes_nothing,
    cls_under,
)

RES = 64


@pytest.fixture(params=TINY_KINDS)
def kind(request):
    return request.param


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _gated_hf_dinov3():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = DINOv3ViTConfig(num_register_tokens=4, layerscale_value=1.0, use_gated_mlp=True, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                              patch_size=16)
        return DINOv3ViTModel(cfg).eval()


def _hooks(model):
    return [(n, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()]


def test_every_family_describes_its_mlps(kind):
    models = [tiny_vit(kind)] + ([_gated_hf_dinov3()] if kind == "hf-dinov3" else [])
    for model in models:
        check_mlp_sites(itae.adapt(model))


def test_no_neurons_leaves_every_family_unchanged(kind, pixels):
    check_no_neurons_changes_nothing(itae.adapt(tiny_vit(kind)), pixels)


def test_every_family_batch_equals_single_images_and_is_restored(kind, pixels):
    model = tiny_vit(kind)
    backbone = itae.adapt(model)
    before = _hooks(model)
    attrs = {n: m.__dict__.get("num_prefix_tokens") for n, m in model.named_modules()}
    plain = _features(backbone, pixels)
    batch = check_batch_equals_single_images(backbone, pixels, NEURONS)
    for whole, unmodified in zip(batch, plain, strict=True):
        assert whole.shape == unmodified.shape  # same tokens, same positions as the unmodified model
    assert not torch.allclose(batch[0], plain[0], atol=1e-4)  # it did something
    assert _hooks(model) == before
    assert {n: m.__dict__.get("num_prefix_tokens") for n, m in model.named_modules()} == attrs
    for g, p in zip(_features(backbone, pixels), plain, strict=True):
        torch.testing.assert_close(g, p, rtol=0, atol=0)


def _one_more_register(model, kind):
    """The same weights with one more trained register, set to zero: what the extra token is at the input."""
    if kind == "hf-dinov3":
        from transformers import DINOv3ViTModel

        cfg = copy.deepcopy(model.config)
        cfg.num_register_tokens += 1
        bigger, key = DINOv3ViTModel(cfg), "embeddings.register_tokens"
    else:
        import timm

        arch = {"timm-dinov3": "vit_small_patch16_dinov3", "timm-deit3": "deit3_small_patch16_224"}[kind]
        registers = itae.adapt(model).num_register_tokens + 1
        extra = {"num_reg_tokens": registers} if kind == "timm-dinov3" else {"reg_tokens": registers}
        bigger = timm.create_model(arch, pretrained=False, img_size=64, embed_dim=32, depth=2, num_heads=4,
                                   init_values=1.0, num_classes=0, **extra)
        key = "reg_token"
    state = model.state_dict()
    old = state.get(key, torch.zeros(1, 0, 32))
    state[key] = torch.cat([old, torch.zeros(1, 1, old.shape[-1])], dim=1)
    bigger.load_state_dict(state, strict=True)
    return bigger.eval()


@pytest.mark.parametrize("kind", ["hf-dinov3", "hf-dinov3-gated", "timm-dinov3", "timm-deit3"])
def test_the_extra_token_shifts_no_patch_position(kind, pixels):
    """The extra token is a zero prefix token, so with neurons whose moves change nothing (their output
    weights are zero) the model must equal the same weights with one more zero register, run plainly: under
    rotary embeddings (DINOv3) every patch keeps its own rotation and the extra token gets none."""
    model = _gated_hf_dinov3() if kind == "hf-dinov3-gated" else tiny_vit(kind)
    kind = kind.removesuffix("-gated")
    backbone = itae.adapt(model)
    with torch.no_grad():
        for b, n in NEURONS:
            backbone.mlp_sites[b].out_proj.weight[:, n] = 0  # inert neurons
    reference = itae.adapt(_one_more_register(model, kind))
    assert reference.num_register_tokens == backbone.num_register_tokens + 1
    want_cls, want_patches, want_registers = _features(reference, pixels)
    for x in (pixels, pixels[1:2]):
        with itae.test_time_registers(backbone, itae.TTRConfig(neurons=NEURONS)):
            cls, patches, registers = _features(backbone, x)
        rows = slice(0, 3) if len(x) == 3 else slice(1, 2)
        torch.testing.assert_close(cls, want_cls[rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(patches, want_patches[rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(registers, want_registers[rows, :-1], rtol=0, atol=1e-6)
    # and the extra token matters: the unmodified model differs
    assert not torch.allclose(_features(backbone, pixels)[1], want_patches, atol=1e-4)


@pytest.mark.parametrize("kind", ["hf-siglip", "hf-siglip2"])
def test_siglip_pools_without_the_extra_token(kind, pixels):
    """SigLIP has no CLS token: the extra token goes in front of the patches through the encoder, and is
    taken out before the final norm, so the pooling probe attends to the patches only."""
    backbone = itae.adapt(tiny_vit(kind))
    keys = []
    handle = backbone.probe.attention.register_forward_pre_hook(
        lambda _m, args, kwargs: keys.append(kwargs.get("key", args[1] if len(args) > 1 else None).shape[1]),
        with_kwargs=True)
    try:
        with itae.test_time_registers(backbone, itae.TTRConfig(neurons=NEURONS)) as state:
            assert state.backbone.num_prefix_tokens == 1  # the extra token, during the blocks
            _features(backbone, pixels)
            with itae.attenuate(state.backbone, itae.ITAEConfig(source="v", side="low", threshold=1e9)) as run:
                _features(backbone, pixels)
            assert run.last[backbone.num_blocks - 1].artifact_mask.shape == (3, 16)
    finally:
        handle.remove()
    assert keys == [16, 16]


def test_siglip2_eager_attention_mask_covers_the_extra_token(pixels):
    model = tiny_vit("hf-siglip2")
    backbone = itae.adapt(model)
    cfg = itae.TTRConfig(neurons=NEURONS)
    with itae.test_time_registers(backbone, cfg):
        sdpa = _features(backbone, pixels)
    model.set_attn_implementation("eager")
    with itae.test_time_registers(backbone, cfg):
        eager = _features(backbone, pixels)
        # a padded batch: the extra token's activation would be a maximum over padding, so it is refused
        patches = itae.models.families.patchify(pixels, 16)
        mask = torch.ones(patches.shape[:2], dtype=torch.long)
        mask[0, -3:] = 0
        spatial = torch.tensor([[4, 4]] * 3)
        with pytest.raises(RuntimeError, match="padded"):
            model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial)
    for e, s in zip(eager, sdpa, strict=True):
        torch.testing.assert_close(e, s, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ through itae.embed


COMMON = dict(batch_size=4, num_workers=0, resolution=RES, progress=False, device="cpu", chunk_size=4,
              calibration_images=6)
# every patch token of block 0 is an outlier (a tiny threshold): the search always finds neurons on random weights
SEARCH = itae.TTRConfig(outlier_layer=0, norm_threshold=1e-6, max_layer=0, top_k=3)


@pytest.mark.parametrize("method", ["ttr", "itae+ttr"])
def test_ttr_runs_end_to_end_on_every_family(kind, method, tmp_path):
    from itae.data.decode import build_transform, load_rgb

    root = _folder(tmp_path / "imgs", count=6, shape=(70, 80))
    backbone = itae.adapt(tiny_vit(kind))
    cfg = itae.ITAEConfig(source="v", side="low", threshold=0.5)
    store = itae.embed(root, backbone, out=tmp_path / "out", method=method, itae=cfg, ttr=SEARCH, **COMMON)
    assert store.method == method
    neurons = store.ttr_config.neurons
    assert len(neurons) == 3 and all(b == 0 for b, _ in neurons)
    assert store.manifest["ttr_search"]["check"]["num_neurons"] == 3
    t = build_transform(backbone.preprocess.with_resolution(RES))
    x = torch.stack([t(load_rgb(root / i)) for i in store.ids])
    ref = cls_under(backbone, x, store.ttr_config, cfg if method == "itae+ttr" else None)
    torch.testing.assert_close(torch.from_numpy(store.embeddings(mmap=False)), ref, rtol=1e-4, atol=1e-5)
    plain = backbone.forward_features(x).cls.detach()
    assert not torch.allclose(ref, plain, atol=1e-4)
