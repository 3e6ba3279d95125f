"""The errors itae raises for bad settings, bad input, models it cannot load and stores it cannot use.

Every one is an ``ItaeError``, so ``except itae.ItaeError`` catches what a user can fix, and anything
else is a bug. Each also keeps the builtin class it had before (``ConfigError`` is a ``ValueError``,
``ConfigTypeError`` a ``TypeError`` too), so existing ``except ValueError`` code keeps working.

Messages name Python parameters (``batch_size``, ``overwrite=True``); the command line rewrites them
into its flags when it prints them.

  ItaeError
    ConfigError            invalid settings: ITAEConfig, TTRConfig, a bench spec, a config file
      ConfigTypeError        ... of the wrong type (also a TypeError)
    InputError             bad data, source or argument
      InputTypeError         ... of the wrong type (also a TypeError)
      InputIndexError        ... out of range (also an IndexError)
      DecodeError            one image file that cannot be decoded (itae.data.decode)
      DatasetLoadError       a bench data set that cannot be loaded (itae.bench.datasets)
    ModelLoadError         a model or checkpoint that cannot be loaded
      UnsupportedModelError  a model whose architecture itae cannot adapt (also a TypeError)
    StoreError             an embedding store that cannot be used as asked
    ResourceError          the device ran out of memory (also a RuntimeError)
    FolderInUseError       an output folder another itae process is writing (also a RuntimeError)
    MissingDependencyError an optional extra that is not installed (also an ImportError)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "DatasetLoadError",
    "DecodeError",
    "FolderInUseError",
    "InputError",
    "InputIndexError",
    "InputTypeError",
    "ItaeError",
    "MissingDependencyError",
    "ResourceError",
    "ModelLoadError",
    "StoreError",
    "UnsupportedModelError",
]


class ItaeError(Exception):
    """Base of the errors a user can fix: a bad setting, input, model or store."""

    # The plain message, also for the subclasses that are KeyErrors or other builtins with their own str().
    __str__ = Exception.__str__


class ConfigError(ItaeError, ValueError):
    """An invalid setting (ITAEConfig, TTRConfig, a bench spec, a config file)."""


class ConfigTypeError(ConfigError, TypeError):
    """A setting of the wrong type."""


class InputError(ItaeError, ValueError):
    """Bad input: a data source, data or an argument that cannot be used."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type."""


class InputIndexError(InputError, IndexError):
    """An index (a block, an image of a batch) out of range."""


class DecodeError(InputError):
    """An image that cannot be used; ``reason`` is a short phrase for ``errors.csv``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DatasetLoadError(InputError):
    """A benchmark data set that cannot be loaded (not on disk, and the hub not reachable)."""


class ModelLoadError(ItaeError, ValueError):
    """A model name, hub id or checkpoint that cannot be loaded."""


class UnsupportedModelError(ModelLoadError, TypeError):
    """A model whose architecture itae cannot adapt."""


class StoreError(ItaeError, ValueError):
    """An embedding store that cannot be used as asked (unreadable, other settings, other images)."""


class ResourceError(ItaeError, RuntimeError):
    """The device ran out of memory; a smaller batch or another precision may fit."""


class FolderInUseError(ItaeError, RuntimeError):
    """An output folder that another itae process holds."""


class MissingDependencyError(ItaeError, ImportError):
    """An optional dependency (an extra such as ``itae[ray]``) that is not installed."""
