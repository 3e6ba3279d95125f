"""Keep the input tokens of one block during forwards that run anyway, so that a later forward over
the same images can start at that block (``forward_cls_from``, ``forward_features_from``).

Calibration runs the unmodified model over its sample; ITAE changes nothing before the first
engineered block, so that block's input is exactly what embedding the same images would compute
again. Kept on the host, in the model's dtype, up to a byte budget.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.base import Backbone
from .capture import HookSet


class keep_block_inputs:  # noqa: N801 - a context manager, named like one
    """Keep a copy of the input tokens (B, T, D) of ``backbone.blocks[layer]`` at every forward, in order.

    ``kept``: one entry per forward of that block, the tokens on the CPU, or None once ``max_bytes``
    would be exceeded (the count of forwards stays exact, so a caller can pair entries with batches).
    The hook is removed on exit, also after an error.
    """

    def __init__(self, backbone: Backbone, layer: int, max_bytes: int) -> None:
        self.block = backbone.blocks[backbone.resolve_layer(layer)]
        self.max_bytes = max_bytes
        self.kept: list[torch.Tensor | None] = []
        self.bytes = 0
        self._hooks = HookSet()

    def _hook(self, _module: nn.Module, args: tuple) -> None:
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
        size = 0 if hidden is None else hidden.numel() * hidden.element_size()
        if hidden is None or self.bytes + size > self.max_bytes:
            self.kept.append(None)
            return
        # a copy: the block may not keep its input intact, and a GPU's memory is not the place for it
        self.kept.append(hidden.detach().to("cpu", copy=True))
        self.bytes += size

    def __enter__(self) -> keep_block_inputs:
        self._hooks.pre(self.block, self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.remove()


__all__ = ["keep_block_inputs"]
