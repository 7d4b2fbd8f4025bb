"""Masked multi-head attention over short token sets.

`masked_attention_ref` defines the op. Backends:
- `torch`: the reference (autograd through PyTorch);
- `triton`: ops/_masked_attention_triton.py, forward and backward (CUDA, or CPU
  tensors under TRITON_INTERPRET=1);
- `cuda`: the CUDA C++ forward in densiformer._C_cuda, with the Triton backward fed by
  the log-sum-exp the CUDA forward writes.
The compiled backends are registered as torch.library custom ops
(densiformer::masked_attention_fwd / _bwd) with fake implementations and autograd, so
torch.compile traces through them.
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import backends
from .backends import resolve_backend

COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # densiformer._C_cuda's dtype_code
MAX_HEAD_DIM = 128
CUDA_HEAD_DIMS = (8, 16, 32, 64, 128)  # the CUDA C++ kernel's instantiations


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
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v, key_padding_mask)}
    if len(devices) > 1:
        raise ValueError(f"q, k, v and key_padding_mask must be on one device; got {sorted(map(str, devices))}")


def _check_compiled(q, v, backend):
    if q.dtype not in COMPILED_DTYPES:
        raise TypeError(f"the {backend} backend takes {', '.join(map(str, COMPILED_DTYPES))}; got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"the {backend} backend takes one head dim <= {MAX_HEAD_DIM} for q, k and v; got "
                         f"{q.shape[-1]} and {v.shape[-1]}")
    if backend == "cuda" and q.shape[-1] not in CUDA_HEAD_DIMS:
        raise ValueError(f"the cuda backend takes head dims {CUDA_HEAD_DIMS}, got {q.shape[-1]}; "
                         "the triton backend takes any up to 128")


@torch.library.custom_op("densiformer::masked_attention_fwd", mutates_args=())
def _masked_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
                          scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, D), lse (B, H, L) fp32, natural log) on contiguous inputs."""
    B, H, L, D = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty((B, H, L), dtype=torch.float32)
    if backend == "triton":
        from ._masked_attention_triton import masked_attention_fwd_triton

        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            masked_attention_fwd_triton(q, k, v, key_padding_mask, scale, out, lse)
    elif backend == "cuda":
        backends.cuda_extension().masked_attention_fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), key_padding_mask.data_ptr(), out.data_ptr(), lse.data_ptr(),
            B, H, L, D, scale, CUDA_DTYPE_CODES[q.dtype], torch.cuda.current_stream(q.device).cuda_stream)
    else:
        raise ValueError(f"no compiled masked_attention backend {backend!r}")
    return out, lse


@_masked_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("densiformer::masked_attention_bwd", mutates_args=())
def _masked_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_padding_mask: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by the Triton backward, for either compiled forward."""
    from ._masked_attention_triton import masked_attention_bwd_triton

    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return masked_attention_bwd_triton(dout.contiguous(), q, k, v, key_padding_mask, out, lse, scale)


@_masked_attention_bwd.register_fake
def _(dout, q, k, v, key_padding_mask, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)  # an internal of the backward, never returned to users


def _backward(ctx, dout, _dlse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _masked_attention_bwd(dout, q, k, v, key_padding_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None, None


_masked_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def masked_attention(q, k, v, key_padding_mask, *, scale=None, backend="auto"):
    """Attention with a key padding mask (True = padding), shapes (B, H, L, D); differentiable.

    backend: "auto" (cuda, then triton, for CUDA tensors; torch on the CPU), "torch",
    "triton", "cuda"; naming one that cannot run here raises RuntimeError saying why.
    "auto" passes over cuda for head dims its kernel lacks (see CUDA_HEAD_DIMS).
    The compiled backends take fp32, bf16 and fp16 with head dims up to 128, accumulate
    in fp32, and copy non-contiguous inputs to contiguous ones.
    """
    _check(q, k, v, key_padding_mask)
    name = resolve_backend("masked_attention", backend, q.device)
    if name == "cuda" and backend == "auto" and q.shape[-1] not in CUDA_HEAD_DIMS:
        name = "triton" if backends.available_backends()["triton"] is True else "torch"
    if name == "torch":
        return masked_attention_ref(q, k, v, key_padding_mask, scale)
    _check_compiled(q, v, name)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _masked_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask.contiguous(),
                                   scale, name)
    return out
