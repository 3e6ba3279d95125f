"""What a benchmark grid is: data sets x models x methods x seeds under one protocol.

A grid is a ``BenchSpec``: built in Python, from a dict, or from a JSON file (``load_spec``). Data sets
are known names (``KNOWN_DATASETS``), local folders, or dicts that name a source and its columns.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from itae.config import ITAEConfig
from itae.errors import ConfigError, ConfigTypeError
from itae.methods import METHODS, TTRConfig

from .published import reference_set

PROTOCOLS = ("test", "train-test")
FEATURES = ("cls", "mean", "cls+mean")
CLUSTER_METHODS = ("kmeans", "minibatch-kmeans", "agglomerative")
REGISTERS = "registers"


@dataclass(frozen=True)
class DatasetSpec:
    """One labelled data set.

    source: a HF hub id (``owner/name``), a folder written by ``datasets.save_to_disk``, a folder of
        images in class subfolders (``<source>/<split>/<class>/...`` or ``<source>/<class>/...``), or a
        CSV list with ``path`` and a label column.
    split / train_split: the evaluation split and, for the train-test protocol, the fitting split.
    image_column / label_column: columns of a HF data set or CSV list (folders take labels from folders).
    max_images: keep a class-balanced, deterministic subset of at most this many images per split.
    hf_config: the configuration of a hub data set that has several (``datasets.load_dataset``'s second
        argument, e.g. "320px" for frgfm/imagenette); ignored when ``source`` is a local copy.
    """

    name: str
    source: str
    split: str | None = "test"
    train_split: str | None = "train"
    image_column: str = "image"
    label_column: str = "label"
    max_images: int | None = None
    hf_config: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("a data set needs a non-empty 'name'")
        if not isinstance(self.source, (str, os.PathLike)) or not str(self.source):
            raise ConfigError(f"data set {self.name!r} needs a 'source' (a HF id or a local path)")
        object.__setattr__(self, "source", os.fspath(self.source))
        if self.max_images is not None and (isinstance(self.max_images, bool) or int(self.max_images) < 1):
            raise ConfigError(f"data set {self.name!r}: max_images must be a positive integer; got {self.max_images!r}")
        if self.hf_config is not None and (not isinstance(self.hf_config, str) or not self.hf_config):
            raise ConfigError(f"data set {self.name!r}: hf_config must be a configuration name; got {self.hf_config!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _hf(name: str, source: str, *, split: str = "test", train_split: str = "train", image: str = "image",
        label: str = "label", hf_config: str | None = None) -> DatasetSpec:
    return DatasetSpec(name, source, split, train_split, image, label, hf_config=hf_config)


# Usual hub ids. The data sets are loaded through ``datasets.load_dataset(source, hf_config, split=...)``;
# any entry can be pointed at a local copy by giving the same name with another ``source`` (or, in the
# presets, a folder of that name under ``data_root``). The evaluation split is the test split where the
# data set has a labelled one: CIFAR-10/100 test (10,000 images, columns img / label, fine_label),
# STL-10 test (8,000, image / label), ImageNet-10 and ImageNet-Dog-15 test (MTEB's copies). Tiny-ImageNet
# has no labelled test split: its validation split, "valid" (10,000 images, 50 per class), stands for it,
# as in the clustering literature and in MTEB.
KNOWN_DATASETS: dict[str, DatasetSpec] = {
    d.name: d
    for d in (
        _hf("cifar10", "uoft-cs/cifar10", image="img"),
        _hf("cifar100", "uoft-cs/cifar100", image="img", label="fine_label"),
        _hf("cifar100-20", "uoft-cs/cifar100", image="img", label="coarse_label"),
        _hf("stl10", "tanganke/stl10"),
        _hf("tiny-imagenet", "zh-plus/tiny-imagenet", split="valid"),
        _hf("imagenet10", "JamieSJS/imagenet-10"),
        _hf("imagenet-dog15", "JamieSJS/imagenet-dog-15"),
        _hf("imagenette", "frgfm/imagenette", split="validation", hf_config="320px"),
        _hf("mnist", "ylecun/mnist"),
    )
}


@dataclass(frozen=True)
class MethodSpec:
    """One method: the baseline (no fix), ITAE (``itae``), test-time registers (``ttr``), both, or the
    registers counterpart (the model trained with registers, unmodified)."""

    name: str
    itae: ITAEConfig | None = None
    registers: bool = False
    ttr: TTRConfig | None = None

    def __post_init__(self) -> None:
        if self.registers and (self.itae is not None or self.ttr is not None):
            raise ConfigError(f"method {self.name!r}: the registers method takes no ITAE or TTR configuration")

    def to_value(self) -> Any:
        if self.registers:
            return REGISTERS
        if self.ttr is not None:
            return {"itae": None if self.itae is None else self.itae.to_dict(), "ttr": self.ttr.to_dict()}
        return None if self.itae is None else self.itae.to_dict()


def method_from_value(name: str, value: Any) -> MethodSpec:
    """``None`` or ``"none"`` -> baseline; ``"registers"`` -> registers model; ``"itae"``, ``"ttr"``,
    ``"itae+ttr"`` -> those methods with default settings; an ``ITAEConfig`` (or its dict) -> ITAE;
    ``{"itae": ITAE dict or None, "ttr": TTR dict or None}`` -> either or both, with settings."""
    if value is None:
        return MethodSpec(name)
    if isinstance(value, str):
        if value == REGISTERS:
            return MethodSpec(name, registers=True)
        if value not in METHODS:
            raise ConfigError(f"method {name!r}: a string value must be one of "
                              f"{', '.join(map(repr, METHODS + (REGISTERS,)))}; got {value!r}")
        return MethodSpec(name, ITAEConfig() if "itae" in value else None, ttr=TTRConfig() if "ttr" in value else None)
    if isinstance(value, ITAEConfig):
        return MethodSpec(name, value)
    if isinstance(value, TTRConfig):
        return MethodSpec(name, ttr=value)
    if isinstance(value, dict):
        if value and set(value) <= {"itae", "ttr"}:
            itae, ttr = value.get("itae"), value.get("ttr")
            return MethodSpec(name, None if itae is None else ITAEConfig.from_dict(itae),
                              ttr=None if ttr is None else TTRConfig.from_dict(ttr))
        return MethodSpec(name, ITAEConfig.from_dict(value))
    raise ConfigTypeError(f"method {name!r}: give None (baseline), a method name ('itae', 'ttr', 'itae+ttr', 'registers'), "
                          f"an ITAEConfig dict or {{'itae': ..., 'ttr': ...}}; got {value!r}")


DEFAULT_METHODS = (MethodSpec("baseline"), MethodSpec("itae", ITAEConfig()))


@dataclass(frozen=True)
class BenchSpec:
    """A grid: every data set x model x method x seed, under one protocol.

    protocol: "test" clusters and scores the evaluation split (the paper's protocol); "train-test"
        fits k-means on the train split and assigns the evaluation split to the nearest centroid.
    k: clusters (default: the number of classes of the evaluation split).
    feature / normalize: what is embedded (``itae.embed``). spherical: cosine k-means.
    n_init: k-means restarts per seed. calibration_images: images used to calibrate each "auto" threshold.
    cluster_method: "kmeans" (scikit-learn k-means), "minibatch-kmeans" (MiniBatchKMeans on every row, batches
        of ``minibatch_size``: MTEB's protocol) or "agglomerative".
    reference: the published figures shown beside ours ("paper", "mteb"; see ``itae.bench.published``).
    model_root: a folder of local model copies: a model is read from ``<model_root>/<last part of its name>``
        (``dinov2-base`` for ``facebook/dinov2-base``) when that exists, else from the hub.
    """

    datasets: tuple[DatasetSpec, ...]
    models: tuple[str, ...]
    methods: tuple[MethodSpec, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    protocol: str = "test"
    k: int | None = None
    feature: str = "cls"
    normalize: bool = False
    cluster_method: str = "kmeans"
    spherical: bool = False
    n_init: int = 1
    batch_size: int = 64
    calibration_images: int = 512
    device: str = "auto"
    num_workers: int | None = None
    minibatch_size: int = 500
    reference: str | None = None
    model_root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("datasets", "models", "methods", "seeds"):
            value = tuple(getattr(self, name))
            if not value:
                raise ConfigError(f"the bench spec needs at least one entry in {name!r}")
            object.__setattr__(self, name, value)
        for name, values in (("data set", [d.name for d in self.datasets]), ("model", list(self.models)),
                             ("method", [m.name for m in self.methods])):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ConfigError(f"duplicate {name} name(s) in the bench spec: {', '.join(dup)}")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ConfigError(f"seeds must be integers; got {list(self.seeds)!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(map(repr, PROTOCOLS))}; got {self.protocol!r}")
        if self.feature not in FEATURES:
            raise ConfigError(f"feature must be one of {', '.join(map(repr, FEATURES))}; got {self.feature!r}")
        if self.cluster_method not in CLUSTER_METHODS:
            raise ConfigError(f"cluster_method must be one of {', '.join(map(repr, CLUSTER_METHODS))}; got "
                              f"{self.cluster_method!r}")
        if self.protocol == "train-test" and self.cluster_method != "kmeans":
            raise ConfigError("the train-test protocol assigns test images to k-means centroids; use cluster_method='kmeans'")
        if self.k is not None and (isinstance(self.k, bool) or int(self.k) < 2):
            raise ConfigError(f"k must be at least 2 (or None for the number of classes); got {self.k!r}")
        if self.reference is not None:
            reference_set(self.reference)  # unknown names are refused here
        if self.model_root is not None:
            object.__setattr__(self, "model_root", os.fspath(self.model_root))
        for name in ("n_init", "batch_size", "calibration_images", "minibatch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": [d.to_dict() for d in self.datasets],
            "models": list(self.models),
            "methods": {m.name: m.to_value() for m in self.methods},
            "seeds": list(self.seeds),
            **{k: getattr(self, k) for k in ("protocol", "k", "feature", "normalize", "cluster_method", "spherical",
                                             "n_init", "batch_size", "calibration_images", "device", "num_workers",
                                             "minibatch_size", "reference", "model_root")},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchSpec:
        if not isinstance(d, dict):
            raise ConfigTypeError(f"a bench spec must be a dict; got {type(d).__name__}")
        known = set(cls.__dataclass_fields__) - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown bench spec field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "datasets" not in d or "models" not in d:
            raise ConfigError("a bench spec needs 'datasets' and 'models'")
        kw = dict(d)
        datasets = kw["datasets"]
        kw["datasets"] = tuple(dataset_from_value(v) for v in ([datasets] if isinstance(datasets, (str, dict)) else datasets))
        models = kw["models"]
        kw["models"] = (models,) if isinstance(models, str) else tuple(models)
        if "methods" in kw:
            methods = kw["methods"]
            if not isinstance(methods, dict):
                raise ConfigTypeError("'methods' must map method names to None (baseline), 'registers' or an ITAEConfig dict")
            kw["methods"] = tuple(method_from_value(name, value) for name, value in methods.items())
        if "seeds" in kw:
            kw["seeds"] = (kw["seeds"],) if isinstance(kw["seeds"], int) else tuple(kw["seeds"])
        return cls(**kw)

    def settings_key(self) -> str:
        """Hash of every setting that changes a run's numbers apart from its grid coordinates."""
        keys = ("k", "feature", "normalize", "cluster_method", "spherical", "n_init", "calibration_images")
        settings = {k: getattr(self, k) for k in keys}
        if self.cluster_method == "minibatch-kmeans":  # absent otherwise: older results keep their key
            settings["minibatch_size"] = self.minibatch_size
        return _digest(settings)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_from_value(value: str | dict[str, Any] | DatasetSpec) -> DatasetSpec:
    """A known name, a local path, or a dict (a known ``name`` with overrides, or ``name`` + ``source``)."""
    if isinstance(value, DatasetSpec):
        return value
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if text in KNOWN_DATASETS:
            return KNOWN_DATASETS[text]
        path = Path(text).expanduser()
        if path.exists():
            return DatasetSpec(path.resolve().name or text, str(path))
        raise ConfigError(
            f"unknown data set {text!r}: use a known name ({', '.join(KNOWN_DATASETS)}), a local folder, or a "
            "dict with 'name' and 'source'"
        )
    if isinstance(value, dict):
        if "name" not in value:
            raise ConfigError(f"a data set dict needs a 'name'; got {value!r}")
        unknown = sorted(set(value) - set(DatasetSpec.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown data set field(s) {', '.join(unknown)} in {value['name']!r}")
        base = KNOWN_DATASETS.get(value["name"])
        if base is not None:
            return replace(base, **{k: v for k, v in value.items() if k != "name"})
        return DatasetSpec(**value)
    raise ConfigTypeError(f"a data set must be a name, a path or a dict; got {type(value).__name__}")


def load_spec(spec: BenchSpec | dict[str, Any] | str | os.PathLike) -> BenchSpec:
    """A ``BenchSpec`` from itself, a dict, or a JSON file."""
    if isinstance(spec, BenchSpec):
        return spec
    if isinstance(spec, dict):
        return BenchSpec.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"bench spec {str(path)!r} does not exist; give a JSON file, a dict or a BenchSpec")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"bench spec {str(path)!r} is not valid JSON: {e}") from None
        return BenchSpec.from_dict(data)
    raise ConfigTypeError(f"spec must be a BenchSpec, a dict or a JSON path; got {type(spec).__name__}")


def registers_counterpart(model: str) -> str:
    """The registers model trained like ``model``: the 'registers' method embeds with it.

    DINOv2: its ``with-registers`` / ``reg4`` / ``_reg`` release. DINOv3 is trained with 4 registers: it is its
    own counterpart. CLIP, OpenCLIP, SigLIP and DeiT-III have no released registers-trained counterpart:
    the method does not apply to them, and a clear error says so.
    """
    name = model.strip()
    low = name.lower()
    if low.startswith("demo:"):
        return "demo:registers"
    for size in ("small", "base", "large", "giant"):
        if low == f"facebook/dinov2-{size}":
            return f"facebook/dinov2-with-registers-{size}"
        if low.removeprefix("timm/").split(".")[0] == f"vit_{size}_patch14_dinov2":
            return f"timm/vit_{size}_patch14_reg4_dinov2.lvd142m"
    for letter in "sblg":
        if low == f"dinov2_vit{letter}14":
            return f"dinov2_vit{letter}14_reg"
    if "registers" in low or "_reg" in low:
        return name  # already a registers model
    family = _family_of(low)
    if family == "DINOv3":
        return name  # trained with 4 registers: the model is its own registers counterpart
    if family is not None:
        raise ConfigError(
            f"no registers counterpart exists for {model!r}: no {family} model trained with registers has been "
            "released, so the 'registers' method does not apply to it (ITAE and the other methods do)"
        )
    raise ConfigError(
        f"no known registers counterpart for model {model!r}; the 'registers' method covers the DINOv2 "
        "S/B/L/g names (HF, timm, torch.hub), DINOv3 (its own counterpart) and the demo models"
    )


# The published DINOv2-L settings, but for the outlier threshold ("auto": 150 is a DINOv2-L norm) and the
# layer limit (the blocks up to the outlier block, as 17 < 22 is for DINOv2-L; here block 0 of 2).
QUICK_TTR = TTRConfig(norm_threshold="auto", max_layer=-2)
def _family_of(low_name: str) -> str | None:
    """The family of a lower-cased model name beyond DINOv2, from the known names or the name itself."""
    from itae.models.loading import KNOWN_MODELS, canonical_name

    canonical = canonical_name(low_name)
    kind = KNOWN_MODELS[canonical].kind if canonical else None
    names = {"dinov3": "DINOv3", "clip": "CLIP/OpenCLIP", "siglip": "SigLIP", "deit3": "DeiT-III"}
    if kind in names:
        return names[kind]
    for key in ("dinov3", "siglip", "deit3", "clip"):  # siglip before clip: the one name holds the other
        if key in low_name:
            return names[key]
    return None


def quick_spec(folder: str | os.PathLike, *, max_images: int = 2000, seeds: tuple[int, ...] = (0, 1, 2)) -> BenchSpec:
    """The offline preset: the demo models (clean, planted) x none, ITAE (auto), ITAE fixed to the published
    v/low, test-time registers, both, and the registers counterpart, on a labelled folder (test-time registers
    with ``QUICK_TTR``)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"the quick preset needs a local folder of labelled images (<folder>/<class>/<image>); {str(path)!r} "
            "is not a folder"
        )
    dataset = DatasetSpec(path.resolve().name or "images", str(path), max_images=max_images)
    return BenchSpec(
        datasets=(dataset,),
        models=("demo:clean", "demo:planted"),
        methods=(
            MethodSpec("none"), MethodSpec("itae", ITAEConfig()),
            MethodSpec("itae-v-low", ITAEConfig(source="v", side="low")), MethodSpec("ttr", ttr=QUICK_TTR),
            MethodSpec("itae+ttr", ITAEConfig(), ttr=QUICK_TTR), MethodSpec(REGISTERS, registers=True),
        ),
        seeds=seeds,
    )


# ------------------------------------------------------------------------------------------ presets

MODEL_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
PAPER_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Preset:
    """A named grid: its data sets, clustering protocol, methods and the published figures it is checked against."""

    name: str
    datasets: tuple[str, ...]
    cluster_method: str
    methods: tuple[MethodSpec, ...]
    reference: str
    description: str


# The paper's reading of ITAE, pinned (value norms, low side, calibrated threshold, last block, CLS row,
# min): the package defaults may move, the reproduction must not.
PAPER_ITAE = ITAEConfig(source="v", side="low", threshold="auto", layers=(-1,), rows="cls", mode="min")

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper", ("cifar10", "cifar100", "stl10", "tiny-imagenet"), "kmeans",
        (MethodSpec("baseline"), MethodSpec("itae", PAPER_ITAE), MethodSpec(REGISTERS, registers=True)),
        "paper",
        "the paper's protocol: k-means (k = number of classes) on the final CLS embedding of the test split; "
        "ACC (Hungarian), NMI, ARI over several seeds",
    ),
    "mteb": Preset(
        "mteb", ("cifar10", "cifar100", "imagenet10", "imagenet-dog15", "tiny-imagenet"), "minibatch-kmeans",
        (MethodSpec("baseline"), MethodSpec("itae", PAPER_ITAE)),
        "mteb",
        "MTEB's image-clustering protocol: MiniBatchKMeans (batch 500, k = number of classes) on the final CLS "
        "embedding of the evaluation split; NMI is MTEB's main score",
    ),
}


def with_data_root(ds: DatasetSpec, data_root: str | os.PathLike | None) -> DatasetSpec:
    """``ds`` read from ``<data_root>/<name>`` when that exists (a save_to_disk copy or an image folder)."""
    if data_root is None:
        return ds
    local = Path(data_root).expanduser() / ds.name
    return replace(ds, source=str(local.resolve()), hf_config=None) if local.exists() else ds


def model_names(values: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"b"``, ``"s,b"``, ``"base"`` or full names -> HF ids (``facebook/dinov2-base``); None -> all four sizes."""
    if values is None:
        values = list(MODEL_SIZES)
    elif isinstance(values, str):
        values = [v for v in values.replace(" ", "").split(",") if v]
    names = []
    for v in values:
        low = v.strip().lower()
        if low in MODEL_SIZES:
            names.append(f"facebook/dinov2-{MODEL_SIZES[low]}")
        elif low in MODEL_SIZES.values():
            names.append(f"facebook/dinov2-{low}")
        elif "/" in v or ":" in v or Path(v).exists():
            names.append(v.strip())
        else:
            raise ConfigError(f"unknown model {v!r}; give sizes s, b, l, g (or small, base, large, giant) or model names")
    if not names:
        raise ConfigError("no model given; give sizes such as 'b' or 's,b,l,g'")
    return tuple(dict.fromkeys(names))


def preset_spec(
    preset: str = "paper",
    *,
    models: str | Sequence[str] | None = None,
    datasets: str | Sequence[str] | None = None,
    seeds: Sequence[int] = PAPER_SEEDS,
    data_root: str | os.PathLike | None = None,
    model_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    **overrides: Any,
) -> BenchSpec:
    """The grid of a preset ("paper" or "mteb"), narrowed to ``models`` (sizes s/b/l/g) and ``datasets``.

    data_root: a folder of local copies: data set NAME is read from ``<data_root>/NAME`` (a save_to_disk
        folder or an image folder) when it exists, else from the hub.
    model_root: a folder of local model copies (see ``BenchSpec.model_root``).
    max_images: a class-balanced subset per data set, for a smoke run; the published figures are for the
        whole split.
    overrides: other ``BenchSpec`` fields (device, batch_size, num_workers, calibration_images, ...).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if datasets is None:
        names = list(p.datasets)
    else:
        names = [d for d in (datasets.replace(" ", "").split(",") if isinstance(datasets, str) else datasets) if d]
        unknown = [d for d in names if d not in KNOWN_DATASETS]
        if unknown or not names:
            raise ConfigError(f"unknown data set(s) {', '.join(unknown) or '(none given)'}; the {preset} preset "
                              f"has {', '.join(p.datasets)} (other known names: "
                              f"{', '.join(d for d in KNOWN_DATASETS if d not in p.datasets)})")
    specs = []
    for name in dict.fromkeys(names):
        ds = KNOWN_DATASETS[name] if max_images is None else replace(KNOWN_DATASETS[name], max_images=max_images)
        specs.append(with_data_root(ds, data_root))
    return BenchSpec(
        datasets=tuple(specs), models=model_names(models), methods=p.methods, seeds=tuple(seeds),
        cluster_method=p.cluster_method, reference=p.reference,
        model_root=None if model_root is None else os.fspath(model_root), **overrides,
    )
