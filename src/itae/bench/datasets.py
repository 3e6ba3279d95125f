"""Opening a benchmark data set: one labelled ``ImageSource`` per split, or one line that says what to do."""

from __future__ import annotations

from pathlib import Path

from itae.data.sources import ImageSource, open_source
from itae.errors import DatasetLoadError

from .spec import DatasetSpec


class SubsetSource(ImageSource):
    """A class-balanced, deterministic subset of another source: classes take turns, in source order."""

    def __init__(self, base: ImageSource, max_images: int) -> None:
        by_class: dict[str, list[int]] = {}
        for i, label in enumerate(base.labels or [""] * len(base)):
            by_class.setdefault(label, []).append(i)
        queues = [by_class[c] for c in sorted(by_class)]
        chosen: list[int] = []
        depth = 0
        while len(chosen) < max_images and any(depth < len(q) for q in queues):
            chosen.extend(q[depth] for q in queues if depth < len(q))
            depth += 1
        self.base = base
        self.indices = sorted(chosen[:max_images])
        self.kind = f"{base.kind}-subset"
        labels = None if base.labels is None else [base.labels[i] for i in self.indices]
        super().__init__(f"{base.spec}[{len(self.indices)} of {len(base)}]", [base.ids[i] for i in self.indices], labels)

    def read(self, index: int):
        return self.base.read(self.indices[index])


def local_copy_hint(ds: DatasetSpec, split: str | None) -> str:
    """How to point a grid at a local copy of ``ds`` (said when the hub copy cannot be loaded)."""
    config = "" if ds.hf_config is None else repr(ds.hf_config) + ", "
    return (f"point the grid at a local copy: data_root=DIR with DIR/{ds.name} a save_to_disk folder "
            f"(datasets.load_dataset({ds.source!r}, {config}split={split!r}).save_to_disk('DIR/{ds.name}')), "
            "or set this data set's 'source' to such a folder in a spec")


def open_dataset(ds: DatasetSpec, split: str | None) -> ImageSource:
    """The labelled ``ImageSource`` of one split of a data set, or a one-line ``DatasetLoadError``."""
    path = Path(ds.source).expanduser()
    local = path.exists()
    try:
        if local and path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "state.json").exists() \
                and not (path / "dataset_dict.json").exists():
            folder = path / split if split and (path / split).is_dir() else path
            src = open_source(folder, labels="from-folders")
        elif local and path.is_file():
            src = open_source(path, labels="column", label_column=ds.label_column)
        else:
            # A local copy (save_to_disk) holds one configuration already: hf_config is for the hub only.
            src = open_source(ds.source if local else f"hf:{ds.source}", labels="column", image_column=ds.image_column,
                              label_column=ds.label_column, split=split, hf_config=None if local else ds.hf_config)
    except ImportError as e:
        raise DatasetLoadError(f"data set {ds.name!r}: {first_line(e)}") from None
    except Exception as e:  # many libraries, many error types: the user needs one line
        where = "" if local else f"; if the HF hub cannot be reached, {local_copy_hint(ds, split)}"
        raise DatasetLoadError(f"cannot open data set {ds.name!r} ({ds.source}, split {split!r}): {first_line(e)}{where}") from None
    if not src.has_labels:
        raise DatasetLoadError(f"data set {ds.name!r} has no labels; the benchmark scores against labels")
    if ds.max_images is not None and ds.max_images < len(src):
        src = SubsetSource(src, ds.max_images)
    return src


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."
