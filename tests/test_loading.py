"""Models by name or path: itae.load_backbone."""

from __future__ import annotations

import json
import os

import pytest
import torch

import itae
from itae.models import adapt
from itae.models.checkpoints import read_checkpoint_spec, read_state_dict
from itae.models.dinov2_arch import checkpoint_filename, dinov2_vits14
from itae.models.loading import (
    KNOWN_MODELS,
    KnownModel,
    ModelLoadError,
    canonical_name,
    load_backbone,
)

from .helpers.tiny import FAMILIES, save_tiny, tiny_model


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Never touch the network, and see only empty caches of our own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _target(tmp_path, family: str, suffix: str = ".safetensors"):
    return tmp_path / ("hf_model" if family == "hf" else f"{family}_model{suffix}")


# ------------------------------------------------------------------------------ local tiny models


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_from_a_saved_tiny_model(tmp_path, family, registers):
    path = save_tiny(family, _target(tmp_path, family), registers=registers, seed=3)
    backbone = load_backbone(str(path))
    assert backbone.family == family and backbone.name == str(path)
    assert backbone.num_register_tokens == registers and backbone.patch_size == 14
    reference = adapt(tiny_model(family, registers=registers, seed=3))
    x = _images(2, 56)
    with torch.no_grad():
        got, want = backbone.forward_features(x), reference.forward_features(x)
    assert torch.equal(got.cls, want.cls) and torch.equal(got.patches, want.patches)
    assert not backbone.model.training


@pytest.mark.parametrize("family", ["hub", "timm"])
def test_pth_checkpoints_load_with_their_sidecar_description(tmp_path, family):
    path = save_tiny(family, tmp_path / "m.pth", registers=1)
    assert read_checkpoint_spec(path)["family"] == family
    backbone = load_backbone(str(path))
    x = _images(1, 56)
    with torch.no_grad():
        want = adapt(tiny_model(family, registers=1)).forward_features(x).cls
        assert torch.equal(backbone.forward_features(x).cls, want)


class _NotATensor:
    """Something a pickle could carry that weights_only loading must refuse."""


def test_pth_files_are_read_with_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": _NotATensor()}, path)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        read_state_dict(path)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_backbone(str(path), arch="dinov2_vits14")


def test_wrapped_state_dicts_are_unwrapped(tmp_path):
    state = tiny_model("hub").state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "w.pth")
    assert set(read_state_dict(tmp_path / "w.pth")) == set(state)


def test_a_checkpoint_without_arch_is_a_one_line_error(tmp_path):
    path = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_model("hub").state_dict(), str(path))
    with pytest.raises(ModelLoadError, match="without an architecture name.*arch=dinov2_vitb14") as err:
        load_backbone(str(path))
    assert "\n" not in str(err.value)


def test_a_wrong_arch_for_a_checkpoint_is_a_clear_error(tmp_path):
    path = save_tiny("hub", tmp_path / "tiny.safetensors")
    with pytest.raises(ModelLoadError, match="does not match DinoVisionTransformer.*check the architecture name"):
        load_backbone(str(path), arch="dinov2_vits14")
    with pytest.raises(ModelLoadError, match="unknown architecture 'resnet-ish'"):
        load_backbone(str(path), arch="resnet-ish")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_backbone(str(tmp_path / "missing.pth"), arch="dinov2_vits14")


# --------------------------------------------------------------------------- resolution and dtype


@pytest.mark.parametrize("family", FAMILIES)
def test_resolution_is_rounded_to_the_patch_size_and_runs(tmp_path, family):
    path = save_tiny(family, _target(tmp_path, family), registers=1)
    backbone = load_backbone(str(path), resolution=60)
    assert backbone.preprocess.image_size == 56 and backbone.preprocess.patch_size == 14
    assert load_backbone(str(path), resolution=230).preprocess.image_size == 224
    with torch.no_grad():
        feats = load_backbone(str(path), resolution=98).forward_features(_images(1, 98))
    assert feats.patches.shape == (1, 49, 32)


def test_dtype_and_device_are_applied(tmp_path):
    path = save_tiny("hub", tmp_path / "m.safetensors")
    backbone = load_backbone(str(path), dtype=torch.float64, device="cpu")
    assert backbone.dtype == torch.float64 and backbone.device.type == "cpu"
    with torch.no_grad():
        assert backbone.forward_features(_images(1, 56).double()).cls.dtype == torch.float64


def test_hf_attention_implementation_defaults_to_sdpa(tmp_path):
    path = save_tiny("hf", tmp_path / "hf")
    assert load_backbone(str(path)).model.config._attn_implementation == "sdpa"
    assert load_backbone(str(path), attn_implementation="eager").model.config._attn_implementation == "eager"


# ------------------------------------------------------------------------------------ by name


def test_known_models_cover_the_three_families():
    assert KNOWN_MODELS["facebook/dinov2-base"].family == "hf"
    assert KNOWN_MODELS["facebook/dinov2-with-registers-giant"].registers == 4
    assert KNOWN_MODELS["timm/vit_large_patch14_reg4_dinov2.lvd142m"].arch == "dinov2_vitl14"
    assert KNOWN_MODELS["dinov2_vits14_reg"].family == "hub"
    dinov2 = {n: k for n, k in KNOWN_MODELS.items() if k.kind == "dinov2"}
    assert {k.family for k in dinov2.values()} == {"hf", "timm", "hub"}
    assert len(dinov2) == 24
    assert canonical_name("vit_large_patch14_dinov2") == "timm/vit_large_patch14_dinov2.lvd142m"
    assert canonical_name("Facebook/DINOv2-Base") == "facebook/dinov2-base"
    assert canonical_name("resnet50") is None


def test_known_models_of_the_other_families():
    assert KNOWN_MODELS["facebook/dinov3-vitb16-pretrain-lvd1689m"] == KnownModel(
        "hf", "facebook/dinov3-vitb16-pretrain-lvd1689m", 4, "dinov3")
    assert KNOWN_MODELS["timm/vit_large_patch16_dinov3.lvd1689m"].registers == 4
    assert KNOWN_MODELS["openai/clip-vit-base-patch16"].kind == "clip"
    assert KNOWN_MODELS["open_clip:ViT-B-16/laion2b_s34b_b88k"].family == "open_clip"
    assert KNOWN_MODELS["google/siglip-base-patch16-224"].kind == "siglip"
    assert canonical_name("deit3_base_patch16_224") == "timm/deit3_base_patch16_224.fb_in22k_ft_in1k"
    assert {k.kind for k in KNOWN_MODELS.values()} == {"dinov2", "dinov3", "clip", "siglip", "deit3"}


@pytest.mark.parametrize("name", ["facebook/dinov3-vits16-pretrain-lvd1689m", "openai/clip-vit-base-patch32",
                                  "google/siglip-base-patch16-224"])
def test_other_hf_families_offline_say_how_to_pass_a_folder(name):
    with pytest.raises(ModelLoadError, match=f"^{name} is not available offline.*model=FOLDER$"):
        load_backbone(name)


def test_dinov3_on_an_older_transformers_names_the_release_it_needs(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.55.4")
    with pytest.raises(ModelLoadError, match=r"needs transformers>=4\.56 \(DINOv3ViTModel\); transformers 4\.55\.4"):
        load_backbone("facebook/dinov3-vitb16-pretrain-lvd1689m")


def test_open_clip_names_are_checked():
    with pytest.raises(ModelLoadError, match="open_clip:ARCH/PRETRAINED"):
        load_backbone("open_clip:ViT-B-16")
    with pytest.raises(ModelLoadError, match="unknown OpenCLIP model ViT-B-16/nope"):
        load_backbone("open_clip:ViT-B-16/nope")


def test_unknown_name_lists_the_families():
    with pytest.raises(ModelLoadError, match="DINOv3.*CLIP.*OpenCLIP.*SigLIP.*DeiT-III"):
        load_backbone("dino-v9")
    with pytest.raises(ModelLoadError, match="unknown model 'dino-v9'.*Hugging Face id.*timm name.*torch.hub name"):
        load_backbone("dino-v9")
    with pytest.raises(ModelLoadError, match="offline demo models.*demo:clean.*demo:planted.*demo:registers"):
        load_backbone("dino-v9")


@pytest.mark.parametrize(
    "name,arch",
    [
        ("facebook/dinov2-base", "dinov2_vitb14"),
        ("facebook/dinov2-with-registers-small", "dinov2_vits14_reg"),
        ("timm/vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14"),
        ("vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg"),
        ("dinov2_vitg14", "dinov2_vitg14"),
        ("dinov2_vitb14_reg", "dinov2_vitb14_reg"),
    ],
)
def test_offline_with_nothing_cached_says_how_to_pass_a_local_path(name, arch):
    with pytest.raises(ModelLoadError) as err:
        load_backbone(name)
    message = str(err.value)
    assert "not available offline" in message and "\n" not in message
    assert f"model=WEIGHTS.safetensors with arch={arch}" in message and "model=FOLDER" in message


def test_the_default_model_is_dinov2_base():
    with pytest.raises(ModelLoadError, match="^facebook/dinov2-base is not available offline"):
        itae.load_backbone()


# ------------------------------------------------------------ the official checkpoint (full size)


@pytest.fixture(scope="module")
def vits14_checkpoint(tmp_path_factory):
    """A random ViT-S/14 in the official checkpoint layout, saved under the torch.hub cache file name."""
    torch.manual_seed(0)
    model = dinov2_vits14()
    root = tmp_path_factory.mktemp("torch_home")
    path = root / "hub" / "checkpoints" / checkpoint_filename("dinov2_vits14")
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return root, path, model


def test_hub_name_loads_the_cached_official_checkpoint(monkeypatch, vits14_checkpoint):
    root, _, model = vits14_checkpoint
    monkeypatch.setenv("TORCH_HOME", str(root))
    backbone = load_backbone("dinov2_vits14")
    assert backbone.family == "hub" and backbone.name == "dinov2_vits14" and backbone.embed_dim == 384
    x = _images(1, 56)
    with torch.no_grad():
        assert torch.equal(backbone.model(x), model(x))
    # the factory finds the same cached file through torch.hub, without a download
    assert torch.equal(dinov2_vits14(pretrained=True).cls_token, model.cls_token)


def test_hub_name_uses_the_cached_hub_code_when_present(monkeypatch, tmp_path, vits14_checkpoint):
    root, checkpoint, model = vits14_checkpoint
    home = tmp_path / "home_with_code"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(checkpoint, home / "hub" / "checkpoints" / checkpoint.name)
    code = home / "hub" / "facebookresearch_dinov2_main"
    code.mkdir()
    # a stand-in for the cached upstream repository: records that it was called and how
    (code / "hubconf.py").write_text(
        "from itae.models import dinov2_arch\n"
        "def dinov2_vits14(*, pretrained=True, **kwargs):\n"
        "    assert not pretrained, 'itae loads the weights itself'\n"
        "    model = dinov2_arch.dinov2_vits14(**kwargs)\n"
        "    model.built_by_hubconf = True\n"
        "    return model\n"
    )
    monkeypatch.setenv("TORCH_HOME", str(home))
    backbone = load_backbone("dinov2_vits14")
    assert getattr(backbone.model, "built_by_hubconf", False)
    assert torch.equal(backbone.model.pos_embed, model.pos_embed)


def test_official_checkpoint_with_a_hub_or_timm_arch(vits14_checkpoint):
    _, checkpoint, model = vits14_checkpoint
    hub = load_backbone(str(checkpoint), arch="dinov2_vits14")
    assert hub.family == "hub" and torch.equal(hub.model.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    timm_backbone = load_backbone(str(checkpoint), arch="timm/vit_small_patch14_dinov2.lvd142m")
    assert timm_backbone.family == "timm"
    # timm converts the official layout itself
    assert torch.equal(timm_backbone.model.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    assert torch.equal(timm_backbone.model.pos_embed, model.pos_embed)
    with torch.no_grad():  # dynamic_img_size: any multiple of the patch size runs
        assert timm_backbone.forward_features(_images(1, 56)).patches.shape == (1, 16, 384)


def test_spec_json_is_what_write_checkpoint_promises(tmp_path):
    path = save_tiny("timm", tmp_path / "x.pth")
    spec = json.loads((tmp_path / "x.pth.json").read_text())
    assert spec == read_checkpoint_spec(path)
    assert spec["arch"] == "vit_small_patch14_dinov2" and spec["model_kwargs"]["depth"] == 2


def _put_in_hf_cache(hf_home, repo_id: str, files: dict) -> None:
    """Lay files out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/...)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        os.symlink(source, snapshot / name)


def test_hf_name_loads_from_the_hub_cache_offline(tmp_path):
    saved = save_tiny("hf", tmp_path / "saved", registers=4)
    _put_in_hf_cache(tmp_path / "hf_home", "facebook/dinov2-with-registers-small",
                     {f.name: f for f in saved.iterdir()})
    backbone = load_backbone("facebook/dinov2-with-registers-small")
    assert backbone.family == "hf" and backbone.name == "facebook/dinov2-with-registers-small"
    x = _images(1, 56)
    with torch.no_grad():
        want = adapt(tiny_model("hf", registers=4)).forward_features(x).cls
        assert torch.equal(backbone.forward_features(x).cls, want)


def test_timm_name_loads_from_the_hub_cache_offline(tmp_path, vits14_checkpoint):
    from safetensors.torch import save_file

    _, _, model = vits14_checkpoint
    weights = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(weights))  # the official layout; timm converts it on load
    _put_in_hf_cache(tmp_path / "hf_home", "timm/vit_small_patch14_dinov2.lvd142m", {"model.safetensors": weights})
    backbone = load_backbone("vit_small_patch14_dinov2")
    assert backbone.family == "timm" and backbone.name == "timm/vit_small_patch14_dinov2.lvd142m"
    assert torch.equal(backbone.model.cls_token, model.cls_token)
