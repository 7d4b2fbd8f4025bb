"""Triton kernel of head_sample_loop (see head_sample_loop.py for the meaning).

Imported only when the triton backend runs, so that importing densiformer never
imports triton, and TRITON_INTERPRET=1 set before the first call takes effect.

Each program takes blocks of BLOCK_M sample rows in turn and runs every step and every
layer on one before the next. The sampler state (x, x0_prev: BLOCK_M x K) stays in registers. Activations are
BLOCK_M x W, too wide to keep whole in registers at W = 512, and Triton cannot slice
a register tensor, so each layer reads its input from a per-program scratch buffer in
global memory (L2-resident on a GPU) in BLOCK_R-wide chunks and writes its output
BLOCK_N columns at a time to a second buffer; the two swap between layers. Matmuls
are tl.dot in IEEE fp32 (no TF32), so the kernel matches the fp32 reference.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton_scratch_matmul import scratch_matmul_t

# Programs launched at most; each loops over blocks of sample rows and owns a
# 2 x BLOCK_M x W scratch buffer (1024 x 256 KiB = 256 MiB at W = 512). To be tuned
# on a GPU.
MAX_PROGRAMS = 1024

@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(tl.minimum(-x, 80.0)))  # clamped as in the C++ kernel: no inf


@triton.jit
def _box_muller(a, b):
    u1 = ((a >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08   # times 2^-24: (0, 1], the log is finite
    u2 = (b >> 8).to(tl.float32) * 5.9604644775390625e-08
    r = tl.sqrt(-2.0 * tl.log(u1))
    theta = 6.2831855 * u2                                # 2 pi rounded to fp32
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors, as csrc/cpu/philox.h.

    Written out rather than tl.philox: that one is built when triton is imported, so
    it cannot run under the interpreter if triton was imported before TRITON_INTERPRET
    was set.
    """
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _normals(seed_lo, seed_hi, row, sample, step, dk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """N(0, 1) (BLOCK_M, BLOCK_K) with the counter layout of csrc/cpu/philox.h.

    Each dim computes its group's whole Philox block and keeps its own lane: 4x the
    arithmetic of sharing it, negligible beside the MLP.
    """
    shape = (BLOCK_M, BLOCK_K)
    c0 = tl.full(shape, 0, tl.uint32) + (dk[None, :] // 4).to(tl.uint32)
    c1 = tl.full(shape, step, tl.uint32)
    c2 = tl.full(shape, 0, tl.uint32) + sample[:, None].to(tl.uint32)
    c3 = tl.full(shape, 0, tl.uint32) + row[:, None].to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, tl.full(shape, seed_lo, tl.uint32),
                                    tl.full(shape, seed_hi, tl.uint32))
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    lane = dk[None, :] % 4
    return tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))


@triton.jit
def _head_sample_loop_kernel(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs, out,
                             scratch, pairs, S, K, W, L, steps, seed_lo, seed_hi, row_offset,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    # Persistent: a fixed number of programs walk the blocks, so scratch stays bounded.
    src = scratch + tl.program_id(0) * 2 * BLOCK_M * W
    dst = src + BLOCK_M * W
    rows = tl.arange(0, BLOCK_M)[:, None] * W
    dk = tl.arange(0, BLOCK_K)
    dn = tl.arange(0, BLOCK_N)
    kmask = dk < K
    for block in range(tl.program_id(0), tl.cdiv(pairs, BLOCK_M), tl.num_programs(0)):
        pair = tl.arange(0, BLOCK_M).to(tl.int64) + block * BLOCK_M
        live = pair < pairs
        row = tl.where(live, pair // S, 0)
        sample = pair % S
        req = tl.load(request + row[:, None] * K + dk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
        noise_row = row + row_offset
        x = _normals(seed_lo, seed_hi, noise_row, sample, 0, dk, BLOCK_M, BLOCK_K) * req
        x0_prev = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for step in range(steps):
            # Input layer, BLOCK_N columns at a time: silu(W_in x + b_in + cond + temb[step]).
            for n0 in range(0, W, BLOCK_N):
                cols = n0 + dn
                nmask = cols < W
                w = tl.load(w_in + cols[None, :] * K + dk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
                pre = tl.dot(x, w, input_precision="ieee")
                pre += tl.load(b_in + cols, mask=nmask, other=0.0)[None, :]
                pre += tl.load(cond + row[:, None] * W + cols[None, :], mask=live[:, None] & nmask[None, :],
                               other=0.0)
                pre += tl.load(time_emb + step * W + cols, mask=nmask, other=0.0)[None, :]
                tl.store(src + rows + cols[None, :], _silu(pre), mask=nmask[None, :])
            tl.debug_barrier()
            # Hidden layers: dst = src + silu(src W_l^T + b_l), then swap.
            for layer in range(L - 1):
                weight = w_hidden + layer * W * W
                for n0 in range(0, W, BLOCK_N):
                    cols = n0 + dn
                    nmask = cols < W
                    acc = scratch_matmul_t(src, rows, weight, cols, nmask, W, BLOCK_M, BLOCK_N, BLOCK_R)
                    acc += tl.load(b_hidden + layer * W + cols, mask=nmask, other=0.0)[None, :]
                    res = tl.load(src + rows + cols[None, :], mask=nmask[None, :], other=0.0)
                    tl.store(dst + rows + cols[None, :], res + _silu(acc), mask=nmask[None, :])
                tl.debug_barrier()
                src, dst = dst, src
            # Output layer (the v-prediction F) and the sampler update.
            v = scratch_matmul_t(src, rows, w_out, dk, kmask, W, BLOCK_M, BLOCK_K, BLOCK_R)
            v = (v + tl.load(b_out + dk, mask=kmask, other=0.0)[None, :]) * req
            c = coefs + step * 6
            x0 = tl.load(c) * x - tl.load(c + 1) * v
            x_next = tl.load(c + 2) * x + tl.load(c + 3) * x0 + tl.load(c + 4) * x0_prev
            c_noise = tl.load(c + 5)
            if c_noise != 0.0:
                x_next += c_noise * (_normals(seed_lo, seed_hi, noise_row, sample, step + 1, dk, BLOCK_M, BLOCK_K)
                                     * req)
            x = x_next
            x0_prev = x0
            tl.debug_barrier()  # the next input layer overwrites the buffer just read
        tl.store(out + pair[:, None] * K + dk[None, :], x, mask=live[:, None] & kmask[None, :])


def head_sample_loop_triton(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs, out, seed,
                            row_offset):
    """Launch on contiguous fp32 tensors; writes `out` (N, S, K)."""
    (N, W), K = cond.shape, request.shape[1]
    S = out.shape[1]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block_m = 16 if interpret else 64  # tl.dot needs >= 16 on every dimension
    chunk = 16 if interpret else min(64, max(16, triton.next_power_of_2(W)))
    programs = min(triton.cdiv(N * S, block_m), MAX_PROGRAMS)
    if programs == 0:
        return
    scratch = torch.empty(programs, 2, block_m, W, device=cond.device, dtype=torch.float32)
    _head_sample_loop_kernel[(programs,)](
        cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs, out, scratch,
        N * S, S, K, W, w_hidden.shape[0] + 1, time_emb.shape[0], seed & 0xFFFFFFFF, seed >> 32, row_offset,
        BLOCK_M=block_m, BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_N=chunk, BLOCK_R=chunk)
