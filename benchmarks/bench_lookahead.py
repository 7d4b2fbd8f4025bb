"""The moment guidance's `lookahead` step against its in-event rate and conditional, on a dynamical system.

    python benchmarks/bench_lookahead.py [lorenz63|fitzhugh-nagumo] [--steps 0,3,4,5,6,8,12] [--samples 300]
        [--std-grad] [--width 32] [--train-steps 3000] [--layers 8] [--seed 0] [--out results.json]

For each lookahead step (0 is the paper's method) it draws `--samples` windows with
moment guidance (100-step DDPM, as `densiformer events` does) from the cached window
denoiser and reports the fraction in the event, the KS statistic of C(x) of those in the
event against the simulator's conditional (10^6 windows), and the time per sample as a
ratio to the step-0 run. A short step leaves f at the blurred Tweedie mean (the Jensen
gap that the option closes); a long one reaches a noise level where x1 is that same
blurred mean and the denoiser returns it.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import stats

from common import device_info, write_result
from densiformer.guidance.cli import _system, constraint, event, simulator_truth
from densiformer.guidance.scores import sample_with_event
from densiformer.model.window_denoiser import WindowConfig, load_or_train

TRUTH_WINDOWS, TRUTH_SEED = 1_000_000, 7  # the truth `densiformer events` caches (seed + 7)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("system", nargs="?", default="lorenz63", choices=["lorenz63", "fitzhugh-nagumo"])
    parser.add_argument("--steps", default="0,3,4,5,6,8,12", help="lookahead steps in log-SNR")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--std-grad", action="store_true", help="differentiate through the std (the paper's default)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    system = _system(args.system, None)
    overrides = {k: v for k, v in (("width", args.width), ("steps", args.train_steps), ("layers", args.layers))
                 if v is not None}
    config = WindowConfig(system.name, system.module.DIM, **{**system.denoiser, **overrides})
    model = load_or_train(config, system.module.simulate)
    truth = constraint(system, simulator_truth(system, TRUTH_WINDOWS, TRUTH_SEED, True))
    true_conditional = truth[truth > 0]
    event_z = event(system).compose(model.to_physical)

    rows = []
    for step in (float(v) for v in args.steps.split(",")):
        generator = torch.Generator().manual_seed(args.seed)  # the same noise for every step
        started = time.perf_counter()
        z = sample_with_event(model.denoiser, model.schedule, event_z, (args.samples, system.module.DIM),
                              guidance="moment", guidance_options={"std_grad": args.std_grad, "lookahead": step},
                              generator=generator)
        seconds = (time.perf_counter() - started) / args.samples
        c = constraint(system, system.fn(model.to_physical(z))).numpy()
        inside = c > 0
        ks = float(stats.ks_2samp(c[inside], true_conditional).statistic) if inside.sum() > 1 else None
        rows.append({"lookahead": step, "satisfied": float(inside.mean()), "ks": ks, "ms_per_sample": 1e3 * seconds,
                     "satisfied_se": float(np.sqrt(inside.mean() * (1 - inside.mean()) / args.samples))})
        rows[-1]["time_vs_first"] = rows[-1]["ms_per_sample"] / rows[0]["ms_per_sample"]
        print(f"lookahead {step:4.1f}: in E {rows[-1]['satisfied']:.3f} +- {rows[-1]['satisfied_se']:.3f}, KS "
              f"{ks if ks is None else round(ks, 3)}, {rows[-1]['time_vs_first']:.1f}x the time of the first", flush=True)
    write_result(f"lookahead_{system.name}", {
        "device": device_info(torch.device("cpu")), "config": model.config.fields(), "config_key": model.config.key(),
        "threshold": system.threshold, "samples": args.samples, "std_grad": args.std_grad, "seed": args.seed,
        "rows": rows}, args.out)


if __name__ == "__main__":
    main()
