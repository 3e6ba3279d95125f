"""Reports: diagnostic figures for `itae inspect` and the self-contained `report.html` of a run.

matplotlib and scikit-learn are imported inside the functions that draw or project, so importing this
package stays light.
"""

from __future__ import annotations

from itae.report.figures import (
    artifact_map,
    attention_maps,
    figure_to_png,
    images_from_pixel_values,
    inspect_grid,
    norm_histograms,
    write_inspection,
)
from itae.report.html import SECTION_IDS, write_report
from itae.report.layout import EmbeddingMap, embedding_map

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
