"""The kernel layer: one module per op, each with a pure-PyTorch `<op>_ref`."""
from .backends import available_backends
from .head_log_prob import head_log_prob, head_log_prob_ref
from .head_sample_loop import head_sample_loop, head_sample_loop_ref
from .masked_attention import masked_attention, masked_attention_ref

__all__ = ["available_backends", "head_log_prob", "head_log_prob_ref", "head_sample_loop", "head_sample_loop_ref",
           "masked_attention", "masked_attention_ref"]
