"""The embedding store: atomic files, deterministic chunks, resume bookkeeping, consolidation, bad folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from itae.data import store as store_mod
from itae.data.store import (
    EmbeddingStore,
    StoreError,
    StoreWriter,
    atomic_write,
    chunk_name,
    prepare_output,
    setting_differences,
)


def _manifest(num_records: int, chunk_size: int, dim: int = 3) -> dict:
    return {
        "format": store_mod.FORMAT, "format_version": store_mod.FORMAT_VERSION, "complete": False,
        "model": "m", "feature": "cls", "normalize": False, "precision": "fp32", "dim": dim,
        "preprocess": {}, "itae_requested": None, "calibration_images": None, "itae": None, "chunk_size": chunk_size,
        "source": {"spec": "s", "kind": "folder", "labels": "none", "has_labels": True,
                   "num_records": num_records, "fingerprint": "f"},
    }


def _fill(writer: StoreWriter, k: int, fail: set[int] = frozenset()) -> None:
    start, stop = writer.chunk_bounds(k)
    ok = [i for i in range(start, stop) if i not in fail]
    bad = [i for i in range(start, stop) if i in fail]
    emb = np.arange(len(ok) * writer.dim, dtype=np.float32).reshape(len(ok), writer.dim) + 100 * k
    writer.write_chunk(k, np.array(ok), [f"id{i}" for i in ok], [f"L{i % 2}" for i in ok], emb,
                       bad, [f"id{i}" for i in bad], ["broken"] * len(bad))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def explode(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no temporary left behind


def test_chunks_are_byte_deterministic_and_resume_bookkeeping(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        prepare_output(out)
        w = StoreWriter(out, _manifest(10, 4))
        w.begin()
        assert w.num_chunks == 3 and w.committed_chunks() == []
        _fill(w, 0, fail={1})
        _fill(w, 2)
    assert (a / chunk_name(0)).read_bytes() == (b / chunk_name(0)).read_bytes()
    # A fresh writer (a resumed run) sees exactly the committed chunks and their failures.
    w = StoreWriter(a, _manifest(10, 4))
    assert w.committed_chunks() == [0, 2]
    assert w.error_rows() == [(1, "id1", "broken")]
    assert (a / "errors.csv").read_text() == "index,id,reason\n1,id1,broken\n"
    with pytest.raises(StoreError, match=r"chunk\(s\) \[1\] missing"):
        w.finalize()


def test_malformed_chunk_is_discarded(tmp_path):
    prepare_output(tmp_path)
    w = StoreWriter(tmp_path, _manifest(8, 4))
    w.begin()
    _fill(w, 0)
    (tmp_path / chunk_name(1)).write_bytes(b"PK\x03\x04 not a zip")
    assert w.committed_chunks() == [0]
    assert not (tmp_path / chunk_name(1)).exists()
    # A chunk written for other bounds (another chunk_size) is not trusted either.
    other = StoreWriter(tmp_path, _manifest(8, 2))
    assert other.committed_chunks() == []
    assert not (tmp_path / chunk_name(0)).exists()


def test_finalize_consolidates_in_source_order(tmp_path):
    prepare_output(tmp_path)
    w = StoreWriter(tmp_path, _manifest(10, 4))
    w.begin()
    for k in (2, 0, 1):  # commit order does not matter
        _fill(w, k, fail={5, 9})
    store = w.finalize()
    assert store.is_complete and len(store) == 8 and store.dim == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.npy", "errors.csv", "manifest.json",
                                                          "records.csv"]
    emb = store.embeddings()
    assert isinstance(emb, np.memmap) and emb.shape == (8, 3) and emb.dtype == np.float32
    assert store.indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8]
    assert store.ids == [f"id{i}" for i in (0, 1, 2, 3, 4, 6, 7, 8)]
    assert store.labels == ["L0", "L1", "L0", "L1", "L0", "L0", "L1", "L0"]
    np.testing.assert_array_equal(emb[4], [100, 101, 102])  # record 4: first row of chunk 1
    np.testing.assert_array_equal(store.embeddings(mmap=False)[5], [103, 104, 105])  # record 6
    assert store.errors == [(5, "id5", "broken"), (9, "id9", "broken")]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_embedded"] == 8 and manifest["num_failed"] == 2


def test_incomplete_store_says_how_to_resume(tmp_path):
    prepare_output(tmp_path)
    w = StoreWriter(tmp_path, _manifest(4, 4))
    w.begin()
    store = EmbeddingStore(tmp_path)
    assert not store.is_complete
    with pytest.raises(StoreError, match="incomplete.*resume"):
        store.embeddings()
    with pytest.raises(FileNotFoundError, match="no embedding store"):
        EmbeddingStore(tmp_path / "nothing")


def test_settings_differences():
    a, b = _manifest(4, 4), _manifest(4, 4)
    assert setting_differences(a, b) == []
    b["feature"] = "mean"
    b["source"]["fingerprint"] = "g"
    b["source"]["spec"] = "elsewhere"  # the same records under another path are fine
    assert setting_differences(a, b) == ["feature", "source.fingerprint"]


def test_prepare_output_errors(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        prepare_output(f)
    with pytest.raises(StoreError, match="cannot create output folder"):
        prepare_output(f / "sub")
    assert prepare_output(tmp_path / "new" / "deep").is_dir()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store_mod.tempfile, "mkstemp", denied)
    with pytest.raises(StoreError, match="cannot write in output folder .*Permission denied"):
        prepare_output(tmp_path / "new")
