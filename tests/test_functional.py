"""The fast functions equal the naive reference of the equation."""

import math

import pytest
import torch

from itae.engine.functional import (
    artifact_mask,
    attention_bias,
    cls_row_attention,
    engineered_attention,
    patch_norms,
    reference_attention,
)

B, H, P, N, D = 2, 3, 2, 9, 4
T = P + N


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(3)]


def _mask(per_head: bool, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, N) if per_head else (B, N)
    mask = torch.rand(shape, generator=g) < 0.3
    mask[..., 0] = True  # at least one flagged per row
    return mask


@pytest.mark.parametrize("mode", ["min", "mask", "scale"])
@pytest.mark.parametrize("per_head", [False, True])
def test_cls_row_equals_reference(mode, per_head):
    q, k, v = _qkv()
    mask = _mask(per_head)
    fast = cls_row_attention(q[:, :, :1], k, v, mask, num_prefix=P, mode=mode, alpha=0.2)
    ref = reference_attention(q, k, v, mask, num_prefix=P, mode=mode, alpha=0.2, rows="cls")
    torch.testing.assert_close(fast, ref[:, :, :1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["min", "mask", "scale"])
@pytest.mark.parametrize("per_head", [False, True])
def test_all_rows_equal_reference(mode, per_head):
    q, k, v = _qkv(2)
    mask = _mask(per_head, 3)
    # a tiny chunk forces several query chunks in the "min" path
    fast = engineered_attention(q, k, v, mask, num_prefix=P, mode=mode, alpha=0.2, chunk_elements=B * H * T * 3)
    ref = reference_attention(q, k, v, mask, num_prefix=P, mode=mode, alpha=0.2, rows="all")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_reference_rows_cls_leaves_other_rows():
    q, k, v = _qkv(4)
    mask = _mask(False)
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v
    ref = reference_attention(q, k, v, mask, num_prefix=P, rows="cls")
    torch.testing.assert_close(ref[:, :, 1:], plain[:, :, 1:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ref[:, :, 0], plain[:, :, 0])


def test_min_mode_gives_artifacts_the_least_patch_weight():
    q, k, v = _qkv(5)
    mask = _mask(False)
    logits = (q[:, :, :1] @ k.transpose(-1, -2)) / math.sqrt(D)
    probs = torch.softmax(
        torch.cat([logits[..., :P], torch.where(mask[:, None, None], logits[..., P:].amin(-1, keepdim=True), logits[..., P:])], -1),
        -1,
    )
    out = cls_row_attention(q[:, :, :1], k, v, mask, num_prefix=P)
    torch.testing.assert_close(out, probs @ v, atol=1e-6, rtol=1e-6)
    patch_probs = probs[:, :, 0, P:]  # (B, H, N)
    for b in range(B):
        least = patch_probs[b].amin(-1, keepdim=True).expand(H, int(mask[b].sum()))
        torch.testing.assert_close(patch_probs[b][:, mask[b]], least)


def test_bias_values():
    mask = _mask(False)
    bias = attention_bias(mask, P, "scale", 0.25, torch.float32, H)
    assert bias.shape == (B, 1, 1, T)
    assert torch.all(bias[..., :P] == 0)
    torch.testing.assert_close(bias[:, 0, 0, P:][mask], torch.full((int(mask.sum()),), math.log(0.25)))
    assert torch.all(bias[:, 0, 0, P:][~mask] == 0)
    assert torch.isinf(attention_bias(mask, P, "mask", 1.0, torch.float32, H)[:, 0, 0, P:][mask]).all()


def test_norms_and_mask():
    x = torch.zeros(1, 1 + 3, 4)
    x[0, 1] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    x[0, 2] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # norm 1
    x[0, 3] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # norm 2
    norms = patch_norms(x, 1)
    torch.testing.assert_close(norms, torch.tensor([[5.0, 1.0, 2.0]]))
    per_head = patch_norms(x, 1, num_heads=2)  # heads of width 2
    torch.testing.assert_close(per_head, torch.tensor([[[5.0, 0.0, 2**0.5], [0.0, 1.0, 2**0.5]]]))
    assert artifact_mask(norms, 2.0, "low").tolist() == [[False, True, True]]
    assert artifact_mask(norms, 2.0, "high").tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="side"):
        artifact_mask(norms, 2.0, "middle")
