"""Log-density accuracy against an analytic conditional density, as training grows.

The 2-D Gaussian mixture of tests/test_density_accuracy.py (its parameters m, w, r
are the model's inputs): for each (rows, epochs) it trains a model, evaluates
log_prob at 1,000 held-out draws, and reports against the true log density:
- mean error, mean(log q - log p): minus a Monte Carlo estimate of KL(p || q);
- mean and median absolute error.

    python benchmarks/bench_density_accuracy.py --runs 100000:30 200000:30 400000:30
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from common import device_info, write_result  # noqa: E402
from test_density_accuracy import CONFIG, simulate, true_log_prob  # noqa: E402

import densiformer as dfm  # noqa: E402


def measure(rows: int, epochs: int, test_rows: int = 1000) -> dict:
    started = time.perf_counter()
    est = dfm.DensityEstimator(["m", "w", "r"], ["x1", "x2"], dfm.ModelConfig(**CONFIG))
    est.fit(simulate(rows, seed=0), epochs=epochs, batch_size=512, seed=0, progress=False)
    seconds = time.perf_counter() - started
    test = simulate(test_rows, seed=1)
    x = np.stack([test["x1"], test["x2"]], 1)
    error = est.log_prob(x, {k: test[k] for k in ("m", "w", "r")}, request=["x1", "x2"]) \
        - true_log_prob(x, test["m"], test["w"], test["r"])
    return {"rows": rows, "epochs": epochs, "train_seconds": seconds, "mean_error": float(error.mean()),
            "mean_error_stderr": float(error.std(ddof=1) / np.sqrt(len(error))),
            "mean_abs_error": float(np.abs(error).mean()), "median_abs_error": float(np.median(np.abs(error))),
            "val_loss": est.history.val_loss[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["40000:15", "100000:30", "200000:30"],
                        help="rows:epochs of each training run")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/density_accuracy.json)")
    args = parser.parse_args()
    runs = []
    for spec in args.runs:
        rows, epochs = (int(v) for v in spec.split(":"))
        runs.append(measure(rows, epochs))
        r = runs[-1]
        print(f"{rows} rows x {epochs} epochs ({r['train_seconds']:.0f} s): mean error {r['mean_error']:+.3f} "
              f"+- {r['mean_error_stderr']:.3f}, mean |error| {r['mean_abs_error']:.3f}, "
              f"median |error| {r['median_abs_error']:.3f} nats", flush=True)
    write_result("density_accuracy", {"environment": device_info(torch.device("cpu")), "config": CONFIG,
                                      "runs": runs}, args.out)


if __name__ == "__main__":
    main()
