"""The pieces of one benchmark run that the runner and the report share: loading a model, clustering."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .spec import BenchSpec


def model_location(name: str, model_root: str | os.PathLike | None) -> str:
    """What to load for ``name``: ``<model_root>/<last part of the name>`` (``dinov2-base`` for
    ``facebook/dinov2-base``) or ``<model_root>/<name>`` when such a folder or file exists, else ``name``."""
    if model_root is None:
        return name
    root = Path(model_root).expanduser()
    for candidate in (root / name.rstrip("/").split("/")[-1], root / name):
        if candidate.exists():
            return str(candidate.resolve())
    return name


def load_model(name: str, device: str, model_root: str | os.PathLike | None = None):
    """A ``Backbone`` by name (anything ``itae.load_backbone`` takes, the demo models included), read from
    ``model_root`` when a local copy is there."""
    from itae.models.loading import load_backbone
    from itae.models.spec import resolve_device

    return load_backbone(model_location(name, model_root), device=resolve_device(device))


def cluster_run(spec: BenchSpec, fit: np.ndarray, predict: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """One seed of the grid's clustering: labels of ``predict`` (train-test) or of ``fit`` (test protocol)."""
    from itae.clustering import KMeansClusterer, cluster

    if spec.cluster_method == "minibatch-kmeans":  # MTEB's protocol: MiniBatchKMeans on every row
        est = KMeansClusterer(k, random_state=seed, spherical=spec.spherical, n_init=spec.n_init, backend="minibatch",
                              batch_size=spec.minibatch_size, train_size=len(fit)).fit(fit)
        return est.labels_ if predict is None else est.predict(predict)
    if predict is not None:  # train-test: fit on train, nearest centroid on test
        est = KMeansClusterer(k, random_state=seed, spherical=spec.spherical, n_init=spec.n_init).fit(fit)
        return est.predict(predict)
    kw = {"n_init": spec.n_init} if spec.cluster_method == "kmeans" else {}
    return cluster(fit, k, method=spec.cluster_method, seeds=(seed,), spherical=spec.spherical, **kw).labels
