"""What several test files set up the same way: generated class folders, the CLI, results files, spies,
and the probes of a model that the engine and backend tests share.

The tiny random-weight models are in ``tests.helpers.tiny``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import itae
from itae.cli.main import main
from itae.config import ITAEConfig
from itae.models import adapt

RGB = ((220, 40, 40), (40, 200, 40), (40, 40, 220))


def colour_classes(
    root: Path, per_class: int, *, colours: Sequence[tuple[int, int, int]] = RGB, names: Sequence[str] | None = None,
    size: tuple[int, int] = (40, 48), noise: float = 20.0, first: int = 0, name: str = "{i:02d}.png",
) -> Path:
    """``root/<class>/<name>``: per class, images of one colour plus Gaussian noise, (height, width) ``size``.

    Classes are ``class0, class1, ...`` unless ``names`` are given; ``name`` formats the image index ``i``
    (``first``, ``first + 1``, ...). The same arguments give the same pixels (one generator, seeded 0).
    """
    rng = np.random.default_rng(0)
    for c, colour in enumerate(colours):
        folder = root / (names[c] if names else f"class{c}")
        folder.mkdir(parents=True)
        for i in range(first, first + per_class):
            a = np.clip(np.array(colour) + rng.normal(0, noise, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(folder / name.format(i=i))
    return root


def run_cli(*argv: Any) -> int:
    """``itae ARGV...`` in this process; every argument is passed as ``str``."""
    return main([str(a) for a in argv])


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@dataclass
class Spy:
    """Calls counted by ``spy``; ``real`` is the function it replaced."""

    real: Any
    calls: int = 0


def spy(monkeypatch, owner: Any, attribute: str, *, interrupt_at: int | None = None) -> Spy:
    """Replace ``owner.attribute`` by a wrapper that counts its calls and, at call number ``interrupt_at``,
    raises ``KeyboardInterrupt`` instead of calling through (as a user's Ctrl-C would)."""
    seen = Spy(getattr(owner, attribute))

    def wrapper(*args, **kwargs):
        seen.calls += 1
        if seen.calls == interrupt_at:
            raise KeyboardInterrupt
        return seen.real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, wrapper)
    return seen


def cls_of(model, x):
    """The CLS embedding of pixels ``x`` through ``model`` (an instance of any supported backend)."""
    return adapt(model).forward_features(x).cls


def median_threshold(model, x, source: str = "v") -> float:
    """A threshold that flags about half the patches of ``x``: many artifacts, a strong test."""
    diag = itae.detect_artifacts(model, x, ITAEConfig(source=source, side="low", threshold=1.0))
    return float(diag[adapt(model).num_blocks - 1].norms[source].median())


def hooks_on(model) -> list[tuple[str, tuple, tuple]]:
    """Every forward / forward-pre hook on the model (HF installs some of its own)."""
    return [(n, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()]
