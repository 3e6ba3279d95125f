"""Benchmark grids: data sets x models x methods x seeds -> results.csv, results.md and report.html.

``run_bench(spec, out_dir)`` runs a ``BenchSpec`` (or a dict, or a JSON file); ``preset_spec("paper")`` is the
paper's grid (``preset_spec("mteb")`` MTEB's image-clustering protocol), with the published figures beside
ours; ``run_bench(folder, out_dir, quick=True)`` runs the offline preset (the planted-artifact demo models)
on a folder of labelled images.
"""

from .datasets import DatasetLoadError, open_dataset
from .published import compare, reference_set, reference_sets
from .results import markdown, summarize_rows
from .runner import BenchResults, run_bench
from .spec import (
    KNOWN_DATASETS,
    PRESETS,
    BenchSpec,
    DatasetSpec,
    MethodSpec,
    dataset_from_value,
    load_spec,
    model_names,
    preset_spec,
    quick_spec,
    registers_counterpart,
)

__all__ = [
    "KNOWN_DATASETS",
    "PRESETS",
    "BenchResults",
    "BenchSpec",
    "DatasetLoadError",
    "DatasetSpec",
    "MethodSpec",
    "compare",
    "dataset_from_value",
    "load_spec",
    "markdown",
    "model_names",
    "open_dataset",
    "preset_spec",
    "quick_spec",
    "reference_set",
    "reference_sets",
    "registers_counterpart",
    "run_bench",
    "summarize_rows",
]
