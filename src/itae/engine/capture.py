"""Observe a block's q, k, v (and its output) through hooks on the model instance.

Hooks are global state on the module instances, so they are only ever installed inside a
``HookSet`` context, which removes every one of them in ``finally``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import AttentionSite
from .functional import split_heads


class HookSet:
    """Registers forward / forward-pre hooks (and instance attributes set for a while) and undoes all of
    them on exit, also after an error."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attrs: list[tuple[object, str, object]] = []

    def forward(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def pre(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def forward_with_kwargs(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs, output)``; may return a replacement output."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=True))

    def set_attr(self, obj: object, name: str, value: object) -> None:
        """Set ``obj.name`` (an instance attribute) until ``remove``, which puts the old value back."""
        self._attrs.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def remove(self) -> None:
        try:
            while self._handles:
                self._handles.pop().remove()
        finally:
            while self._attrs:
                obj, name, old = self._attrs.pop()
                setattr(obj, name, old)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class HookedContext:
    """A context manager that hooks a live model instance (``itae.attenuate``, ``itae.test_time_registers``).

    A subclass sets ``backbone`` and ``state`` in ``__init__`` (validating everything there) and installs
    its hooks in ``_install``. ``__enter__`` refuses a model already inside a context of the same kind,
    installs, and on a failure removes what was installed; ``__exit__`` removes everything, also after
    an exception, then calls ``_on_exit``. Each kind keeps its own registry of active models.
    """

    _active: weakref.WeakSet
    _hooks: HookSet | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._active = weakref.WeakSet()

    def _install(self, hooks: HookSet) -> None:
        raise NotImplementedError

    def _on_exit(self) -> None:
        pass

    def __enter__(self):
        model = self.backbone.model
        if model in self._active:
            raise RuntimeError(f"this model is already inside an itae.{type(self).__name__} context; "
                               "nesting is not supported")
        hooks = HookSet()
        try:
            self._install(hooks)
        except BaseException:
            hooks.remove()
            raise
        self._hooks = hooks
        self._active.add(model)
        return self.state

    def __exit__(self, *exc) -> None:
        try:
            if self._hooks is not None:
                self._hooks.remove()
        finally:
            self._hooks = None
            self._active.discard(self.backbone.model)
            self._on_exit()


@dataclass
class QKV:
    """Projections of one forward of one block, each (B, T, D), before any per-head q/k norm or rotary
    embedding (``rotary`` holds the embedding of that forward, when the site has one)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rotary: object = None

    def get(self, source: str) -> torch.Tensor:
        return {"q": self.q, "k": self.k, "v": self.v}[source]

    def heads(self, site: AttentionSite) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, T, d) q, k, v as the attention sees them (per-head q/k norms and rotary embedding applied)."""
        q = split_heads(self.q, site.num_heads)
        k = split_heads(self.k, site.num_heads)
        v = split_heads(self.v, site.num_heads)
        if site.q_norm is not None:
            q = site.q_norm(q)
        if site.k_norm is not None:
            k = site.k_norm(k)
        if site.rotary is not None:
            q, k = site.rotary.apply(q, k, self.rotary)
        return q, k, v


def mha_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, key, value) of a ``nn.MultiheadAttention`` call, positional or by keyword."""
    names = ("query", "key", "value")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return values[0], values[1], values[2]


def mha_projections(
    mha: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, L or T, D) of a batch-first ``nn.MultiheadAttention`` with a fused ``in_proj``."""
    if not getattr(mha, "batch_first", False) or mha.in_proj_weight is None:
        raise RuntimeError("only batch-first nn.MultiheadAttention with a fused in_proj is supported")
    w, b = mha.in_proj_weight, mha.in_proj_bias
    dim = w.shape[0] // 3
    parts = [(w[i * dim : (i + 1) * dim], None if b is None else b[i * dim : (i + 1) * dim]) for i in range(3)]
    return tuple(F.linear(x, wi, bi) for x, (wi, bi) in zip((query, key, value), parts, strict=True))


class QKVCapture:
    """Keeps the latest q, k, v of a site; ``pop()`` hands them over once."""

    def __init__(self, site: AttentionSite, hooks: HookSet) -> None:
        self.site = site
        self._parts: dict[str, torch.Tensor] = {}
        self._rotary = None
        if site.mha is not None:
            hooks.pre(site.mha, self._on_mha, with_kwargs=True)
        elif site.qkv is not None:
            hooks.forward(site.qkv, self._on_qkv)
        else:
            for name in ("q", "k", "v"):
                hooks.forward(getattr(site, name), self._on_part(name))
        if site.rotary is not None:
            hooks.pre(site.rotary.module, self._on_rotary, with_kwargs=True)

    def _on_rotary(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._rotary = self.site.rotary.read(args, kwargs)

    def _on_mha(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        q, k, v = mha_projections(module, *mha_inputs(args, kwargs))
        self._parts = {"q": q, "k": k, "v": v}

    def _on_qkv(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        # (B, T, 3D) -> three (B, T, D), ordered q, k, v as in the fused layouts
        q, k, v = output.chunk(3, dim=-1)
        self._parts = {"q": q, "k": k, "v": v}

    def _on_part(self, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self._parts[name] = output

        return hook

    def pop(self) -> QKV:
        parts, self._parts = self._parts, {}
        rotary, self._rotary = self._rotary, None
        missing = {"q", "k", "v"} - set(parts)
        if missing:
            raise RuntimeError(
                f"block {self.site.index}: the attention ran without {sorted(missing)} passing through the "
                "expected projections; this model's attention layout is not supported"
            )
        if self.site.rotary is not None and rotary is None:
            raise RuntimeError(f"block {self.site.index}: the attention ran without its rotary position embedding")
        return QKV(parts["q"], parts["k"], parts["v"], rotary)
