"""`densiformer bench`: how fast this machine samples the bundled model, per backend.

For each head-loop backend that runs here (and the torch reference as the baseline,
in the same run), it times `DensityEstimator.sample` on Hipparcos test stars, and
reports rows per second and the ratio to the reference. The fuller benchmarks (kernel
FLOP rates, attention, catalog throughput with memory) are the scripts in the
repository's benchmarks/ folder.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_time(fn, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls, in seconds, after one warm-up call."""
    fn()  # warm-up: lazy extension loads, caches
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def run(rows: int = 256, num_samples: int = 100, repeats: int = 3) -> dict:
    from .assets import default_model
    from .datasets import hipparcos
    from .ops import available_backends
    from .ops.backends import IMPLEMENTED

    est = default_model()
    stars = hipparcos("test").head(rows)[list(est.columns)]
    status = available_backends()
    device = est.device
    results = {}
    for backend in IMPLEMENTED["head_sample_loop"]:
        runs_here = status[backend] is True and (backend != "triton" or device.type == "cuda") \
            and (backend != "cpu" or device.type == "cpu") and (backend != "cuda" or device.type == "cuda")
        if not runs_here:
            results[backend] = {"skipped": status[backend] if status[backend] is not True else f"not for {device}"}
            continue
        seconds = best_time(lambda: est.sample(stars, request=["abs_hpmag"], num_samples=num_samples,
                                           backend=backend, progress=False), repeats)
        results[backend] = {"seconds": seconds, "rows_per_second": rows / seconds}
    baseline = results["torch"]["seconds"]
    for result in results.values():
        if "seconds" in result:
            result["speedup_vs_torch"] = baseline / result["seconds"]
    return {"benchmark": "densiformer bench", "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "rows": rows, "num_samples": num_samples, "sampler": "default", "backends": results}


def main(out: str | None, rows: int, num_samples: int) -> int:
    report = run(rows, num_samples)
    print(f"sampling the bundled model: {rows} stars x {num_samples} samples on {report['device_name']} "
          f"({report['device']}, {report['threads']} threads)")
    for backend, result in report["backends"].items():
        if "seconds" in result:
            print(f"  {backend:>6}: {result['rows_per_second']:9.0f} rows/s  "
                  f"({result['speedup_vs_torch']:.2f}x the torch reference)")
        else:
            print(f"  {backend:>6}: skipped ({result['skipped']})")
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"written to {out}")
    return 0
