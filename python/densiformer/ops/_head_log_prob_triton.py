"""Triton kernel of head_log_prob (see head_log_prob.py for the meaning).

Imported only when the triton backend runs, so that importing densiformer never
imports triton, and TRITON_INTERPRET=1 set before the first call takes effect.

Each program takes blocks of BLOCK_M rows in turn and runs every RK4 step, stage and
layer on one before the next. The ODE state (x, the stage input and the RK4 sums:
BLOCK_M x K, and the log-determinant) stays in registers. Activations and the K tangent
vectors per row (dh/dx_j) are BLOCK_M x W each, too wide for registers at W = 512, so as
in _head_sample_loop_triton.py each layer reads them from a per-program scratch buffer
in global memory in BLOCK_R-wide chunks and writes BLOCK_N columns at a time to a second
buffer. For each output chunk the forward pre-activation's silu' stays in registers and
scales every tangent's chunk, so it is never stored. Matmuls are tl.dot in IEEE fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton_scratch_matmul import scratch_matmul_t

# Programs launched at most; each owns a 2 x (1 + K) x BLOCK_M x W scratch buffer.
MAX_PROGRAMS = 1024


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(tl.minimum(-x, 80.0)))  # clamped as in the C++ kernel: no inf


@triton.jit
def _evaluate(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, scratch, y, req, row, live,
              node, scale, K, W, L, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """(v = scale F (BLOCK_M, BLOCK_K), div = scale tr dF/dx (BLOCK_M,)) at state y and node `node`.

    scratch holds two slots of (1 + K) slabs (BLOCK_M, W): slab 0 the activations, slab
    1 + j the tangent dh/dx_j.
    """
    slab = BLOCK_M * W
    src = scratch
    dst = scratch + (1 + K) * slab
    rows = tl.arange(0, BLOCK_M)[:, None] * W
    dk = tl.arange(0, BLOCK_K)
    dn = tl.arange(0, BLOCK_N)
    dr = tl.arange(0, BLOCK_R)
    kmask = dk < K
    # Input layer: h = silu(W_in (y req) + b_in + cond + temb), T_j = silu'(pre) W_in[:, j] req_j.
    for n0 in range(0, W, BLOCK_N):
        cols = n0 + dn
        nmask = cols < W
        w = tl.load(w_in + cols[None, :] * K + dk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        pre = tl.dot(y * req, w, input_precision="ieee")
        pre += tl.load(b_in + cols, mask=nmask, other=0.0)[None, :]
        pre += tl.load(cond + row[:, None] * W + cols[None, :], mask=live[:, None] & nmask[None, :], other=0.0)
        pre += tl.load(time_emb + node * W + cols, mask=nmask, other=0.0)[None, :]
        s = _sigmoid(pre)
        slope = s * (1.0 + pre * (1.0 - s))
        tl.store(src + rows + cols[None, :], pre * s, mask=nmask[None, :])
        for j in range(K):
            req_j = tl.load(request + row * K + j, mask=live, other=0.0)
            w_j = tl.load(w_in + cols * K + j, mask=nmask, other=0.0)
            tl.store(src + (1 + j) * slab + rows + cols[None, :], slope * w_j[None, :] * req_j[:, None],
                     mask=nmask[None, :])
    tl.debug_barrier()
    # Hidden layers: h' = h + silu(W_l h + b_l), T_j' = T_j + silu'(pre) (W_l T_j); then swap.
    for layer in range(L - 1):
        weight = w_hidden + layer * W * W
        for n0 in range(0, W, BLOCK_N):
            cols = n0 + dn
            nmask = cols < W
            pre = scratch_matmul_t(src, rows, weight, cols, nmask, W, BLOCK_M, BLOCK_N, BLOCK_R)
            pre += tl.load(b_hidden + layer * W + cols, mask=nmask, other=0.0)[None, :]
            s = _sigmoid(pre)
            slope = s * (1.0 + pre * (1.0 - s))
            res = tl.load(src + rows + cols[None, :], mask=nmask[None, :], other=0.0)
            tl.store(dst + rows + cols[None, :], res + pre * s, mask=nmask[None, :])
            for j in range(K):
                t_src = src + (1 + j) * slab
                acc = scratch_matmul_t(t_src, rows, weight, cols, nmask, W, BLOCK_M, BLOCK_N, BLOCK_R)
                res = tl.load(t_src + rows + cols[None, :], mask=nmask[None, :], other=0.0)
                tl.store(dst + (1 + j) * slab + rows + cols[None, :], res + slope * acc, mask=nmask[None, :])
        tl.debug_barrier()
        src, dst = dst, src
    # Output layer: F = (W_out h + b_out) req, tr dF/dx = sum_j req_j W_out[j] . T_j.
    out = scratch_matmul_t(src, rows, w_out, dk, kmask, W, BLOCK_M, BLOCK_K, BLOCK_R)
    out = (out + tl.load(b_out + dk, mask=kmask, other=0.0)[None, :]) * req
    trace = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(K):
        t_src = src + (1 + j) * slab
        dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for r0 in range(0, W, BLOCK_R):
            red = r0 + dr
            rmask = red < W
            t = tl.load(t_src + rows + red[None, :], mask=rmask[None, :], other=0.0)
            w = tl.load(w_out + j * W + red, mask=rmask, other=0.0)
            dot += tl.sum(t * w[None, :], axis=1)
        trace += tl.load(request + row * K + j, mask=live, other=0.0) * dot
    tl.debug_barrier()  # the next evaluation's input layer overwrites the buffers just read
    return scale * out, scale * trace


@triton.jit
def _head_log_prob_kernel(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, scale, h, x0, out,
                          scratch, N, K, W, L, steps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # Persistent: a fixed number of programs walk the blocks, so scratch stays bounded.
    buf = scratch + tl.program_id(0) * 2 * (1 + K) * BLOCK_M * W
    dk = tl.arange(0, BLOCK_K)
    kmask = dk < K
    for block in range(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.num_programs(0)):
        index = tl.arange(0, BLOCK_M).to(tl.int64) + block * BLOCK_M
        live = index < N
        row = tl.where(live, index, 0)
        mask = live[:, None] & kmask[None, :]
        req = tl.load(request + row[:, None] * K + dk[None, :], mask=mask, other=0.0)
        x = tl.load(x0 + row[:, None] * K + dk[None, :], mask=mask, other=0.0) * req
        log_det = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for step in range(steps):
            hs = tl.load(h + step)
            # RK4 as likelihood._rk4; stage s evaluates at node 2 step + (s + 1) // 2.
            v, div = _evaluate(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, buf, x, req,
                               row, live, 2 * step, tl.load(scale + 2 * step), K, W, L, BLOCK_M, BLOCK_K,
                               BLOCK_N, BLOCK_R)
            acc_x, acc_l = v, div
            mid = 2 * step + 1
            v, div = _evaluate(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, buf,
                               x + (0.5 * hs) * v, req, row, live, mid, tl.load(scale + mid), K, W, L, BLOCK_M,
                               BLOCK_K, BLOCK_N, BLOCK_R)
            acc_x, acc_l = acc_x + 2.0 * v, acc_l + 2.0 * div
            v, div = _evaluate(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, buf,
                               x + (0.5 * hs) * v, req, row, live, mid, tl.load(scale + mid), K, W, L, BLOCK_M,
                               BLOCK_K, BLOCK_N, BLOCK_R)
            acc_x, acc_l = acc_x + 2.0 * v, acc_l + 2.0 * div
            v, div = _evaluate(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, buf,
                               x + hs * v, req, row, live, mid + 1, tl.load(scale + mid + 1), K, W, L, BLOCK_M,
                               BLOCK_K, BLOCK_N, BLOCK_R)
            acc_x, acc_l = acc_x + v, acc_l + div
            x += (hs / 6.0) * acc_x
            log_det += (hs / 6.0) * acc_l
        prior = -0.5 * tl.sum(x * x, axis=1) - 0.9189385332046727 * tl.sum(req, axis=1)  # 0.5 log(2 pi) per dim
        tl.store(out + index, prior + log_det, mask=live)


def head_log_prob_triton(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, scale, h, x0, out):
    """Launch on contiguous fp32 tensors; scale (2 steps + 1,) and h (steps,) fp32 from rk4_tables; writes out (N,)."""
    (N, W), K = cond.shape, request.shape[1]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block_m = 16 if interpret else 64  # tl.dot needs >= 16 on every dimension
    chunk = 16 if interpret else min(64, max(16, triton.next_power_of_2(W)))
    programs = min(triton.cdiv(N, block_m), MAX_PROGRAMS)
    if programs == 0:
        return
    scratch = torch.empty(programs, 2, 1 + K, block_m, W, device=cond.device, dtype=torch.float32)
    _head_log_prob_kernel[(programs,)](
        cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, scale, h, x0, out, scratch,
        N, K, W, w_hidden.shape[0] + 1, h.shape[0],
        BLOCK_M=block_m, BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_N=chunk, BLOCK_R=chunk)
