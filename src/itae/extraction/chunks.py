"""Results in, committed store chunks out: the assembler both engines write through.

Results arrive in any grouping (a local batch lies in one chunk; a Ray batch may span chunks and come out
of order); each chunk is committed, atomically and sorted by record, once all its records are accounted
for. Long chunks can be committed in parts (``commit_part``), which a resumed run reloads first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from itae.data.sources import ImageSource
from itae.data.store import StoreWriter
from itae.errors import InputError

logger = logging.getLogger("itae.extraction")

# The clock of the commit interval (a test replaces it).
_clock = time.monotonic


class ProgressSaver:
    """When to commit the chunk in progress: every ``every`` images or ``interval`` seconds, whichever
    comes first, counted from the last commit."""

    def __init__(self, every: int, interval: float) -> None:
        self.every, self.interval = every, interval
        self.last_count, self.last_time = 0, _clock()

    def due(self, processed: int) -> bool:
        return processed - self.last_count >= self.every or _clock() - self.last_time >= self.interval

    def saved(self, processed: int) -> None:
        self.last_count, self.last_time = processed, _clock()


class ChunkBuffer:
    """What one chunk has gathered so far; committed when all its records are accounted for.

    ``saved``: how many of its records (from the chunk's start) are already committed as parts.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0
        self.saved = 0
        self.index: list[np.ndarray] = []
        self.embeddings: list[np.ndarray] = []
        self.failed: list[tuple[int, str]] = []

    def records(self) -> set[int]:
        """The records gathered so far, embedded or failed."""
        return {int(i) for part in self.index for i in part} | {i for i, _ in self.failed}


def check_finite(emb: np.ndarray, index: np.ndarray, src: ImageSource) -> None:
    """Refuse non-finite embeddings (rows of ``emb`` for records ``index``), naming the images."""
    ok = np.isfinite(emb).all(axis=1)
    if bool(ok.all()):
        return
    bad = [int(i) for i in np.asarray(index)[~ok].tolist()]
    names = ", ".join(repr(src.ids[i]) for i in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise InputError(
        f"non-finite (NaN or inf) embedding for image {names}; refusing to write it. Committed chunks are "
        "kept and a rerun resumes; with fp16 this is usually an overflow, so try precision='bf16' or precision='fp32'"
    )


class ChunkAssembler:
    """Gathers results into the chunks of ``writer`` and commits each chunk once it is complete.

    ``buffers``: chunk number -> ``ChunkBuffer`` of the chunks partly gathered; empty when nothing is.
    """

    def __init__(self, writer: StoreWriter, src: ImageSource) -> None:
        self.writer, self.src = writer, src
        self.buffers: dict[int, ChunkBuffer] = {}

    def resume_parts(self, todo: Iterable[int]) -> dict[int, int]:
        """Reload the committed parts of the chunks to do; returns chunk -> first record still missing."""
        writer = self.writer
        for k in todo:
            parts = writer.load_parts(k)
            if parts is None:
                continue
            start, stop = writer.chunk_bounds(k)
            buf = self.buffers[k] = ChunkBuffer(stop - start)
            buf.index.append(parts["index"])
            buf.embeddings.append(parts["embeddings"].reshape(len(parts["index"]), writer.dim))
            buf.failed.extend(zip(parts["failed_index"].tolist(), parts["failed_reason"].tolist(), strict=True))
            buf.seen = buf.saved = parts["stop"] - start
        if self.buffers:
            logger.info("resuming %d chunk(s) after their committed parts", len(self.buffers))
        return {k: writer.chunk_bounds(k)[0] + buf.seen for k, buf in self.buffers.items()}

    @property
    def num_seen(self) -> int:
        return sum(buf.seen for buf in self.buffers.values())

    def add(self, index: np.ndarray, embeddings: np.ndarray | None,
            failed: Iterable[tuple[int, str]] = ()) -> dict[int, bool]:
        """Add embedded records ``index`` (rows of ``embeddings``, (B, D) float32) and failed ones
        (record, reason); commit the chunks they complete. Returns chunk -> whether it was committed."""
        writer, src = self.writer, self.src
        index = np.asarray(index, dtype=np.int64)
        failed = [(int(i), str(r)) for i, r in failed]
        if len(index):
            if embeddings.shape[1] != writer.dim:
                raise RuntimeError(f"the model gave {embeddings.shape[1]}-d embeddings, expected {writer.dim}")
            check_finite(embeddings, index, src)
        chunk = index // writer.chunk_size
        failed_chunk = np.asarray([i for i, _ in failed], dtype=np.int64) // writer.chunk_size
        touched: dict[int, bool] = {}
        for k in sorted(set(chunk.tolist()) | set(failed_chunk.tolist())):
            start, stop = writer.chunk_bounds(k)
            buf = self.buffers.setdefault(k, ChunkBuffer(stop - start))
            rows = chunk == k
            if rows.any():
                buf.index.append(index if rows.all() else index[rows])
                buf.embeddings.append(np.asarray(embeddings if rows.all() else embeddings[rows], dtype=np.float32))
            mine = [f for f, c in zip(failed, failed_chunk.tolist(), strict=True) if c == k]
            buf.failed.extend(mine)
            buf.seen += int(rows.sum()) + len(mine)
            if buf.seen > buf.size:
                raise RuntimeError(f"chunk {k} received {buf.seen} results for {buf.size} records")
            touched[k] = buf.seen == buf.size
            if touched[k]:
                _commit(writer, k, self.buffers.pop(k), src)
        return touched

    def commit_part(self, k: int) -> None:
        """Commit the records of chunk ``k`` gathered since its last part (batches arrive in order, so they
        are the records [chunk start + saved, chunk start + seen))."""
        writer, buf = self.writer, self.buffers[k]
        chunk_start = writer.chunk_bounds(k)[0]
        lo, hi = chunk_start + buf.saved, chunk_start + buf.seen
        index = np.concatenate(buf.index) if buf.index else np.zeros(0, dtype=np.int64)
        emb = np.concatenate(buf.embeddings, axis=0) if buf.embeddings else np.zeros((0, writer.dim), np.float32)
        new = (index >= lo) & (index < hi)
        order = np.argsort(index[new], kind="stable")
        index, emb = index[new][order], emb[new][order]
        failed = sorted((i, r) for i, r in buf.failed if lo <= i < hi)
        writer.write_part(k, lo, hi, **_records(self.src, index, emb, failed))
        buf.saved = buf.seen

    def check_done(self, engine: str) -> None:
        if self.buffers:
            raise RuntimeError(f"{engine} ended with unfinished chunks {sorted(self.buffers)}")


def _commit(writer: StoreWriter, k: int, buf: ChunkBuffer, src: ImageSource) -> None:
    if buf.index:
        index = np.concatenate(buf.index)
        emb = np.concatenate(buf.embeddings, axis=0)
    else:
        index = np.zeros(0, dtype=np.int64)
        emb = np.zeros((0, writer.dim), dtype=np.float32)
    order = np.argsort(index, kind="stable")
    index, emb = index[order], emb[order]
    writer.write_chunk(k, **_records(src, index, emb, sorted(buf.failed)))


def _records(src: ImageSource, index: np.ndarray, emb: np.ndarray, failed: list[tuple[int, str]]) -> dict[str, Any]:
    """The store's record fields of embedded images ``index`` (their rows ``emb``) and of ``failed`` ones."""
    labels = src.labels
    return dict(
        index=index,
        ids=[src.ids[i] for i in index.tolist()],
        labels=[labels[i] if labels is not None else "" for i in index.tolist()],
        embeddings=emb,
        failed_index=[i for i, _ in failed],
        failed_ids=[src.ids[i] for i, _ in failed],
        failed_reason=[r for _, r in failed],
    )


__all__ = ["ChunkAssembler", "ChunkBuffer", "ProgressSaver", "check_finite"]
