"""Tiny random-weight DINOv2 models in the three families, for the tests and the benchmark scripts.

``tiny_model(family, seed=s)`` builds one network and wraps it as an HF ``Dinov2Model`` /
``Dinov2WithRegistersModel``, a timm ``VisionTransformer`` or the official ``DinoVisionTransformer``.
For the same arguments the three hold the same weights (the official-layout weights are drawn once from
the seed and converted), so at the native ``img_size`` they compute the same function; at other sizes they
differ only by each family's position-embedding interpolation.

Choices that differ from each family's pretrained constructor, on purpose:

- layer scale starts at 1.0 (HF and the official hub code do so; timm's DINOv2 entries start at 1e-5), so
  the random blocks change the tokens and attention engineering has a visible effect;
- the timm model is built with ``dynamic_img_size=True`` (timm's DINOv2 entries are fixed-size), as
  ``load_backbone`` builds timm models, so every family accepts any multiple of the patch size.

``save_tiny`` writes a model where ``load_backbone`` reads it: HF as a ``save_pretrained`` folder, hub and
timm as a ``.safetensors`` (or ``.pth``) file that names its architecture (see ``itae.models.checkpoints.write_checkpoint``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from itae.errors import InputError
from itae.models.checkpoints import write_checkpoint
from itae.models.dinov2_arch import build_dinov2

FAMILIES = ("hf", "timm", "hub")


def tiny_model(
    family: str,
    *,
    registers: int = 0,
    depth: int = 2,
    embed_dim: int = 32,
    num_heads: int = 4,
    patch_size: int = 14,
    img_size: int = 56,
    seed: int = 0,
) -> nn.Module:
    """A small random DINOv2 model of ``family`` ("hf", "timm" or "hub"), deterministic for ``seed``, in eval mode."""
    _check(family, registers, embed_dim, num_heads, img_size, patch_size)
    kwargs = _hub_kwargs(registers, depth, embed_dim, num_heads, patch_size, img_size)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        reference = _build_hub(kwargs)
        if family == "hub":
            return reference.eval()
        state = reference.state_dict()
        if family == "timm":
            model = _build_timm(_timm_arch(registers), _timm_kwargs(registers, depth, embed_dim, num_heads,
                                                                   patch_size, img_size))
            from timm.models.vision_transformer import checkpoint_filter_fn

            # timm's own converter for official DINOv2 checkpoints (drops mask_token, folds the CLS position
            # into cls_token for register models, which timm builds without a class position)
            model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
            return model.eval()
        model = _build_hf(registers, depth, embed_dim, num_heads, patch_size, img_size)
        converted = _hub_to_hf(state)
        if not any(".attention.q_proj." in k for k in model.state_dict()):
            converted = _hf_4x_names(converted)  # transformers before the 5.x attention layout
        model.load_state_dict(converted, strict=True)
        return model.eval()


def save_tiny(
    family: str,
    path: str | Path,
    *,
    registers: int = 0,
    depth: int = 2,
    embed_dim: int = 32,
    num_heads: int = 4,
    patch_size: int = 14,
    img_size: int = 56,
    seed: int = 0,
) -> Path:
    """Write ``tiny_model(...)`` where ``load_backbone(path)`` loads it; returns ``path``.

    HF: ``path`` is a folder (``save_pretrained``). hub/timm: ``path`` ends in ``.safetensors`` (architecture in
    the metadata) or ``.pth`` (architecture in ``<path>.json``).
    """
    model = tiny_model(family, registers=registers, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                       patch_size=patch_size, img_size=img_size, seed=seed)
    path = Path(path)
    if family == "hf":
        model.save_pretrained(str(path))
        return path
    if family == "hub":
        arch = "dinov2_vits14_reg" if registers else "dinov2_vits14"
        model_kwargs = _hub_kwargs(registers, depth, embed_dim, num_heads, patch_size, img_size)
    else:
        arch = _timm_arch(registers)
        model_kwargs = _timm_kwargs(registers, depth, embed_dim, num_heads, patch_size, img_size)
        model_kwargs.pop("dynamic_img_size")  # the loader sets it
        model_kwargs.pop("num_classes")
    return write_checkpoint(model.state_dict(), path, family=family, arch=arch, model_kwargs=model_kwargs)


# ------------------------------------------------------------------------------------------- builders


def _check(family: str, registers: int, embed_dim: int, num_heads: int, img_size: int, patch_size: int) -> None:
    if family not in FAMILIES:
        raise InputError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if registers < 0:
        raise InputError(f"registers must be >= 0; got {registers}")
    if embed_dim % num_heads:
        raise InputError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    if img_size % patch_size:
        raise InputError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")


def _hub_kwargs(registers: int, depth: int, embed_dim: int, num_heads: int, patch_size: int, img_size: int) -> dict:
    return {"arch": "vit_small", "depth": depth, "embed_dim": embed_dim, "num_heads": num_heads,
            "patch_size": patch_size, "img_size": img_size, "num_register_tokens": registers}


def _build_hub(kwargs: dict) -> nn.Module:
    return build_dinov2(**kwargs)


def _timm_arch(registers: int) -> str:
    return "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"


def _timm_kwargs(registers: int, depth: int, embed_dim: int, num_heads: int, patch_size: int, img_size: int) -> dict:
    kwargs = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
              "num_heads": num_heads, "init_values": 1.0, "num_classes": 0, "dynamic_img_size": True}
    if registers:
        # as timm's *_reg4_dinov2 entries: register tokens and no position embedding on the prefix tokens
        kwargs.update(reg_tokens=registers, no_embed_class=True)
    return kwargs


def _build_timm(arch: str, kwargs: dict) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, **kwargs)


def _build_hf(registers: int, depth: int, embed_dim: int, num_heads: int, patch_size: int, img_size: int) -> nn.Module:
    common = {"hidden_size": embed_dim, "num_hidden_layers": depth, "num_attention_heads": num_heads,
              "mlp_ratio": 4, "image_size": img_size, "patch_size": patch_size, "layerscale_value": 1.0,
              "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True}
    if registers:
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**common))


_HF_4X = {
    ".attention.q_proj.": ".attention.attention.query.",
    ".attention.k_proj.": ".attention.attention.key.",
    ".attention.v_proj.": ".attention.attention.value.",
    ".attention.o_proj.": ".attention.output.dense.",
}


def _hf_4x_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF 5.x attention key names -> the older layout (``attention.attention.query``, ``attention.output.dense``)."""
    out = {}
    for key, value in state.items():
        for new, old in _HF_4X.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def _hub_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 key names -> HF transformers (5.x) ``Dinov2Model`` key names."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if "register_tokens" in state:
        out["embeddings.register_tokens"] = state["register_tokens"]
    renames = {"attn.proj": "attention.o_proj", "ls1.gamma": "layer_scale1.lambda1",
               "ls2.gamma": "layer_scale2.lambda1"}
    for key, value in state.items():
        if not key.startswith("blocks."):
            continue
        _, index, rest = key.split(".", 2)
        prefix = f"encoder.layer.{index}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]  # weight (3D, D) or bias (3D,), rows ordered q, k, v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}attention.{name}.{kind}"] = part
            continue
        for old, new in renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[prefix + rest] = value
    return out


# ------------------------------------------------------------------- the other ViT families, for tests

#: the tiny models of the other families ``tiny_vit`` builds (patch 16, 64 px: a 4 x 4 grid)
TINY_KINDS = ("hf-dinov3", "timm-dinov3", "hf-clip", "hf-siglip", "hf-siglip2", "timm-deit3", "open_clip")


def tiny_vit(kind: str, *, depth: int = 2, embed_dim: int = 32, num_heads: int = 4, seed: int = 0) -> nn.Module:
    """A small random model of another ViT family (see ``TINY_KINDS``), deterministic for ``seed``, in eval
    mode, 64 px input with 16 px patches. Layer scales (DINOv3, DeiT-III) start at 1, as in ``tiny_model``.

    hf-dinov3: ``DINOv3ViTModel`` with 4 registers and rotary embeddings; hf-clip: ``CLIPVisionModel``
    (quick_gelu); hf-siglip: ``SiglipVisionModel`` with its attention-pooling head; hf-siglip2: the same in
    ``Siglip2VisionModel`` (NaFlex: 16 position embeddings, a 4 x 4 grid); timm-deit3:
    ``deit3_small_patch16_224`` resized; timm-dinov3: ``vit_small_patch16_dinov3`` resized (timm's Eva, 4
    registers, rotary embeddings); open_clip: an OpenCLIP ``VisionTransformer`` (quick_gelu,
    ``nn.MultiheadAttention``; needs ``itae[openclip]``).
    """
    if kind not in TINY_KINDS:
        raise InputError(f"kind must be one of {', '.join(TINY_KINDS)}; got {kind!r}")
    common = {"hidden_size": embed_dim, "intermediate_size": 2 * embed_dim, "num_hidden_layers": depth,
              "num_attention_heads": num_heads, "image_size": 64, "patch_size": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "hf-dinov3":
            from transformers import DINOv3ViTConfig, DINOv3ViTModel

            model = DINOv3ViTModel(DINOv3ViTConfig(num_register_tokens=4, layerscale_value=1.0, **common))
        elif kind == "hf-clip":
            from transformers import CLIPVisionConfig, CLIPVisionModel

            model = CLIPVisionModel(CLIPVisionConfig(hidden_act="quick_gelu", **common))
        elif kind == "hf-siglip":
            from transformers import SiglipVisionConfig, SiglipVisionModel

            model = SiglipVisionModel(SiglipVisionConfig(**common))
        elif kind == "hf-siglip2":
            from transformers import Siglip2VisionConfig, Siglip2VisionModel

            common.pop("image_size")
            model = Siglip2VisionModel(Siglip2VisionConfig(num_patches=16, **common))
        elif kind == "open_clip":
            from open_clip.transformer import QuickGELU, VisionTransformer

            model = VisionTransformer(image_size=64, patch_size=16, width=embed_dim, layers=depth, heads=num_heads,
                                      mlp_ratio=2.0, output_dim=16, act_layer=QuickGELU)
        else:
            import timm

            arch = "vit_small_patch16_dinov3" if kind == "timm-dinov3" else "deit3_small_patch16_224"
            model = timm.create_model(arch, pretrained=False, img_size=64, embed_dim=embed_dim,
                                      depth=depth, num_heads=num_heads, init_values=1.0, num_classes=0)
    return model.eval()
