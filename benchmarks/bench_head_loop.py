"""The fused head loop (ops.head_sample_loop) on the CPU against torch eager, and against GEMM.

    python benchmarks/bench_head_loop.py [--threads N] [--rows 8] [--samples 1000] [--steps 20] [--out FILE]

For the paper-sized head (5 layers x 512) and a 3 x 256 head, both with k = 3 labels, it
times sampling rows x samples x steps with:
- `cpu`: the fused C++ kernel;
- `torch`: head_sample_loop_ref in torch eager, the same math (the op's reference);
- `generic`: the generic sampler with DiffusionHead.forward as its eps_fn, the way
  DensityEstimator.sample ran before the fused loop.
It also times torch.mm doing the hidden layers' matmuls, on (rows * samples) x W times
W x W and on the kernel's 96-row tiles, in the same run, and reports the kernel's FLOP
rate (the head's matmul FLOPs only) as a fraction of each. Issue #4's CPU targets: cpu
at least 1.5x torch, and at least 80% of torch's GEMM rate. The machine may be shared:
all timings take turns (best of --rounds), and the load average at the start and the
thread count are recorded.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from densiformer.diffusion import samplers
from densiformer.diffusion.schedules import CosineSchedule
from densiformer.model.head import DiffusionHead
from densiformer.ops import available_backends
from densiformer.ops.backends import cpu_extension
from densiformer.ops.head_sample_loop import head_sample_loop_from_head, philox_normal

from common import device_info, write_result

HEADS = [(5, 512), (3, 256)]  # (layers, width)
K = 3
TILE_ROWS = 96  # the C++ kernel's tile (csrc/cpu/head_sample_loop.cpp, kTileRows)
SAMPLER = "dpmpp2m"


def head_flops(layers, width, k):
    """Multiply-add FLOPs of one network evaluation for one sample row."""
    return 2 * (k * width + (layers - 1) * width * width + width * k)


def interleaved_best(fns: dict, rounds: int) -> dict:
    """Best wall time of each callable over `rounds` rounds that run them in turn.

    Taking turns, rather than timing one callable `rounds` times and then the next,
    spreads the load of a shared machine over all of them alike.
    """
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench_head(layers, width, rows, num_samples, steps, rounds):
    torch.manual_seed(0)
    head = DiffusionHead(16, K, width, layers, 16).eval()
    cond = torch.randn(rows, width)
    request = torch.ones(rows, K)
    schedule = CosineSchedule()

    def fused(backend):
        return lambda: head_sample_loop_from_head(head, cond, request, schedule, SAMPLER, steps, num_samples,
                                                  seed=0, backend=backend)

    def generic():
        x = philox_normal(0, rows, num_samples, K, 0)
        eps_fn = lambda x, lam: head(x, lam, cond[:, None, :], request[:, None, :])  # noqa: E731
        return samplers.sample(SAMPLER, eps_fn, x, schedule, steps)

    # torch.mm on the hidden layers' shapes, as many FLOPs as the loop's hidden layers do.
    m = rows * num_samples
    a, b, tile = torch.randn(m, width), torch.randn(width, width), torch.randn(TILE_ROWS, width)
    gemms = steps * (layers - 1)
    tile_calls = gemms * m // TILE_ROWS
    gemm_flops = 2 * width * width * m * gemms
    fns = {"cpu": fused("cpu"), "torch": fused("torch"), "generic": generic,
           "gemm_rows_x_samples": lambda: [torch.mm(a, b) for _ in range(gemms)],
           "gemm_tile": lambda: [torch.mm(tile, b) for _ in range(tile_calls)]}
    with torch.no_grad():
        seconds = interleaved_best(fns, rounds)
    flops = head_flops(layers, width, K) * m * steps
    gemm = {name: gemm_flops / seconds[f"gemm_{name}"] for name in ("rows_x_samples", "tile")}
    loop = ("cpu", "torch", "generic")
    result = {
        "layers": layers, "width": width, "k": K, "rows": rows, "num_samples": num_samples, "steps": steps,
        "sampler": SAMPLER, "seconds": seconds,
        "gflops": {name: flops / seconds[name] / 1e9 for name in loop},
        "torch_gemm_gflops": {name: rate / 1e9 for name, rate in gemm.items()},
        "speedup_cpu_vs_torch": seconds["torch"] / seconds["cpu"],
        "speedup_cpu_vs_generic": seconds["generic"] / seconds["cpu"],
        "cpu_fraction_of_gemm": {name: flops / seconds["cpu"] / rate for name, rate in gemm.items()},
        "stars_per_second_cpu": rows / seconds["cpu"],
    }
    print(f"{layers} x {width}: cpu {result['gflops']['cpu']:.1f} GFLOP/s, torch {result['gflops']['torch']:.1f}, "
          f"generic {result['gflops']['generic']:.1f}; torch GEMM {result['torch_gemm_gflops']['rows_x_samples']:.1f} "
          f"({m} rows), {result['torch_gemm_gflops']['tile']:.1f} ({TILE_ROWS} rows); "
          f"cpu/torch {result['speedup_cpu_vs_torch']:.2f}x, "
          f"cpu/GEMM {result['cpu_fraction_of_gemm']['rows_x_samples']:.2f}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    status = available_backends()["cpu"]
    if status is not True:
        raise SystemExit(f"the cpu backend is unavailable: {status}")
    torch.set_num_threads(args.threads)  # the C++ kernel takes torch's thread count too
    load = os.getloadavg()
    results = [bench_head(layers, width, args.rows, args.samples, args.steps, args.rounds)
               for layers, width in HEADS]
    write_result(f"head_loop_cpu_{args.threads}threads", {
        "device": device_info(torch.device("cpu")), "threads": args.threads,
        "cpu_isa": cpu_extension().head_sample_loop_isa(), "load_average_at_start": load,
        "targets": {"speedup_cpu_vs_torch": 1.5, "cpu_fraction_of_gemm": 0.8}, "heads": results}, args.out)


if __name__ == "__main__":
    main()
