"""Bundled data sets."""
from .hipparcos import hipparcos
from . import fitzhugh_nagumo, lorenz63

__all__ = ["fitzhugh_nagumo", "hipparcos", "lorenz63"]
