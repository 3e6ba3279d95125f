"""Test-time registers: the MLP description, neuron finding, the context manager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import itae

from .conftest import build_tiny


def check_mlp_sites(backbone) -> None:
    """Every block's MLP is described, and its out_proj's input is the whole hidden activation."""
    assert len(backbone.mlp_sites) == backbone.num_blocks
    x = torch.randn(2, 5, backbone.embed_dim)
    for site in backbone.mlp_sites:
        seen = []
        handle = site.out_proj.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        try:
            out = site.mlp(x)
        finally:
            handle.remove()
        (hidden,) = seen
        assert hidden.shape == (2, 5, site.hidden_dim)
        # the hidden activation is all the MLP's output depends on: out_proj of it is the output
        torch.testing.assert_close(site.out_proj(hidden), out)


def test_mlp_sites_describe_every_block(tiny):
    backbone = itae.adapt(tiny)
    check_mlp_sites(backbone)
    assert all(site.mlp is parts.mlp for site, parts in zip(backbone.mlp_sites, backbone.parts, strict=True))


# ------------------------------------------------------------------------------------ helpers

NEURONS = ((0, 3), (0, 17), (1, 5))


def _features(backbone, x):
    with torch.no_grad():
        f = backbone.forward_features(x)
    return f.cls, f.patches, f.registers


def _act(mlp):
    return getattr(mlp, "act", None) or mlp.activation_fn


def _replay(backbone, x, neurons, zero_prefix=True):
    """The method by hand: insert a zero token after the prefix, run each block's attention and MLP
    explicitly with the neuron edit, drop the token, final norm."""
    p = backbone.num_prefix_tokens
    by_block: dict[int, list[int]] = {}
    for b, n in neurons:
        by_block.setdefault(b, []).append(n)
    with torch.no_grad():
        h = backbone.embed(x)
        h = torch.cat([h[:, :p], torch.zeros_like(h[:, :1]), h[:, p:]], dim=1)
        for i, block in enumerate(backbone.blocks):
            parts = backbone.parts[i]
            attn = block.attention if backbone.family == "hf" else block.attn
            out = attn(parts.norm1(h))
            h = h + parts.ls1(out[0] if isinstance(out, tuple) else out)
            mlp = parts.mlp
            a = _act(mlp)(mlp.fc1(parts.norm2(h)))  # (B, T + 1, hidden)
            for n in by_block.get(i, []):
                top = a[:, :, n].amax(dim=1)
                keep = a[:, :p, n].clone()
                a[:, :, n] = 0
                if not zero_prefix:
                    a[:, :p, n] = keep
                a[:, p, n] = top
            h = h + parts.ls2(mlp.fc2(a))
        h = torch.cat([h[:, :p], h[:, p + 1 :]], dim=1)
        h = backbone.final_norm(h)
    return h[:, 0], h[:, p:], h[:, 1:p]


def _planted(tiny_model, neurons=(7, 40, 99), scale=60.0):
    """Make a few block-0 MLP neurons fire hugely on the tokens whose normed residual is high along one
    direction, and write a large vector into the residual there: high-norm outliers made by MLP neurons."""
    backbone = itae.adapt(tiny_model)
    site = backbone.mlp_sites[0]
    fc1, fc2 = site.mlp.fc1, site.out_proj
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(fc2.out_features, generator=g)
    with torch.no_grad():
        for j, n in enumerate(neurons):
            fc1.weight[n] = 0
            fc1.weight[n, j] = scale  # reads one input channel of the normed token ...
            fc1.bias[n] = -1.5 * scale  # ... and fires only where it is above 1.5
            fc2.weight[:, n] = direction / direction.norm() * 20.0
    return backbone, {(0, n) for n in neurons}


# ---------------------------------------------------------------------------------------- tests


def test_config_validation():
    with pytest.raises(ValueError, match="norm_threshold"):
        itae.TTRConfig(norm_threshold=-1.0)
    with pytest.raises(ValueError, match="norm_threshold"):
        itae.TTRConfig(norm_threshold="otsu")
    with pytest.raises(TypeError, match="top_k"):
        itae.TTRConfig(top_k=2.5)
    with pytest.raises(ValueError, match="duplicates"):
        itae.TTRConfig(neurons=((0, 1), (0, 1)))
    cfg = itae.TTRConfig(neurons=[[1, 2], [0, 3]])
    assert cfg.neurons == ((1, 2), (0, 3)) and cfg.by_block() == {0: [3], 1: [2]}
    assert itae.TTRConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown TTRConfig"):
        itae.TTRConfig.from_dict({"topk": 3})
    d = itae.TTRConfig()
    assert (d.outlier_layer, d.norm_threshold, d.max_layer, d.top_k) == (-2, 150.0, 17, 50)


def test_bad_neurons_refused_before_patching(tiny):
    backbone = itae.adapt(tiny)
    with pytest.raises(ValueError, match="find them first"):
        itae.test_time_registers(backbone, itae.TTRConfig())
    with pytest.raises(ValueError, match="out of range"):
        itae.test_time_registers(backbone, itae.TTRConfig(neurons=((9, 0),)))
    with pytest.raises(ValueError, match="128 neurons"):
        itae.test_time_registers(backbone, itae.TTRConfig(neurons=((0, 128),)))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny.modules())


def test_matches_a_replay_and_never_shifts_outputs(tiny, images):
    backbone = itae.adapt(tiny)
    plain = _features(backbone, images)
    for zero_prefix in (True, False):
        cfg = itae.TTRConfig(neurons=NEURONS, zero_prefix=zero_prefix)
        with itae.test_time_registers(backbone, cfg) as state:
            got = _features(backbone, images)
            assert state.backbone.num_prefix_tokens == backbone.num_prefix_tokens + 1
        want = _replay(backbone, images, NEURONS, zero_prefix)
        for g, w, p in zip(got, want, plain, strict=True):
            assert g.shape == p.shape  # same tokens, same positions as the unmodified model
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[0], plain[0], atol=1e-4)  # it did something


def check_batch_equals_single_images(backbone, images, neurons=NEURONS):
    """Under test-time registers a batch gives what its images give one by one; returns the batch's features."""
    with itae.test_time_registers(backbone, itae.TTRConfig(neurons=neurons)):
        batch = _features(backbone, images)
        singles = [_features(backbone, images[i : i + 1]) for i in range(len(images))]
    for j, whole in enumerate(batch):
        torch.testing.assert_close(whole, torch.cat([s[j] for s in singles]), rtol=1e-5, atol=1e-6)
    return batch


def check_no_neurons_changes_nothing(backbone, images):
    plain = _features(backbone, images)
    with itae.test_time_registers(backbone, itae.TTRConfig(neurons=())) as state:
        got = _features(backbone, images)
        assert state.backbone is backbone
    for g, p in zip(got, plain, strict=True):
        torch.testing.assert_close(g, p, rtol=0, atol=1e-6)


def test_batch_equals_single_images(tiny, images):
    check_batch_equals_single_images(itae.adapt(tiny), images)


def test_no_neurons_leaves_the_model_unchanged(tiny, images):
    check_no_neurons_changes_nothing(itae.adapt(tiny), images)


def test_model_restored_after_the_context_and_after_an_error(tiny, images):
    backbone = itae.adapt(tiny)
    state_before = {k: v.clone() for k, v in tiny.state_dict().items()}
    plain = _features(backbone, images)
    with itae.test_time_registers(backbone, itae.TTRConfig(neurons=NEURONS)):
        _features(backbone, images)
    with pytest.raises(KeyError):
        with itae.test_time_registers(backbone, itae.TTRConfig(neurons=NEURONS)):
            raise KeyError("boom")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny.modules())
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, state_before[k])
    for g, p in zip(_features(backbone, images), plain, strict=True):
        assert torch.equal(g, p)


def test_planted_register_neurons_are_found_and_removed(tiny):
    backbone, planted = _planted(tiny)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, 56, 56, generator=g) for _ in range(3)]
    found = itae.find_register_neurons(
        backbone, batches, itae.TTRConfig(outlier_layer=0, norm_threshold="auto", max_layer=-1, top_k=3)
    )
    assert set(found.config.neurons) == planted
    assert 0 < found.outlier_fraction < 0.25 and found.images_with_outliers > 0
    from itae.engine.registers import registers_check

    x = torch.cat(batches)
    check = registers_check(backbone, x, found.config, found.threshold)
    assert check.outlier_fraction > 0
    assert check.outlier_fraction_after == 0  # the outliers are gone from the patches
    assert check.neurons == {0: sorted(n for _, n in planted)}


def test_no_outliers_no_neurons(tiny, images):
    found = itae.find_register_neurons(tiny, [images], itae.TTRConfig())  # norm 150 is far above a tiny model's
    assert found.config.neurons == () and found.images_with_outliers == 0


def test_itae_runs_around_the_registers(tiny, images):
    backbone = itae.adapt(tiny)
    with itae.test_time_registers(backbone, itae.TTRConfig(neurons=NEURONS)) as ttr:
        with itae.attenuate(ttr.backbone, itae.ITAEConfig(source="v", side="low", threshold=1e9)) as state:
            got = _features(backbone, images)
        n = backbone.forward_features(images).patches.shape[1]
    mask = state.last[backbone.num_blocks - 1].artifact_mask
    assert mask.shape == (len(images), n)  # the extra token is a prefix token for ITAE: never flagged
    assert got[1].shape[1] == n


# ------------------------------------------------------------------------------- the embedding store

RES = 56
COMMON = dict(batch_size=4, num_workers=0, resolution=RES, progress=False, device="cpu", chunk_size=4,
              calibration_images=8)
SEARCH = itae.TTRConfig(outlier_layer=0, norm_threshold="auto", max_layer=0, top_k=3)


def _folder(root, count=10, shape=(40, 48)):
    """``count`` random RGB images of ``shape`` (height, width) in a new folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def cls_under(backbone, x, ttr, itae_config=None):
    """The CLS embedding with test-time registers, and ITAE around them when ``itae_config`` is given."""
    with torch.no_grad(), itae.test_time_registers(backbone, ttr) as state:
        if itae_config is None:
            return backbone.forward_features(x).cls
        with itae.attenuate(state.backbone, itae_config):
            return backbone.forward_features(x).cls


def _direct(backbone, root, ids, ttr):
    from itae.data.decode import build_transform, load_rgb

    t = build_transform(backbone.preprocess.with_resolution(RES))
    x = torch.stack([t(load_rgb(root / i)) for i in ids])
    with torch.no_grad(), itae.test_time_registers(backbone, ttr):
        return torch.cat([backbone.forward_features(x[i : i + 1]).cls for i in range(len(x))])


def _planted_hf():
    return _planted(build_tiny("hf", 0, "sdpa"))


def test_embed_finds_records_and_applies_the_neurons(tmp_path):
    root = _folder(tmp_path / "imgs")
    backbone, planted = _planted_hf()
    store = itae.embed(root, backbone, out=tmp_path / "out", method="ttr", ttr=SEARCH, **COMMON)
    m = store.manifest
    assert store.method == "ttr" and m["itae"] is None
    assert set(map(tuple, m["ttr"]["neurons"])) == planted
    assert m["ttr_requested"]["neurons"] is None
    check = m["ttr_search"]["check"]
    assert check["num_neurons"] == 3 and check["outlier_fraction"] > 0 and check["outlier_fraction_after"] == 0
    ref = _direct(backbone, root, store.ids, store.ttr_config)
    torch.testing.assert_close(torch.from_numpy(store.embeddings(mmap=False)), ref, rtol=1e-4, atol=1e-5)

    both = itae.embed(root, backbone, out=tmp_path / "both", method="itae+ttr", ttr=SEARCH, **COMMON)
    assert both.method == "itae+ttr" and both.manifest["ttr"]["neurons"] == m["ttr"]["neurons"]
    none = itae.embed(root, backbone, out=tmp_path / "none", method="none", **COMMON)
    assert none.method == "none" and "ttr" not in none.manifest and "ttr_requested" not in none.manifest


def test_a_resumed_store_uses_its_own_neurons(tmp_path, monkeypatch):
    import itae.engine.registers as registers
    import itae.extraction.chunks as extract

    root = _folder(tmp_path / "imgs")
    backbone, _ = _planted_hf()
    clean = itae.embed(root, backbone, out=tmp_path / "clean", method="ttr", ttr=SEARCH, **COMMON)

    commit = extract._commit
    calls = []

    def dies_on_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return commit(*args, **kwargs)

    monkeypatch.setattr(extract, "_commit", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        itae.embed(root, backbone, out=tmp_path / "killed", method="ttr", ttr=SEARCH, **COMMON)
    monkeypatch.setattr(extract, "_commit", commit)

    def no_search(*_a, **_k):
        raise AssertionError("a resumed store must not search again")

    monkeypatch.setattr(registers, "find_register_neurons", no_search)
    resumed = itae.embed(root, backbone, out=tmp_path / "killed", method="ttr", ttr=SEARCH, **COMMON)
    assert resumed.manifest["ttr"] == clean.manifest["ttr"]
    np.testing.assert_array_equal(resumed.embeddings(mmap=False), clean.embeddings(mmap=False))
    with pytest.raises(itae.data.store.StoreError, match="ttr_requested"):
        itae.embed(root, backbone, out=tmp_path / "killed", method="ttr", ttr=SEARCH.replace(top_k=2), **COMMON)


def test_a_method_that_does_not_apply_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import itae.engine.registers as registers

    root = _folder(tmp_path / "imgs")
    backbone = itae.adapt(build_tiny_hf())
    backbone.mlp_sites = []  # a backbone that does not describe its MLPs
    monkeypatch.setattr(registers, "find_register_neurons", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(ValueError, match="MLP described"):
        itae.embed(root, backbone, out=tmp_path / "out", method="ttr", **COMMON)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ValueError, match="method must be one of"):
        itae.embed(root, backbone, out=tmp_path / "out", method="registers", **COMMON)


def build_tiny_hf():
    return build_tiny("hf", 0, "sdpa")


@pytest.mark.parametrize("method", ["ttr", "itae+ttr"])
def test_embed_with_neurons_in_the_last_block_runs_the_full_model(tmp_path, method):
    root = _folder(tmp_path / "imgs")
    backbone = itae.adapt(build_tiny_hf())
    ttr = itae.TTRConfig(neurons=((0, 3), (1, 5), (1, 9)))  # block 1 is the last: no CLS-only fast path
    cfg = itae.ITAEConfig(source="v", side="low", threshold=0.5)
    store = itae.embed(root, backbone, out=tmp_path / "out", method=method, itae=cfg, ttr=ttr, **COMMON)
    assert store.ttr_config == ttr and store.manifest["ttr_search"] is None  # given neurons: no search
    from itae.data.decode import build_transform, load_rgb

    t = build_transform(backbone.preprocess.with_resolution(RES))
    x = torch.stack([t(load_rgb(root / i)) for i in store.ids])
    ref = cls_under(backbone, x, ttr, cfg if method == "itae+ttr" else None)
    torch.testing.assert_close(torch.from_numpy(store.embeddings(mmap=False)), ref, rtol=1e-4, atol=1e-5)


def test_the_cls_only_fast_path_refuses_neurons_in_the_last_block(images):
    from itae.engine.fast import forward_cls

    backbone = itae.adapt(build_tiny_hf())
    with itae.test_time_registers(backbone, itae.TTRConfig(neurons=((1, 5),))) as state:
        with pytest.raises(RuntimeError, match="cannot serve register neurons there"):
            forward_cls(state.backbone, images)
    with itae.test_time_registers(backbone, itae.TTRConfig(neurons=((0, 5),))) as state:
        fast = forward_cls(state.backbone, images)[0]
        full = backbone.forward_features(images).cls
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_a_model_whose_mlps_are_not_recognised_still_adapts_and_ttr_refuses_it(images):
    from torch import nn

    model = build_tiny_hf()
    model.encoder.layer[1].mlp.fc2 = nn.Sequential(model.encoder.layer[1].mlp.fc2)  # not a linear any more
    backbone = itae.adapt(model)
    assert backbone.mlp_sites == []
    backbone.forward_features(images)  # everything else works
    with pytest.raises(ValueError, match="MLP described"):
        itae.test_time_registers(backbone, itae.TTRConfig(neurons=((0, 1),)))
