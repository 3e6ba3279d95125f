"""Reports: they only render what the other packages computed.

`figures` draws (diagnostic figures, the 2-D map of the embeddings, thumbnails); `html` writes the
self-contained `report.html` of a run, `pages` the pages of `itae check` and `itae compare`, all through
the Jinja2 templates in `templates/` (one page shared by all). matplotlib and scikit-learn are imported
inside the functions that draw or project, so importing this package stays light.
"""

from __future__ import annotations

from itae.report.figures import (
    EmbeddingMap,
    artifact_map,
    attention_maps,
    embedding_map,
    figure_to_png,
    images_from_pixel_values,
    inspect_grid,
    norm_histograms,
    write_inspection,
)
from itae.report.html import SECTION_IDS, write_report

__all__ = [
    "SECTION_IDS",
    "EmbeddingMap",
    "artifact_map",
    "attention_maps",
    "embedding_map",
    "figure_to_png",
    "images_from_pixel_values",
    "inspect_grid",
    "norm_histograms",
    "write_inspection",
    "write_report",
]
