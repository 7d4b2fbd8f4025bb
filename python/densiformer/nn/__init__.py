"""Modules built on the kernel layer."""
from .attention import MaskedSelfAttention

__all__ = ["MaskedSelfAttention"]
