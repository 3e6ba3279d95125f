"""Benchmark grids: data sets x models x methods x seeds -> results.csv and results.md.

``run_bench(spec, out_dir)`` runs a ``BenchSpec`` (or a dict, or a JSON file); ``run_bench(folder, out_dir,
quick=True)`` runs the offline preset (the planted-artifact demo models) on a folder of labelled images.
"""

from .results import markdown, summarize_rows
from .runner import BenchResults, DatasetLoadError, open_dataset, run_bench
from .spec import (
    KNOWN_DATASETS,
    BenchSpec,
    DatasetSpec,
    MethodSpec,
    dataset_from_value,
    load_spec,
    quick_spec,
    registers_counterpart,
)

__all__ = [
    "KNOWN_DATASETS",
    "BenchResults",
    "BenchSpec",
    "DatasetLoadError",
    "DatasetSpec",
    "MethodSpec",
    "dataset_from_value",
    "load_spec",
    "markdown",
    "open_dataset",
    "quick_spec",
    "registers_counterpart",
    "run_bench",
    "summarize_rows",
]
