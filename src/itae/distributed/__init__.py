"""Scale-out extraction: the same embedding store as ``itae.embed``, filled by Ray Data batch inference.

Ray is an optional extra (``pip install "itae[ray]"``); importing this package does not import it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["embed_ray"]


def __getattr__(name: str) -> Any:
    if name == "embed_ray":
        from .ray_embed import embed_ray

        globals()[name] = embed_ray
        return embed_ray
    raise AttributeError(f"module 'itae.distributed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
