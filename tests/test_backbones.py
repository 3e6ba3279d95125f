"""The ViT families beyond DINOv2 (DINOv3, CLIP, SigLIP, DeiT-III): the same parity tests as DINOv2,
on tiny random-weight models (64 px, 16 px patches)."""

from __future__ import annotations

import copy

import pytest
import torch

import itae
from itae import ITAEConfig
from itae.engine.fast import forward_cls, supports_fast_cls
from itae.models import adapt
from itae.models.loading import load_backbone

from .helpers import cls_of as _cls
from .helpers import hooks_on as _hooks
from .helpers import median_threshold as _median_threshold
from .helpers.tiny import TINY_KINDS, tiny_vit

# which kinds the fast CLS path serves (the others go through the hooks of ``attenuate``)
FAST = {"hf-clip": True, "timm-deit3": True, "open_clip": True, "hf-dinov3": True, "timm-dinov3": False,
        "hf-siglip": False, "hf-siglip2": False}


@pytest.fixture(params=TINY_KINDS)
def kind(request):
    return request.param


@pytest.fixture
def model(kind):
    return tiny_vit(kind)


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_adapter_describes_the_family(kind, model):
    backbone = adapt(model)
    expected_prefix = {"hf-dinov3": 5, "timm-dinov3": 5, "hf-clip": 1, "hf-siglip": 0, "hf-siglip2": 0,
                       "timm-deit3": 1, "open_clip": 1}[kind]
    assert backbone.num_prefix_tokens == expected_prefix
    assert backbone.cls_token == (not kind.startswith("hf-siglip"))
    assert (backbone.probe is not None) == kind.startswith("hf-siglip")
    assert backbone.patch_size == 16 and backbone.num_blocks == 2
    assert supports_fast_cls(backbone, None) == FAST[kind]


def test_cls_embedding_is_the_models_own(kind, model, pixels):
    """Features.cls is the model's pooled output (HF pooler_output; timm's normed CLS token; OpenCLIP's
    ln_post on the CLS token, before ``proj``)."""
    with torch.no_grad():
        if kind == "hf-siglip2":  # NaFlex inputs, patched by the image processor's own function
            from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

            patches = torch.stack([convert_image_to_patches(img, 16) for img in pixels])
            out = model(pixel_values=patches, pixel_attention_mask=torch.ones(3, 16, dtype=torch.long),
                        spatial_shapes=torch.tensor([[4, 4]] * 3))
            torch.testing.assert_close(_cls(model, pixels), out.pooler_output, atol=0, rtol=0)
            return
        out = model(pixels)
        if kind == "open_clip":
            torch.testing.assert_close(_cls(model, pixels) @ model.proj, out, atol=1e-6, rtol=0)
            return
        ref = out.pooler_output if hasattr(out, "pooler_output") else model.forward_features(pixels)[:, 0]
        torch.testing.assert_close(_cls(model, pixels), ref, atol=0, rtol=0)


@pytest.mark.parametrize("rows", ["cls", "all"])
def test_nothing_flagged_is_the_unmodified_model(kind, model, pixels, rows):
    if kind.startswith("hf-siglip") and rows == "all":
        pytest.skip("SigLIP: ITAE engineers only the probe's row")
    with torch.no_grad():
        ref = _cls(model, pixels)
        with itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=0.0, rows=rows)) as state:
            out = _cls(model, pixels)
    assert not state.last[1].artifact_mask.any()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _attend(q0, k, v, flagged, num_prefix, scale):
    """One head, one query row, float64: logits, flagged patch keys set to the least patch logit, softmax."""
    logits = torch.stack([q0 @ k[j] for j in range(k.shape[0])]) * scale
    patch_min = logits[num_prefix:].min()
    for i in range(flagged.shape[0]):
        if flagged[i]:
            logits[num_prefix + i] = patch_min
    weights = torch.softmax(logits, dim=0)
    return sum(weights[j] * v[j] for j in range(v.shape[0]))


def _linear64(module, x):
    return x @ module.weight.double().T + (0 if module.bias is None else module.bias.double())


def _replay_last_block(kind, model, x_in, mask, pixels):
    """Hand-written float64 replay of the last block for the CLS token with the published change."""
    if kind == "timm-deit3":
        block = model.blocks[-1]
        norm1, ls1, norm2, mlp, ls2, final = block.norm1, block.ls1, block.norm2, block.mlp, block.ls2, model.norm
        w, b = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()
        z = norm1(x_in).double()
        q, k, v = (z @ w.T + b).chunk(3, dim=-1)
        out_proj, heads = block.attn.proj, block.attn.num_heads
    elif kind == "timm-dinov3":  # timm's Eva: layer scales are parameters, qkv without bias
        block = model.blocks[-1]
        norm1, norm2, mlp, final = block.norm1, block.norm2, block.mlp, model.norm
        def ls1(t):
            return block.gamma_1 * t
        def ls2(t):
            return block.gamma_2 * t
        z = norm1(x_in).double()
        q, k, v = (z @ block.attn.qkv.weight.double().T).chunk(3, dim=-1)
        out_proj, heads = block.attn.proj, block.attn.num_heads
    elif kind == "open_clip":  # nn.MultiheadAttention: one fused in_proj weight, rows ordered q, k, v
        block = model.transformer.resblocks[-1]
        norm1, ls1, norm2, mlp, ls2, final = block.ln_1, block.ls_1, block.ln_2, block.mlp, block.ls_2, model.ln_post
        w, b = block.attn.in_proj_weight.double(), block.attn.in_proj_bias.double()
        z = norm1(x_in).double()
        q, k, v = (z @ w.T + b).chunk(3, dim=-1)
        out_proj, heads = block.attn.out_proj, block.attn.num_heads
    else:
        layer = model.model.layer[-1] if kind == "hf-dinov3" else model.encoder.layers[-1]
        attn = layer.attention if kind == "hf-dinov3" else layer.self_attn
        if kind == "hf-dinov3":
            norm1, ls1, norm2, mlp, ls2 = layer.norm1, layer.layer_scale1, layer.norm2, layer.mlp, layer.layer_scale2
            final, out_proj = model.norm, attn.o_proj
        else:  # CLIP: pre-LN block without layer scale; the CLS embedding is post_layernorm of the CLS token
            norm1, norm2, mlp, final, out_proj = layer.layer_norm1, layer.layer_norm2, layer.mlp, model.post_layernorm, attn.out_proj
            ls1 = ls2 = torch.nn.Identity()
        z = norm1(x_in).double()
        q, k, v = (_linear64(m, z) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        heads = attn.num_heads
    prefix = adapt(model).num_prefix_tokens
    d = q.shape[-1] // heads
    if kind in ("hf-dinov3", "timm-dinov3"):  # rotary embedding on the patch rows of q and k, per head
        if kind == "hf-dinov3":
            cos, sin = (t.double() for t in model.rope_embeddings(pixels))  # (N, d) each
        else:  # timm hands the blocks sin and cos concatenated, (N, 2d)
            sin, cos = model._pos_embed(model.patch_embed(pixels))[1].double().chunk(2, dim=-1)
        def rope(t):
            t = t.clone().view(t.shape[0], t.shape[1], heads, d)
            patches = t[:, prefix:]
            t[:, prefix:] = patches * cos[:, None] + _rotate_half(patches) * sin[:, None]
            return t.view(t.shape[0], t.shape[1], heads * d)
        q, k = rope(q), rope(k)
    context = torch.stack([
        torch.cat([_attend(q[bi, 0, h * d:(h + 1) * d], k[bi, :, h * d:(h + 1) * d], v[bi, :, h * d:(h + 1) * d],
                           mask[bi], prefix, d**-0.5) for h in range(heads)])
        for bi in range(x_in.shape[0])
    ]).float()
    h = x_in[:, 0] + ls1(out_proj(context))
    h = h + ls2(mlp(norm2(h)))
    return final(h)


def _replay_probe(model, tokens, mask):
    """Hand-written float64 replay of SigLIP's pooling head with the change on its probe row."""
    head = model.head
    mha = head.attention
    w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    dim, heads = w.shape[1], mha.num_heads
    d = dim // heads
    q = head.probe.double()[0, 0] @ w[:dim].T + b[:dim]  # (D,)
    k = tokens.double() @ w[dim:2 * dim].T + b[dim:2 * dim]  # (B, N, D)
    v = tokens.double() @ w[2 * dim:].T + b[2 * dim:]
    context = torch.stack([
        torch.cat([_attend(q[h * d:(h + 1) * d], k[bi, :, h * d:(h + 1) * d], v[bi, :, h * d:(h + 1) * d],
                           mask[bi], 0, d**-0.5) for h in range(heads)])
        for bi in range(tokens.shape[0])
    ]).float()
    pooled = mha.out_proj(context)
    return pooled + head.mlp(head.layernorm(pooled))


def test_engineered_output_equals_hand_written_replay(kind, model, pixels):
    backbone = adapt(model)
    seen = {}
    target = backbone.probe.head if backbone.probe is not None else backbone.blocks[-1]
    handle = target.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0]))
    try:
        with torch.no_grad(), itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=_median_threshold(model, pixels))) as state:
            out = backbone.forward_features(pixels).cls
    finally:
        handle.remove()
    mask = state.last[1].artifact_mask
    assert 0 < mask.sum() < mask.numel()
    with torch.no_grad():
        expected = _replay_probe(model, seen["x"], mask) if backbone.probe is not None else _replay_last_block(
            kind, model, seen["x"], mask, pixels)
        plain = _cls(model, pixels)
    assert (out - plain).abs().max() > 1e-6  # the change is there...
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # ...and it is the equation's


def test_batch_equals_single_images(model, pixels):
    with torch.no_grad(), itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=_median_threshold(model, pixels))):
        batch = _cls(model, pixels)
        singles = torch.cat([_cls(model, pixels[i : i + 1]) for i in range(pixels.shape[0])])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)


def test_model_restored_after_exit_and_after_exception(model, pixels):
    with torch.no_grad():
        ref = _cls(model, pixels)
    hooks_before = _hooks(model)
    state_before = copy.deepcopy(model.state_dict())
    cfg = ITAEConfig(source="v", side="low", threshold=_median_threshold(model, pixels))
    with torch.no_grad():
        with itae.attenuate(model, cfg):
            assert not torch.allclose(_cls(model, pixels), ref, atol=1e-6)
        assert _hooks(model) == hooks_before
        torch.testing.assert_close(_cls(model, pixels), ref, atol=0, rtol=0)
        with pytest.raises(KeyError), itae.attenuate(model, cfg):
            _cls(model, pixels)
            raise KeyError("boom")
        assert _hooks(model) == hooks_before
        torch.testing.assert_close(_cls(model, pixels), ref, atol=0, rtol=0)
    after = model.state_dict()
    assert all(torch.equal(state_before[key], after[key]) for key in after)


def test_fast_cls_path_where_the_structure_allows(kind, model, pixels):
    backbone = adapt(model)
    cfg = ITAEConfig(side="low", threshold=_median_threshold(model, pixels, "k"), source="k")
    if not FAST[kind]:
        assert not supports_fast_cls(backbone, cfg)
        with pytest.raises(ValueError, match="attenuate"):
            forward_cls(backbone, pixels, cfg)
        return
    with torch.no_grad():
        plain, _ = forward_cls(backbone, pixels)
        torch.testing.assert_close(plain, backbone.forward_features(pixels).cls, atol=1e-5, rtol=1e-5)
        with itae.attenuate(model, cfg) as state:
            hooked = backbone.forward_features(pixels).cls
        fast, mask = forward_cls(backbone, pixels, cfg)
    assert torch.equal(mask, state.last[1].artifact_mask)
    torch.testing.assert_close(fast, hooked, atol=1e-5, rtol=1e-5)


def test_diagnostics_show_the_row_that_is_engineered(kind, model, pixels):
    """detect_artifacts' attention rows (the probe's on SigLIP) give flagged keys no more than the least patch."""
    backbone = adapt(model)
    diag = itae.detect_artifacts(model, pixels, ITAEConfig(source="v", side="low", threshold=_median_threshold(model, pixels)))[1]
    after = diag.cls_attention_itae[:, :, backbone.num_prefix_tokens:]
    assert after.shape[-1] == 16
    least = after.amin(dim=-1, keepdim=True)
    flagged = diag.artifact_mask[:, None].expand_as(after)
    assert flagged.any() and torch.all(after[flagged] <= least.expand_as(after)[flagged] + 1e-7)
    torch.testing.assert_close(diag.cls_attention.sum(-1), torch.ones(3, 4), atol=1e-5, rtol=0)


def test_siglip_refuses_what_its_probe_cannot_do(pixels):
    model = tiny_vit("hf-siglip")
    before = _hooks(model)
    for cfg in (ITAEConfig(source="v", side="low", threshold=1.0, rows="all"), ITAEConfig(source="v", side="low", threshold=1.0, layers=(0,))):
        with pytest.raises(ValueError, match="no CLS token"):
            itae.attenuate(model, cfg)
    assert _hooks(model) == before
    model.head = None  # a SigLIP tower without its pooling head: nothing for ITAE to engineer
    model.use_head = False
    with pytest.raises(ValueError, match="neither"):
        itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=1.0))


def test_embed_refuses_itae_on_a_model_without_cls_or_probe(tmp_path, monkeypatch):
    import itae.extraction.sampling

    def calibration_ran(*_a, **_k):
        raise AssertionError("calibration ran before the refusal")

    monkeypatch.setattr(itae.extraction.sampling, "calibrate_source", calibration_ran)
    model = tiny_vit("hf-siglip")
    model.head, model.use_head = None, False
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(ValueError, match="has neither"):
        itae.embed(tmp_path / "imgs", model, out=tmp_path / "store", itae=ITAEConfig())
    assert not (tmp_path / "store" / "embeddings.npy").exists()
    store = itae.embed(tmp_path / "imgs", model, out=tmp_path / "plain", itae=None)  # the baseline still runs
    assert store.embeddings().shape == (1, 32)


def test_siglip2_refuses_padded_batches_under_itae(pixels):
    from itae.models.families import patchify

    model = tiny_vit("hf-siglip2")
    patches = patchify(pixels, 16)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, -4:] = 0  # the first image's last row of patches is padding
    with torch.no_grad(), itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=1.0)):
        with pytest.raises(RuntimeError, match="padded"):
            model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[4, 4]] * 3))


def test_clip_wrappers_use_the_vision_tower(pixels):
    from transformers import CLIPVisionModelWithProjection

    tower = tiny_vit("hf-clip")
    wrapper = CLIPVisionModelWithProjection(tower.config).eval()
    wrapper.vision_model.load_state_dict(tower.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_cls(wrapper, pixels), _cls(tower, pixels), atol=0, rtol=0)
        with itae.attenuate(wrapper, ITAEConfig(source="v", side="low", threshold=_median_threshold(tower, pixels))):
            engineered = wrapper(pixels).image_embeds
        assert (engineered - wrapper(pixels).image_embeds).abs().max() > 0


@pytest.mark.parametrize("kind", ["hf-dinov3", "hf-clip", "hf-siglip", "hf-siglip2"])
def test_hf_families_load_from_a_save_pretrained_folder(tmp_path, kind, pixels):
    model = tiny_vit(kind)
    model.save_pretrained(str(tmp_path / kind))
    backbone = load_backbone(str(tmp_path / kind))
    assert type(backbone.model) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(pixels).cls, _cls(model, pixels), atol=1e-6, rtol=0)
    assert backbone.preprocess.patch_size == 16


@pytest.mark.parametrize("kind, arch", [("timm-deit3", "deit3_small_patch16_224"),
                                        ("timm-dinov3", "vit_small_patch16_dinov3")])
def test_timm_families_load_from_a_described_checkpoint(tmp_path, pixels, kind, arch):
    from itae.models.checkpoints import write_checkpoint

    model = tiny_vit(kind)
    path = write_checkpoint(model.state_dict(), tmp_path / f"{kind}.safetensors", family="timm", arch=arch,
                            model_kwargs={"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 4, "init_values": 1.0})
    backbone = load_backbone(str(path))
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(pixels).cls, _cls(model, pixels), atol=1e-6, rtol=0)
