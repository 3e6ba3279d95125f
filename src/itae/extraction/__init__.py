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

from .chunks import ChunkAssembler
from .forward import embed_batches, make_forward, pool_features
from .local import embed
from .options import EmbedOptions, default_num_workers
from .sampling import KEEP_BYTES, KeptBatches, SampleBatches

__all__ = [
    "KEEP_BYTES", "ChunkAssembler", "EmbedOptions", "KeptBatches", "SampleBatches", "default_num_workers", "embed",
    "embed_batches", "make_forward", "pool_features",
]
