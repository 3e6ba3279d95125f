"""Reading a store's images back for thumbnails: through the source the store was made from."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from itae.data.store import EmbeddingStore

log = logging.getLogger("itae")


def store_images(
    store: EmbeddingStore | None, data: str | os.PathLike | None = None
) -> Callable[[str], Any] | None:
    """id -> the image (a path, bytes or PIL image, for thumbnails) of a store's rows, read from ``data`` or
    else from the source named in the store's manifest; None (with a warning) when it cannot be opened."""
    from itae.data.decode import DecodeError, load_rgb
    from itae.data.sources import open_source

    if data is None and store is None:
        return None
    spec = str(data) if data is not None else store.manifest.get("source", {}).get("spec")
    if not spec:
        return None
    try:
        source = open_source(spec)
    except (OSError, ValueError, ImportError) as e:
        log.warning("itae: no thumbnails: the images at %r cannot be opened (%s); pass data=FOLDER", spec, e)
        return None
    index = {ident: i for i, ident in enumerate(source.ids)}

    def read(ident: str):
        i = index.get(ident)
        if i is None:
            return None
        try:
            return load_rgb(source.read(i), draft_size=256)
        except (DecodeError, OSError):
            return None

    return read
