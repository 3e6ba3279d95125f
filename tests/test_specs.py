"""The typed extraction options: SourceSpec, ModelSpec, EmbedOptions; validated once, the same store as the
plain keywords, and the CLI's choices taken from the same constants."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import itae
from itae import EmbedOptions, ModelSpec, SourceSpec
from itae.config import FEATURES, PRECISION_NAMES
from itae.data.sources import LABEL_MODES
from itae.extraction.options import build_specs
from itae.models.spec import PRECISIONS, prepare_model, resolve_device, resolve_precision

from .helpers.tiny import save_tiny

RES = 56


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_specs_are_frozen_and_validated_once():
    spec = EmbedOptions(batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batch_size = 4
    assert spec.replace(feature="mean").feature == "mean" and spec.feature == "cls"
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        EmbedOptions(batch_size=0)
    with pytest.raises(ValueError, match="feature must be one of"):
        EmbedOptions(feature="max")
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        EmbedOptions(num_workers=-1)
    with pytest.raises(TypeError, match="fast_decode must be True or False"):
        EmbedOptions(fast_decode="yes")
    with pytest.raises(ValueError, match="save_interval must be a positive number"):
        EmbedOptions(save_interval=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        ModelSpec("m", precision="int8")
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        ModelSpec("m", resolution=0)
    with pytest.raises(ValueError, match="labels must be one of"):
        SourceSpec("photos/", labels="from-names")
    with pytest.raises(TypeError, match="SourceSpec.split"):
        SourceSpec("photos/", split=3)


def test_plain_keywords_fill_the_specs_and_unknown_ones_are_refused():
    source, model, options = build_specs("photos/", "m", None, dict(
        split="test", hf_config="small", labels="column", precision="bf16", device="cpu", batch_size=3,
        feature="mean"))
    assert source == SourceSpec("photos/", split="test", config="small", labels="column")
    assert model == ModelSpec("m", device="cpu", precision="bf16")
    assert options == EmbedOptions(batch_size=3, feature="mean")
    # keywords replace the fields of specs given
    _, model, options = build_specs("photos/", ModelSpec("m", precision="fp16"), EmbedOptions(batch_size=9),
                                    dict(resolution=112, normalize=True))
    assert model == ModelSpec("m", precision="fp16", resolution=112)
    assert options == EmbedOptions(batch_size=9, normalize=True)
    with pytest.raises(TypeError, match=r"embed\(\) got unexpected keyword argument\(s\): batchsize"):
        build_specs("photos/", "m", None, dict(batchsize=3))


def test_device_and_precision_resolution_beside_the_models():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu7")
    assert resolve_precision("bf16") is torch.bfloat16 and resolve_precision("fp8") is torch.bfloat16
    assert tuple(PRECISIONS) == PRECISION_NAMES


def test_a_loaded_model_spec_is_not_moved_again(tmp_path):
    path = save_tiny("hf", tmp_path / "tiny")
    spec = ModelSpec(str(path), device="cpu", precision="bf16", resolution=RES)
    bb = spec.load()
    assert bb.dtype == torch.bfloat16 and bb.preprocess.image_size == RES
    again, preprocess = prepare_model(bb, spec, torch.device("cpu"))
    assert again.model is bb.model and preprocess == bb.preprocess


def test_the_specs_give_the_store_the_plain_keywords_give(folder, tmp_path):
    path = save_tiny("hf", tmp_path / "tiny")
    plain = itae.embed(folder, str(path), out=tmp_path / "plain", itae=None, labels="from-folders", batch_size=3,
                       num_workers=0, resolution=RES, device="cpu", feature="cls+mean", progress=False)
    typed = itae.embed(SourceSpec(folder, labels="from-folders"), ModelSpec(str(path), device="cpu", resolution=RES),
                       out=tmp_path / "typed", itae=None,
                       options=EmbedOptions(batch_size=3, num_workers=0, feature="cls+mean"), progress=False)
    assert typed.manifest["source"] == plain.manifest["source"] and typed.labels == plain.labels
    assert typed.manifest["dim"] == plain.manifest["dim"] == 2 * 32
    np.testing.assert_array_equal(np.asarray(typed.embeddings()), np.asarray(plain.embeddings()))


def test_the_cli_choices_are_the_specs_constants():
    from itae.cli.main import build_parser

    parser = build_parser()
    embed = parser._subparsers._group_actions[0].choices["embed"]
    choices = {a.dest: tuple(a.choices) for a in embed._actions if a.choices is not None}
    assert choices["feature"] == FEATURES and choices["precision"] == PRECISION_NAMES
    assert choices["labels"] == LABEL_MODES
    for name in FEATURES:  # every choice the CLI offers is one the spec accepts
        EmbedOptions(feature=name)
    for name in PRECISION_NAMES:
        ModelSpec("m", precision=name)
