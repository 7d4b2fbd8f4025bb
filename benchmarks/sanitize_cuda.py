"""Small runs of every CUDA kernel path, for compute-sanitizer (benchmarks/gpu_session.sh runs it).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_cuda.py [head|attention]

Without torch's caching allocator every tensor is its own allocation, so memcheck sees an
access past a tensor's end. head_sample_loop runs each row-tile variant the launcher
picks (fp32: 64, 32 rows; bf16: 128, 64, 32 rows), odd widths and k, tail tiles and
rows with nothing requested; masked_attention_fwd every head dim and dtype, with and
without log-sum-exp, at L = 1, 7 and 300. Each result is checked against its reference
so a run that computes garbage fails here too.
"""
from __future__ import annotations

import sys

import torch

from densiformer.diffusion.schedules import CosineSchedule, DiscreteDDPMSchedule
from densiformer.model.head import DiffusionHead
from densiformer.ops.backends import cuda_extension
from densiformer.ops.head_sample_loop import head_sample_loop_from_head
from densiformer.ops.masked_attention import masked_attention_ref

HEAD_CASES = [  # rows, samples, k, width, layers, sampler, precision
    (1, 1, 1, 48, 1, "ddim", "fp32"),
    (3, 37, 3, 200, 3, "ddpm", "fp32"),     # Wp 256: 64-row tiles
    (2, 21, 5, 512, 3, "dpmpp2m", "fp32"),  # Wp 512: 32-row tiles
    (2, 70, 3, 256, 2, "ddpm", "bf16"),     # 128-row tiles
    (3, 30, 2, 512, 3, "dpmpp2m", "bf16"),  # 64-row tiles
    (2, 9, 3, 1000, 2, "ddim", "bf16"),     # Wp 1024: 32-row tiles
]


def run_head():
    for rows, samples, k, width, layers, sampler, precision in HEAD_CASES:
        torch.manual_seed(0)
        head = DiffusionHead(8, k, width, layers, 16).cuda()
        cond = torch.randn(rows, width, device="cuda")
        request = (torch.rand(rows, k, device="cuda") < 0.6).float()
        request[:, 0] = 1
        if rows > 1:
            request[0] = 0
        schedule = DiscreteDDPMSchedule(120) if sampler == "ddpm" else CosineSchedule()
        with torch.no_grad():
            out = head_sample_loop_from_head(head, cond, request, schedule, sampler, 3, samples, 5, backend="cuda",
                                             precision=precision)
            ref = head_sample_loop_from_head(head, cond, request, schedule, sampler, 3, samples, 5, backend="torch")
        err = float((out - ref).abs().max() / ref.abs().max())
        limit = 1e-4 if precision == "fp32" else 5e-2
        print(f"head_sample_loop rows={rows} samples={samples} k={k} width={width} layers={layers} {sampler} "
              f"{precision}: relative error {err:.2e}")
        assert err < limit, err


def run_attention():
    ext = cuda_extension()
    codes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    for dtype, code in codes.items():
        for D in (8, 16, 32, 64, 128):
            for L in (1, 7, 300):
                B, H = 3, 2
                q, k, v = (torch.randn(B, H, L, D, device="cuda").to(dtype) for _ in range(3))
                mask = torch.rand(B, L, device="cuda") < 0.4
                mask[0] = True
                out = torch.empty_like(q)
                lse = torch.empty(B, H, L, device="cuda") if L != 7 else None
                ext.masked_attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
                                         0 if lse is None else lse.data_ptr(), B, H, L, D, D ** -0.5, code,
                                         torch.cuda.current_stream().cuda_stream)
                ref = masked_attention_ref(q.double(), k.double(), v.double(), mask)
                err = float((out.double() - ref).abs().max() / ref.abs().max())
                print(f"masked_attention_fwd {dtype} D={D} L={L}: relative error {err:.2e}")
                assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


if __name__ == "__main__":
    which = sys.argv[1:] or ["head", "attention"]
    if "head" in which:
        run_head()
    if "attention" in which:
        run_attention()
    torch.cuda.synchronize()
    print("all kernels ran")
