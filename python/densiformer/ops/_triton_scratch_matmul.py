"""The tile product the head kernels share: a scratch slab times a weight's rows.

The head MLP's activations (BLOCK_M x W) live in a per-program scratch buffer in global
memory (see _head_sample_loop_triton.py), so every layer reduces over W in BLOCK_R-wide
chunks read back from it. Imported only by the Triton kernels, never by densiformer itself.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scratch_matmul_t(src, rows, weight, outs, out_mask, W, BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """src[rows, :W] @ weight[outs, :W]^T as a (BLOCK_M, BLOCK_OUT) fp32 tile.

    src: the slab's base pointer, rows: its row offsets (BLOCK_M, 1) in elements; weight:
    row-major (out, W); outs (BLOCK_OUT,) the weight rows to take, out_mask which are real.
    IEEE fp32 dots (no TF32), so the kernels match their fp32 references.
    """
    dr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    for r0 in range(0, W, BLOCK_R):
        red = r0 + dr
        rmask = red < W
        a = tl.load(src + rows + red[None, :], mask=rmask[None, :], other=0.0)
        w = tl.load(weight + outs[None, :] * W + red[:, None], mask=rmask[:, None] & out_mask[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision="ieee")
    return acc
