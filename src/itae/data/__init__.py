"""Image and store I/O: sources, robust decoding, the dataset and the embedding store (extraction itself
is ``itae.extraction``)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageRecord": "itae.data.sources",
    "ImageSource": "itae.data.sources",
    "open_source": "itae.data.sources",
    "DecodeError": "itae.data.decode",
    "load_rgb": "itae.data.decode",
    "build_transform": "itae.data.decode",
    "ImageDataset": "itae.data.dataset",
    "EmbeddingStore": "itae.data.store",
    "StoreError": "itae.data.store",
    "SourceSpec": "itae.data.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'itae.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
