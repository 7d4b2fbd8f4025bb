"""Triton kernels of masked_attention, forward and backward (see masked_attention.py for the meaning).

Imported only when the triton or cuda backend runs, so that importing densiformer never
imports triton, and TRITON_INTERPRET=1 set before the first call takes effect.

Layout. q, k, v, out are contiguous (B, H, L, D): the B*H sequences are consecutive runs
of L rows. The host picks one of two tilings from L alone (never from the mask, so
nothing waits on the GPU):
- packed (L <= BLOCK): a program takes SEQS = BLOCK // L whole sequences, their SEQS*L
  consecutive rows, as one BLOCK x BLOCK score tile; a block-diagonal mask keeps every
  sequence to its own keys. A 7-token set fills 7 rows of a shared tile, not 128.
- blocked (L > BLOCK): FlashAttention-2. A program takes BLOCK query rows of one
  sequence and walks its keys BLOCK at a time with an online softmax.
Programs lie on grid axis 0 only (up to 2^31 - 1), so B*H is bounded by memory alone.

Head dim. D is padded in registers to BLOCK_D = max(16, next power of two): masked
loads, so the padding moves no memory. 16 because tl.dot needs every dimension >= 16;
at these lengths the kernel is bandwidth bound, so the doubled MMA work at D = 8 is
free, while tl.sum-based products would give up the tensor cores altogether.

Softmax is in base 2 (scale * log2(e) folded into the scores); lse is stored in natural
log, fp32, -inf for a fully padded sequence. Masked scores are dropped with tl.where,
never by arithmetic on -inf, so a fully padded sequence gets zeros and zero gradients
whatever its lse holds (the backward also reads the CUDA forward's lse).

Backward, FA2 recomputation: P = exp(S - lse), dS = P * (dP - delta), delta = rowsum(dO * O).
- packed: one program per tile computes dq, dk and dv together. It holds every key of
  its queries and every query of its keys, so no atomics and no second pass.
- blocked: _bwd_dq_kernel per query block (dq, and delta for the next kernel), then
  _bwd_dkdv_kernel per key block, walking the query blocks.
fp16/bf16 inputs go into tl.dot as they are (P and dS rounded to the input dtype, as
FlashAttention does); everything accumulates in fp32. fp32 inputs use IEEE dots, not TF32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 64  # rows per tile, queries and keys alike; to be tuned on a GPU
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _cast(x, DOT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x (fp32) rounded to nearest even in DOT, the dots' operand dtype.

    EMULATE_BF16 is bf16 under the interpreter (triton 3.x), whose tl.dot multiplies bf16
    bit patterns as integers and whose fp32 -> bf16 conversion truncates. There bf16 is
    emulated: values are rounded to bf16 here and kept in fp32, the dots run in IEEE fp32
    (bf16 products are exact in fp32: the same sums as the bf16 MMA), and storing them to
    bf16 memory converts exactly.
    """
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(DOT)


@triton.jit
def _rows(tile, start, idx, L, n_seq, SEQS: tl.constexpr, PACKED: tl.constexpr):
    """(sequence index int64, position in the sequence, valid) of the tile's rows start + idx."""
    if PACKED:
        local = idx // L
        seq = tile.to(tl.int64) * SEQS + local
        pos = idx - local * L
        valid = (local < SEQS) & (seq < n_seq)
    else:
        seq = tile.to(tl.int64) + tl.zeros_like(idx).to(tl.int64)
        pos = start + idx
        valid = pos < L
    return seq, pos, valid


@triton.jit
def _keep_keys(PAD, seq, pos, valid, H, L):
    """Keys that exist and are not padding."""
    pad = tl.load(PAD + (seq // H) * L + pos, mask=valid, other=1)
    return valid & (pad == 0)


@triton.jit
def _load(ptr, row, valid, dd, D, DOT: tl.constexpr):
    x = tl.load(ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & (dd < D)[None, :], other=0.0)
    return x.to(DOT)


@triton.jit
def _store(ptr, row, valid, dd, D, x, EMULATE_BF16: tl.constexpr):
    tl.store(ptr + row[:, None] * D + dd[None, :], _cast(x, ptr.dtype.element_ty, EMULATE_BF16),
             mask=valid[:, None] & (dd < D)[None, :])


@triton.jit
def _fwd_kernel(Q, K, V, PAD, OUT, LSE, n_seq, H, L, D, span, qk_scale,
                SEQS: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT: tl.constexpr, PREC: tl.constexpr, EMULATE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    if PACKED:
        tile = pid
        qstart = 0
    else:
        tile = pid // tl.cdiv(L, BLOCK)
        qstart = (pid % tl.cdiv(L, BLOCK)) * BLOCK
    idx = tl.arange(0, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    seq_q, pos_q, valid_q = _rows(tile, qstart, idx, L, n_seq, SEQS, PACKED)
    row_q = seq_q * L + pos_q
    q = _load(Q, row_q, valid_q, dd, D, DOT)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for kstart in range(0, span, BLOCK):
        seq_k, pos_k, valid_k = _rows(tile, kstart, idx, L, n_seq, SEQS, PACKED)
        row_k = seq_k * L + pos_k
        keep = _keep_keys(PAD, seq_k, pos_k, valid_k, H, L)[None, :]
        if PACKED:
            keep = keep & (seq_q[:, None] == seq_k[None, :])
        k = _load(K, row_k, valid_k, dd, D, DOT)
        v = _load(V, row_k, valid_k, dd, D, DOT)
        s = tl.where(keep, tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf while a row has no key yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m - m_ref)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_cast(p, DOT, EMULATE_BF16), v, input_precision=PREC)
        m = m_new
    empty = l == 0.0  # every key padded
    l_safe = tl.where(empty, 1.0, l)
    _store(OUT, row_q, valid_q, dd, D, acc / l_safe[:, None], EMULATE_BF16)
    tl.store(LSE + row_q, tl.where(empty, float("-inf"), (m + tl.log2(l_safe)) * 0.6931471805599453), mask=valid_q)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, PAD, OUT, DOUT, LSE, DELTA, DQ, DK, DV, n_seq, H, L, D, span, scale, qk_scale,
                     SEQS: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT: tl.constexpr, PREC: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """dk, dv of a key block; packed, also dq (and delta from O) of the same tile."""
    pid = tl.program_id(0)
    if PACKED:
        tile = pid
        kstart = 0
    else:
        tile = pid // tl.cdiv(L, BLOCK)
        kstart = (pid % tl.cdiv(L, BLOCK)) * BLOCK
    idx = tl.arange(0, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    seq_k, pos_k, valid_k = _rows(tile, kstart, idx, L, n_seq, SEQS, PACKED)
    row_k = seq_k * L + pos_k
    keep_k = _keep_keys(PAD, seq_k, pos_k, valid_k, H, L)
    k = _load(K, row_k, valid_k, dd, D, DOT)
    v = _load(V, row_k, valid_k, dd, D, DOT)
    dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for qstart in range(0, span, BLOCK):
        seq_q, pos_q, valid_q = _rows(tile, qstart, idx, L, n_seq, SEQS, PACKED)
        row_q = seq_q * L + pos_q
        q = _load(Q, row_q, valid_q, dd, D, DOT)
        do = _load(DOUT, row_q, valid_q, dd, D, DOT)
        lse = tl.load(LSE + row_q, mask=valid_q, other=0.0)
        if PACKED:
            delta = tl.sum(_load(OUT, row_q, valid_q, dd, D, tl.float32) * do.to(tl.float32), 1)
        else:
            delta = tl.load(DELTA + row_q, mask=valid_q, other=0.0)
        keep = valid_q[:, None] & keep_k[None, :]
        if PACKED:
            keep = keep & (seq_q[:, None] == seq_k[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(keep, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        dv += tl.dot(tl.trans(_cast(p, DOT, EMULATE_BF16)), do, input_precision=PREC)
        ds = _cast(p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None]), DOT, EMULATE_BF16)
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
        if PACKED:
            _store(DQ, row_q, valid_q, dd, D, tl.dot(ds, k, input_precision=PREC) * scale, EMULATE_BF16)
    _store(DK, row_k, valid_k, dd, D, dk * scale, EMULATE_BF16)
    _store(DV, row_k, valid_k, dd, D, dv, EMULATE_BF16)


@triton.jit
def _bwd_dq_kernel(Q, K, V, PAD, OUT, DOUT, LSE, DELTA, DQ, n_seq, H, L, D, scale, qk_scale,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                   EMULATE_BF16: tl.constexpr):
    """Blocked tiling only: dq of a query block, and its delta for _bwd_dkdv_kernel."""
    pid = tl.program_id(0)
    tile = pid // tl.cdiv(L, BLOCK)
    idx = tl.arange(0, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    seq_q, pos_q, valid_q = _rows(tile, (pid % tl.cdiv(L, BLOCK)) * BLOCK, idx, L, n_seq, 1, False)
    row_q = seq_q * L + pos_q
    q = _load(Q, row_q, valid_q, dd, D, DOT)
    do = _load(DOUT, row_q, valid_q, dd, D, DOT)
    lse = tl.load(LSE + row_q, mask=valid_q, other=0.0)
    delta = tl.sum(_load(OUT, row_q, valid_q, dd, D, tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_q, delta, mask=valid_q)
    dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for kstart in range(0, L, BLOCK):
        seq_k, pos_k, valid_k = _rows(tile, kstart, idx, L, n_seq, 1, False)
        row_k = seq_k * L + pos_k
        keep = valid_q[:, None] & _keep_keys(PAD, seq_k, pos_k, valid_k, H, L)[None, :]
        k = _load(K, row_k, valid_k, dd, D, DOT)
        v = _load(V, row_k, valid_k, dd, D, DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(keep, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        dq += tl.dot(_cast(ds, DOT, EMULATE_BF16), k, input_precision=PREC)
    _store(DQ, row_q, valid_q, dd, D, dq * scale, EMULATE_BF16)


def _precision(dtype):
    """Constexprs DOT (operand dtype of the dots), PREC (their input_precision), EMULATE_BF16 (see _cast).

    fp32 runs IEEE dots, not TF32, so it matches the reference to fp32 rounding.
    """
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return {"DOT": tl.float32, "PREC": "ieee", "EMULATE_BF16": True}
    dot = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    return {"DOT": dot, "PREC": "ieee" if dtype == torch.float32 else "tf32", "EMULATE_BF16": False}


def _tiling(n_seq, L, D):
    """(packed, sequences per tile, key/query span a program walks, grid, BLOCK_D)."""
    block_d = max(16, triton.next_power_of_2(D))
    if L <= BLOCK:
        seqs = BLOCK // L
        return True, seqs, seqs * L, (triton.cdiv(n_seq, seqs),), block_d
    return False, 1, L, (n_seq * triton.cdiv(L, BLOCK),), block_d


def masked_attention_fwd_triton(q, k, v, pad, scale, out, lse):
    """Writes out (B, H, L, D) and lse (B, H, L) fp32; all tensors contiguous, pad bool (B, L)."""
    B, H, L, D = q.shape
    if B * H * L == 0:
        return
    packed, seqs, span, grid, block_d = _tiling(B * H, L, D)
    _fwd_kernel[grid](q, k, v, pad.view(torch.uint8), out, lse, B * H, H, L, D, span, scale * LOG2E,
                      SEQS=seqs, PACKED=packed, BLOCK=BLOCK, BLOCK_D=block_d, **_precision(q.dtype))


def masked_attention_bwd_triton(dout, q, k, v, pad, out, lse, scale):
    """(dq, dk, dv) from the forward's out and lse; all tensors contiguous."""
    B, H, L, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H * L == 0:
        return dq, dk, dv
    packed, seqs, span, grid, block_d = _tiling(B * H, L, D)
    pad = pad.view(torch.uint8)
    precision = _precision(q.dtype)
    delta = lse  # packed: unread (delta comes from O inside the kernel)
    if not packed:
        delta = torch.empty_like(lse)
        _bwd_dq_kernel[grid](q, k, v, pad, out, dout, lse, delta, dq, B * H, H, L, D, scale, scale * LOG2E,
                             BLOCK=BLOCK, BLOCK_D=block_d, **precision)
    _bwd_dkdv_kernel[grid](q, k, v, pad, out, dout, lse, delta, dq, dk, dv, B * H, H, L, D, span, scale,
                           scale * LOG2E, SEQS=seqs, PACKED=packed, BLOCK=BLOCK, BLOCK_D=block_d, **precision)
    return dq, dk, dv
