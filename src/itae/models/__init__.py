"""Model adapters: every backend meets the rest of the code as a ``Backbone``."""

from .adapters import SUPPORTED, UnsupportedModelError, adapt
from .base import AttentionSite, Backbone, Features, Preprocess

__all__ = ["SUPPORTED", "AttentionSite", "Backbone", "Features", "Preprocess", "UnsupportedModelError", "adapt"]
