"""The official DINOv2 vision transformer, written here so that no hub code has to be downloaded.

The module tree and attribute names follow ``facebookresearch/dinov2`` (``DinoVisionTransformer``,
``Block``, ``MemEffAttention``, ``LayerScale``, ...), so that the published ``.pth`` checkpoints load with
``strict=True`` and the model is what ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")``
returns, for inference. Differences from the official code, all on paths inference does not take:

- only ``block_chunks=0`` (a flat ``blocks`` list, as the hub factories build it) is supported;
- ``MemEffAttention`` uses ``torch.nn.functional.scaled_dot_product_attention`` instead of xFormers, and
  lists of images (xFormers nested tensors) are run one tensor at a time;
- training-only stochastic-depth batching is replaced by a plain per-sample drop path.

Factories mirror the hub names: ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vitl14``, ``dinov2_vitg14``
and their ``*_reg`` variants (4 registers). ``build_dinov2`` builds any size, e.g. tiny test models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itae.errors import InputError, InputIndexError, InputTypeError

from .checkpoints import read_state_dict

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"

# Official architecture names -> (embed_dim, depth, num_heads); MLP ratio 4 for all.
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}

# Hub factory names -> (architecture, number of register tokens).
HUB_MODELS: dict[str, tuple[str, int]] = {
    "dinov2_vits14": ("vit_small", 0),
    "dinov2_vitb14": ("vit_base", 0),
    "dinov2_vitl14": ("vit_large", 0),
    "dinov2_vitg14": ("vit_giant2", 0),
    "dinov2_vits14_reg": ("vit_small", 4),
    "dinov2_vitb14_reg": ("vit_base", 4),
    "dinov2_vitl14_reg": ("vit_large", 4),
    "dinov2_vitg14_reg": ("vit_giant2", 4),
}


# ------------------------------------------------------------------------------------------ layers


class PatchEmbed(nn.Module):
    """Image to patch tokens: (B, C, H, W) -> (B, N, D) with a strided convolution."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        image_hw = _pair(img_size)
        patch_hw = _pair(patch_size)
        self.img_size = image_hw
        self.patch_size = patch_hw
        self.patches_resolution = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_hw, stride=patch_hw)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise InputError(
                f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}; "
                "resize or crop the images to a multiple of the patch size"
            )
        x = self.proj(x)  # (B, D, H/p, W/p)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = self.norm(x)
        if not self.flatten_embedding:
            x = x.reshape(-1, grid_h, grid_w, self.embed_dim)  # (B, H/p, W/p, D)
        return x


class LayerScale(nn.Module):
    """Per-channel learnt scale of a residual branch (``gamma``)."""

    def __init__(self, dim: int, init_values: float | Tensor = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """Two-layer feed-forward network ``fc2(act(fc1(x)))``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward network with the two input projections packed in ``w12``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # each (B, N, hidden)
        return self.w3(F.silu(gate) * value)


class SwiGLUFFNFused(SwiGLUFFN):
    """SwiGLU with the hidden width the ViT-g checkpoints use: 2/3 of the MLP width, rounded up to 8."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        hidden_features = hidden_features or in_features
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        super().__init__(in_features, hidden_features, out_features or in_features, bias=bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection, computed with explicit softmax."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise InputError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        # (B, N, 3D) -> (3, B, H, N, d)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))  # (B, H, N, N)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)  # (B, H, N, d) -> (B, N, D)
        return self.proj_drop(self.proj(x))


class MemEffAttention(Attention):
    """``Attention`` computed with ``scaled_dot_product_attention`` (the official class uses xFormers).

    Dataflow kept as upstream: ``qkv`` linear -> (B, N, 3, H, d) -> attention -> heads merged -> ``proj``,
    so hooks on ``attn.qkv`` outputs and ``attn.proj`` inputs see the same tensors.
    """

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        if attn_bias is not None and not isinstance(attn_bias, Tensor):
            raise InputTypeError("attn_bias must be an additive tensor broadcastable to (B, H, N, N); "
                                 "xFormers block-diagonal masks (nested tensors) are not supported")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, N, d)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )
        x = x.transpose(1, 2).reshape(b, n, c)  # (B, H, N, d) -> (B, N, D)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=ffn_bias
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# ------------------------------------------------------------------------------------------- model


class DinoVisionTransformer(nn.Module):
    """The DINOv2 ViT backbone. Tokens are ``[CLS, registers..., patches...]``.

    ``forward_features(x)`` returns ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D),
    ``x_norm_patchtokens`` (B, N, D), ``x_prenorm`` (B, 1+R+N, D) and ``masks``; ``forward(x)`` returns
    the CLS head output (``head`` is the identity).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: str = "mlp",
        block_chunks: int = 0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        if block_chunks:
            raise InputError(
                f"block_chunks={block_chunks} is not supported: only the flat block list (block_chunks=0) "
                "that the torch.hub factories build"
            )
        if num_register_tokens < 0:
            raise InputError(f"num_register_tokens must be >= 0; got {num_register_tokens}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            dpr = [drop_path_rate] * depth
        else:
            # stochastic depth grows linearly over the blocks (plain Python: also works on the meta device)
            dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]

        ffn = _ffn_class(ffn_layer)
        self.chunked_blocks = False
        self.blocks = nn.ModuleList(
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=ffn,
                init_values=init_values,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """Position embeddings (1, 1+N, D) for an image of ``height`` x ``width`` pixels (bicubic)."""
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and height == width:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        h0 = height // self.patch_size
        w0 = width // self.patch_size
        m = int(math.sqrt(n))  # side of the square grid the embeddings were trained on
        if m * m != n:
            raise InputError(f"pos_embed holds {n} patch positions, not a square grid")
        if self.interpolate_offset:
            # Upstream passes a scale factor nudged by the offset (a historical floating-point work-around);
            # the interpolation weights depend on it, so checkpoints trained this way need it kept.
            kwargs: dict = {"scale_factor": ((h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (h0, w0)}
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),  # (1, D, m, m)
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        if tuple(patch_pos_embed.shape[-2:]) != (h0, w0):
            raise RuntimeError(f"position embedding interpolation gave {tuple(patch_pos_embed.shape[-2:])}, "
                               f"expected {(h0, w0)}")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, h0*w0, D)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Patch-embed images (B, C, H, W) into tokens (B, 1+R+N, D); ``masks`` (B, N) swaps in the mask token."""
        _, _, height, width = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            # registers carry no position embedding: they go in after it is added
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(self, x_list: list[Tensor], masks_list: list[Tensor | None]) -> list[dict]:
        """``forward_features`` of each image batch in turn (upstream batches them through xFormers)."""
        return [self.forward_features(x, masks) for x, masks in zip(x_list, masks_list, strict=True)]

    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | None = None) -> dict | list[dict]:
        if isinstance(x, list):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x))
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._outputs(x, masks)

    def _get_intermediate_layers_not_chunked(self, x: Tensor, n: int | Sequence[int] = 1) -> list[Tensor]:
        x = self.prepare_tokens_with_masks(x)
        total = len(self.blocks)
        take = range(total - n, total) if isinstance(n, int) else n
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                output.append(x)
        if len(output) != len(take):
            raise InputIndexError(f"only {len(output)} of the {len(take)} requested blocks exist")
        return output

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last ``n`` blocks (or of the listed blocks), as upstream.

        Each output is (B, N, D), or (B, D, H/p, W/p) with ``reshape``; paired with the CLS token (B, D)
        when ``return_class_token``.
        """
        outputs = self._get_intermediate_layers_not_chunked(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b, _, height, width = x.shape
            outputs = [
                out.reshape(b, height // self.patch_size, width // self.patch_size, -1).permute(0, 3, 1, 2).contiguous()
                for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens, strict=True))
        return tuple(outputs)

    def forward(self, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


def _ffn_class(ffn_layer: str) -> Callable[..., nn.Module]:
    if ffn_layer == "mlp":
        return Mlp
    if ffn_layer in ("swiglu", "swiglufused"):
        return SwiGLUFFNFused
    if ffn_layer == "identity":
        return lambda *args, **kwargs: nn.Identity()
    raise InputError(f"unknown ffn_layer {ffn_layer!r}; expected 'mlp', 'swiglu', 'swiglufused' or 'identity'")


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(x, tuple):
        if len(x) != 2:
            raise InputError(f"expected an int or a pair; got {x}")
        return x
    return (int(x), int(x))


# --------------------------------------------------------------------------------------- factories


def checkpoint_filename(hub_name: str) -> str:
    """The file name of a hub model's official checkpoint, e.g. ``dinov2_vitb14_reg4_pretrain.pth``.

    ``torch.hub.load_state_dict_from_url`` caches it under ``torch.hub.get_dir()/checkpoints/``.
    """
    _, registers = _hub_spec(hub_name)
    stem = hub_name.removesuffix("_reg")
    return f"{stem}_reg{registers}_pretrain.pth" if registers else f"{stem}_pretrain.pth"


def checkpoint_url(hub_name: str) -> str:
    """Where the official checkpoint of a hub model is published."""
    _hub_spec(hub_name)
    return f"{DINOV2_BASE_URL}/{hub_name.removesuffix('_reg')}/{checkpoint_filename(hub_name)}"


def _hub_spec(hub_name: str) -> tuple[str, int]:
    try:
        return HUB_MODELS[hub_name]
    except KeyError:
        raise InputError(f"unknown DINOv2 hub model {hub_name!r}; expected one of {', '.join(HUB_MODELS)}") from None


def build_dinov2(
    *,
    arch: str = "vit_base",
    patch_size: int = 14,
    num_register_tokens: int = 0,
    img_size: int = 518,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    ffn_layer: str | None = None,
    init_values: float = 1.0,
    interpolate_antialias: bool | None = None,
    interpolate_offset: float | None = None,
    weights: str | Path | None = None,
) -> DinoVisionTransformer:
    """A ``DinoVisionTransformer`` built as the hub builds it, with any size overridden.

    ``arch`` is one of ``vit_small``, ``vit_base``, ``vit_large``, ``vit_giant2``; it sets the defaults of
    ``depth``/``embed_dim``/``num_heads`` and the FFN (SwiGLU for ``vit_giant2``). As in the hub, models
    with registers interpolate position embeddings by output size with antialiasing, and the others with
    the 0.1 scale-factor offset, unless ``interpolate_*`` are given. ``weights``: a local ``.pth`` or
    ``.safetensors`` state dict, loaded with ``strict=True``. The model is returned in eval mode.
    """
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown DINOv2 architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    default_dim, default_depth, default_heads = ARCHITECTURES[arch]
    registers = int(num_register_tokens)
    model = DinoVisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim if embed_dim is not None else default_dim,
        depth=depth if depth is not None else default_depth,
        num_heads=num_heads if num_heads is not None else default_heads,
        mlp_ratio=mlp_ratio,
        init_values=init_values,
        block_fn=partial(Block, attn_class=MemEffAttention),
        ffn_layer=ffn_layer or ("swiglufused" if arch == "vit_giant2" else "mlp"),
        block_chunks=0,
        num_register_tokens=registers,
        interpolate_antialias=bool(registers) if interpolate_antialias is None else interpolate_antialias,
        interpolate_offset=(0.0 if registers else 0.1) if interpolate_offset is None else interpolate_offset,
    )
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state dict (``.safetensors``, or ``.pth`` via ``torch.load(weights_only=True)``), strictly."""
    state_dict = read_state_dict(path)
    missing, unexpected = _key_mismatch(model, state_dict)
    if missing or unexpected:
        raise InputError(
            f"{path}: the checkpoint does not match {type(model).__name__} "
            f"(missing {_few(missing)}; unexpected {_few(unexpected)}); check the architecture name"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # shape mismatch: same names, another size
        raise InputError(f"{path}: the checkpoint's tensor shapes do not match the model; "
                         f"check the architecture name ({str(err).splitlines()[-1].strip()})") from None
    return model


def _key_mismatch(model: nn.Module, state_dict: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    given = set(state_dict)
    return sorted(expected - given), sorted(given - expected)


def _few(keys: list[str], limit: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _make_hub_model(hub_name: str, pretrained: bool, weights: str | Path | None, **kwargs) -> DinoVisionTransformer:
    arch, registers = _hub_spec(hub_name)
    model = build_dinov2(arch=arch, num_register_tokens=registers, weights=weights, **kwargs)
    if pretrained and weights is None:
        state_dict = torch.hub.load_state_dict_from_url(
            checkpoint_url(hub_name), map_location="cpu", weights_only=True, file_name=checkpoint_filename(hub_name)
        )
        model.load_state_dict(state_dict, strict=True)
    return model


def dinov2_vits14(*, pretrained: bool = False, weights: str | None = None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14. ``pretrained`` fetches the official checkpoint (cached by torch.hub); ``weights``
    loads a local file instead."""
    return _make_hub_model("dinov2_vits14", pretrained, weights, **kwargs)


def dinov2_vitb14(*, pretrained: bool = False, weights: str | None = None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 (see ``dinov2_vits14`` for the arguments)."""
    return _make_hub_model("dinov2_vitb14", pretrained, weights, **kwargs)


def dinov2_vitl14(*, pretrained: bool = False, weights: str | None = None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 (see ``dinov2_vits14`` for the arguments)."""
    return _make_hub_model("dinov2_vitl14", pretrained, weights, **kwargs)


def dinov2_vitg14(*, pretrained: bool = False, weights: str | None = None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14, SwiGLU FFN (see ``dinov2_vits14`` for the arguments)."""
    return _make_hub_model("dinov2_vitg14", pretrained, weights, **kwargs)


def dinov2_vits14_reg(*, pretrained: bool = False, weights: str | None = None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14 with 4 registers (see ``dinov2_vits14`` for the arguments)."""
    return _make_hub_model("dinov2_vits14_reg", pretrained, weights, **kwargs)


def dinov2_vitb14_reg(*, pretrained: bool = False, weights: str | None = None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 with 4 registers (see ``dinov2_vits14`` for the arguments)."""
    return _make_hub_model("dinov2_vitb14_reg", pretrained, weights, **kwargs)


def dinov2_vitl14_reg(*, pretrained: bool = False, weights: str | None = None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 with 4 registers (see ``dinov2_vits14`` for the arguments)."""
    return _make_hub_model("dinov2_vitl14_reg", pretrained, weights, **kwargs)


def dinov2_vitg14_reg(*, pretrained: bool = False, weights: str | None = None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14 with 4 registers (see ``dinov2_vits14`` for the arguments)."""
    return _make_hub_model("dinov2_vitg14_reg", pretrained, weights, **kwargs)


def hub_model(name: str, *, pretrained: bool = False, weights: str | Path | None = None, **kwargs) -> DinoVisionTransformer:
    """The hub factory called ``name`` (``dinov2_vitb14``, ``dinov2_vits14_reg``, ...)."""
    return _make_hub_model(name, pretrained, weights, **kwargs)
