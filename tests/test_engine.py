"""Parity and behaviour of ``attenuate`` on tiny models of every backend."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import itae
from itae import ITAEConfig
from itae.engine.functional import reference_attention, split_heads
from itae.models import UnsupportedModelError, adapt
from itae.models.planted import plant_artifacts

from .conftest import build_tiny
from .helpers import cls_of as _out
from .helpers import hooks_on as _hooks
from .helpers import median_threshold as _median_threshold


def test_nothing_flagged_is_the_unmodified_model(tiny, images):
    ref = _out(tiny, images)
    for rows in ("cls", "all"):
        with itae.attenuate(tiny, ITAEConfig(source="v", threshold=0.0, side="low", rows=rows)) as state:
            out = _out(tiny, images)
        assert not state.last[adapt(tiny).num_blocks - 1].artifact_mask.any()
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_models_own_forward_is_engineered(tiny, images):
    """The model's own forward (not only forward_features) goes through the engine."""
    thr = _median_threshold(tiny, images)
    ref = tiny(images)
    with itae.attenuate(tiny, ITAEConfig(source="v", side="low", threshold=thr)):
        out = tiny(images)
    ref = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    assert not torch.allclose(ref, out, atol=1e-4)


def _replay_last_block_cls(backbone, x_in: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hand-written replay of the last block for the CLS token, in float64, with the published change:
    CLS-row logits of artifact keys replaced by the row minimum over patch keys."""
    block, site = backbone.blocks[-1], backbone.sites[-1]
    if backbone.family == "hf":
        norm1, ls1, norm2, mlp, ls2 = block.norm1, block.layer_scale1, block.norm2, block.mlp, block.layer_scale2
        final = backbone.model.base_model.layernorm
    else:
        norm1, ls1, norm2, mlp, ls2 = block.norm1, block.ls1, block.norm2, block.mlp, block.ls2
        final = backbone.model.norm
    z = norm1(x_in).double()
    if site.qkv is not None:
        w, b = site.qkv.weight.double(), site.qkv.bias.double()
        q_all, k_all, v_all = (z @ w.T + b).chunk(3, dim=-1)
    else:
        q_all, k_all, v_all = (z @ m.weight.double().T + m.bias.double() for m in (site.q, site.k, site.v))
    p = backbone.num_prefix_tokens
    heads, d = site.num_heads, site.head_dim
    outs = []
    for bi in range(x_in.shape[0]):
        head_outs = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            q0 = q_all[bi, 0, sl]
            logits = torch.stack([q0 @ k_all[bi, j, sl] for j in range(x_in.shape[1])]) * d**-0.5
            patch_min = logits[p:].min()
            for i in range(mask.shape[1]):
                if mask[bi, i]:
                    logits[p + i] = patch_min
            weights = torch.softmax(logits, dim=0)
            head_outs.append(sum(weights[j] * v_all[bi, j, sl] for j in range(x_in.shape[1])))
        outs.append(torch.cat(head_outs))
    context = torch.stack(outs).float()  # (B, D)
    h = x_in[:, 0] + ls1(site.out_proj(context))
    h = h + ls2(mlp(norm2(h)))
    return final(h)


def test_cls_output_equals_hand_written_replay(tiny, images):
    backbone = adapt(tiny)
    thr = _median_threshold(tiny, images)
    seen = {}
    handle = backbone.blocks[-1].register_forward_pre_hook(lambda _m, a: seen.update(x=a[0]))
    try:
        with itae.attenuate(tiny, ITAEConfig(source="v", side="low", threshold=thr)) as state:
            out = backbone.forward_features(images).cls
    finally:
        handle.remove()
    mask = state.last[backbone.num_blocks - 1].artifact_mask
    assert 0 < mask.sum() < mask.numel()
    with torch.no_grad():
        expected = _replay_last_block_cls(backbone, seen["x"], mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", ["cls", "all"])
@pytest.mark.parametrize("mode", ["min", "mask", "scale"])
@pytest.mark.parametrize("granularity", ["token", "head"])
def test_fast_path_equals_reference(rows, mode, granularity, images):
    for family, registers in (("hf", 0), ("timm", 4), ("hub", 4)):
        model = build_tiny(family, registers)
        backbone = adapt(model)
        site = backbone.sites[-1]
        thr = _median_threshold(model, images, "k")
        cfg = ITAEConfig(source="k", side="low", threshold=thr, rows=rows, mode=mode, granularity=granularity, alpha=0.3)
        got = {}
        with itae.attenuate(model, cfg) as state:
            # observers registered after the engine's hooks see what the engine did
            qkv_module = site.qkv if site.qkv is not None else None
            def keep(name, got=got):
                def hook(_m, *args):
                    got[name] = args[-1] if name != "ctx" else args[0][0].clone()
                return hook  # returns None: observes, never replaces

            handles = [site.out_proj.register_forward_pre_hook(keep("ctx"))]
            if qkv_module is not None:
                handles.append(qkv_module.register_forward_hook(keep("qkv")))
            else:
                handles += [getattr(site, name).register_forward_hook(keep(name)) for name in "qkv"]
            try:
                backbone.forward_features(images)
            finally:
                for h in handles:
                    h.remove()
        q, k, v = got["qkv"].chunk(3, -1) if "qkv" in got else (got["q"], got["k"], got["v"])
        mask = state.last[backbone.num_blocks - 1].artifact_mask
        assert mask.any()
        ref = reference_attention(
            *(split_heads(t, site.num_heads) for t in (q, k, v)), mask,
            num_prefix=backbone.num_prefix_tokens, mode=mode, alpha=0.3, rows=rows,
        )
        ref = ref.transpose(1, 2).reshape(got["ctx"].shape)
        if rows == "cls":
            torch.testing.assert_close(got["ctx"][:, 0], ref[:, 0], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(got["ctx"], ref, atol=1e-5, rtol=1e-5)


def test_batch_equals_single_images(tiny, images):
    cfg = ITAEConfig(source="v", side="low", threshold=_median_threshold(tiny, images))
    with itae.attenuate(tiny, cfg):
        batch = _out(tiny, images)
        singles = torch.cat([_out(tiny, images[i : i + 1]) for i in range(images.shape[0])])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)


def test_model_restored_after_exit_and_after_exception(tiny, images):
    ref = _out(tiny, images)
    hooks_before = _hooks(tiny)
    state_before = copy.deepcopy(tiny.state_dict())
    cfg = ITAEConfig(source="v", side="low", threshold=_median_threshold(tiny, images))
    with itae.attenuate(tiny, cfg):
        assert not torch.allclose(_out(tiny, images), ref, atol=1e-5)
    assert _hooks(tiny) == hooks_before
    torch.testing.assert_close(_out(tiny, images), ref, atol=0, rtol=0)
    with pytest.raises(KeyError):
        with itae.attenuate(tiny, cfg):
            _out(tiny, images)
            raise KeyError("boom")
    assert _hooks(tiny) == hooks_before
    torch.testing.assert_close(_out(tiny, images), ref, atol=0, rtol=0)
    after = tiny.state_dict()
    assert state_before.keys() == after.keys()
    for key in after:
        assert torch.equal(state_before[key], after[key]), key


def test_nesting_refused(images):
    model = build_tiny("hf")
    before = _hooks(model)
    with itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=1.0)):
        with pytest.raises(RuntimeError, match="already inside"):
            with itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=1.0)):
                pass
    assert _hooks(model) == before


def test_planted_artifacts_detected_calibrated_and_attenuated(tiny, images):
    positions = [0, 5, 10]
    plant_artifacts(tiny, positions)
    cal = itae.calibrate(tiny, images, ITAEConfig())
    last = adapt(tiny).num_blocks - 1
    diag = itae.detect_artifacts(tiny, images, cal.config)[last]
    expected = torch.zeros_like(diag.artifact_mask)
    expected[:, positions] = True
    assert torch.equal(diag.artifact_mask, expected)
    # the threshold sits between the planted tokens and the rest
    v = diag.norms["v"]
    assert v[:, positions].max() < cal.thresholds[last] < v[~expected].min()
    assert cal.bimodal[last]
    assert cal.flagged_fraction[last] == pytest.approx(len(positions) / v.shape[1])
    # the sinks soak up the CLS attention before ITAE...
    assert (diag.attention_on_artifacts > 0.5).all()
    # ...and after it each gets no more than the least-attended patch
    after = diag.cls_attention_itae[:, :, diag.num_prefix_tokens :]
    least = after.amin(dim=-1)
    assert torch.all(after[:, :, positions] <= least[..., None] + 1e-7)
    # the model run under attenuate reports the same mask
    with itae.attenuate(tiny, cal.config) as state:
        _out(tiny, images)
    assert torch.equal(state.last[last].artifact_mask, expected)


def test_auto_threshold_calibrates_on_first_batch_and_keeps_it(images):
    model = build_tiny("timm")
    plant_artifacts(model, [3, 7])
    fixed = ITAEConfig(source="v", side="low")  # threshold "auto"
    with itae.attenuate(model, fixed) as state:
        _out(model, images[:2])
        first = dict(state.thresholds)
        _out(model, images[2:])
    assert state.calibrated_on_first_batch
    assert state.thresholds == first
    expected = itae.calibrate(model, images[:2], fixed).thresholds
    assert first == pytest.approx(expected)


def test_attenuate_refuses_an_auto_source_with_a_pointer_to_calibrate():
    model = build_tiny("timm")
    for cfg in (ITAEConfig(), ITAEConfig(source="v"), ITAEConfig(side="low")):
        with pytest.raises(ValueError, match=r"itae\.calibrate"):
            itae.attenuate(model, cfg)


def test_calibration_reports_what_its_threshold_flags(images):
    """flagged_fraction, bimodal and the pooled norms of a Calibration agree with its threshold."""
    model = build_tiny("hf")
    plant_artifacts(model, [2, 9])
    last = adapt(model).num_blocks - 1
    for cfg in (ITAEConfig(), ITAEConfig(source="k", granularity="head")):
        cal = itae.calibrate(model, images, cfg)
        norms = cal.norms[last]
        expected = 16 * images.shape[0] * (4 if cfg.granularity == "head" else 1)  # 4 x 4 patches (x heads)
        assert norms.shape == (expected,)
        threshold = cal.thresholds[last]
        flagged = float((norms <= threshold if cal.side == "low" else norms >= threshold).mean())
        assert cal.flagged_fraction[last] == pytest.approx(flagged)
        assert cal.bimodal[last] == (flagged > 0)


def test_wrappers_are_supported(images):
    from transformers import Dinov2Backbone, Dinov2ForImageClassification

    base = build_tiny("hf")
    for cls in (Dinov2ForImageClassification, Dinov2Backbone):
        cfg = copy.deepcopy(base.config)
        if cls is Dinov2Backbone:
            cfg.out_features = ["stage2"]
        wrapper = cls(cfg).eval()
        before = _hooks(wrapper)
        thr = _median_threshold(wrapper, images)
        ref = wrapper(images)
        # the first block: its CLS change reaches the patch feature maps that Dinov2Backbone returns
        with itae.attenuate(wrapper, ITAEConfig(source="v", side="low", threshold=thr, layers=(0,))) as state:
            out = wrapper(images)
        assert state.last[0].artifact_mask.any()
        a = ref.logits if hasattr(ref, "logits") else ref.feature_maps[0]
        b = out.logits if hasattr(out, "logits") else out.feature_maps[0]
        # random-init HF weights are small (std 0.02), so the change is small, but it must be there
        assert a.shape == b.shape and (a - b).abs().max() > 0
        assert _hooks(wrapper) == before


def test_hf_attention_implementations_agree(images):
    """eager, SDPA and flex attention (flash needs a GPU): the same engineered output, and the unmodified
    output when nothing is flagged, through the model's own forward."""
    outs = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        model = build_tiny("hf", attn=impl).requires_grad_(False)  # flex has no CPU backward
        ref = model(pixel_values=images).pooler_output
        with itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=0.0)):
            torch.testing.assert_close(model(pixel_values=images).pooler_output, ref, atol=1e-6, rtol=0)
        with itae.attenuate(model, ITAEConfig(source="v", side="low", threshold=_median_threshold(model, images))):
            outs[impl] = model(pixel_values=images).pooler_output
    for impl, out in outs.items():
        torch.testing.assert_close(out, outs["eager"], atol=1e-5, rtol=1e-5, msg=impl)


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_fail_at_the_call_and_patch_nothing(images):
    model = build_tiny("hub")
    before = _hooks(model)
    with pytest.raises(IndexError, match="out of range"):
        itae.attenuate(model, ITAEConfig(source="v", side="low", layers=(7,), threshold=1.0))
    with pytest.raises(IndexError, match="out of range"):
        itae.attenuate(model, ITAEConfig(source="v", side="low", layers=(-3,), threshold=1.0))
    with pytest.raises(UnsupportedModelError, match="Supported"):
        itae.attenuate(torch.nn.Linear(3, 3), ITAEConfig(source="v", side="low", threshold=1.0))
    with pytest.raises(TypeError, match="ITAEConfig"):
        itae.attenuate(model, {"threshold": 1.0})
    with pytest.raises(ValueError, match="same block twice"):
        itae.attenuate(model, ITAEConfig(source="v", side="low", layers=(1, -1), threshold=1.0))
    assert _hooks(model) == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": float("nan")}, "finite"),
        ({"threshold": "median"}, "auto"),
        ({"threshold": (1.0, 2.0)}, "one threshold per engineered layer"),
        ({"source": "x"}, "source"),
        ({"side": "both"}, "side"),
        ({"rows": "patches"}, "rows"),
        ({"mode": "zero"}, "mode"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 2.0}, "alpha"),
        ({"granularity": "channel"}, "granularity"),
        ({"layers": ()}, "at least one"),
        ({"layers": (1.5,)}, "ints"),
        ({"calibration": "kde"}, "calibration"),
        ({"source": "Q"}, "'q', 'k', 'v', 'auto'"),
        ({"side": "middle"}, "'low', 'high', 'auto'"),
        ({"threshold": 1.0}, "numeric threshold needs a fixed source and side.*source='auto' and side='auto'"),
        ({"threshold": 1.0, "source": "v"}, "numeric threshold needs a fixed source and side.*side='auto'"),
        ({"threshold": (1.0, "auto"), "layers": (0, 1)}, "'auto' is not accepted"),
        ({"alpha": "auto"}, "alpha must be a number; 'auto' is not accepted"),
        ({"layers": ("auto",)}, "ints"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ITAEConfig(**kwargs)


def test_config_round_trip():
    cfg = ITAEConfig(source="k", side="low", threshold=(1.5, 2.5), layers=(-2, -1), mode="scale", alpha=0.5)
    assert ITAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ITAEConfig.from_dict({"sauce": "v"})


# ------------------------------------------------------------------------- fast CLS-only path


@pytest.mark.parametrize("source, granularity", [("v", "token"), ("q", "head"), ("k", "token")])
def test_fast_cls_path_equals_hooked_model(tiny, images, source, granularity):
    from itae.engine.fast import forward_cls, supports_fast_cls

    backbone = adapt(tiny)
    with torch.no_grad():
        plain, none_mask = forward_cls(backbone, images)
        torch.testing.assert_close(plain, backbone.forward_features(images).cls, atol=1e-5, rtol=1e-5)
        assert none_mask is None
        cfg = ITAEConfig(threshold=_median_threshold(tiny, images, source), source=source, side="low",
                         granularity=granularity)
        assert supports_fast_cls(backbone, cfg)
        with itae.attenuate(tiny, cfg) as state:
            hooked = backbone.forward_features(images).cls
        fast, mask = forward_cls(backbone, images, cfg)
    assert torch.equal(mask, state.last[backbone.num_blocks - 1].artifact_mask)
    torch.testing.assert_close(fast, hooked, atol=1e-5, rtol=1e-5)


def test_fast_cls_path_refuses_other_configs(images):
    from itae.engine.fast import forward_cls

    backbone = adapt(build_tiny("timm"))
    for cfg in (ITAEConfig(), ITAEConfig(source="v", side="low", threshold=1.0, rows="all"), ITAEConfig(source="v", side="low", threshold=1.0, layers=(0,))):
        with pytest.raises(ValueError, match="attenuate"):
            forward_cls(backbone, images, cfg)


def test_calibration_splits_rare_modes_only():
    from itae.engine.calibrate import find_threshold

    rng = np.random.default_rng(0)
    bulk = rng.lognormal(mean=3.0, sigma=0.1, size=5000)
    rare = rng.lognormal(mean=0.0, sigma=0.1, size=100)  # 2% artifacts, decades below
    low = ITAEConfig(source="v", side="low")
    split = find_threshold(np.concatenate([bulk, rare]), low)
    assert split.bimodal and rare.max() < split.threshold < bulk.min()
    assert split.flagged_fraction == pytest.approx(100 / 5100)
    high = find_threshold(np.concatenate([bulk, np.exp(6.0) * np.ones(50)]), ITAEConfig(source="v", side="high"))
    assert high.bimodal and high.flagged_fraction == pytest.approx(50 / 5050)
    # a balanced two-mode mixture (e.g. two kinds of images) is not an artifact mode
    balanced = find_threshold(np.concatenate([bulk, rng.lognormal(0.0, 0.1, 5000)]), low)
    assert not balanced.bimodal and balanced.flagged_fraction == 0.0
    unimodal = find_threshold(bulk, low)
    assert not unimodal.bimodal and unimodal.flagged_fraction == 0.0
    gmm = find_threshold(np.concatenate([bulk, rare]), low.replace(calibration="gmm"))
    assert gmm.bimodal and rare.max() < gmm.threshold < bulk.min()


def test_fast_cls_path_with_per_head_qk_norms(images):
    """Per-head q/k norms do not fold into the weights: the fast path projects K and V instead."""
    from timm.models.vision_transformer import VisionTransformer

    from itae.engine.fast import forward_cls

    torch.manual_seed(0)
    model = VisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=4, qk_norm=True,
                              init_values=1.0, num_classes=0).eval()
    backbone = adapt(model)
    cfg = ITAEConfig(source="v", side="low", threshold=_median_threshold(model, images))
    with torch.no_grad():
        with itae.attenuate(model, cfg):
            hooked = backbone.forward_features(images).cls
        fast, _ = forward_cls(backbone, images, cfg)
        plain, _ = forward_cls(backbone, images)
        torch.testing.assert_close(plain, backbone.forward_features(images).cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, hooked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, plain, atol=1e-4)
