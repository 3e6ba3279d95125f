"""Where images come from: a folder, a list of paths, WebDataset tar shards, or a HF ``datasets`` data set.

Every source is an ``ImageSource``: a fixed, sorted, stable sequence of records, each with a string id
(relative path, ``<shard>#<key>``, or ``<dataset>[:<config>]:<split>:<row>``) and an optional label. Only ids and
labels are held in memory; image bytes are read one record at a time by ``read`` (in DataLoader
workers), so sources are picklable and cheap to send to worker processes.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from itae.errors import InputError, MissingDependencyError

logger = logging.getLogger("itae.data")

LabelMode = Literal["none", "from-folders", "column"]
LABEL_MODES = ("none", "from-folders", "column")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".avif"}
)
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WDS_LABEL_EXTENSIONS = ("cls", "txt", "json")

# An image's payload, as ``itae.data.decode.load_rgb`` accepts it: a file path, raw bytes, or an
# already decoded PIL image (HF data sets without raw bytes).
Payload = Any


@dataclass(frozen=True)
class ImageRecord:
    """One image of a source: its position, stable id and label (None when the source has none)."""

    index: int
    id: str
    label: str | None


class ImageSource:
    """A sorted, stable sequence of images. Subclasses fill ``ids``/``labels`` and implement ``read``."""

    kind: str = "source"

    def __init__(self, spec: str, ids: list[str], labels: list[str] | None) -> None:
        if labels is not None and len(labels) != len(ids):
            raise InputError(f"{len(labels)} labels for {len(ids)} images")
        self.spec = spec
        self.ids = ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> ImageRecord:
        return ImageRecord(index, self.ids[index], None if self.labels is None else self.labels[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, {len(self)} images)"

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def read(self, index: int) -> Payload:
        """The payload of record ``index`` (a path, bytes or a PIL image); may raise OSError."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 over the ordered ids and labels: a resumed run must see exactly the same records."""
        h = hashlib.sha256()
        for i, ident in enumerate(self.ids):
            label = "" if self.labels is None else self.labels[i]
            h.update(ident.encode("utf-8", "surrogateescape"))
            h.update(b"\t")
            h.update(label.encode("utf-8", "surrogateescape"))
            h.update(b"\n")
        return h.hexdigest()


def display_name(ident: str) -> str:
    """The informative end of an id, for captions: a file's name, a WebDataset sample's key (not its shard),
    a data set's row."""
    if ".tar#" in ident:  # <shard file name>#<key>: the key names the sample
        ident = ident.rsplit(".tar#", 1)[1]
    return ident.replace("\\", "/").rsplit("/", 1)[-1] or ident


# ------------------------------------------------------------------------------------------ folder


class FolderSource(ImageSource):
    """Every image file under ``root`` (recursive, hidden entries skipped), sorted by relative path.

    Symlinked folders are followed (a link back to a folder already seen is skipped, so link loops end).
    Folders that hold itae's own outputs are not input: the ``exclude`` folders (a run's output folder),
    and any folder holding an embedding store or a run (``manifest.json`` of a store, ``run.json``).
    """

    kind = "folder"

    def __init__(self, root: str | Path, *, labels: LabelMode = "none", spec: str | None = None,
                 exclude: tuple[str | os.PathLike, ...] = ()) -> None:
        self.root = Path(root)
        rel = _scan_images(self.root, exclude)
        if not rel:
            raise InputError(
                f"no images found in folder {str(self.root)!r} (looked recursively for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point to a folder that holds images"
            )
        label_list = None
        if labels == "from-folders":
            top = [r for r in rel if "/" not in r]
            if top:
                raise InputError(
                    f"labels='from-folders' takes each image's label from its immediate subfolder, but "
                    f"{len(top)} image(s) lie directly in {str(self.root)!r} (e.g. {top[0]!r}); "
                    "move them into class folders or use labels='none'"
                )
            label_list = [r.split("/", 1)[0] for r in rel]
        elif labels == "column":
            raise InputError(
                "labels='column' needs a CSV list or a data set; for a folder use labels='from-folders'"
            )
        super().__init__(spec or str(root), rel, label_list)

    def read(self, index: int) -> Payload:
        return self.root / self.ids[index]


def _scan_images(root: Path, exclude: tuple[str | os.PathLike, ...] = ()) -> list[str]:
    """Relative posix paths of image files under ``root``, sorted; hidden files and folders skipped,
    symlinked folders followed once, itae output folders (and ``exclude``) left out."""
    return sorted(rel for rel, _ in _walk_images(root, exclude))


def _walk_images(root: Path, exclude: tuple[str | os.PathLike, ...] = ()):
    """Yield (relative posix path, name) of each image file under ``root`` (see ``_scan_images``)."""
    excluded = {os.path.realpath(e) for e in exclude}
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a symlink: a loop or a second link
            logger.info("skipping %s: a link to a folder already scanned", dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        top = os.path.samefile(dirpath, root)
        if not top and (os.path.realpath(dirpath) in excluded or _holds_itae_output(Path(dirpath), filenames)):
            logger.info("skipping %s: it holds itae outputs, not input images", dirpath)
            dirnames[:] = []
            continue
        if top and _holds_itae_output(Path(dirpath), filenames):  # a run folder given as input: its own
            dirnames[:] = [d for d in dirnames if d not in ("inspect", "embeddings")]  # outputs are no input
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            yield (base / name).as_posix(), name


def _holds_itae_output(folder: Path, filenames: list[str]) -> bool:
    """Whether ``folder`` is an itae run folder or embedding store (by their own files, not by name)."""
    for name, key, value in (("manifest.json", "format", "itae-embeddings"), ("run.json", "status", None)):
        if name in filenames:
            try:
                data = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and key in data and (value is None or data[key] == value):
                return True
    return ".itae.lock" in filenames


# -------------------------------------------------------------------------------------- path list


class ListSource(ImageSource):
    """A text file with one path per line, or a CSV with a ``path`` column and an optional label column.

    Relative paths are relative to the list's folder. Blank lines and lines starting with ``#`` in a text
    list are skipped. A listed file that does not exist is not an error here: it is reported at decode
    time and lands in ``errors.csv`` like any other unreadable image.
    """

    kind = "list"

    def __init__(
        self, list_path: str | Path, *, labels: LabelMode = "none", label_column: str = "label", spec: str | None = None
    ) -> None:
        self.list_path = Path(list_path)
        self.base = self.list_path.parent
        if self.list_path.suffix.lower() == ".csv":
            paths, label_list = self._read_csv(labels, label_column)
        else:
            if labels != "none":
                raise InputError(
                    f"labels={labels!r} needs a label column: use a .csv list with a header "
                    f"'path,{label_column}', or labels='none'"
                )
            paths, label_list = self._read_text(), None
        if not paths:
            raise InputError(f"the list {str(self.list_path)!r} names no images; give one path per line")
        super().__init__(spec or str(list_path), paths, label_list)

    def _read_text(self) -> list[str]:
        lines = _list_text(self.list_path).splitlines()
        return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]

    def _read_csv(self, labels: LabelMode, label_column: str) -> tuple[list[str], list[str] | None]:
        with io.StringIO(_list_text(self.list_path), newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "path" not in header:
                raise InputError(
                    f"the CSV list {str(self.list_path)!r} needs a header row with a 'path' column "
                    f"(and optionally '{label_column}'); found columns {header}"
                )
            if labels == "column" and label_column not in header:
                raise InputError(
                    f"labels='column' but the CSV list {str(self.list_path)!r} has no {label_column!r} column; "
                    f"columns are {header}"
                )
            if labels == "from-folders":
                raise InputError(
                    "labels='from-folders' applies to folders; for a CSV list use labels='column'"
                )
            paths: list[str] = []
            label_list: list[str] | None = [] if labels == "column" else None
            for line_no, row in enumerate(reader, start=2):
                path = (row.get("path") or "").strip()
                if not path:
                    raise InputError(f"{str(self.list_path)!r} line {line_no}: empty path")
                paths.append(path)
                if label_list is not None:
                    label_list.append((row.get(label_column) or "").strip())
        return paths, label_list

    def read(self, index: int) -> Payload:
        return self.base / self.ids[index]


def _list_text(path: Path) -> str:
    """A list file's text: UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8"); any other
    encoding is refused naming the file and the line, since guessing would misread paths."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(
            f"{str(path)!r} line {line}: not UTF-8 text (byte {data[e.start]:#04x}); save the list as UTF-8 "
            "(e.g. Excel's \"CSV UTF-8\")"
        ) from None


# ------------------------------------------------------------------------------------- WebDataset


@dataclass(frozen=True)
class _TarMember:
    shard: int
    offset: int
    size: int


class WebDatasetSource(ImageSource):
    """Local WebDataset tar shards: members grouped by key (the name up to the first dot of the basename).

    Each sample's image is its first member with extension jpg, jpeg, png or webp; its label (when asked)
    comes from a ``.cls``, ``.txt`` or ``.json`` member (a JSON object gives its ``label_column`` key).
    Samples without an image member are skipped. Ids are ``<shard file name>#<key>``.
    """

    kind = "webdataset"

    def __init__(
        self, shards: list[Path], *, labels: LabelMode = "none", label_column: str = "label", spec: str | None = None
    ) -> None:
        if labels == "from-folders":
            raise InputError(
                "labels='from-folders' applies to folders; for WebDataset shards use labels='column'"
            )
        self.shards = [Path(s) for s in shards]
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise InputError("WebDataset shards must have distinct file names (ids are '<shard>#<key>')")
        ids: list[str] = []
        members: list[_TarMember] = []
        label_list: list[str] | None = [] if labels == "column" else None
        missing_label = None
        for s, shard in enumerate(self.shards):
            for key, image, label in _scan_shard(shard, label_column if label_list is not None else None):
                ids.append(f"{shard.name}#{key}")
                members.append(_TarMember(s, image.offset_data, image.size))
                if label_list is not None:
                    if label is None and missing_label is None:
                        missing_label = ids[-1]
                    label_list.append(label or "")
        if not ids:
            raise InputError(
                f"no images found in the WebDataset shard(s) {spec or names}; each sample needs a member "
                f"with extension {', '.join(WDS_IMAGE_EXTENSIONS)}"
            )
        if missing_label is not None:
            raise InputError(
                f"labels='column' but sample {missing_label!r} has no .cls/.txt/.json member "
                f"(or its JSON has no {label_column!r} key); use labels='none'"
            )
        self._members = members
        super().__init__(spec or ",".join(map(str, self.shards)), ids, label_list)

    def read(self, index: int) -> Payload:
        m = self._members[index]
        with open(self.shards[m.shard], "rb") as f:
            f.seek(m.offset)
            data = f.read(m.size)
        if len(data) != m.size:
            raise OSError(f"shard {self.shards[m.shard].name} ends early: read {len(data)} of {m.size} bytes")
        return data


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename; ext = the rest, lower case."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def _scan_shard(shard: Path, label_column: str | None):
    """Yield (key, image TarInfo, label or None) per sample of one shard, in the shard's member order."""
    try:
        tar = tarfile.open(shard, "r:")  # plain tar only: random access needs uncompressed members
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"cannot read WebDataset shard {str(shard)!r}: {e} (an uncompressed .tar is needed)") from e
    with tar:
        order: dict[str, None] = {}  # keys in order of first appearance
        images: dict[str, tarfile.TarInfo] = {}
        label_members: dict[str, tarfile.TarInfo] = {}
        for info in tar:
            if not info.isfile():
                continue
            key, ext = _split_key(info.name)
            order.setdefault(key, None)
            if ext in WDS_IMAGE_EXTENSIONS and key not in images:
                images[key] = info
            elif ext in WDS_LABEL_EXTENSIONS and label_column is not None:
                # Prefer .cls over .txt over .json when a sample has several.
                prev = label_members.get(key)
                if prev is None or _label_rank(ext) < _label_rank(_split_key(prev.name)[1]):
                    label_members[key] = info
        for key in order:
            if key not in images:
                continue
            label = None
            if label_column is not None and key in label_members:
                label = _read_label(tar, label_members[key], label_column)
            yield key, images[key], label


def _label_rank(ext: str) -> int:
    return WDS_LABEL_EXTENSIONS.index(ext) if ext in WDS_LABEL_EXTENSIONS else len(WDS_LABEL_EXTENSIONS)


def _read_label(tar: tarfile.TarFile, info: tarfile.TarInfo, label_column: str) -> str | None:
    f = tar.extractfile(info)
    if f is None:
        return None
    text = f.read().decode("utf-8", "replace").strip()
    if info.name.lower().endswith(".json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(value, dict):
            value = value.get(label_column)
        return None if value is None else str(value)
    return text


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand WebDataset-style braces: ``a-{000..002}.tar`` and ``{x,y}.tar``; zero padding is kept."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


# ------------------------------------------------------------------------------------ HF datasets


# A hub id: ``name`` or ``owner/name`` (letters, digits, '_', '.', '-'), as the hub allows.
_HUB_ID = re.compile(r"[\w.-]+(?:/[\w.-]+)?")
# A configuration name: anything without whitespace, ':', '/' or '\\' (e.g. 320px, 20231101.en, cs-en).
_HF_CONFIG = re.compile(r"[^\s:/\\]+")


def parse_hf_spec(spec: str, hf_config: str | None = None) -> tuple[str, str | None]:
    """Split a HF data set spec into (name, configuration).

    The spec is ``[hf:]<id>[:<config>]`` with ``<id>`` a hub id (``owner/name``, or ``name`` after
    ``hf:``), e.g. ``hf:frgfm/imagenette:320px``; anything else (a path to a ``save_to_disk`` folder) is
    returned whole, with ``hf_config``. A configuration given both in the spec and as ``hf_config``
    must agree. Hub ids cannot hold ':', so the colon is never part of the id; an existing local
    folder is never parsed (the caller checks for it first).
    """
    body = spec[3:] if spec.startswith("hf:") else spec
    if hf_config is not None and (not isinstance(hf_config, str) or not _HF_CONFIG.fullmatch(hf_config)):
        raise InputError(
            f"hf_config must be a configuration name such as '320px' (no spaces, ':' or '/'); got {hf_config!r}"
        )
    head, colon, tail = body.partition(":")
    if not colon or not _HUB_ID.fullmatch(head):
        return body, hf_config
    if not _HF_CONFIG.fullmatch(tail):
        raise InputError(
            f"cannot read the data set spec {spec!r}: write a hub data set as hf:owner/name or, to choose "
            "one of its configurations, hf:owner/name:config (e.g. hf:frgfm/imagenette:320px)"
        )
    if hf_config is not None and hf_config != tail:
        raise InputError(
            f"the data set spec {spec!r} names configuration {tail!r} but hf_config={hf_config!r}; give one"
        )
    return head, tail


class HFDatasetSource(ImageSource):
    """A HF ``datasets`` data set: a folder written by ``save_to_disk`` or a hub id (``hf:`` prefix allowed).

    A hub data set with several configurations (e.g. ``frgfm/imagenette``: ``full_size``, ``320px``,
    ``160px``) takes one with ``hf_config="320px"`` or in the spec, ``hf:frgfm/imagenette:320px``; it is
    passed to ``datasets.load_dataset(name, hf_config, split=...)`` and becomes part of every id
    (``frgfm/imagenette:320px:validation:0``), so two configurations never share ids or fingerprints.
    The image column is read undecoded (raw bytes) where it is a ``datasets.Image`` feature, so decoding
    goes through ``itae``'s robust decoder. A ``ClassLabel`` label column gives its class names.
    """

    kind = "hf"

    def __init__(
        self,
        spec: str,
        *,
        labels: LabelMode = "none",
        image_column: str = "image",
        label_column: str = "label",
        split: str | None = None,
        hf_config: str | None = None,
    ) -> None:
        try:
            import datasets
        except ImportError as e:
            raise MissingDependencyError(
                "reading a HF data set needs the 'datasets' package: pip install 'itae[datasets]'"
            ) from e
        if labels == "from-folders":
            raise InputError(
                "labels='from-folders' applies to folders; for a HF data set use labels='column'"
            )
        name = spec[3:] if spec.startswith("hf:") else spec
        local = Path(name)
        if local.is_dir():
            if hf_config is not None:
                raise InputError(
                    f"{spec!r} is a folder written by save_to_disk, which holds one configuration; "
                    f"hf_config={hf_config!r} applies to hub data sets only"
                )
            data = datasets.load_from_disk(str(local))
            shown = local.name
        else:
            name, hf_config = parse_hf_spec(spec, hf_config)
            try:
                data = datasets.load_dataset(name, hf_config, split=split)
            except Exception as e:  # the library raises many types; the user needs one clear line
                hint = ""
                if hf_config is None and "config" in str(e).lower():  # e.g. "Config name is missing"
                    hint = f" (to choose a configuration, write hf:{name}:CONFIG, or pass hf_config=...)"
                raise InputError(
                    f"{spec!r} is neither an image folder, a list, WebDataset shards nor a loadable HF data set: "
                    f"{e}{hint}"
                ) from e
            shown = name if hf_config is None else f"{name}:{hf_config}"
        if isinstance(data, datasets.DatasetDict):
            splits = list(data)
            if split is None:
                if len(splits) != 1:
                    raise InputError(f"the data set {spec!r} has splits {splits}; choose one with split=...")
                split = splits[0]
            if split not in data:
                raise InputError(f"the data set {spec!r} has no split {split!r}; splits are {splits}")
            data = data[split]
        split = split or (str(data.split) if getattr(data, "split", None) else "train")
        columns = list(data.column_names)
        if image_column not in columns:
            raise InputError(f"the data set {spec!r} has no image column {image_column!r}; columns are {columns}")
        label_list = None
        if labels == "column":
            if label_column not in columns:
                raise InputError(f"the data set {spec!r} has no label column {label_column!r}; columns are {columns}")
            feature = data.features[label_column]
            raw = data[label_column] if len(data) else []
            if isinstance(feature, datasets.ClassLabel):
                label_list = [feature.int2str(int(v)) for v in raw]
            else:
                label_list = ["" if v is None else str(v) for v in raw]
        if len(data) == 0:
            raise InputError(f"the data set {spec!r} (split {split!r}) is empty")
        images = data.select_columns([image_column])
        if isinstance(images.features[image_column], datasets.Image):
            images = images.cast_column(image_column, datasets.Image(decode=False))
        self._data = images
        self._column = image_column
        ids = [f"{shown}:{split}:{i}" for i in range(len(data))]
        super().__init__(spec, ids, label_list)

    def read(self, index: int) -> Payload:
        value = self._data[index][self._column]
        if isinstance(value, dict):  # undecoded datasets.Image: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                return Path(value["path"])
            raise OSError("the data set row has neither image bytes nor a path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            return Path(value)
        return value  # e.g. a PIL image


# ---------------------------------------------------------------------------------------- factory


def open_source(
    spec: str | os.PathLike | ImageSource,
    *,
    labels: LabelMode = "none",
    image_column: str = "image",
    label_column: str = "label",
    split: str | None = None,
    hf_config: str | None = None,
    exclude: tuple[str | os.PathLike, ...] = (),
) -> ImageSource:
    """Recognise ``spec`` and open it as an ``ImageSource``.

    - a folder of images (recursive); ``labels="from-folders"`` labels each by its immediate subfolder;
    - a ``.txt`` list of paths, or a ``.csv`` list with header ``path[,label]`` (``labels="column"``);
    - WebDataset: a ``.tar`` shard, a brace pattern (``shards-{000..009}.tar``), a glob, or a folder
      holding ``.tar`` files and no images;
    - a HF data set: a folder written by ``save_to_disk``, or a hub id (``owner/name`` or ``hf:name``),
      with ``image_column``, ``label_column`` and ``split``; a hub data set with several configurations
      takes one as ``hf_config`` or after a colon: ``hf:frgfm/imagenette:320px``.

    ``hf_config`` with a source that is not a hub data set is an error (it would otherwise be ignored).
    ``exclude``: folders that a folder source leaves out (a run's own output folder inside its input).
    """
    if isinstance(spec, ImageSource):
        return spec
    if labels not in LABEL_MODES:
        raise InputError(f"labels must be one of {', '.join(map(repr, LABEL_MODES))}; got {labels!r}")
    text = os.fspath(spec)
    if not text:
        raise InputError("empty image source; give a folder, a list file, tar shards or a data set")
    hf_kw: dict[str, Any] = dict(
        labels=labels, image_column=image_column, label_column=label_column, split=split, hf_config=hf_config
    )
    if text.startswith("hf:"):
        return HFDatasetSource(text, **hf_kw)
    path = Path(text)
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            return HFDatasetSource(text, **hf_kw)
        _no_hf_config(hf_config, text, "a folder of images or shards")
        if not _scan_has_images(path, exclude):
            shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".tar")
            if shards:
                return WebDatasetSource(shards, labels=labels, label_column=label_column, spec=text)
        return FolderSource(path, labels=labels, spec=text, exclude=exclude)
    if path.is_file():
        _no_hf_config(hf_config, text, "a local file")
        suffix = path.suffix.lower()
        if suffix == ".tar":
            return WebDatasetSource([path], labels=labels, label_column=label_column, spec=text)
        if suffix in (".txt", ".csv", ".lst"):
            return ListSource(path, labels=labels, label_column=label_column, spec=text)
        raise InputError(
            f"{text!r} is a file of unknown kind; give a folder, a .txt/.csv list of paths or a .tar shard"
        )
    if any(c in text for c in "{*?["):
        _no_hf_config(hf_config, text, "a shard pattern")
        matches = sorted({p for pat in expand_braces(text) for p in glob.glob(pat)})
        missing = [p for p in expand_braces(text) if not any(c in p for c in "*?[") and not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"shard pattern {text!r}: {len(missing)} shard(s) missing, e.g. {missing[0]!r}")
        tars = [Path(p) for p in matches if p.lower().endswith(".tar")]
        if not tars:
            raise FileNotFoundError(f"the pattern {text!r} matches no .tar shards")
        return WebDatasetSource(tars, labels=labels, label_column=label_column, spec=text)
    hub = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::.*)?", text)
    if hub and not Path(hub.group(1)).suffix:  # owner/name[:config]; a missing list.txt is no hub id
        return HFDatasetSource(text, **hf_kw)
    raise FileNotFoundError(f"image source {text!r} does not exist; give a folder, a list file, tar shards or a data set")


def _no_hf_config(hf_config: str | None, text: str, what: str) -> None:
    if hf_config is not None:
        raise InputError(
            f"hf_config={hf_config!r} chooses a configuration of a hub data set, but {text!r} is {what}"
        )


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _scan_has_images(root: Path, exclude: tuple[str | os.PathLike, ...] = ()) -> bool:
    return next(_walk_images(root, exclude), None) is not None


__all__ = [
    "IMAGE_EXTENSIONS", "LABEL_MODES", "FolderSource", "HFDatasetSource", "ImageRecord", "ImageSource",
    "ListSource", "WebDatasetSource", "display_name", "expand_braces", "open_source", "parse_hf_spec",
]
