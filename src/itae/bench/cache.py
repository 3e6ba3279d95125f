"""Where a grid keeps what it computed: the one owner of the ``<out_dir>/cache`` layout.

::

    cache/<data set>/<split>/<backbone>/<feature>/<embedding>/   an embedding store (baseline, itae-<digest>)
    cache/<data set>/calibration/<backbone>/<digest>.json        an "auto" threshold, per detection settings
"""

from __future__ import annotations

import re
from pathlib import Path

CACHE = "cache"


def safe_name(name: str) -> str:
    """A file-system-safe folder name for a data set, split or model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def feature_dir(feature: str, normalize: bool) -> str:
    return f"{feature}{'-normalized' if normalize else ''}"


def embedding_dir(out_dir: str | Path, dataset: str, split: str | None, backbone: str, feature: str,
                  normalize: bool, embedding: str) -> Path:
    """The embedding store of one (data set, split, backbone, feature, embedding configuration)."""
    return (Path(out_dir) / CACHE / safe_name(dataset) / safe_name(str(split)) / safe_name(backbone)
            / feature_dir(feature, normalize) / embedding)


def calibration_dir(out_dir: str | Path, dataset: str, backbone: str) -> Path:
    """The folder of the calibrated thresholds of one (data set, backbone)."""
    return Path(out_dir) / CACHE / safe_name(dataset) / "calibration" / safe_name(backbone)
