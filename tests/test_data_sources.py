"""Image sources: folder, text/CSV lists, WebDataset shards, HF data sets; order, ids, labels, errors."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itae.data.decode import load_rgb
from itae.data.sources import (
    FolderSource,
    HFDatasetSource,
    ListSource,
    WebDatasetSource,
    expand_braces,
    open_source,
    parse_hf_spec,
)


def _png(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pixels(payload) -> np.ndarray:
    return np.asarray(load_rgb(payload))


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for i, rel in enumerate(["cat/b.png", "cat/a.PNG", "dog/x/deep.png", "dog/c.jpg", "cat/.hidden.png",
                             ".cache/skip.png", "dog/readme.txt"]):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_png(i) if rel.endswith((".png", ".PNG")) else b"not really" if rel.endswith(".jpg") else b"x")
    return root


def test_folder_sorted_recursive_labels(folder):
    src = open_source(folder, labels="from-folders")
    assert isinstance(src, FolderSource)
    assert src.ids == ["cat/a.PNG", "cat/b.png", "dog/c.jpg", "dog/x/deep.png"]
    assert src.labels == ["cat", "cat", "dog", "dog"]
    assert [r.index for r in src] == [0, 1, 2, 3]
    assert src[3].label == "dog" and src[3].id == "dog/x/deep.png"
    np.testing.assert_array_equal(_pixels(src.read(1)), _pixels(_png(0)))
    assert open_source(str(folder)).labels is None


def test_folder_errors(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        open_source(tmp_path / "empty")
    (folder / "top.png").write_bytes(_png(9))
    with pytest.raises(ValueError, match="directly in"):
        open_source(folder, labels="from-folders")
    with pytest.raises(ValueError, match="from-folders"):
        open_source(folder, labels="column")
    with pytest.raises(ValueError, match="labels must be one of"):
        open_source(folder, labels="yes")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "nowhere")


def test_text_list_relative_to_its_folder(tmp_path, folder):
    lst = tmp_path / "lists" / "files.txt"
    lst.parent.mkdir()
    lst.write_text(f"# a comment\n../imgs/cat/b.png\n\n{folder / 'dog/x/deep.png'}\n../imgs/missing.png\n")
    src = open_source(lst)
    assert isinstance(src, ListSource)
    assert src.ids == ["../imgs/cat/b.png", str(folder / "dog/x/deep.png"), "../imgs/missing.png"]
    np.testing.assert_array_equal(_pixels(src.read(0)), _pixels(_png(0)))
    np.testing.assert_array_equal(_pixels(src.read(1)), _pixels(_png(2)))
    with pytest.raises(ValueError, match="label column"):
        open_source(lst, labels="column")


def test_csv_list_with_labels(tmp_path, folder):
    lst = tmp_path / "files.csv"
    lst.write_text('path,label,extra\nimgs/cat/b.png,cat,1\n"imgs/dog/x/deep.png",dog,2\n')
    src = open_source(lst, labels="column")
    assert src.ids == ["imgs/cat/b.png", "imgs/dog/x/deep.png"] and src.labels == ["cat", "dog"]
    assert open_source(lst).labels is None
    lst2 = tmp_path / "other.csv"
    lst2.write_text("path,cls\nimgs/cat/b.png,cat\n")
    assert open_source(lst2, labels="column", label_column="cls").labels == ["cat"]
    with pytest.raises(ValueError, match="no 'label' column"):
        open_source(lst2, labels="column")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(ValueError, match="'path' column"):
        open_source(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="names no images"):
        open_source(empty)


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _write_shard(d / "train-000.tar", [
        ("s/0001", {"png": _png(1), "cls": b"3"}),
        ("s/0002", {"json": json.dumps({"label": "seven"}).encode(), "PNG": _png(2)}),
        ("s/0003", {"txt": b"only a caption"}),  # no image: skipped
    ])
    _write_shard(d / "train-001.tar", [("s/0004", {"jpg": b"corrupt", "txt": b"bird", "cls": b"9"})])

    one = open_source(d / "train-000.tar")
    assert isinstance(one, WebDatasetSource)
    assert one.ids == ["train-000.tar#s/0001", "train-000.tar#s/0002"] and one.labels is None
    np.testing.assert_array_equal(_pixels(one.read(1)), _pixels(_png(2)))

    both = open_source(str(d / "train-{000..001}.tar"), labels="column")
    assert both.ids == ["train-000.tar#s/0001", "train-000.tar#s/0002", "train-001.tar#s/0004"]
    assert both.labels == ["3", "seven", "9"]  # .cls wins over .txt
    assert both.read(2) == b"corrupt"
    assert open_source(d, labels="column").ids == both.ids  # a folder holding shards only
    assert open_source(str(d / "*.tar")).ids == both.ids

    with pytest.raises(FileNotFoundError, match="missing"):
        open_source(str(d / "train-{000..002}.tar"))
    _write_shard(d / "train-002.tar", [("x", {"png": _png(3)})])
    with pytest.raises(ValueError, match="has no .cls"):
        open_source(str(d / "train-{000..002}.tar"), labels="column")
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="(cannot read WebDataset shard|no images found)"):
        open_source(tmp_path / "broken.tar")


def test_expand_braces():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _saved_dataset(tmp_path: Path, splits: bool = False) -> Path:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    data = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(i), "path": None} for i in range(3)] + [{"bytes": b"broken", "path": None}],
         "label": [0, 1, 1, 0]},
        features=features,
    )
    out = tmp_path / ("dd" if splits else "ds")
    if splits:
        datasets.DatasetDict({"train": data, "test": data.select([0, 1])}).save_to_disk(str(out))
    else:
        data.save_to_disk(str(out))
    return out


def test_hf_dataset_from_disk(tmp_path):
    path = _saved_dataset(tmp_path)
    src = open_source(path, labels="column")
    assert isinstance(src, HFDatasetSource)
    assert src.ids == ["ds:train:0", "ds:train:1", "ds:train:2", "ds:train:3"]
    assert src.labels == ["cat", "dog", "dog", "cat"]
    np.testing.assert_array_equal(_pixels(src.read(2)), _pixels(_png(2)))
    assert src.read(3) == b"broken"  # undecoded: our decoder reports it, the data set library does not raise
    clone = pickle.loads(pickle.dumps(src))  # DataLoader workers receive the source by pickling
    np.testing.assert_array_equal(_pixels(clone.read(0)), _pixels(_png(0)))
    with pytest.raises(ValueError, match="no image column 'img'"):
        open_source(path, image_column="img")
    with pytest.raises(ValueError, match="no label column 'y'"):
        open_source(path, labels="column", label_column="y")


def test_hf_dataset_dict_needs_a_split(tmp_path):
    path = _saved_dataset(tmp_path, splits=True)
    with pytest.raises(ValueError, match="choose one with split"):
        open_source(path)
    src = open_source(path, split="test", labels="column")
    assert src.ids == ["dd:test:0", "dd:test:1"] and src.labels == ["cat", "dog"]
    with pytest.raises(ValueError, match="no split 'val'"):
        open_source(path, split="val")


def test_sources_pickle_and_fingerprint(tmp_path, folder):
    d = tmp_path / "w"
    d.mkdir()
    _write_shard(d / "a.tar", [("k", {"png": _png(5)})])
    for src in (open_source(folder, labels="from-folders"), open_source(d / "a.tar")):
        clone = pickle.loads(pickle.dumps(src))
        assert clone.ids == src.ids and clone.fingerprint() == src.fingerprint()
        assert _pixels(clone.read(0)).shape == _pixels(src.read(0)).shape
    a = open_source(folder, labels="from-folders").fingerprint()
    assert a == open_source(folder, labels="from-folders").fingerprint()
    assert a != open_source(folder).fingerprint()
    (folder / "cat" / "new.png").write_bytes(_png(11))
    assert a != open_source(folder, labels="from-folders").fingerprint()


# ------------------------------------------------------------------------ hub configurations (offline)


@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` replaced by a recorder that returns a small in-memory data set."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, *, split=None, **kw):
        calls.append((path, name, split))
        if path == "multi/set" and name is None:  # what the library says for a multi-configuration set
            raise ValueError("Config name is missing. Please pick one among the available configs: ['a', 'b']")
        n = 1 if name is None else 3  # every configuration has the same rows: only the ids tell them apart
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": _png(i), "path": None} for i in range(n)], "label": [i % 2 for i in range(n)]},
            features=features,
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_parse_hf_spec():
    assert parse_hf_spec("hf:frgfm/imagenette") == ("frgfm/imagenette", None)
    assert parse_hf_spec("hf:frgfm/imagenette:320px") == ("frgfm/imagenette", "320px")
    assert parse_hf_spec("frgfm/imagenette:320px") == ("frgfm/imagenette", "320px")
    assert parse_hf_spec("hf:mnist:default") == ("mnist", "default")
    # dots and dashes belong to the id or the configuration, never separate them
    assert parse_hf_spec("hf:my-org/set.v2_x:20231101.en") == ("my-org/set.v2_x", "20231101.en")
    assert parse_hf_spec("hf:a/b", "cs-en") == ("a/b", "cs-en")
    assert parse_hf_spec("hf:a/b:cs-en", "cs-en") == ("a/b", "cs-en")
    # not a hub id before the colon (a path, a URL): returned whole for the caller to handle
    assert parse_hf_spec("hf:/data/saved:1") == ("/data/saved:1", None)
    assert parse_hf_spec("hf://datasets/a/b") == ("//datasets/a/b", None)
    for bad in ("hf:a/b:", "hf:a/b:x:y", "hf:a/b:x y", "hf:a/b:x/y", "hf:C:/data"):
        with pytest.raises(ValueError, match="hf:owner/name:config"):
            parse_hf_spec(bad)
    with pytest.raises(ValueError, match="names configuration '320px' but hf_config='160px'"):
        parse_hf_spec("hf:a/b:320px", "160px")
    for bad in ("", "a b", "a:b", 3):
        with pytest.raises(ValueError, match="hf_config must be a configuration name"):
            parse_hf_spec("hf:a/b", bad)


def test_hf_config_reaches_load_dataset(fake_hub):
    src = open_source("hf:owner/set:320px", split="validation", labels="column")
    assert isinstance(src, HFDatasetSource)
    assert fake_hub[-1] == ("owner/set", "320px", "validation")
    assert src.ids == ["owner/set:320px:validation:0", "owner/set:320px:validation:1", "owner/set:320px:validation:2"]
    assert src.labels == ["x", "y", "x"]
    np.testing.assert_array_equal(_pixels(src.read(1)), _pixels(_png(1)))

    same = open_source("hf:owner/set", hf_config="320px", split="validation", labels="column")
    assert fake_hub[-1] == ("owner/set", "320px", "validation")
    assert same.ids == src.ids and same.fingerprint() == src.fingerprint()
    bare = open_source("owner/set:320px", split="validation", labels="column")  # no hf: prefix, as owner/name
    assert fake_hub[-1] == ("owner/set", "320px", "validation") and bare.ids == src.ids

    plain = open_source("owner/set", split="validation")  # no configuration: ids as before
    assert fake_hub[-1] == ("owner/set", None, "validation") and plain.ids == ["owner/set:validation:0"]
    # two configurations of the same data set never share ids, nor a fingerprint (a resume is refused)
    other = open_source("hf:owner/set:160px", split="validation", labels="column")
    assert not set(other.ids) & set(src.ids)
    assert other.fingerprint() != src.fingerprint()
    same_rows = open_source("hf:owner/set:160px", split="validation", labels="column")
    assert same_rows.fingerprint() == other.fingerprint()
    assert pickle.loads(pickle.dumps(src)).ids == src.ids


def test_hf_config_errors(fake_hub, tmp_path, folder):
    with pytest.raises(ValueError, match="hf:owner/name:config"):
        open_source("hf:owner/set:")
    with pytest.raises(ValueError, match="hf:owner/name:config"):
        open_source("owner/set:a:b")
    with pytest.raises(ValueError, match="names configuration '320px' but hf_config='160px'"):
        open_source("hf:owner/set:320px", hf_config="160px")
    assert fake_hub == []  # refused before reaching the hub
    with pytest.raises(ValueError, match=r"Config name is missing.*write hf:multi/set:CONFIG"):
        open_source("hf:multi/set")
    # a configuration means nothing for local sources: refused rather than ignored
    with pytest.raises(ValueError, match="save_to_disk, which holds one configuration"):
        open_source(_saved_dataset(tmp_path), hf_config="320px")
    with pytest.raises(ValueError, match="hf_config='320px' chooses a configuration of a hub data set"):
        open_source(folder, hf_config="320px")
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\n")
    with pytest.raises(ValueError, match="is a local file"):
        open_source(listing, hf_config="320px")


def test_csv_list_with_a_byte_order_mark_and_one_in_another_encoding(tmp_path, folder):
    """Excel's "CSV UTF-8" starts with a BOM; a Latin-1 list is refused naming the file and the line."""
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbfpath,label\nimgs/cat/b.png,cat\nimgs/dog/c.jpg,dog\n")
    src = open_source(bom, labels="column")
    assert src.ids == ["imgs/cat/b.png", "imgs/dog/c.jpg"] and src.labels == ["cat", "dog"]
    txt = tmp_path / "excel.txt"
    txt.write_bytes(b"\xef\xbb\xbfimgs/cat/b.png\n")
    assert open_source(txt).ids == ["imgs/cat/b.png"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,label\nimgs/cat/b.png,cat\nimgs/dog/c.jpg,chien fran\u00e7ais\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv' line 3: not UTF-8.*save the list as UTF-8"):
        open_source(latin, labels="column")
