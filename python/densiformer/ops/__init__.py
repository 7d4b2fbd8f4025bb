"""The kernel layer: one module per op, each with a pure-PyTorch `<op>_ref`."""
from .backends import available_backends
from .masked_attention import masked_attention, masked_attention_ref

__all__ = ["available_backends", "masked_attention", "masked_attention_ref"]
