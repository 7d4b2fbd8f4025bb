"""Masked multi-head attention over short token sets.

`masked_attention_ref` defines the op. Only the pure-PyTorch backend exists so far;
the Triton and CUDA C++ kernels are issue #5, and naming them raises an error that
says so instead of silently running the reference.
"""
from __future__ import annotations

import math

import torch

from .backends import resolve_backend


def masked_attention_ref(q, k, v, key_padding_mask, scale=None):
    """softmax(q k^T * scale, keys masked) v, with a fully padded row giving zeros.

    q, k, v: (B, H, L, D); key_padding_mask: (B, L) bool, True = padding. A masked key
    gets weight exactly 0 (exp(-inf)), so padding never changes the unmasked outputs.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(mask, float("-inf"))
    # A row whose keys are all padding would softmax to NaN; give it zeros instead.
    all_masked = mask.all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(all_masked, 0.0), dim=-1)
    weights = weights.masked_fill(all_masked, 0.0)
    return torch.matmul(weights, v)


def _check(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.shape != q.shape[:-1] + k.shape[-1:] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"q, k, v must be (B, H, L, D) with matching B, H, L; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    B, _, L, _ = q.shape
    if key_padding_mask.shape != (B, L) or key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be bool of shape ({B}, {L}); got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    devices = {t.device for t in (q, k, v, key_padding_mask)}
    if len(devices) > 1:
        raise ValueError(f"q, k, v and key_padding_mask must be on one device; got {sorted(map(str, devices))}")


def masked_attention(q, k, v, key_padding_mask, *, scale=None, backend="auto"):
    """Attention with a key padding mask (True = padding), shapes (B, H, L, D)."""
    _check(q, k, v, key_padding_mask)
    name = resolve_backend("masked_attention", backend, q.device)
    if name == "torch":
        return masked_attention_ref(q, k, v, key_padding_mask, scale)
    raise AssertionError(f"unhandled backend {name}")  # resolve_backend only returns implemented ones
