"""The embedding store: a folder that extraction fills chunk by chunk and that later stages read.

Layout while a run is in progress::

    manifest.json        settings, versions, source fingerprint; "complete": false
    chunk-00000.npz      records [0, chunk_size): their embeddings, ids, labels, and the failures
    chunk-00001.npz      ...
    chunk-00002.part-0000008192-0000008448.npz
                         a committed part of a chunk still in progress (records [8192, 8448)): progress is
                         saved every so many images or seconds, not only when a chunk is full
    errors.csv           index,id,reason for every image that could not be decoded (committed chunks)

and once finished (the chunks are consolidated, then removed)::

    manifest.json        "complete": true, plus counts and file names
    embeddings.npy       (N, D) float32, memory-mappable, rows in source order
    records.csv          index,id,label of each row (index = position in the source)
    errors.csv

The CSV files are UTF-8, except that an id (a file name) that is not valid UTF-8 is written as the file
name's own bytes; read them with ``errors="surrogateescape"`` to get the ids back as ``os.fsdecode`` gives
them (this module's reader does).

Chunk ``k`` always covers source records ``[k * chunk_size, (k + 1) * chunk_size)``, whatever failed in
it, so a resumed run recomputes exactly the missing chunks and ends with a store identical to an
uninterrupted run's. Every file is written to a temporary name in the same folder, fsynced, and moved
into place with ``os.replace``: a file is either absent or complete, even after kill -9.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import numpy as np

from itae._io import ID_ERRORS, TMP_PREFIX, atomic_write, atomic_write_text, fsync_dir, temp_path
from itae.errors import StoreError

FORMAT = "itae-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
RECORDS = "records.csv"
ERRORS = "errors.csv"
CHUNK_PREFIX = "chunk-"
_CHUNK_KEYS = (
    "start", "stop", "index", "ids", "labels", "embeddings", "failed_index", "failed_ids", "failed_reason",
)
# Manifest keys that define the result: a resumed run must agree on all of them.
SETTING_KEYS = ("format_version", "model", "feature", "normalize", "precision", "preprocess", "itae_requested",
                "calibration_images", "chunk_size", "dim", "ttr_requested")
SOURCE_SETTING_KEYS = ("kind", "num_records", "fingerprint", "has_labels")


# ------------------------------------------------------------------------------------- atomic I/O


def _write_npz(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz (readable by ``np.load``) with fixed timestamps, so equal data gives equal bytes."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr, order="C"), allow_pickle=False)
            z.writestr(info, buf.getvalue())


def _csv_text(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _str_array(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def library_versions() -> dict[str, str]:
    """Versions of the packages that shape the embeddings, for the manifest."""
    out = {"python": ".".join(map(str, sys.version_info[:3]))}
    for dist in ("itae", "torch", "transformers", "timm", "numpy", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def chunk_name(k: int) -> str:
    return f"{CHUNK_PREFIX}{k:05d}.npz"


def part_name(k: int, start: int, stop: int) -> str:
    """A committed part of chunk ``k``: records [start, stop), the next ones after the chunk's earlier parts."""
    return f"{CHUNK_PREFIX}{k:05d}.part-{start:010d}-{stop:010d}.npz"


# ------------------------------------------------------------------------------------------ reader


class EmbeddingStore:
    """Read an embedding store folder (see the module docstring for the layout).

    ``embeddings()`` (N, D), ``ids``, ``labels`` and ``indices`` are aligned row by row, in source order;
    images that failed to decode have no row and are listed by ``errors``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"no embedding store at {str(self.path)!r} (no {MANIFEST}); run itae embed (itae.embed in Python) first"
            )
        try:
            with open(manifest, encoding="utf-8") as f:
                self.manifest: dict[str, Any] = json.load(f)
        except ValueError as e:  # not JSON, or not UTF-8
            raise StoreError(f"{str(manifest)!r} is not an itae embedding store manifest ({e})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise StoreError(f"{str(manifest)!r} is not an itae embedding store manifest")
        if int(self.manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise StoreError(
                f"the store at {str(self.path)!r} has format version {self.manifest['format_version']}, newer "
                f"than this itae understands ({FORMAT_VERSION}); upgrade itae"
            )
        self._records: tuple[np.ndarray, list[str], list[str]] | None = None

    def __repr__(self) -> str:
        state = f"{len(self)} x {self.dim}" if self.is_complete else "incomplete"
        return f"EmbeddingStore({str(self.path)!r}, {state})"

    @property
    def is_complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def num_records(self) -> int:
        """Images in the source, decoded or not."""
        return int(self.manifest["source"]["num_records"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def itae_config(self):
        """The ``ITAEConfig`` used (thresholds resolved), or None for the baseline."""
        from itae.config import ITAEConfig

        d = self.manifest.get("itae")
        return None if d is None else ITAEConfig.from_dict(d)

    @property
    def ttr_config(self):
        """The ``TTRConfig`` used (neurons found), or None when test-time registers were off."""
        from itae.methods import TTRConfig

        d = self.manifest.get("ttr")
        return None if d is None else TTRConfig.from_dict(d)

    @property
    def method(self) -> str:
        """The artifact fix the store was embedded with: "none", "itae", "ttr" or "itae+ttr"."""
        from itae.methods import method_name

        return method_name(self.itae_config, self.ttr_config)

    def _require_complete(self) -> None:
        if not self.is_complete:
            raise StoreError(
                f"the store at {str(self.path)!r} is incomplete (the run was interrupted); run itae embed "
                "(itae.embed in Python) again with the same settings to resume it"
            )

    def __len__(self) -> int:
        self._require_complete()
        return int(self.manifest["num_embedded"])

    def embeddings(self, mmap: bool = True) -> np.ndarray:
        """(N, D) float32 in source order; memory-mapped read-only unless ``mmap=False``."""
        self._require_complete()
        return np.load(self.path / EMBEDDINGS, mmap_mode="r" if mmap else None, allow_pickle=False)

    def _load_records(self) -> tuple[np.ndarray, list[str], list[str]]:
        if self._records is None:
            self._require_complete()
            index: list[int] = []
            ids: list[str] = []
            labels: list[str] = []
            with open(self.path / RECORDS, encoding="utf-8", errors=ID_ERRORS, newline="") as f:
                reader = csv.reader(f)
                next(reader)
                for row in reader:
                    index.append(int(row[0]))
                    ids.append(row[1])
                    labels.append(row[2])
            self._records = (np.asarray(index, dtype=np.int64), ids, labels)
        return self._records

    @property
    def indices(self) -> np.ndarray:
        """(N,) position of each row in the source."""
        return self._load_records()[0]

    @property
    def ids(self) -> list[str]:
        return self._load_records()[1]

    @property
    def labels(self) -> list[str] | None:
        """Row labels, or None when the source was read without labels."""
        if not self.manifest["source"].get("has_labels"):
            return None
        return self._load_records()[2]

    @property
    def errors(self) -> list[tuple[int, str, str]]:
        """(index, id, reason) of every image that could not be decoded."""
        p = self.path / ERRORS
        if not p.is_file():
            return []
        with open(p, encoding="utf-8", errors=ID_ERRORS, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            return [(int(r[0]), r[1], r[2]) for r in reader]


# ------------------------------------------------------------------------------------------ writer


def prepare_output(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written in it, or raise a clear error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{str(out)!r} is a file, not a folder; give a folder path for the store")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StoreError(f"cannot create output folder {str(out)!r}: a parent is a file") from None
    except OSError as e:
        raise StoreError(f"cannot create output folder {str(out)!r}: {e.strerror or e}") from None
    if not os.access(out, os.R_OK | os.X_OK):
        raise StoreError(f"output folder {str(out)!r} is not readable; fix its permissions or choose another")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StoreError(
            f"cannot write in output folder {str(out)!r}: {e.strerror or e}; fix its permissions or choose another"
        ) from None
    return out


def _is_store_file(name: str) -> bool:
    return (
        name in (MANIFEST, EMBEDDINGS, RECORDS, ERRORS)
        or name.startswith(TMP_PREFIX)
        or (name.startswith(CHUNK_PREFIX) and name.endswith(".npz"))
    )


def clear_store_files(out: Path) -> None:
    """Remove this module's files from ``out`` (never anything else)."""
    for p in out.iterdir():
        if p.is_file() and _is_store_file(p.name):
            p.unlink()
    fsync_dir(out)


# The folder lock of ``itae._lock`` (by name, since the lock lives a floor above the store)
_LOCK_FILES = (".itae.lock", ".itae.lock.owner")


def foreign_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not _is_store_file(p.name) and p.name not in _LOCK_FILES)


def read_manifest(out: Path) -> dict[str, Any] | None:
    p = out / MANIFEST
    if not p.is_file():
        return None
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(
            f"cannot read {str(p)!r}: {e}; pass overwrite=True to start this store again"
        ) from None


def _setting(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _shown(value: Any) -> str:
    """A setting's value for a message: long hex digests (fingerprints) cut to their first 12 characters."""
    if isinstance(value, str) and len(value) > 16 and all(c in "0123456789abcdef" for c in value):
        return repr(value[:12] + "...")
    return repr(value)


def _labels_setting(manifest: dict[str, Any]) -> str:
    src = manifest.get("source", {})
    if not src.get("has_labels"):
        return "none"
    return str(src.get("labels") or "yes")


def describe_setting_differences(old: dict[str, Any], new: dict[str, Any], diffs: list[str]) -> str:
    """``diffs`` (from ``setting_differences``) in words: "labels: store has none, asked from-folders; ..."."""
    old_mode, new_mode = _setting(old, "source.labels"), _setting(new, "source.labels")
    labels_differ = "source.has_labels" in diffs or (
        "source.fingerprint" in diffs and None not in (old_mode, new_mode) and old_mode != new_mode
    )
    parts = []
    if labels_differ:  # said plainly, with the label mode of each side, rather than as has_labels True/False
        parts.append(f"labels: store has {_labels_setting(old)}, asked {_labels_setting(new)}")
    for d in diffs:
        if d == "source.has_labels":
            continue
        note = " (of the image ids and their labels)" if d == "source.fingerprint" and labels_differ else ""
        was, now = _setting(old, d), _setting(new, d)
        if isinstance(was, dict) and isinstance(now, dict):  # e.g. itae_requested: only the keys that differ
            keys = [key for key in {**was, **now} if was.get(key) != now.get(key)]
            was, now = {key: was.get(key) for key in keys}, {key: now.get(key) for key in keys}
        parts.append(f"{d}{note}: store has {_shown(was)}, asked {_shown(now)}")
    return "; ".join(parts)


def setting_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of result-defining settings on which two manifests disagree."""
    diffs = [k for k in SETTING_KEYS if old.get(k) != new.get(k)]
    old_src, new_src = old.get("source", {}), new.get("source", {})
    diffs += [f"source.{k}" for k in SOURCE_SETTING_KEYS if old_src.get(k) != new_src.get(k)]
    return diffs


class StoreWriter:
    """Fills a store folder: ``begin`` writes the manifest, ``write_chunk`` commits chunks, ``finalize``."""

    def __init__(self, out: Path, manifest: dict[str, Any]) -> None:
        self.out = out
        self.manifest = manifest
        self.chunk_size = int(manifest["chunk_size"])
        self.num_records = int(manifest["source"]["num_records"])
        self.num_chunks = -(-self.num_records // self.chunk_size)
        self.dim = int(manifest["dim"])
        # Failures of the committed chunks, by chunk: errors.csv is rewritten from memory, not from disk.
        self._errors: dict[int, list[tuple[int, str, str]]] | None = None

    def begin(self) -> None:
        atomic_write_text(self.out / MANIFEST, _manifest_text(self.manifest))

    def chunk_bounds(self, k: int) -> tuple[int, int]:
        start = k * self.chunk_size
        return start, min(start + self.chunk_size, self.num_records)

    def _load_chunk(self, k: int) -> dict[str, np.ndarray] | None:
        """A committed chunk's arrays, or None (a malformed file is removed and will be recomputed)."""
        p = self.out / chunk_name(k)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {key: z[key] for key in _CHUNK_KEYS}
            start, stop = self.chunk_bounds(k)
            emb = arrays["embeddings"]
            ok = (
                int(arrays["start"]) == start and int(arrays["stop"]) == stop
                and emb.ndim == 2 and emb.shape[1] == self.dim and emb.shape[0] == len(arrays["index"])
                and len(arrays["index"]) + len(arrays["failed_index"]) == stop - start
            )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # unreadable: recompute it
            ok = False
        if not ok:
            p.unlink()
            return None
        return arrays

    def committed_chunks(self) -> list[int]:
        """Validate the chunk files on disk (removing malformed ones) and list the committed chunks."""
        self._errors = {}
        done = []
        for k in range(self.num_chunks):
            a = self._load_chunk(k)
            if a is not None:
                done.append(k)
                self._errors[k] = _failures(a)
        return done

    def _iter_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        for k in range(self.num_chunks):
            arrays = self._load_chunk(k)
            if arrays is not None:
                yield arrays

    def write_chunk(
        self,
        k: int,
        index: np.ndarray,
        ids: list[str],
        labels: list[str],
        embeddings: np.ndarray,
        failed_index: list[int],
        failed_ids: list[str],
        failed_reason: list[str],
    ) -> None:
        """Commit chunk ``k`` atomically, then refresh ``errors.csv`` from all committed chunks."""
        start, stop = self.chunk_bounds(k)
        arrays = self._record_arrays(
            start, stop, index, ids, labels, embeddings, failed_index, failed_ids, failed_reason
        )
        if self._errors is None:
            self.committed_chunks()
        atomic_write(self.out / chunk_name(k), lambda f: _write_npz(f, arrays))
        self._remove_parts(k)  # the chunk holds them now
        self._errors[k] = _failures(arrays)  # type: ignore[index]
        self.write_errors()

    def write_part(
        self,
        k: int,
        start: int,
        stop: int,
        index: np.ndarray,
        ids: list[str],
        labels: list[str],
        embeddings: np.ndarray,
        failed_index: list[int],
        failed_ids: list[str],
        failed_reason: list[str],
    ) -> None:
        """Commit records [start, stop) of chunk ``k``, which follow its earlier parts, atomically.

        Parts are progress, not results: ``write_chunk`` replaces them once the chunk is complete, and a
        resumed run continues the chunk after its last part (``load_parts``).
        """
        lo, hi = self.chunk_bounds(k)
        if not lo <= start < stop <= hi or len(index) + len(failed_index) != stop - start:
            raise StoreError(f"records [{start}, {stop}) are not a part of chunk {k} [{lo}, {hi})")
        arrays = self._record_arrays(
            start, stop, index, ids, labels, embeddings, failed_index, failed_ids, failed_reason
        )
        atomic_write(self.out / part_name(k, start, stop), lambda f: _write_npz(f, arrays))

    def _record_arrays(
        self,
        start: int,
        stop: int,
        index: np.ndarray,
        ids: list[str],
        labels: list[str],
        embeddings: np.ndarray,
        failed_index: list[int],
        failed_ids: list[str],
        failed_reason: list[str],
    ) -> dict[str, np.ndarray]:
        """The arrays one chunk or part file holds for records [start, stop), in their stored dtypes."""
        return {
            "start": np.asarray(start, dtype=np.int64),
            "stop": np.asarray(stop, dtype=np.int64),
            "index": np.asarray(index, dtype=np.int64),
            "ids": _str_array(ids),
            "labels": _str_array(labels),
            "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32).reshape(len(index), self.dim),
            "failed_index": np.asarray(failed_index, dtype=np.int64),
            "failed_ids": _str_array(failed_ids),
            "failed_reason": _str_array(failed_reason),
        }

    def _part_files(self, k: int) -> list[Path]:
        return sorted(self.out.glob(f"{CHUNK_PREFIX}{k:05d}.part-*.npz"))

    def _remove_parts(self, k: int) -> None:
        for p in self._part_files(k):
            p.unlink(missing_ok=True)

    def load_parts(self, k: int) -> dict[str, Any] | None:
        """The committed parts of chunk ``k`` joined: ``stop`` (the first record not yet done) and the
        arrays of records [chunk start, stop); None when there are none. Parts that are unreadable or do
        not follow one another from the chunk's start are removed (their records are recomputed)."""
        lo, hi = self.chunk_bounds(k)
        joined: dict[str, list[np.ndarray]] = {key: [] for key in _CHUNK_KEYS[2:]}
        stop = lo
        for p in self._part_files(k):
            try:
                with np.load(p, allow_pickle=False) as z:
                    a = {key: z[key] for key in _CHUNK_KEYS}
                ok = (
                    int(a["start"]) == stop and stop < int(a["stop"]) <= hi
                    and a["embeddings"].ndim == 2 and a["embeddings"].shape == (len(a["index"]), self.dim)
                    and len(a["index"]) + len(a["failed_index"]) == int(a["stop"]) - int(a["start"])
                )
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                ok = False
            if not ok:  # this part and any after it cannot be used
                for q in self._part_files(k):
                    if q.name >= p.name:
                        q.unlink(missing_ok=True)
                break
            for key in joined:
                joined[key].append(a[key])
            stop = int(a["stop"])
        if stop == lo:
            return None
        out: dict[str, Any] = {key: np.concatenate(v) for key, v in joined.items()}
        out["stop"] = stop
        return out

    def error_rows(self) -> list[tuple[int, str, str]]:
        """(index, id, reason) of the failures in the committed chunks, in source order."""
        if self._errors is None:
            self.committed_chunks()
        return [row for k in sorted(self._errors) for row in self._errors[k]]  # type: ignore[union-attr]

    def write_errors(self) -> int:
        """Rewrite ``errors.csv`` for the committed chunks; returns the number of errors."""
        rows = self.error_rows()
        write_errors_csv(self.out, rows)
        return len(rows)

    def finalize(self) -> EmbeddingStore:
        """Consolidate the chunks into ``embeddings.npy`` + ``records.csv``, mark complete, drop the chunks."""
        done = self.committed_chunks() if self._errors is None else list(self._errors)
        missing = sorted(set(range(self.num_chunks)) - set(done))
        if missing:
            raise StoreError(f"cannot finalize {str(self.out)!r}: chunk(s) {missing[:5]} missing")
        num_failed = self.write_errors()
        num_embedded = self.num_records - num_failed
        if num_embedded == 0:
            raise StoreError(f"no embeddings to write in {str(self.out)!r}")

        # Stream chunk by chunk into a memory-mapped file: memory stays at one chunk.
        tmp = temp_path(self.out / EMBEDDINGS)
        try:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_embedded, self.dim))
            rows = []
            row = 0
            for a in self._iter_chunks():
                n = len(a["index"])
                mm[row : row + n] = a["embeddings"]
                row += n
                rows.extend(zip(a["index"].tolist(), a["ids"].tolist(), a["labels"].tolist(), strict=True))
            if row != num_embedded:
                raise StoreError(f"chunks of {str(self.out)!r} hold {row} rows, expected {num_embedded}")
            mm.flush()
            del mm
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.out / EMBEDDINGS)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        atomic_write_text(self.out / RECORDS, _csv_text(["index", "id", "label"], rows), errors=ID_ERRORS)
        manifest = dict(self.manifest)
        manifest.update(
            complete=True, num_embedded=num_embedded, num_failed=num_failed,
            files={"embeddings": EMBEDDINGS, "records": RECORDS, "errors": ERRORS},
        )
        atomic_write_text(self.out / MANIFEST, _manifest_text(manifest))
        self.manifest = manifest
        remove_chunks(self.out)
        return EmbeddingStore(self.out)


def write_errors_csv(out: Path, rows: list[tuple[int, str, str]]) -> None:
    """Write ``errors.csv`` (index,id,reason) atomically."""
    atomic_write_text(out / ERRORS, _csv_text(["index", "id", "reason"], rows), errors=ID_ERRORS)


def _failures(arrays: dict[str, np.ndarray]) -> list[tuple[int, str, str]]:
    a = arrays
    return list(zip(a["failed_index"].tolist(), a["failed_ids"].tolist(), a["failed_reason"].tolist(), strict=True))


def remove_chunks(out: Path) -> None:
    for p in out.glob(f"{CHUNK_PREFIX}*.npz"):
        p.unlink()
    fsync_dir(out)


def _manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


__all__ = [
    "EmbeddingStore", "StoreError", "StoreWriter", "atomic_write", "atomic_write_text", "chunk_name",
    "clear_store_files", "describe_setting_differences", "foreign_files", "library_versions", "prepare_output",
    "read_manifest", "remove_chunks", "setting_differences", "write_errors_csv",
]
