"""The extraction core: what the local engine (``itae.embed``) and the Ray engine (``itae.distributed``)
share, so that both write the same store.

- ``options``: ``EmbedOptions`` and building the specs from plain keywords;
- ``session``: the store session (output folder, manifest, writer, finishing);
- ``chunks``: the chunk assembler that commits complete chunks (and parts of long ones);
- ``forward``: ``make_forward`` (fast CLS path, ITAE hooks or compiled blocks) and pooling;
- ``sampling``: calibration sampling and the calibration work extraction reuses;
- ``local``: the local engine (DataLoader workers, this process).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EmbedOptions": "itae.extraction.options",
    "FEATURES": "itae.extraction.options",
    "default_num_workers": "itae.extraction.options",
    "embed": "itae.extraction.local",
    "embed_batches": "itae.extraction.forward",
    "make_forward": "itae.extraction.forward",
    "pool_features": "itae.extraction.forward",
    "ChunkAssembler": "itae.extraction.chunks",
    "SampleBatches": "itae.extraction.sampling",
    "KeptBatches": "itae.extraction.sampling",
    "KEEP_BYTES": "itae.extraction.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'itae.extraction' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
