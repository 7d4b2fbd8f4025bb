"""Bundled data sets."""
from .hipparcos import hipparcos

__all__ = ["hipparcos"]
