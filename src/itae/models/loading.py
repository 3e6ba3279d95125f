"""Models by name: ``load_backbone("facebook/dinov2-base")`` returns a ready ``Backbone``.

Accepted names (see ``KNOWN_MODELS``):

- Hugging Face ids: ``facebook/dinov2-{small,base,large,giant}``, ``facebook/dinov2-with-registers-*``
  (and any other HF id or ``save_pretrained`` folder of a DINOv2 model);
- timm names: ``timm/vit_{small,base,large,giant}_patch14_dinov2.lvd142m`` and ``..._reg4_...``
  (with or without the ``timm/`` prefix and the ``.lvd142m`` tag);
- official torch.hub names: ``dinov2_vits14``, ``dinov2_vitb14_reg``, ...;
- the other ViT families (``OTHER_FAMILIES``): DINOv3 (``facebook/dinov3-vitb16-pretrain-lvd1689m``,
  ``timm/vit_base_patch16_dinov3.lvd1689m``), CLIP (``openai/clip-vit-base-patch16``; OpenCLIP as
  ``open_clip:ViT-B-16/laion2b_s34b_b88k``), SigLIP and SigLIP2 (``google/siglip-base-patch16-224``,
  ``google/siglip2-base-patch16-naflex``) and DeiT-III
  (``timm/deit3_base_patch16_224.fb_in22k_ft_in1k``); any other HF id or timm name of these families loads too;
- local files: a ``.safetensors`` or ``.pth`` state dict plus an architecture name, given as ``arch=`` or
  stored with the file (see ``itae.models.checkpoints.write_checkpoint``).

Weights are read only through safetensors or ``torch.load(weights_only=True)``. Nothing is downloaded when
``HF_HUB_OFFLINE=1``; a model that is neither cached nor downloadable raises a one-line ``ModelLoadError``
that says how to pass a local path instead.

Checkpoint files and their stored model description: ``itae.models.checkpoints``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import adapt
from .base import Backbone
from .checkpoints import CHECKPOINT_SUFFIXES, ModelLoadError, read_checkpoint_spec, read_state_dict
from .demo import DEMO_MODELS, is_demo_name, load_demo
from .dinov2_arch import HUB_MODELS, build_dinov2, checkpoint_filename, checkpoint_url, hub_model

DEFAULT_MODEL = "facebook/dinov2-base"
OPEN_CLIP_PREFIX = "open_clip:"


@dataclass(frozen=True)
class KnownModel:
    """What a known name stands for: the loading family, the architecture and its registers."""

    family: str  # "hf", "timm", "hub" or "open_clip"
    arch: str  # DINOv2: official hub architecture name without the register suffix, e.g. "dinov2_vitb14";
    # timm: the timm architecture; HF: the model id; OpenCLIP: "architecture/pretrained tag"
    registers: int
    kind: str = "dinov2"  # "dinov2", "dinov3", "clip", "siglip" or "deit3"


#: the model families beyond DINOv2, with example names (shown when a name is not recognised)
OTHER_FAMILIES = {
    "dinov3": "DINOv3 (HF facebook/dinov3-vitb16-pretrain-lvd1689m, timm/vit_base_patch16_dinov3.lvd1689m)",
    "clip": "CLIP (HF openai/clip-vit-base-patch16, OpenCLIP open_clip:ViT-B-16/laion2b_s34b_b88k)",
    "siglip": "SigLIP / SigLIP2 (HF google/siglip-base-patch16-224, google/siglip2-base-patch16-naflex)",
    "deit3": "DeiT-III (timm/deit3_base_patch16_224.fb_in22k_ft_in1k)",
}


def _known_models() -> dict[str, KnownModel]:
    sizes = (("small", "s"), ("base", "b"), ("large", "l"), ("giant", "g"))
    known: dict[str, KnownModel] = {}
    for size, letter in sizes:
        arch = f"dinov2_vit{letter}14"
        known[f"facebook/dinov2-{size}"] = KnownModel("hf", arch, 0)
        known[f"facebook/dinov2-with-registers-{size}"] = KnownModel("hf", arch, 4)
        known[f"timm/vit_{size}_patch14_dinov2.lvd142m"] = KnownModel("timm", arch, 0)
        known[f"timm/vit_{size}_patch14_reg4_dinov2.lvd142m"] = KnownModel("timm", arch, 4)
        known[arch] = KnownModel("hub", arch, 0)
        known[f"{arch}_reg"] = KnownModel("hub", arch, 4)
    for size, letter in (("small", "s"), ("base", "b"), ("large", "l")):
        hf_id = f"facebook/dinov3-vit{letter}16-pretrain-lvd1689m"
        known[hf_id] = KnownModel("hf", hf_id, 4, "dinov3")
        known[f"timm/vit_{size}_patch16_dinov3.lvd1689m"] = KnownModel("timm", f"vit_{size}_patch16_dinov3", 4, "dinov3")
        known[f"timm/deit3_{size}_patch16_224.fb_in22k_ft_in1k"] = KnownModel(
            "timm", f"deit3_{size}_patch16_224", 0, "deit3")
    for hf_id in ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16", "openai/clip-vit-large-patch14",
                  "openai/clip-vit-large-patch14-336"):
        known[hf_id] = KnownModel("hf", hf_id, 0, "clip")
    for spec in ("ViT-B-32/laion2b_s34b_b79k", "ViT-B-16/laion2b_s34b_b88k", "ViT-L-14/laion2b_s32b_b82k"):
        known[f"open_clip:{spec}"] = KnownModel("open_clip", spec, 0, "clip")
    for hf_id in ("google/siglip-base-patch16-224", "google/siglip-large-patch16-256",
                  "google/siglip-so400m-patch14-384", "google/siglip2-base-patch16-224",
                  "google/siglip2-base-patch16-naflex"):
        known[hf_id] = KnownModel("hf", hf_id, 0, "siglip")
    return known


KNOWN_MODELS: dict[str, KnownModel] = _known_models()


def _aliases() -> dict[str, str]:
    """Spellings people use -> the canonical name in ``KNOWN_MODELS``."""
    aliases = {}
    for name, known in KNOWN_MODELS.items():
        aliases[name.lower()] = name
        if known.family == "timm":
            bare = name.removeprefix("timm/")
            aliases[bare] = name
            aliases[bare.split(".")[0]] = name
    return aliases


_ALIASES = _aliases()


def canonical_name(name: str) -> str | None:
    """The ``KNOWN_MODELS`` key that ``name`` stands for, or None."""
    return _ALIASES.get(name.strip().lower())


# -------------------------------------------------------------------------------------- public API


def load_backbone(
    name_or_path: str = DEFAULT_MODEL,
    *,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    resolution: int | None = None,
    attn_implementation: str | None = None,
) -> Backbone:
    """Load a DINOv2 backbone by name or path, with its own preprocessing.

    ``arch`` names the architecture of a bare checkpoint file (a hub name such as ``dinov2_vitb14`` for
    official-format weights, or a timm name such as ``vit_base_patch14_dinov2`` for timm-format ones).
    ``resolution`` overrides the input size (rounded to a multiple of the patch size).
    ``attn_implementation`` is passed to HF models (default ``"sdpa"``).
    """
    name = str(name_or_path).strip()
    if not name:
        raise ModelLoadError("empty model name; pass a model name such as facebook/dinov2-base or a local path")
    if is_demo_name(name):  # the offline planted-artifact demonstration models
        return load_demo(name, device=device, dtype=dtype, resolution=resolution)
    path = Path(name).expanduser()
    if arch is not None or path.exists() or _looks_like_path(name):
        model, label = _load_local(path, arch, attn_implementation), str(path)
    else:
        canonical = canonical_name(name)
        known = KNOWN_MODELS.get(canonical) if canonical else None
        if known is not None:
            label = canonical
            model = _load_known(canonical, known, attn_implementation)
        elif name.lower().startswith(OPEN_CLIP_PREFIX):
            label = name
            model = _load_open_clip(name)
        elif name.startswith("timm/") or _is_timm_name(name):
            label = name
            model = _load_timm_by_name(name, hint_arch="dinov2_vitb14")
        elif name.count("/") == 1 and not name.startswith(("/", ".")):
            label = name
            model = _load_hf(name, attn_implementation, known=False)
        else:
            raise ModelLoadError(
                f"unknown model {name!r}; use a Hugging Face id (facebook/dinov2-base, "
                "facebook/dinov2-with-registers-base, ...), a timm name (timm/vit_base_patch14_dinov2.lvd142m, "
                "timm/vit_base_patch14_reg4_dinov2.lvd142m, ...), a torch.hub name (dinov2_vitb14, "
                f"dinov2_vitb14_reg, ...), a model of the other supported families: {'; '.join(OTHER_FAMILIES.values())}, "
                f"a local path, or one of the offline demo models ({', '.join(DEMO_MODELS)})"
            )
    model = model.to(device=device, dtype=dtype).eval()
    backbone = adapt(model, name=label)
    if resolution is not None:
        backbone.preprocess = backbone.preprocess.with_resolution(int(resolution))
    return backbone


# ----------------------------------------------------------------------------------------- helpers


def _looks_like_path(name: str) -> bool:
    """A name meant as a file or folder even though it does not exist (a hub id has exactly one '/')."""
    if name.startswith(("/", "./", "../", "~")) or name.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    return name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _is_timm_name(name: str) -> bool:
    try:
        from timm.models import is_model
    except ImportError:  # timm is a dependency, but keep the error about the name, not the import
        return False
    return bool(is_model(name))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads it once, at import)."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hf_cache_dir() -> str:
    """The Hugging Face hub cache, from the environment at call time (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def _not_available(name: str, arch: str | None) -> ModelLoadError:
    if arch is None:  # no checkpoint-file route: only a save_pretrained folder
        return ModelLoadError(
            f"{name} is not available offline (not cached and could not be downloaded); download it once with "
            "network, or pass a local save_pretrained folder: model=FOLDER"
        )
    return ModelLoadError(
        f"{name} is not available offline (not cached and could not be downloaded); download it once with "
        f"network, or pass a local path: model=FOLDER, or model=WEIGHTS.safetensors with arch={arch}"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -------------------------------------------------------------------------------------- by family


#: the first transformers release with each HF model class a family needs beyond ``transformers>=4.40``
HF_CLASS_SINCE = {"dinov3": ("DINOv3ViTModel", "4.56")}


def _require_hf_class(name: str, kind: str) -> None:
    """A clear error, before any download, when the installed transformers predates the family's model class."""
    if kind not in HF_CLASS_SINCE:
        return
    import transformers

    cls, since = HF_CLASS_SINCE[kind]
    if _release(transformers.__version__) < _release(since):  # a dev build of the release counts
        raise ModelLoadError(
            f"{name} needs transformers>={since} ({cls}); transformers {transformers.__version__} is installed: "
            f"pip install -U 'transformers>={since}'"
        )


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string: "4.56.0.dev0" -> (4, 56)."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _load_known(name: str, known: KnownModel, attn_implementation: str | None) -> nn.Module:
    if known.family == "hf":
        _require_hf_class(name, known.kind)
    if known.kind != "dinov2":
        if known.family == "timm":
            return _load_timm_by_name(name, hint_arch=known.arch)
        if known.family == "open_clip":
            return _load_open_clip(name)
        # SigLIP2 ids hold either architecture (fixed-size: SigLIP's; NaFlex: SigLIP2's): let AutoModel choose
        vision_only = None if "siglip2" in name else known.kind
        return _load_hf(name, attn_implementation, known=True, hint_arch=None, vision_only=vision_only)
    hint = known.arch + ("_reg" if known.registers else "")
    if known.family == "hf":
        return _load_hf(name, attn_implementation, known=True, hint_arch=hint)
    if known.family == "timm":
        return _load_timm_by_name(name, hint_arch=hint)
    return _load_hub_by_name(name)


def _load_hf(name_or_dir: str, attn_implementation: str | None, *, known: bool, hint_arch: str | None = "dinov2_vitb14",
             vision_only: str | None = None):
    """``vision_only`` ("clip" or "siglip") loads only the vision tower of a CLIP or SigLIP checkpoint."""
    from transformers import AutoModel, CLIPVisionModel, SiglipVisionModel

    loader = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}.get(vision_only or "", AutoModel)

    local = Path(name_or_dir).is_dir()
    kwargs: dict = {"attn_implementation": attn_implementation or "sdpa"}
    if not local:
        kwargs.update(cache_dir=_hf_cache_dir(), local_files_only=_offline())
    try:
        return loader.from_pretrained(name_or_dir, **kwargs)
    except OSError as err:
        if local:
            raise ModelLoadError(f"{name_or_dir}: not a loadable save_pretrained folder ({_first_line(err)})") from None
        if known or _offline():
            raise _not_available(name_or_dir, hint_arch) from None
        raise ModelLoadError(
            f"could not load {name_or_dir!r} from the Hugging Face Hub ({_first_line(err)}); check the id, "
            "or pass a local path"
        ) from None


def _load_timm_by_name(name: str, *, hint_arch: str) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    model_name = name.removeprefix("timm/")
    if not timm.models.is_model(model_name):
        raise ModelLoadError(f"unknown timm model {model_name!r}; see timm.list_models('*dinov2*')")
    cfg = get_pretrained_cfg(model_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise ModelLoadError(f"timm model {model_name!r} has no pretrained weights on the Hugging Face Hub; "
                             "pass a local checkpoint and its arch")
    weights = _hf_file(hub_id, ("model.safetensors", "pytorch_model.bin"))
    if weights is None:
        raise _not_available(name, hint_arch)
    return _create_timm(model_name, weights, {})


def _hf_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """The first of ``filenames`` found in the hub cache; else the first downloaded (unless offline); else None."""
    from huggingface_hub import hf_hub_download

    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=_hf_cache_dir(), local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: try the next name
            continue
    if _offline():
        return None
    try:
        # only the first name online: each failed attempt costs the hub client's retries when there is no network
        return hf_hub_download(repo_id, filenames[0], cache_dir=_hf_cache_dir())
    except Exception:  # noqa: BLE001 - no network, missing file, auth...: reported as one line by the caller
        return None


def _create_timm(arch: str, weights: str | Path, model_kwargs: dict) -> nn.Module:
    import timm

    # dynamic_img_size: DINOv2 timm configs fix 518 px; this lets any multiple of the patch size through,
    # resampling the position embeddings per forward.
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **model_kwargs}
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    except RuntimeError as err:  # strict loading: names or shapes do not match the architecture
        raise ModelLoadError(f"{weights}: does not match timm architecture {arch} ({_first_line(err)})") from None


def _load_open_clip(name: str) -> nn.Module:
    """``open_clip:ARCH/PRETRAINED`` (e.g. ``open_clip:ViT-B-16/laion2b_s34b_b88k``) -> its vision tower."""
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError(f"{name} needs OpenCLIP: pip install 'itae[openclip]'") from None
    arch, _, pretrained = name[len(OPEN_CLIP_PREFIX):].partition("/")
    if not arch or not pretrained:
        raise ModelLoadError(f"{name!r}: an OpenCLIP name is open_clip:ARCH/PRETRAINED, e.g. "
                             "open_clip:ViT-B-16/laion2b_s34b_b88k (see open_clip.list_pretrained())")
    if (arch, pretrained) not in {tuple(p) for p in open_clip.list_pretrained()}:
        raise ModelLoadError(f"unknown OpenCLIP model {arch}/{pretrained}; see open_clip.list_pretrained()")
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, cache_dir=_hf_cache_dir())
    except Exception:  # noqa: BLE001 - no network, not cached...: one readable line
        raise ModelLoadError(f"{name} is not available offline (not cached and could not be downloaded); "
                             "download it once with network") from None
    return model.visual


def _load_hub_by_name(name: str) -> nn.Module:
    hub_dir = Path(torch.hub.get_dir())
    checkpoint = hub_dir / "checkpoints" / checkpoint_filename(name)
    if not checkpoint.is_file():
        if _offline():
            raise _not_available(name, name)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(checkpoint_url(name), str(checkpoint.with_suffix(".part")), progress=True)
        except Exception:  # noqa: BLE001 - no network, proxy, HTTP error...: one readable line
            raise _not_available(name, name) from None
        checkpoint.with_suffix(".part").replace(checkpoint)
    code = hub_dir / "facebookresearch_dinov2_main"
    if (code / "hubconf.py").is_file():
        # the official code is cached: build its model (without it fetching weights) and load them here
        model = torch.hub.load(str(code), name, source="local", pretrained=False)
        state_dict = read_state_dict(checkpoint)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise ModelLoadError(f"{checkpoint}: does not match {name} ({_first_line(err)})") from None
        return model
    try:
        return hub_model(name, weights=checkpoint)
    except ModelLoadError:
        raise
    except ValueError as err:
        raise ModelLoadError(str(err)) from None


def _load_local(path: Path, arch: str | None, attn_implementation: str | None) -> nn.Module:
    if not path.exists():
        raise ModelLoadError(f"no such file or folder: {path}")
    if path.is_dir():
        if arch is not None:
            raise ModelLoadError(f"{path}: arch applies to checkpoint files; a folder is loaded from its config.json")
        return _load_folder(path, attn_implementation)
    spec = _spec_for(path, arch)
    if spec["family"] == "timm":
        return _create_timm(spec["arch"], path, spec["model_kwargs"])
    try:
        if spec["model_kwargs"]:
            return build_dinov2(**spec["model_kwargs"], weights=path)
        return hub_model(spec["arch"], weights=path)
    except ModelLoadError:
        raise
    except (ValueError, TypeError) as err:
        raise ModelLoadError(str(err)) from None


def _load_folder(path: Path, attn_implementation: str | None) -> nn.Module:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: a model folder needs a config.json (a save_pretrained folder); "
                             "for a checkpoint file pass the file itself")
    return _load_hf(str(path), attn_implementation, known=False)


def _spec_for(path: Path, arch: str | None) -> dict:
    """How to build the model of a checkpoint file: from ``arch`` if given, else from what is stored with it."""
    if arch is None:
        spec = read_checkpoint_spec(path)
        if spec is None:
            raise ModelLoadError(
                f"{path}: checkpoint without an architecture name; pass one, e.g. "
                "arch=dinov2_vitb14"
            )
        return spec
    arch = arch.strip()
    canonical = canonical_name(arch)
    if arch in HUB_MODELS:
        return {"family": "hub", "arch": arch, "model_kwargs": {}}
    if canonical is not None and KNOWN_MODELS[canonical].family == "timm":
        return {"family": "timm", "arch": canonical.removeprefix("timm/"), "model_kwargs": {}}
    if _is_timm_name(arch.removeprefix("timm/")):
        return {"family": "timm", "arch": arch.removeprefix("timm/"), "model_kwargs": {}}
    raise ModelLoadError(
        f"unknown architecture {arch!r} for a checkpoint file; use a torch.hub name for official weights "
        "(dinov2_vits14, dinov2_vitb14_reg, ...) or a timm name for timm weights (vit_base_patch14_dinov2, ...); "
        "Hugging Face models load from their save_pretrained folder"
    )
