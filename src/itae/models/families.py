"""Adapters for the ViT families beyond DINOv2: DINOv3, CLIP and SigLIP vision towers (HF transformers),
DINOv3 in timm, and OpenCLIP. DeiT-III needs none of its own: it is a timm ``VisionTransformer`` with a
class token, which ``adapters._adapt_timm`` describes.

What each family's "CLS embedding" is (``Features.cls``, the image embedding ``itae`` clusters):

- DINOv3: the CLS token after the final LayerNorm (``pooler_output``), as for DINOv2;
- CLIP (HF and OpenCLIP): the CLS token after the final LayerNorm (HF ``post_layernorm``, the
  ``pooler_output`` of ``CLIPVisionModel``; OpenCLIP ``ln_post``), *before* the projection into the joint
  image-text space (HF ``visual_projection``, OpenCLIP ``proj``). That projection is one linear map,
  applied after ITAE's change; embeddings in the joint space are ``features.cls @ proj``;
- SigLIP: no CLS token; the output of its attention-pooling head (``pooler_output``). ITAE engineers
  that head's single query row (see ``docs/method.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from itae.errors import UnsupportedModelError

from .base import AttentionSite, Backbone, BlockParts, Features, Preprocess, ProbeSite, Rotary, mlp_sites

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

HF_MODEL_TYPES = {
    "dinov3_vit": "dinov3",
    "clip_vision_model": "clip",
    "clip": "clip",
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
    "siglip2_vision_model": "siglip2",
    "siglip2": "siglip2",
}


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _patch(value) -> int:
    return int(value if isinstance(value, int) else value[0])


def _split_site(index: int, layer: nn.Module, attn: nn.Module, out_proj: nn.Module, rotary=None) -> AttentionSite:
    heads = int(getattr(attn, "num_heads", None) or attn.config.num_attention_heads)
    head_dim = int(attn.head_dim)
    scale = getattr(attn, "scaling", None) or getattr(attn, "scale", None) or head_dim**-0.5
    return AttentionSite(
        index=index, block=layer, attention=attn, out_proj=out_proj, num_heads=heads, head_dim=head_dim,
        scale=float(scale), q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, rotary=rotary,
    )


def adapt_hf(model: nn.Module, kind: str, name: str | None) -> Backbone:
    """An HF transformers model of ``kind`` ("dinov3", "clip", "siglip" or "siglip2"), or a model wrapping one."""
    adapters = {"dinov3": _adapt_hf_dinov3, "clip": _adapt_hf_clip, "siglip": _adapt_hf_siglip,
                "siglip2": _adapt_hf_siglip2}
    return adapters[kind](model, name)


def _hf_name(model: nn.Module, cfg, name: str | None) -> str:
    return name or getattr(cfg, "_name_or_path", "") or type(model).__name__


# ------------------------------------------------------------------------------------------- DINOv3


def _read_position_embeddings(args: tuple, kwargs: dict):
    """(cos, sin) from a ``DINOv3ViTAttention`` call: (hidden_states, attention_mask, position_embeddings)."""
    if "position_embeddings" in kwargs:
        return kwargs["position_embeddings"]
    return args[2] if len(args) > 2 else None


def _apply_hf_dinov3_rope(q: torch.Tensor, k: torch.Tensor, position_embeddings):
    # the model's own function: rotates the patch rows, leaves CLS and registers as they are
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

    cos, sin = position_embeddings
    return apply_rotary_pos_emb(q, k, cos, sin)


def _adapt_hf_dinov3(model: nn.Module, name: str | None) -> Backbone:
    # DINOv3ViTModel keeps its encoder in ``.model``, which is also its base_model_prefix
    base = model if hasattr(model, "rope_embeddings") else getattr(model, "base_model", model)
    if not all(hasattr(base, a) for a in ("embeddings", "rope_embeddings", "model")):
        raise UnsupportedModelError(f"{type(model).__name__} has no DINOv3 encoder")
    cfg = base.config
    layers = list(base.model.layer)
    registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
    patch = _patch(cfg.patch_size)
    final_norm = getattr(base, "norm", None)

    def embed(pixel_values: torch.Tensor) -> torch.Tensor:
        return base.embeddings(pixel_values.to(base.embeddings.patch_embeddings.weight.dtype))

    def block_kwargs(pixel_values: torch.Tensor) -> dict:
        pixel_values = pixel_values.to(base.embeddings.patch_embeddings.weight.dtype)
        return {"position_embeddings": base.rope_embeddings(pixel_values)}

    def forward_features(pixel_values: torch.Tensor) -> Features:
        pixel_values = pixel_values.to(base.embeddings.patch_embeddings.weight.dtype)
        h = base.embeddings(pixel_values)
        position_embeddings = base.rope_embeddings(pixel_values)
        for layer in layers:
            h = _first(layer(h, position_embeddings=position_embeddings))
        if final_norm is not None:
            h = final_norm(h)
        p = 1 + registers
        return Features(cls=h[:, 0], patches=h[:, p:], registers=h[:, 1:p])

    sites = [
        _split_site(i, layer, layer.attention, layer.attention.o_proj,
                    Rotary(layer.attention, _read_position_embeddings, _apply_hf_dinov3_rope))
        for i, layer in enumerate(layers)
    ]
    return Backbone(
        model=model, family="hf", name=_hf_name(model, cfg, name),
        num_register_tokens=registers, patch_size=patch, embed_dim=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads), blocks=layers, sites=sites,
        preprocess=Preprocess(image_size=224, resize_size=256, interpolation="bicubic", patch_size=patch),
        forward_features_fn=forward_features, embed_fn=embed, final_norm=final_norm, block_kwargs_fn=block_kwargs,
        parts=[BlockParts(layer.norm1, layer.layer_scale1, layer.norm2, layer.mlp, layer.layer_scale2) for layer in layers],
        mlp_sites=mlp_sites([layer.mlp for layer in layers]),
    )


# --------------------------------------------------------------------------------------------- CLIP


def _clip_like_parts(layers: list[nn.Module]) -> list[BlockParts]:
    return [BlockParts(layer.layer_norm1, nn.Identity(), layer.layer_norm2, layer.mlp, nn.Identity()) for layer in layers]


def _square_preprocess(image_size: int, patch: int, mean, std) -> Preprocess:
    # CLIP and SigLIP are trained on the whole image at their input size: resize the shorter side to it
    # and centre-crop (no extra margin as in the DINOv2 recipe).
    return Preprocess(image_size=image_size, resize_size=image_size, interpolation="bicubic",
                      mean=tuple(mean), std=tuple(std), patch_size=patch)


def _adapt_hf_clip(model: nn.Module, name: str | None) -> Backbone:
    vision = getattr(model, "vision_model", model)  # CLIPModel / CLIPVisionModelWithProjection wrap the tower
    if not all(hasattr(vision, a) for a in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")):
        raise UnsupportedModelError(f"{type(model).__name__} has no CLIP vision tower")
    cfg = vision.config
    cfg = getattr(cfg, "vision_config", cfg)
    layers = list(vision.encoder.layers)
    patch = _patch(cfg.patch_size)

    def embed(pixel_values: torch.Tensor) -> torch.Tensor:
        return vision.pre_layrnorm(vision.embeddings(pixel_values))

    def forward_features(pixel_values: torch.Tensor) -> Features:
        h = embed(pixel_values)
        for layer in layers:
            h = _first(layer(h, None))
        h = vision.post_layernorm(h)  # HF normalises only the CLS (pooler_output); patches get the same norm here
        return Features(cls=h[:, 0], patches=h[:, 1:], registers=h[:, 1:1])

    return Backbone(
        model=model, family="hf", name=_hf_name(model, cfg, name),
        num_register_tokens=0, patch_size=patch, embed_dim=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads), blocks=layers,
        sites=[_split_site(i, layer, layer.self_attn, layer.self_attn.out_proj) for i, layer in enumerate(layers)],
        preprocess=_square_preprocess(int(cfg.image_size), patch, CLIP_MEAN, CLIP_STD),
        forward_features_fn=forward_features, embed_fn=embed, final_norm=vision.post_layernorm,
        parts=_clip_like_parts(layers), block_args=(None,), mlp_sites=mlp_sites([layer.mlp for layer in layers]),
    )


# ------------------------------------------------------------------------------------------- SigLIP


def _siglip_probe(head: nn.Module | None) -> ProbeSite | None:
    if head is None:
        return None
    return ProbeSite(head=head, attention=head.attention, num_heads=int(head.attention.num_heads),
                     head_dim=int(head.attention.head_dim))


def _siglip_tower(model: nn.Module, label: str) -> tuple[nn.Module, Any, list[nn.Module], int, nn.Module | None]:
    """The vision tower of a SigLIP or SigLIP2 model (or the tower itself): the tower, its vision config,
    its encoder layers, its patch size and its pooling head (None when the tower pools by mean)."""
    vision = getattr(model, "vision_model", model)
    if not all(hasattr(vision, a) for a in ("embeddings", "encoder", "post_layernorm")):
        raise UnsupportedModelError(f"{type(model).__name__} has no {label} vision tower")
    cfg = getattr(vision.config, "vision_config", vision.config)
    head = getattr(vision, "head", None) if getattr(vision, "use_head", True) else None
    return vision, cfg, list(vision.encoder.layers), _patch(cfg.patch_size), head


def _adapt_hf_siglip(model: nn.Module, name: str | None) -> Backbone:
    vision, cfg, layers, patch, head = _siglip_tower(model, "SigLIP")
    probe = _siglip_probe(head)

    def forward_features(pixel_values: torch.Tensor) -> Features:
        h = vision.embeddings(pixel_values)
        for layer in layers:
            h = _first(layer(h, None))
        h = vision.post_layernorm(h)
        pooled = head(h) if head is not None else h.mean(dim=1)
        return Features(cls=pooled, patches=h, registers=h[:, :0])

    return Backbone(
        model=model, family="hf", name=_hf_name(model, cfg, name),
        num_register_tokens=0, patch_size=patch, embed_dim=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads), blocks=layers,
        sites=[_split_site(i, layer, layer.self_attn, layer.self_attn.out_proj) for i, layer in enumerate(layers)],
        preprocess=_square_preprocess(int(cfg.image_size), patch, SIGLIP_MEAN, SIGLIP_STD),
        forward_features_fn=forward_features, embed_fn=vision.embeddings, final_norm=vision.post_layernorm,
        parts=_clip_like_parts(layers), block_args=(None,), cls_token=False, probe=probe,
        mlp_sites=mlp_sites([layer.mlp for layer in layers]),
    )


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C) patches in SigLIP2's order (rows of patches; inside a patch, pixel
    rows, then pixel columns, then channels), as its image processor hands them to the model."""
    b, c, h, w = pixel_values.shape
    x = pixel_values.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _adapt_hf_siglip2(model: nn.Module, name: str | None) -> Backbone:
    """SigLIP2 (NaFlex): the model takes patches, a padding mask and each image's grid. ``forward_features``
    feeds whole images (no padding); a padded batch run under ITAE is refused by the probe hook."""
    vision, cfg, layers, patch, head = _siglip_tower(model, "SigLIP2")
    side = int(round(int(cfg.num_patches) ** 0.5)) * patch

    def forward_features(pixel_values: torch.Tensor) -> Features:
        b, _, h, w = pixel_values.shape
        patches = patchify(pixel_values, patch)
        spatial = torch.tensor([[h // patch, w // patch]] * b, device=pixel_values.device)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=pixel_values.device)
        out = vision(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial)
        tokens = out.last_hidden_state
        pooled = out.pooler_output if out.pooler_output is not None else tokens.mean(dim=1)
        return Features(cls=pooled, patches=tokens, registers=tokens[:, :0])

    return Backbone(
        model=model, family="hf", name=_hf_name(model, cfg, name),
        num_register_tokens=0, patch_size=patch, embed_dim=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads), blocks=layers,
        sites=[_split_site(i, layer, layer.self_attn, layer.self_attn.out_proj) for i, layer in enumerate(layers)],
        preprocess=_square_preprocess(side, patch, SIGLIP_MEAN, SIGLIP_STD),
        forward_features_fn=forward_features, final_norm=vision.post_layernorm,
        parts=_clip_like_parts(layers), block_args=(None,), cls_token=False, probe=_siglip_probe(head),
        mlp_sites=mlp_sites([layer.mlp for layer in layers]),
    )


# ----------------------------------------------------------------------------------------- OpenCLIP


def is_open_clip(model: nn.Module) -> bool:
    """An OpenCLIP ``CLIP`` model (its ``visual`` tower is used) or an OpenCLIP ``VisionTransformer``."""
    module = type(model).__module__ or ""
    return module.startswith("open_clip") and (hasattr(model, "visual") or hasattr(model, "transformer"))


def adapt_open_clip(model: nn.Module, name: str | None) -> Backbone:
    """An OpenCLIP ViT with a class token and the default blocks (``nn.MultiheadAttention``)."""
    visual = getattr(model, "visual", model)
    if not all(hasattr(visual, a) for a in ("conv1", "class_embedding", "transformer", "ln_post")):
        raise UnsupportedModelError(f"{type(visual).__name__} is not an OpenCLIP ViT (no class-token vision transformer)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError("OpenCLIP ViTs that pool otherwise than by the class token are not supported")
    blocks = list(visual.transformer.resblocks)
    if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
        raise UnsupportedModelError("OpenCLIP ViT with custom attention blocks (block_type='custom') is not supported")
    if not getattr(visual.transformer, "batch_first", True):
        raise UnsupportedModelError("OpenCLIP ViT built with batch_first=False is not supported")
    patch = _patch(visual.patch_size)
    size = _patch(visual.image_size)
    cfg = getattr(visual, "preprocess_cfg", None) or {}

    def forward_features(pixel_values: torch.Tensor) -> Features:
        h = visual._embeds(pixel_values)
        for block in blocks:
            h = block(h)
        h = visual.ln_post(h)
        return Features(cls=h[:, 0], patches=h[:, 1:], registers=h[:, 1:1])

    sites = []
    for i, block in enumerate(blocks):
        mha = block.attn
        head_dim = mha.embed_dim // mha.num_heads
        sites.append(AttentionSite(index=i, block=block, attention=mha, out_proj=mha.out_proj, num_heads=mha.num_heads,
                                   head_dim=head_dim, scale=head_dim**-0.5, mha=mha))
    return Backbone(
        model=model, family="open_clip", name=name or type(model).__name__,
        num_register_tokens=0, patch_size=patch, embed_dim=int(visual.class_embedding.shape[-1]),
        num_heads=sites[0].num_heads, blocks=blocks, sites=sites,
        preprocess=_square_preprocess(size, patch, cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)),
        forward_features_fn=forward_features, embed_fn=visual._embeds, final_norm=visual.ln_post,
        parts=[BlockParts(b.ln_1, b.ls_1, b.ln_2, b.mlp, b.ls_2) for b in blocks],
        mlp_sites=mlp_sites([b.mlp for b in blocks]),
    )


# ------------------------------------------------------------------------------- timm DINOv3 (Eva)


def is_timm_eva(model: nn.Module) -> bool:
    return (type(model).__module__ or "").startswith("timm.") and type(model).__name__ == "Eva"


def _read_rope(args: tuple, kwargs: dict):
    """The rotary embedding of an ``EvaAttention`` call: (x, rope, attn_mask, is_causal)."""
    if "rope" in kwargs:
        return kwargs["rope"]
    return args[1] if len(args) > 1 else None


def _eva_rotary(attn: nn.Module) -> Rotary:
    def apply(q: torch.Tensor, k: torch.Tensor, rope):
        if rope is None:
            return q, k
        from timm.layers import apply_rot_embed_cat

        # as EvaAttention: the patch rows rotated with timm's own function, prefix rows as they are
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
        return q, k

    return Rotary(attn, _read_rope, apply, prefix_count="num_prefix_tokens")


def adapt_timm_eva(model: nn.Module, name: str | None) -> Backbone:
    """timm's ``Eva`` as its DINOv3 entries build it (``vit_*_patch16_dinov3``): class token, 4 registers,
    rotary embeddings, fused qkv without bias. The ``_qkvb`` entries add the q/v biases outside the qkv
    linear (``F.linear`` on its weight), where no hook sees them: they are refused."""
    if getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError("timm Eva model without a class token")
    if getattr(model, "rope_mixed", False):
        raise UnsupportedModelError("timm Eva with depth-dependent (mixed) rotary embeddings is not supported")
    blocks = list(model.blocks)
    sites = []
    for i, block in enumerate(blocks):
        attn = block.attn
        if type(block).__name__ != "EvaBlock" or getattr(attn, "qkv", None) is None:
            raise UnsupportedModelError(f"timm Eva block {i}: only pre-norm blocks with a fused qkv are supported")
        if getattr(attn, "q_bias", None) is not None:
            raise UnsupportedModelError(f"timm Eva block {i}: qkv biases applied outside the qkv linear (*_qkvb models) "
                                        "are not supported")
        if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"timm Eva block {i}: attention with an output norm or gate is not supported")
        heads = int(attn.num_heads)
        head_dim = attn.qkv.out_features // 3 // heads
        sites.append(AttentionSite(
            index=i, block=block, attention=attn, out_proj=attn.proj, num_heads=heads, head_dim=head_dim,
            scale=float(attn.scale), qkv=attn.qkv, q_norm=attn.q_norm, k_norm=attn.k_norm, rotary=_eva_rotary(attn),
        ))
    prefix = int(model.num_prefix_tokens)
    patch = _patch(model.patch_embed.patch_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}

    def forward_features(pixel_values: torch.Tensor) -> Features:
        h = model.forward_features(pixel_values)
        return Features(cls=h[:, 0], patches=h[:, prefix:], registers=h[:, 1:prefix])

    return Backbone(
        model=model, family="timm",
        name=name or cfg.get("hf_hub_id") or type(model).__name__,
        num_register_tokens=prefix - 1, patch_size=patch, embed_dim=int(model.embed_dim),
        num_heads=sites[0].num_heads, blocks=blocks, sites=sites,
        preprocess=Preprocess(image_size=224, resize_size=256, interpolation=cfg.get("interpolation", "bicubic"),
                              mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                              std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), patch_size=patch),
        forward_features_fn=forward_features, final_norm=model.norm, mlp_sites=mlp_sites([b.mlp for b in blocks]),
    )
