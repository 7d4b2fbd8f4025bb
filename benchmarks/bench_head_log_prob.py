"""The fused log density op (ops.head_log_prob) against the generic path, on the CPU.

    python benchmarks/bench_head_log_prob.py [--threads N] [--rows 192] [--steps 8] [--rounds 3] [--out FILE]

For a 3 x 256 head and the paper-sized head (5 layers x 512), both with k = 3 labels, it
times log p of `rows` points by RK4 with `steps` steps (4 x steps network evaluations),
in the same run, with:
- `cpu`: the fused C++ kernel (forward-mode tangents carry the exact divergence);
- `torch`: head_log_prob_ref in torch eager, the same math (the op's reference);
- `generic`: likelihood.log_prob(method="fixed") with DiffusionHead.forward as its
  eps_fn, one forward pass and k VJPs per evaluation: how DensityEstimator.log_prob ran
  before the fused op.
It reports each one's time, the ratios cpu/generic and cpu/torch, and the kernel's FLOP
rate counting the head's matmuls (forward and k tangents), beside torch.mm's rate on the
same hidden-layer shape measured in the same run. The machine may be shared: all
timings take turns (best of --rounds), and the load average at the start and the thread
count are recorded.
"""
from __future__ import annotations

import argparse
import os

import torch

from densiformer.diffusion import likelihood
from densiformer.diffusion.schedules import CosineSchedule
from densiformer.model.head import DiffusionHead
from densiformer.ops import available_backends
from densiformer.ops.backends import cpu_extension
from densiformer.ops.head_log_prob import head_log_prob_from_head

from bench_head_loop import interleaved_best
from common import device_info, write_result

HEADS = [(3, 256), (5, 512)]  # (layers, width)
K = 3


def matmul_flops(layers, width, k):
    """Multiply-add FLOPs of one evaluation for one row: the forward pass and k tangents."""
    return 2 * ((k * width + (layers - 1) * width * width + width * k)
                + k * ((layers - 1) * width * width + width))


def bench_head(layers, width, rows, steps, rounds):
    torch.manual_seed(0)
    head = DiffusionHead(16, K, width, layers, 16).eval().requires_grad_(False)
    cond = torch.randn(rows, width)
    request = torch.ones(rows, K)
    x0 = torch.randn(rows, K)
    schedule = CosineSchedule()

    def fused(backend):
        return lambda: head_log_prob_from_head(head, cond, request, x0, schedule, steps, backend)

    def generic():
        eps_fn = lambda x, lam: head(x, lam, cond, request)  # noqa: E731
        return likelihood.log_prob(eps_fn, x0, schedule, method="fixed", steps=steps)

    evaluations = 4 * steps
    a, b = torch.randn((1 + K) * rows, width), torch.randn(width, width)
    gemms = evaluations * (layers - 1)  # as many hidden-layer FLOPs as the fused op does
    fns = {"cpu": fused("cpu"), "torch": fused("torch"), "generic": generic,
           "gemm": lambda: [torch.mm(a, b) for _ in range(gemms)]}
    with torch.no_grad():
        ours, reference = fns["cpu"](), generic()
        seconds = interleaved_best(fns, rounds)
    flops = matmul_flops(layers, width, K) * rows * evaluations
    gemm_rate = 2 * width * width * a.shape[0] * gemms / seconds["gemm"]
    result = {
        "layers": layers, "width": width, "k": K, "rows": rows, "steps": steps, "evaluations": evaluations,
        "seconds": seconds,
        "speedup_cpu_vs_generic": seconds["generic"] / seconds["cpu"],
        "speedup_cpu_vs_torch": seconds["torch"] / seconds["cpu"],
        "gflops": {name: flops / seconds[name] / 1e9 for name in ("cpu", "torch", "generic")},
        "torch_gemm_gflops": gemm_rate / 1e9,
        "cpu_fraction_of_gemm": flops / seconds["cpu"] / gemm_rate,
        "rows_per_second_cpu": rows / seconds["cpu"],
        "max_relative_difference_cpu_vs_generic": float(((ours - reference).abs() / reference.abs()).max()),
    }
    print(f"{layers} x {width}, {rows} rows x {evaluations} evaluations: cpu {seconds['cpu'] * 1e3:.0f} ms, "
          f"torch {seconds['torch'] * 1e3:.0f} ms, generic {seconds['generic'] * 1e3:.0f} ms; "
          f"cpu/generic {result['speedup_cpu_vs_generic']:.2f}x, cpu/torch {result['speedup_cpu_vs_torch']:.2f}x; "
          f"cpu {result['gflops']['cpu']:.1f} GFLOP/s vs torch.mm {result['torch_gemm_gflops']:.1f}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--note", default="", help="recorded in the JSON, e.g. that the machine was shared")
    parser.add_argument("--out")
    args = parser.parse_args()
    status = available_backends()["cpu"]
    if status is not True:
        raise SystemExit(f"the cpu backend is unavailable: {status}")
    torch.set_num_threads(args.threads)  # the C++ kernel takes torch's thread count too
    load = os.getloadavg()
    results = [bench_head(layers, width, args.rows, args.steps, args.rounds) for layers, width in HEADS]
    write_result(f"head_log_prob_cpu_{args.threads}thread", {
        "device": device_info(torch.device("cpu")), "threads": args.threads,
        "cpu_isa": cpu_extension().head_sample_loop_isa(), "load_average_at_start": load, "note": args.note,
        "heads": results}, args.out)


if __name__ == "__main__":
    main()
