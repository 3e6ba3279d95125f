"""A torch Dataset over an ``ImageSource`` that never raises on a bad file, and its collate.

Items are ``(index, tensor, None)`` or ``(index, None, reason)``; ``collate_images`` stacks the good ones
and passes the failures on, so a DataLoader with workers keeps going through corrupt files. Indices
travel with the tensors so order survives batching.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .decode import DecodeError, PreprocessTransform, load_rgb
from .sources import ImageSource

Item = tuple[int, "torch.Tensor | None", "str | None"]


class ImageDataset(Dataset):
    """``source[i]`` decoded and preprocessed; a failure is returned as data, not raised.

    uint8: return resized, cropped uint8 pixels (3, S, S) and leave ``transform.normalize`` to the
    consumer (on the device); otherwise normalised float32.
    fast_decode: decode JPEGs at reduced scale when they are at least twice the resize target
    (``load_rgb``'s ``draft_size``): much faster for large photos, pixels slightly different.
    """

    def __init__(
        self, source: ImageSource, transform: PreprocessTransform, *, max_pixels: int | None = None,
        uint8: bool = False, fast_decode: bool = False,
    ) -> None:
        self.source = source
        self.transform = transform
        self.max_pixels = max_pixels
        self.uint8 = uint8
        self.draft_size = transform.preprocess.resize_size if fast_decode else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Item:
        try:
            payload = self.source.read(index)
            image = load_rgb(payload, max_pixels=self.max_pixels, draft_size=self.draft_size)
            return index, self.transform.to_uint8(image) if self.uint8 else self.transform(image), None
        except DecodeError as e:
            return index, None, e.reason
        except FileNotFoundError:
            return index, None, "file not found"
        except OSError as e:
            return index, None, f"cannot read: {e}"
        except Exception as e:  # one strange file must not end a million-image run
            return index, None, f"failed: {type(e).__name__}: {e}"


def collate_images(items: Sequence[Item]) -> dict:
    """Stack decoded items; failures go to ``failed_index``/``failed_reason``.

    Returns a dict (pin_memory-friendly): ``index`` (B,) int64, ``pixels`` (B, 3, S, S) or None when
    every item failed, ``failed_index`` list[int], ``failed_reason`` list[str].
    """
    good = [(i, x) for i, x, reason in items if reason is None]
    bad = [(i, reason) for i, _, reason in items if reason is not None]
    return {
        "index": torch.tensor([i for i, _ in good], dtype=torch.int64),
        "pixels": torch.stack([x for _, x in good]) if good else None,
        "failed_index": [i for i, _ in bad],
        "failed_reason": [r for _, r in bad],
    }


class ChunkBatchSampler(Sampler[list[int]]):
    """Batches of record indices that never cross a chunk boundary, for the chunks still to compute.

    Keeping batches inside chunks makes every chunk's batches the same in a fresh and a resumed run, so
    a resumed store is identical to an uninterrupted one. ``starts`` maps a chunk to the record where it
    resumes (after its committed parts, which end on a batch boundary of the same batch size). ``skip``:
    first indices of batches to leave out (batches whose results are already at hand).
    """

    def __init__(self, num_records: int, chunk_size: int, batch_size: int, chunks: Sequence[int],
                 starts: dict[int, int] | None = None, skip: Collection[int] = ()) -> None:
        self.num_records = num_records
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.chunks = list(chunks)
        self.starts = dict(starts or {})
        self.skip = frozenset(skip)

    def _range(self, k: int) -> tuple[int, int]:
        start = k * self.chunk_size
        return self.starts.get(k, start), min(start + self.chunk_size, self.num_records)

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.chunks:
            start, stop = self._range(k)
            for b in range(start, stop, self.batch_size):
                if b not in self.skip:
                    yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        n = 0
        for k in self.chunks:
            start, stop = self._range(k)
            n += -(-max(0, stop - start) // self.batch_size)
        chunks = set(self.chunks)
        for b in self.skip:
            k = b // self.chunk_size
            if k in chunks:
                start, stop = self._range(k)
                n -= start <= b < stop and (b - start) % self.batch_size == 0
        return n


def spread_indices(n: int, count: int) -> list[int]:
    """``count`` evenly spaced positions in ``range(n)`` (all of them when count >= n), ascending."""
    if count >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))


class CalibrationBatches(Sampler[list[int]]):
    """The extraction's own batches (``ChunkBatchSampler`` over every chunk), in the order calibration
    reads them: enough batches for ``count`` images, spread evenly over the source, then all the others
    in source order (they replace images that fail to decode).

    Calibrating on whole extraction batches lets extraction reuse the calibration pass's work for them
    and still compute exactly what it would compute from the pixels.
    """

    def __init__(self, num_records: int, chunk_size: int, batch_size: int, count: int) -> None:
        self.num_records = num_records
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.per_chunk = -(-chunk_size // batch_size)
        num_chunks = -(-num_records // chunk_size)
        last = num_records - (num_chunks - 1) * chunk_size
        self.num_batches = 0 if num_records == 0 else (num_chunks - 1) * self.per_chunk + -(-last // batch_size)
        self.first = spread_indices(self.num_batches, -(-count // batch_size))

    def batch(self, j: int) -> list[int]:
        """Batch ``j`` of the extraction order."""
        k, r = divmod(j, self.per_chunk)
        start = k * self.chunk_size + r * self.batch_size
        stop = min(start + self.batch_size, (k + 1) * self.chunk_size, self.num_records)
        return list(range(start, stop))

    def __iter__(self) -> Iterator[list[int]]:
        yield from (self.batch(j) for j in self.first)
        chosen = set(self.first)
        yield from (self.batch(j) for j in range(self.num_batches) if j not in chosen)

    def __len__(self) -> int:
        return self.num_batches


__all__ = ["CalibrationBatches", "ChunkBatchSampler", "ImageDataset", "collate_images", "spread_indices"]
