"""Shared fixtures: tiny random-weight models of every backend, generated images."""

from __future__ import annotations

import pytest
import torch

from .helpers.tiny import tiny_model

torch.set_num_threads(1)

# (family, registers, HF attention implementation or None)
FAMILIES = [
    ("hf", 0, "sdpa"),
    ("hf", 0, "eager"),
    ("hf", 4, "sdpa"),
    ("timm", 0, None),
    ("timm", 4, None),
    ("hub", 0, None),
    ("hub", 4, None),
]
FAMILY_IDS = [f"{f}-reg{r}" + (f"-{a}" if a else "") for f, r, a in FAMILIES]


def build_tiny(family: str, registers: int = 0, attn: str | None = None, seed: int = 0):
    """A tiny model in eval mode with layer scales at 1 (random init leaves them ~1e-5, hiding attention)."""
    model = tiny_model(family, registers=registers, seed=seed)
    if attn is not None:
        model.set_attn_implementation(attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lambda1", "gamma", "ls1.gamma", "ls2.gamma")):
                p.fill_(1.0)
    return model.eval()


@pytest.fixture(params=FAMILIES, ids=FAMILY_IDS)
def tiny(request):
    family, registers, attn = request.param
    return build_tiny(family, registers, attn)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 56, 56, generator=g)


@pytest.fixture
def hub_offline(monkeypatch):
    """No hub: what is not in the local copies fails at once, as it would without network."""
    datasets_config = pytest.importorskip("datasets.config")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True, raising=False)
