"""source="auto" on planted sinks of every signature: it flags them, ITAE removes their attention,
and models without sinks get no flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import itae
from itae.models.demo import demo_backbone
from itae.models.planted import SIGNATURES, paint_trigger, plant_artifacts

from .helpers.tiny import tiny_model

PATCH, SIZE = 4, 80  # a 20 x 20 grid: 400 patches, so 2 sinks per image are 0.5% and 20 are 5%
N_IMAGES = 16
RARE, COMMON = 2, 20

# The split (find_threshold) of this version misses these: a rare mode (0.5%), or a mode on the high
# side beside a wide bulk of key norms (the case of issue 9, item 1). They pass once the split finds
# rare modes; strict, so that the marks go when it does.
SPLIT_MISSES = {("long-key", "content", RARE)}


def _tiny(seed: int = 0):
    model = tiny_model("timm", img_size=SIZE, patch_size=PATCH, seed=seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(1.0)  # random init leaves layer scales at ~1e-5, hiding attention
    return model


def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (preprocessed units): content without the trigger's pixel-level texture."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 10, 10, generator=g), size=SIZE, mode="bilinear", align_corners=False)


def _case(signature: str, positions: str, count: int, layers: tuple[int, ...]):
    """A planted model, images, and the (B, N) mask of the planted sinks."""
    model = _tiny()
    x = _smooth_images(N_IMAGES)
    rng = np.random.default_rng(1)
    n = (SIZE // PATCH) ** 2
    if positions == "content":  # per image, wherever the image shows the trigger texture
        chosen = [rng.choice(n, count, replace=False) for _ in range(N_IMAGES)]
        plant_artifacts(model, None, signature=signature, layers=layers)
        x = paint_trigger(x, chosen, PATCH)
    else:
        fixed = rng.choice(n, count, replace=False).tolist()
        chosen = [fixed] * N_IMAGES
        plant_artifacts(model, fixed, signature=signature, layers=layers)
    truth = torch.zeros(N_IMAGES, n, dtype=torch.bool)
    for b, p in enumerate(chosen):
        truth[b, list(p)] = True
    return model, x, truth


CASES = [
    pytest.param(sig, pos, count, layers,
                 marks=[pytest.mark.xfail(strict=True, reason="the split misses this mode (issue 9, item 1)")]
                 if (sig, pos, count) in SPLIT_MISSES else [],
                 id=f"{sig}-{pos}-{'rare' if count == RARE else 'common'}-{'blocks' if len(layers) > 1 else 'last'}")
    for sig in SIGNATURES for pos in ("fixed", "content") for count in (RARE, COMMON) for layers in ((-1,), (0, 1))
]


@pytest.mark.parametrize("signature, positions, count, layers", CASES)
def test_auto_flags_planted_sinks_and_itae_removes_their_attention(signature, positions, count, layers):
    model, x, truth = _case(signature, positions, count, layers)
    cal = itae.calibrate(model, x, itae.ITAEConfig(layers=layers))
    assert cal.chosen_by == "auto" and cal.reason is None, cal.summary()
    diagnostics = itae.detect_artifacts(model, x, cal.config)
    assert sorted(diagnostics) == sorted(cal.checks)
    for block, d in diagnostics.items():
        flagged = d.artifact_mask
        hits = int((flagged & truth).sum())
        precision, recall = hits / max(int(flagged.sum()), 1), hits / int(truth.sum())
        assert precision >= 0.95 and recall >= 0.95, (block, precision, recall, cal.summary())
        heads = d.cls_attention.shape[1]
        on_sinks = truth[:, None].expand(-1, heads, -1)
        before = d.cls_attention[:, :, d.num_prefix_tokens:][on_sinks].sum()
        after = d.cls_attention_itae[:, :, d.num_prefix_tokens:][on_sinks].sum()
        assert before / (N_IMAGES * heads) > 0.5  # they are sinks of the unmodified model
        assert after <= 0.05 * before, (block, float(after / before))
        check = cal.checks[block]
        assert check.passes and check.lift > 2 and check.residual_ratio > 1


@pytest.mark.parametrize("signature", SIGNATURES)
def test_a_fixed_source_keeps_its_split_and_reports_its_check(signature):
    """A fixed source/side is not overruled by the checks; they are computed all the same."""
    model, x, _ = _case(signature, "fixed", COMMON, (-1,))
    cal = itae.calibrate(model, x, itae.ITAEConfig(source="q", side="low"))
    assert (cal.source, cal.side, cal.chosen_by) == ("q", "low", "fixed")
    assert list(cal.candidates[1]) == [cal.checks[1]] or cal.checks[1].flags_nothing
    assert cal.checks[1].source == "q" and cal.checks[1].side == "low"


@pytest.mark.parametrize("kind", ["clean", "registers"])
def test_demo_models_without_sinks_get_no_flags(kind):
    backbone = demo_backbone(kind)
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(32, 3, 32, 32, generator=g),
              F.interpolate(torch.randn(32, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)):
        cal = itae.calibrate(backbone, x)
        assert cal.flags_nothing and cal.reason and "no (source, side) split passes" in cal.reason
        assert all(c.flags_nothing for c in cal.checks.values())


@pytest.mark.parametrize("kind, pair", [("planted", ("v", "low")), ("planted-keys", ("k", "high"))])
def test_demo_planted_signatures_are_found_by_auto(kind, pair):
    backbone = demo_backbone(kind)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cal = itae.calibrate(backbone, x)
    assert (cal.source, cal.side) == pair
    assert cal.flagged_fraction[1] == pytest.approx(2 / 64)
    # the fixed published choice misses the long-key sinks: values do not show them
    fixed = itae.calibrate(backbone, x, itae.ITAEConfig(source="v", side="low"))
    assert fixed.flags_nothing == (kind == "planted-keys")
