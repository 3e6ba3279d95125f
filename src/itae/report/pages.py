"""Self-contained HTML pages of ``itae check`` and ``itae compare``, drawn with Jinja2 (autoescaped).

The pages only draw what ``itae.collection`` computed: tables of rows and thumbnails as data URIs. No
scripts, no network: every image is embedded. The templates are ``templates/check.html.j2`` and
``compare.html.j2``; they extend ``collection.html.j2`` and, through it, ``page.html.j2``, the page every
report shares with the run report.
"""

from __future__ import annotations

import base64
import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from itae._io import atomic_write_text
from itae._version import __version__
from itae.report.figures import thumbnail_jpeg
from itae.report.templates import environment

Thumbnails = Callable[[str], Any] | None  # id -> PIL image, (H, W, 3) array or path; None when unreadable

def thumbnail_uri(image: Any, size: int) -> str | None:
    """A JPEG data URI of ``image`` (PIL image, (H, W, 3) array or path) fitted in size x size, or None."""
    if image is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail_jpeg(image, size, quality=75)).decode("ascii")


def thumb_item(path: str, lines: Sequence[str], thumbnails: Thumbnails, size: int) -> dict[str, Any]:
    """What the ``thumb`` macro draws: the image (or a placeholder), its caption lines, a hover title."""
    uri = None
    if thumbnails is not None:
        try:
            uri = thumbnail_uri(thumbnails(path), size)
        except (OSError, ValueError):
            uri = None
    return {"path": path, "uri": uri, "lines": list(lines), "title": "\n".join([path, *lines[1:]])}


def _render(template: str, path: str | Path, **context: Any) -> Path:
    context.setdefault("thumb", 96)
    page = environment().get_template(template).render(
        version=__version__, generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
        **context,
    )
    path = Path(path)
    atomic_write_text(path, page)
    return path


def write_check_page(path: str | Path, context: Mapping[str, Any]) -> Path:
    """``check.html``; ``context`` as built by ``itae.collection.check``."""
    nav = [("summary", "summary"), ("duplicates", "duplicates"), ("outliers", "outliers"), ("mislabels", "mislabels")]
    return _render("check.html.j2", path, nav=nav, **context)


def write_compare_page(path: str | Path, context: Mapping[str, Any]) -> Path:
    """The comparison page; ``context`` as built by ``itae.collection.compare``."""
    nav = [("runs", "runs"), ("metrics", "metrics"), ("classes", "per class"), ("changed", "changed images")]
    return _render("compare.html.j2", path, nav=nav, **context)
