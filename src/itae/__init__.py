"""itae: Inference-Time Attention Engineering for pretrained Vision Transformers.

Finds the artifact patch tokens of a DINOv2-style ViT from the norms of a Q/K/V projection and
attenuates the CLS token's attention to them, for better zero-shot image clustering.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# Public name -> module that defines it. Imported on first use, so `import itae` stays light.
_EXPORTS = {
    "ITAEConfig": "itae.config",
    "attenuate": "itae.engine.patch",
    "ITAEState": "itae.engine.patch",
    "detect_artifacts": "itae.engine.detect",
    "calibrate": "itae.engine.calibrate",
    "Calibration": "itae.engine.calibrate",
    "adapt": "itae.models.adapters",
    "Backbone": "itae.models.base",
    "load_backbone": "itae.models.loading",
    "ItaeError": "itae.errors",
    "ConfigError": "itae.errors",
    "InputError": "itae.errors",
    "ModelLoadError": "itae.errors",
    "StoreError": "itae.errors",
    "KNOWN_MODELS": "itae.models.loading",
    "TTRConfig": "itae.methods",
    "METHODS": "itae.methods",
    "find_register_neurons": "itae.engine.registers",
    "test_time_registers": "itae.engine.registers",
    "run": "itae.pipeline",
    "embed": "itae.extraction.local",
    "EmbedOptions": "itae.extraction.options",
    "SourceSpec": "itae.data.spec",
    "ModelSpec": "itae.models.spec",
    "cluster": "itae.clustering",
    "evaluate": "itae.metrics",
    "assign": "itae.collection.assign",
    "check": "itae.collection.check",
    "compare": "itae.collection.compare",
    "write_diagnostics": "itae.diagnostics",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'itae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
