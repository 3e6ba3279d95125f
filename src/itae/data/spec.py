"""``SourceSpec``: which images an extraction reads, as one frozen, validated value."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from itae.errors import InputError, InputTypeError

from .sources import LABEL_MODES, ImageSource, LabelMode, open_source


@dataclass(frozen=True)
class SourceSpec:
    """Where the images are and how to read them (see ``open_source``).

    path: a folder, a .txt/.csv list, WebDataset shards, a Hugging Face data set id or folder, or an
        ``ImageSource``. split, config: the HF data set's split and configuration. image_column,
    label_column: the HF columns. labels: "none", "from-folders" or "column".
    """

    path: str | os.PathLike | ImageSource
    split: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    config: str | None = None
    labels: LabelMode = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike, ImageSource)):
            raise InputTypeError(f"SourceSpec.path must be a path, a data set id or an ImageSource; got {self.path!r}")
        if self.labels not in LABEL_MODES:
            raise InputError(f"labels must be one of {', '.join(map(repr, LABEL_MODES))}; got {self.labels!r}")
        for name in ("split", "config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InputTypeError(f"SourceSpec.{name} must be a string or None; got {value!r}")
        for name in ("image_column", "label_column"):
            if not isinstance(getattr(self, name), str):
                raise InputTypeError(f"SourceSpec.{name} must be a string; got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> SourceSpec:
        return replace(self, **changes)

    def open(self, exclude: tuple[str | os.PathLike, ...] = ()) -> ImageSource:
        """The source, opened (``open_source``); ``exclude``: folders never read as images."""
        return open_source(self.path, labels=self.labels, image_column=self.image_column,
                           label_column=self.label_column, split=self.split, hf_config=self.config, exclude=exclude)


__all__ = ["SourceSpec"]
