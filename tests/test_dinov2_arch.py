"""The official DINOv2 architecture written in itae.models.dinov2_arch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itae.models import dinov2_arch as d


def _tiny(registers: int = 0, img_size: int = 56, depth: int = 2, seed: int = 0) -> d.DinoVisionTransformer:
    torch.manual_seed(seed)
    return d.build_dinov2(arch="vit_small", depth=depth, embed_dim=32, num_heads=4, img_size=img_size,
                          num_register_tokens=registers)


def _images(b: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w or h, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- official naming

# ViT-S/14 as the hub builds it (518 px, 37 x 37 patches, 384 wide, 6 heads, MLP 4x, layer scale),
# written out from the upstream module definitions.
def _vits14_expected(registers: int) -> dict[str, tuple[int, ...]]:
    dim, hidden = 384, 1536
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + 37 * 37, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if registers:
        keys["register_tokens"] = (1, registers, dim)
    for i in range(12):
        p = f"blocks.{i}."
        keys.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "ls1.gamma": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,),
            p + "ls2.gamma": (dim,),
        })
    return keys


@pytest.mark.parametrize("name,registers", [("dinov2_vits14", 0), ("dinov2_vits14_reg", 4)])
def test_vits14_state_dict_has_the_official_names_and_shapes(name, registers):
    with torch.device("meta"):  # no memory, no init cost
        model = d.hub_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _vits14_expected(registers)


@pytest.mark.parametrize("name", ["dinov2_vitb14", "dinov2_vitg14", "dinov2_vitl14_reg"])
def test_state_dict_converts_to_timm_like_an_official_checkpoint(name):
    """timm ships its own converter for the official checkpoints; our keys must go through it exactly."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn

    size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[name[len("dinov2_vit")]]
    timm_name = f"vit_{size}_patch14{'_reg4' if name.endswith('_reg') else ''}_dinov2"
    with torch.device("meta"):
        ours = d.hub_model(name)
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=0)
    converted = {k: tuple(v.shape) for k, v in checkpoint_filter_fn(dict(ours.state_dict()), theirs).items()}
    assert converted == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_giant_uses_swiglu_with_the_official_hidden_width():
    with torch.device("meta"):
        model = d.dinov2_vitg14()
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, d.SwiGLUFFNFused)
    assert tuple(mlp.w12.weight.shape) == (2 * 4096, 1536) and tuple(mlp.w3.weight.shape) == (1536, 4096)
    assert model.n_blocks == 40 and model.num_heads == 24 and len(model.blocks) == 40


def test_checkpoint_file_names_follow_the_hub():
    assert d.checkpoint_filename("dinov2_vitb14") == "dinov2_vitb14_pretrain.pth"
    assert d.checkpoint_filename("dinov2_vitg14_reg") == "dinov2_vitg14_reg4_pretrain.pth"
    assert d.checkpoint_url("dinov2_vits14_reg").endswith("/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth")
    with pytest.raises(ValueError, match="unknown DINOv2 hub model"):
        d.checkpoint_filename("dinov2_vitx14")


# ------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("registers", [0, 4])
def test_forward_features_shapes_and_forward_is_the_cls_token(registers):
    model = _tiny(registers)
    x = _images(2, 56)
    with torch.no_grad():
        out = model.forward_features(x)
        cls = model(x)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, 32)
    assert out["x_norm_regtokens"].shape == (2, registers, 32)
    assert out["x_norm_patchtokens"].shape == (2, 16, 32)
    assert out["x_prenorm"].shape == (2, 1 + registers + 16, 32)
    assert torch.equal(cls, out["x_norm_clstoken"])
    assert torch.allclose(model.norm(out["x_prenorm"])[:, 0], cls)
    assert model.num_register_tokens == registers and model.patch_size == 14 and model.n_blocks == 2


def test_register_tokens_enter_after_the_cls_token_without_position_embedding():
    model = _tiny(registers=3)
    assert model.register_tokens.shape == (1, 3, 32)
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(_images(2, 56))
    assert tokens.shape == (2, 1 + 3 + 16, 32)
    assert torch.equal(tokens[:, 1:4], model.register_tokens.expand(2, -1, -1))
    assert torch.equal(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))


def test_sdpa_attention_equals_the_explicit_softmax_reference():
    model = _tiny(registers=2)
    attn = model.blocks[0].attn
    assert isinstance(attn, d.MemEffAttention)
    with torch.no_grad():
        attn.qkv.weight.normal_(0, 0.5)  # sharper attention than the init, so a mistake would show
        x = torch.randn(2, 21, 32)
        fast = attn(x)
        reference = d.Attention.forward(attn, x)
    assert torch.allclose(fast, reference, atol=1e-5)


def test_attention_hooks_see_qkv_output_and_the_merged_heads_at_proj():
    model = _tiny()
    attn = model.blocks[-1].attn
    seen = {}
    h1 = attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))
    h2 = attn.proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("proj_in", i[0]))
    try:
        with torch.no_grad():
            model(_images(1, 56))
    finally:
        h1.remove()
        h2.remove()
    assert seen["qkv"].shape == (1, 17, 96)
    assert seen["proj_in"].shape == (1, 17, 32)
    # the proj input is softmax(q k^T / sqrt(d)) v with heads merged: recompute it from the hooked qkv
    q, k, v = seen["qkv"].reshape(1, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    context = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    assert torch.allclose(context.transpose(1, 2).reshape(1, 17, 32), seen["proj_in"], atol=1e-5)


def test_masks_replace_patch_tokens_with_the_mask_token():
    model = _tiny()
    with torch.no_grad():
        model.mask_token.normal_()
        masks = torch.zeros(1, 16, dtype=torch.bool)
        masks[0, 3] = True
        plain = model.prepare_tokens_with_masks(_images(1, 56))
        masked = model.prepare_tokens_with_masks(_images(1, 56), masks)
    assert torch.allclose(masked[0, 4], model.mask_token[0] + model.pos_embed[0, 4])
    assert torch.equal(masked[0, 5:], plain[0, 5:]) and not torch.equal(masked[0, 4], plain[0, 4])


def test_get_intermediate_layers():
    model = _tiny(registers=1, depth=3)
    x = _images(2, 56)
    with torch.no_grad():
        last_two = model.get_intermediate_layers(x, n=2, return_class_token=True)
        grids = model.get_intermediate_layers(x, n=[0], reshape=True)
        out = model.forward_features(x)
    assert len(last_two) == 2 and last_two[1][0].shape == (2, 16, 32) and last_two[1][1].shape == (2, 32)
    assert torch.allclose(last_two[1][0], out["x_norm_patchtokens"])
    assert grids[0].shape == (2, 32, 4, 4)
    with pytest.raises(IndexError):
        model.get_intermediate_layers(x, n=[5])


def test_lists_of_images_run_one_batch_at_a_time():
    model = _tiny()
    a, b = _images(1, 56, seed=1), _images(2, 28, seed=2)
    with torch.no_grad():
        outs = model.forward_features([a, b])
        single = model.forward_features(b)
    assert len(outs) == 2 and torch.equal(outs[1]["x_norm_clstoken"], single["x_norm_clstoken"])


# ------------------------------------------------------------------------------ interpolation


@pytest.mark.parametrize("registers", [0, 4])
def test_position_embeddings_interpolate_from_518_to_224(registers):
    model = _tiny(registers, img_size=518, depth=1)
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 32)
    with torch.no_grad():
        native = model.forward_features(_images(1, 518))
        small = model.forward_features(_images(2, 224))
        wide = model.forward_features(_images(1, 224, 280))
        same = model.interpolate_pos_encoding(torch.zeros(1, 1 + 37 * 37, 32), 518, 518)
    assert native["x_norm_patchtokens"].shape == (1, 37 * 37, 32)
    assert small["x_norm_patchtokens"].shape == (2, 16 * 16, 32)
    assert small["x_prenorm"].shape == (2, 1 + registers + 256, 32)
    assert wide["x_norm_patchtokens"].shape == (1, 16 * 20, 32)
    assert same is model.pos_embed


def test_interpolation_settings_follow_the_hub_factories():
    with torch.device("meta"):
        plain, reg = d.dinov2_vitb14(), d.dinov2_vitb14_reg()
    assert (plain.interpolate_offset, plain.interpolate_antialias, plain.num_register_tokens) == (0.1, False, 0)
    assert (reg.interpolate_offset, reg.interpolate_antialias, reg.num_register_tokens) == (0.0, True, 4)


@pytest.mark.parametrize("registers", [0, 4])
def test_interpolation_uses_the_offset_scale_factor_or_the_size(registers):
    """Without registers upstream interpolates by a scale factor nudged by 0.1 (not by output size): the
    two give different embeddings, and checkpoints were trained with the first. Registers: size + antialias."""
    model = _tiny(registers, img_size=518, depth=1)
    grid = model.pos_embed[:, 1:].detach().reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    if registers:
        expected = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True)
    else:
        expected = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
        by_size = F.interpolate(grid, size=(16, 16), mode="bicubic")
        assert (expected - by_size).abs().max() > 1e-3
    with torch.no_grad():
        got = model.interpolate_pos_encoding(torch.zeros(1, 257, 32), 224, 224)
    assert torch.allclose(got[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 32), atol=1e-6)
    assert torch.equal(got[:, 0], model.pos_embed[:, 0])


def test_image_size_not_a_multiple_of_the_patch_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        _tiny()(_images(1, 50))


# ----------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_strict_round_trip_through_a_file(tmp_path, suffix):
    model = _tiny(registers=2, seed=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = d.build_dinov2(arch="vit_small", depth=2, embed_dim=32, num_heads=4, img_size=56,
                            num_register_tokens=2, weights=path)
    x = _images(2, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training


def test_loading_a_mismatched_checkpoint_names_the_problem(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_tiny(registers=0).state_dict(), path)
    with pytest.raises(ValueError, match="missing register_tokens"):
        d.build_dinov2(arch="vit_small", depth=2, embed_dim=32, num_heads=4, img_size=56,
                       num_register_tokens=4, weights=path)
    with pytest.raises(ValueError, match="shapes do not match"):
        d.build_dinov2(arch="vit_small", depth=2, embed_dim=64, num_heads=4, img_size=56, weights=path)


def test_invalid_construction_is_refused():
    with pytest.raises(ValueError, match="block_chunks"):
        d.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=4, block_chunks=1)
    with pytest.raises(ValueError, match="unknown DINOv2 architecture"):
        d.build_dinov2(arch="vit_huge")
    with pytest.raises(ValueError, match="ffn_layer"):
        d.build_dinov2(arch="vit_small", depth=1, embed_dim=32, num_heads=4, ffn_layer="moe")
