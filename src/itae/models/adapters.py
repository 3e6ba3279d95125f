"""Adapters: recognise a model instance and describe it as a ``Backbone``.

DINOv2 in the three ways people load it (here):
- HF transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` and the models that wrap them;
- timm ``VisionTransformer`` (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``, ...; DeiT-III too);
- the official DINOv2 ``DinoVisionTransformer`` (``torch.hub.load("facebookresearch/dinov2", ...)``).
The other families (DINOv3, CLIP, OpenCLIP, SigLIP) are described in ``families``.
"""

from __future__ import annotations

import torch
from torch import nn

from itae.errors import UnsupportedModelError

from . import families
from .base import AttentionSite, Backbone, BlockParts, Features, MLPSite, Preprocess, mlp_sites

SUPPORTED = (
    "HF transformers Dinov2Model / Dinov2WithRegistersModel (and wrappers such as "
    "Dinov2ForImageClassification, Dinov2Backbone), DINOv3ViTModel, CLIPVisionModel (and CLIPModel, "
    "CLIPVisionModelWithProjection), SiglipVisionModel / Siglip2VisionModel (and SiglipModel, Siglip2Model); timm VisionTransformer with a class token "
    "(e.g. vit_base_patch14_dinov2, vit_base_patch14_reg4_dinov2, deit3_base_patch16_224) and timm's DINOv3 Eva "
    "(vit_base_patch16_dinov3, not the _qkvb entries); the official DINOv2 "
    "DinoVisionTransformer from torch.hub (dinov2_vits14, dinov2_vitb14_reg, ...); OpenCLIP ViTs (open_clip CLIP "
    "or its .visual, e.g. ViT-B-16)"
)

_HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def adapt(model: nn.Module | Backbone, name: str | None = None) -> Backbone:
    """Describe ``model`` as a ``Backbone``; a ``Backbone`` is returned unchanged."""
    if isinstance(model, Backbone):
        return model
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module; got {type(model).__name__}. Supported: {SUPPORTED}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _HF_MODEL_TYPES:
        return _adapt_hf(model, name)
    if model_type in families.HF_MODEL_TYPES:
        try:
            return families.adapt_hf(model, families.HF_MODEL_TYPES[model_type], name)
        except TypeError as err:
            raise UnsupportedModelError(f"{err}. Supported: {SUPPORTED}") from None
    module = type(model).__module__ or ""
    if families.is_open_clip(model):
        try:
            return families.adapt_open_clip(model, name)
        except TypeError as err:
            raise UnsupportedModelError(f"{err}. Supported: {SUPPORTED}") from None
    if families.is_timm_eva(model):
        try:
            return families.adapt_timm_eva(model, name)
        except TypeError as err:
            raise UnsupportedModelError(f"{err}. Supported: {SUPPORTED}") from None
    if module.startswith("timm.") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):
        return _adapt_timm(model, name)
    if _looks_like_official_dinov2(model):
        return _adapt_hub(model, name)
    raise UnsupportedModelError(f"unsupported model {type(model).__name__} ({module}). Supported: {SUPPORTED}")


# --------------------------------------------------------------------------------------------- HF


def _hf_base(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if not (hasattr(base, "embeddings") and hasattr(base, "encoder")):
        raise UnsupportedModelError(f"{type(model).__name__} has no DINOv2 encoder. Supported: {SUPPORTED}")
    return base


def _hf_site(index: int, layer: nn.Module) -> AttentionSite:
    attn = layer.attention
    if hasattr(attn, "q_proj"):  # transformers >= 5.x layout
        heads = attn.num_attention_heads
        head_dim = attn.head_dim
        return AttentionSite(
            index=index, block=layer, attention=attn, out_proj=attn.o_proj,
            num_heads=heads, head_dim=head_dim, scale=float(getattr(attn, "scaling", head_dim**-0.5)),
            q=attn.q_proj, k=attn.k_proj, v=attn.v_proj,
        )
    if hasattr(attn, "attention") and hasattr(attn.attention, "query"):  # transformers 4.x layout
        sa = attn.attention
        heads = sa.num_attention_heads
        head_dim = sa.attention_head_size
        return AttentionSite(
            index=index, block=layer, attention=sa, out_proj=attn.output.dense,
            num_heads=heads, head_dim=head_dim, scale=float(getattr(sa, "scaling", head_dim**-0.5)),
            q=sa.query, k=sa.key, v=sa.value,
        )
    raise UnsupportedModelError(f"unrecognised HF DINOv2 attention layout: {type(attn).__name__}")


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _adapt_hf(model: nn.Module, name: str | None) -> Backbone:
    base = _hf_base(model)
    cfg = base.config
    layers = list(base.encoder.layer)
    registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
    patch = int(cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0])
    final_norm = getattr(base, "layernorm", None)

    def forward_features(pixel_values: torch.Tensor) -> Features:
        h = base.embeddings(pixel_values)
        for layer in layers:
            h = _first(layer(h))
        if final_norm is not None:
            h = final_norm(h)
        p = 1 + registers
        return Features(cls=h[:, 0], patches=h[:, p:], registers=h[:, 1:p])

    return Backbone(
        model=model, family="hf", name=name or getattr(cfg, "_name_or_path", "") or type(model).__name__,
        num_register_tokens=registers, patch_size=patch, embed_dim=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads), blocks=layers,
        sites=[_hf_site(i, layer) for i, layer in enumerate(layers)],
        preprocess=Preprocess(image_size=224, resize_size=256, interpolation="bicubic", patch_size=patch),
        forward_features_fn=forward_features,
        embed_fn=base.embeddings, final_norm=final_norm,
        parts=[BlockParts(layer.norm1, layer.layer_scale1, layer.norm2, layer.mlp, layer.layer_scale2) for layer in layers],
        mlp_sites=_mlp_sites(layers),
    )


def _timm_style_parts(blocks: list[nn.Module]) -> list[BlockParts]:
    return [BlockParts(b.norm1, b.ls1, b.norm2, b.mlp, b.ls2) for b in blocks]


def _mlp_sites(blocks: list[nn.Module]) -> list[MLPSite]:
    return mlp_sites([getattr(b, "mlp", None) for b in blocks])


# ------------------------------------------------------------------------------------------- timm


def _fused_qkv_site(index: int, block: nn.Module, family: str) -> AttentionSite:
    attn = block.attn
    if not (hasattr(attn, "qkv") and hasattr(attn, "proj")):
        raise UnsupportedModelError(f"{family} block {index}: attention {type(attn).__name__} has no fused qkv/proj")
    norm = getattr(attn, "norm", None)
    if (norm is not None and not isinstance(norm, nn.Identity)) or getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(
            f"{family} block {index}: attention with an output norm or gate is not supported (not a DINOv2 layout)"
        )
    heads = int(attn.num_heads)
    head_dim = int(getattr(attn, "head_dim", attn.qkv.out_features // 3 // heads))
    return AttentionSite(
        index=index, block=block, attention=attn, out_proj=attn.proj,
        num_heads=heads, head_dim=head_dim, scale=float(getattr(attn, "scale", head_dim**-0.5)),
        qkv=attn.qkv, q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
    )


def _adapt_timm(model: nn.Module, name: str | None) -> Backbone:
    registers = int(getattr(model, "num_reg_tokens", 0) or 0)
    if int(model.num_prefix_tokens) - registers != 1 or getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError("timm model has no class token; ITAE engineers the CLS row. " + SUPPORTED)
    blocks = list(model.blocks)
    patch = model.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    preprocess = _timm_preprocess(model, patch)
    p = 1 + registers

    def forward_features(pixel_values: torch.Tensor) -> Features:
        h = model.forward_features(pixel_values)
        return Features(cls=h[:, 0], patches=h[:, p:], registers=h[:, 1:p])

    def embed(pixel_values: torch.Tensor) -> torch.Tensor:
        # the steps of timm's VisionTransformer.forward_features before its blocks
        h = model._pos_embed(model.patch_embed(pixel_values))
        return model.norm_pre(model.patch_drop(h))

    return Backbone(
        model=model, family="timm",
        name=name or (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id") or type(model).__name__,
        num_register_tokens=registers, patch_size=patch, embed_dim=int(model.embed_dim),
        num_heads=int(blocks[0].attn.num_heads), blocks=blocks,
        sites=[_fused_qkv_site(i, b, "timm") for i, b in enumerate(blocks)],
        preprocess=preprocess, forward_features_fn=forward_features,
        embed_fn=embed, final_norm=model.norm, parts=_timm_style_parts(blocks), mlp_sites=_mlp_sites(blocks),
    )


def _timm_preprocess(model: nn.Module, patch: int) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    interpolation = cfg.get("interpolation", "bicubic")
    # timm's DINOv2 configs describe 518 px with crop_pct 1.0; the DINOv2 evaluation recipe (and the
    # HF and hub adapters) resize to 256 and centre-crop 224, so the same weights see the same pixels.
    size = 224
    return Preprocess(
        image_size=size, resize_size=256, interpolation=interpolation,
        mean=mean, std=std, patch_size=patch,
    )


# ----------------------------------------------------------------------- official DINOv2 (hub)


def _looks_like_official_dinov2(model: nn.Module) -> bool:
    return (
        hasattr(model, "blocks")
        and hasattr(model, "num_register_tokens")
        and hasattr(model, "cls_token")
        and hasattr(model, "forward_features")
        and hasattr(model, "patch_size")
    )


def _flat_blocks(model: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for b in model.blocks:
        if hasattr(b, "attn"):
            blocks.append(b)
        else:  # BlockChunk: a ModuleList padded with Identity
            blocks.extend(m for m in b if not isinstance(m, nn.Identity))
    return blocks


def _adapt_hub(model: nn.Module, name: str | None) -> Backbone:
    blocks = _flat_blocks(model)
    registers = int(model.num_register_tokens)
    patch = int(model.patch_size)

    def forward_features(pixel_values: torch.Tensor) -> Features:
        out = model.forward_features(pixel_values)
        return Features(
            cls=out["x_norm_clstoken"], patches=out["x_norm_patchtokens"], registers=out.get("x_norm_regtokens")
        )

    return Backbone(
        model=model, family="hub", name=name or type(model).__name__,
        num_register_tokens=registers, patch_size=patch, embed_dim=int(model.embed_dim),
        num_heads=int(blocks[0].attn.num_heads), blocks=blocks,
        sites=[_fused_qkv_site(i, b, "DINOv2") for i, b in enumerate(blocks)],
        preprocess=Preprocess(image_size=224, resize_size=256, interpolation="bicubic", patch_size=patch),
        forward_features_fn=forward_features,
        embed_fn=model.prepare_tokens_with_masks, final_norm=model.norm, parts=_timm_style_parts(blocks),
        mlp_sites=_mlp_sites(blocks),
    )
