"""Checkpoint files: reading a state dict safely, and the model description stored with a file.

Weights are read only through safetensors or ``torch.load(weights_only=True)``. Checkpoint files written by
``write_checkpoint`` describe their model: safetensors files in their metadata (key ``"itae"``, a JSON
object), ``.pth`` files in a sidecar ``<file>.json``; the object holds ``family`` (``"hub"`` or ``"timm"``),
``arch`` (a hub or timm name) and optional ``model_kwargs`` (constructor overrides, e.g. the size of a
tiny test model). ``itae.models.loading`` builds the model such a file describes.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from itae.errors import ModelLoadError

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_METADATA_KEY = "itae"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file read with
    ``torch.load(weights_only=True)`` (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such checkpoint file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"{path}: unsupported checkpoint format {suffix!r}; expected .safetensors or .pth")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"{path}: holds objects other than tensors, which are not unpickled (weights_only=True); "
            "save only the state dict (torch.save(model.state_dict(), ...)) or use .safetensors"
        ) from None
    if isinstance(obj, dict) and not _all_tensors(obj):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict) and _all_tensors(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not _all_tensors(obj):
        raise ModelLoadError(f"{path}: not a state dict (a mapping from parameter names to tensors)")
    return obj


def write_checkpoint(
    state_dict: dict[str, torch.Tensor],
    path: str | Path,
    *,
    family: str,
    arch: str,
    model_kwargs: dict | None = None,
) -> Path:
    """Save a state dict that ``load_backbone(path)`` can load without ``arch=``.

    ``family`` is ``"hub"`` (official key names; ``arch`` a hub name or ``model_kwargs`` for ``build_dinov2``)
    or ``"timm"`` (timm key names; ``arch`` a timm model name, ``model_kwargs`` passed to ``create_model``).
    A ``.safetensors`` path keeps the description in its metadata; a ``.pth`` path gets a ``<file>.json``.
    """
    if family not in ("hub", "timm"):
        raise ModelLoadError(f"family must be 'hub' or 'timm' for a checkpoint file; got {family!r}")
    path = Path(path)
    spec = {"family": family, "arch": arch, "model_kwargs": dict(model_kwargs or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt", _METADATA_KEY: json.dumps(spec)})
    elif path.suffix.lower() in (".pth", ".pt"):
        torch.save(tensors, path)
        _sidecar(path).write_text(json.dumps(spec, indent=2) + "\n")
    else:
        raise ModelLoadError(f"checkpoint path must end in .safetensors or .pth; got {path.name}")
    return path


def read_checkpoint_spec(path: str | Path) -> dict | None:
    """The ``{"family", "arch", "model_kwargs"}`` description stored with a checkpoint, or None."""
    path = Path(path)
    sidecar = _sidecar(path)
    if sidecar.is_file():
        return _validate_spec(json.loads(sidecar.read_text()), sidecar)
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if _METADATA_KEY in meta:
            return _validate_spec(json.loads(meta[_METADATA_KEY]), path)
    return None


# ----------------------------------------------------------------------------------------- helpers


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _validate_spec(spec: object, where: Path) -> dict:
    if not isinstance(spec, dict) or spec.get("family") not in ("hub", "timm") or not spec.get("arch"):
        raise ModelLoadError(f"{where}: the stored model description needs family 'hub' or 'timm' and an arch")
    return {"family": spec["family"], "arch": spec["arch"], "model_kwargs": dict(spec.get("model_kwargs") or {})}


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
