"""The fused head loop (ops.head_sample_loop) against torch eager: on the CPU, and on a GPU.

    python benchmarks/bench_head_loop.py [--threads N] [--rows 8] [--samples 1000] [--steps 20] [--out FILE]
    python benchmarks/bench_head_loop.py --device cuda [--rows 1000] [--samples 1000] [--steps 12]
                                         [--backends cuda,cuda_bf16,triton,torch,compile] [--out FILE]

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

With --device cuda it times, on the same head shapes at rows x samples sample rows
(10^6 by default): `cuda` (the CUDA C++ kernel in fp32), `cuda_bf16` (its bf16
tensor-core path), `triton`, `torch` (the reference in eager mode, fp32, TF32 off) and
`compile` (torch.compile(mode="max-autotune") of the reference; slow to compile, so only
when asked). It reports each one's time, ratio to torch eager, the head's matmul FLOP
rate and its fraction of the GPU's dense bf16 peak, and stars (rows) per second, with
the GPU's name. Issue #4's GPU targets: cuda at least 5x torch eager and 2x compile, and
at least 50% of the bf16 peak.
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

from common import best_time, device_info, write_result

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


# Dense bf16 tensor-core peak (no sparsity) by GPU name, FLOP/s, from NVIDIA's data sheets.
BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
GPU_BACKENDS = ("cuda", "cuda_bf16", "triton", "torch", "compile")


def bf16_peak(name: str):
    for key, peak in BF16_PEAK.items():  # the specific names come first
        if key in name:
            return peak
    return None


def bench_head_gpu(layers, width, rows, num_samples, steps, rounds, names):
    from densiformer.ops.head_sample_loop import head_sample_loop_ref, sampler_coefficients

    torch.manual_seed(0)
    device = torch.device("cuda")
    head = DiffusionHead(16, K, width, layers, 16).to(device).eval()
    cond = torch.randn(rows, width, device=device)
    request = torch.ones(rows, K, device=device)
    schedule = CosineSchedule()

    def fused(backend, precision="fp32"):
        return lambda: head_sample_loop_from_head(head, cond, request, schedule, SAMPLER, steps, num_samples, seed=0,
                                                  backend=backend, precision=precision)

    fns = {"cuda": fused("cuda"), "cuda_bf16": fused("cuda", "bf16"), "triton": fused("triton"),
           "torch": fused("torch")}
    if "compile" in names:
        lam, coefs = sampler_coefficients(SAMPLER, schedule, steps)
        with torch.no_grad():
            args = (cond, request, head.input.weight, head.input.bias,
                    torch.stack([layer.weight for layer in head.hidden]),
                    torch.stack([layer.bias for layer in head.hidden]), head.output.weight, head.output.bias,
                    head.time_embedding(lam[:-1].to(device=device, dtype=torch.float32)),
                    coefs.to(device=device, dtype=torch.float32))
        compiled = torch.compile(head_sample_loop_ref, mode="max-autotune")
        fns["compile"] = lambda: compiled(*args, num_samples, 0)
    fns = {name: fns[name] for name in names}
    with torch.no_grad():
        compile_start = time.perf_counter()
        seconds = {}
        for name, fn in fns.items():  # the first call compiles (torch.compile, Triton): timed apart
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
        first_call = dict(seconds)
        for name in fns:
            seconds[name] = best_time(fns[name], repeats=rounds)
    m = rows * num_samples
    flops = head_flops(layers, width, K) * m * steps
    matmul_flops = 2 * (layers - 1) * width * width * m * steps
    peak = bf16_peak(torch.cuda.get_device_name(device))
    result = {
        "layers": layers, "width": width, "k": K, "rows": rows, "num_samples": num_samples, "steps": steps,
        "sampler": SAMPLER, "seconds": seconds, "first_call_seconds": first_call,
        "setup_seconds": time.perf_counter() - compile_start,
        "tflops": {name: flops / t / 1e12 for name, t in seconds.items()},
        "speedup_vs_torch_eager": ({name: seconds["torch"] / t for name, t in seconds.items()}
                                   if "torch" in seconds else None),
        "speedup_vs_compile": ({name: seconds["compile"] / t for name, t in seconds.items()}
                               if "compile" in seconds else None),
        "bf16_peak_tflops": peak / 1e12 if peak else None,
        # Hidden-layer matmuls only, as issue #4 counts them.
        "fraction_of_bf16_peak": {name: matmul_flops / t / peak for name, t in seconds.items()} if peak else None,
        "stars_per_second": {name: rows / t for name, t in seconds.items()},
    }
    print(f"{layers} x {width}, {m} sample rows x {steps} steps: " + ", ".join(
        f"{name} {t * 1e3:.1f} ms ({result['tflops'][name]:.1f} TFLOP/s"
        + (f", {result['speedup_vs_torch_eager'][name]:.2f}x eager" if "torch" in seconds else "") + ")"
        for name, t in seconds.items()))
    return result


def main_gpu(args):
    names = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = set(names) - set(GPU_BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}; choose from {GPU_BACKENDS}")
    status = available_backends()
    for name in names:
        backend = {"cuda_bf16": "cuda", "compile": "torch"}.get(name, name)
        if status[backend] is not True:
            raise SystemExit(f"the {backend} backend is unavailable: {status[backend]}")
    torch.backends.cuda.matmul.allow_tf32 = False  # the eager reference in true fp32, as the kernels' fp32 path
    gpu = torch.cuda.get_device_name()
    results = [bench_head_gpu(layers, width, args.rows, args.samples, args.steps, args.rounds, names)
               for layers, width in HEADS]
    write_result(f"head_loop_gpu_{gpu.replace(' ', '_')}", {
        "device": device_info(torch.device("cuda")), "gpu": gpu, "backends": names,
        "targets": {"speedup_cuda_vs_torch_eager": 5.0, "speedup_cuda_vs_compile": 2.0,
                    "fraction_of_bf16_peak": 0.5},
        "heads": results}, args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=None, help="default: 8 on the CPU, 1000 on a GPU")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None, help="default: 20 on the CPU, 12 on a GPU")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="cuda,cuda_bf16,triton,torch",
                        help=f"--device cuda only: a comma-separated subset of {','.join(GPU_BACKENDS)}")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.device == "cuda":
        args.rows = 1000 if args.rows is None else args.rows
        args.steps = 12 if args.steps is None else args.steps
        return main_gpu(args)
    args.rows = 8 if args.rows is None else args.rows
    args.steps = 20 if args.steps is None else args.steps
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
