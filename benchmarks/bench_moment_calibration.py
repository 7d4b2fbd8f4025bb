"""How well the moment guidance's log p(E | x_t) is calibrated along the sampler's noise levels.

    python benchmarks/bench_moment_calibration.py [lorenz63|fitzhugh-nagumo] [--width 32] [--train-steps N]
        [--layers 8] [--starts 30] [--continuations 64] [--levels 5,10,15,20,30] [--lookahead 4]
        [--starts-in-event] [--out results.json]

The guidance can steer a trajectory only while its p(E | x_t) is right. This noises
simulated windows to the log-SNR of steps `--levels` of the 100-step DDPM grid that
`densiformer events` samples on, and compares, per level, three values of p(E | x_t):
  - the paper's linearisation, Phi(C(f(x0_hat)) / s);
  - the same with f stated at the denoiser's estimate one DDIM step of `--lookahead` in
    log-SNR closer to the data (guidance option "lookahead");
  - the model's own, from `--continuations` unguided DDPM runs from each x_t to the data.
Both estimates are read from guidance.scores.guidance_terms, the code the sampler runs.
It reports the mean absolute difference from the model's own, their means, and the median
Jensen gap f(x0_hat) - E[f(x0) | x_t] (the continuations' mean).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from bench_window_tail import StartingAt
from common import device_info, write_result
from densiformer.diffusion import samplers
from densiformer.diffusion.schedules import alpha_sigma
from densiformer.guidance.cli import _system, constraint, event
from densiformer.guidance.scores import guidance_terms
from densiformer.model.window_denoiser import WindowConfig, load_or_train

GRID_STEPS = 100  # the DDPM grid of guidance.scores.sample_with_event


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("system", nargs="?", default="lorenz63", choices=["lorenz63", "fitzhugh-nagumo"])
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--starts", type=int, default=30, help="noised windows per level")
    parser.add_argument("--continuations", type=int, default=64, help="unguided runs to the data per noised window")
    parser.add_argument("--levels", default="5,10,15,20,30", help="steps of the 100-step DDPM grid")
    parser.add_argument("--lookahead", type=float, default=4.0, help="log-SNR step of the lookahead estimate")
    parser.add_argument("--starts-in-event", action="store_true",
                        help="noise simulated windows in the event only (for a rare event, whose generic windows "
                             "all have p(E | x_t) near 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    system = _system(args.system, None)
    overrides = {k: v for k, v in (("width", args.width), ("steps", args.train_steps), ("layers", args.layers))
                 if v is not None}
    config = WindowConfig(system.name, system.module.DIM, **{**system.denoiser, **overrides})
    model = load_or_train(config, system.module.simulate)
    event_z = event(system).compose(model.to_physical)
    generator = torch.Generator().manual_seed(args.seed)
    estimates = {"linearised": guidance_terms(model.denoiser, event_z, "moment", {"std_grad": False}),
                 "lookahead": guidance_terms(model.denoiser, event_z, "moment",
                                             {"std_grad": False, "lookahead": args.lookahead})}
    lams = samplers.log_snr_grid(model.schedule, GRID_STEPS, "time")
    if args.starts_in_event:
        candidates = torch.from_numpy(system.module.simulate(400 * args.starts, 4242)).float()
        candidates = candidates[constraint(system, system.fn(candidates)) > 0][:args.starts]
        if len(candidates) < args.starts:
            raise SystemExit(f"only {len(candidates)} of {400 * args.starts} simulated windows are in the event")
        windows = model.from_physical(candidates)
    else:
        windows = model.from_physical(torch.from_numpy(system.module.simulate(args.starts, 4242)).float())

    rows = []
    for level in (int(v) for v in args.levels.split(",")):
        lam = lams[level]
        alpha, sigma = (float(v) for v in alpha_sigma(lam))
        noise = torch.randn(windows.shape, generator=generator)
        xt = alpha * windows + sigma * noise
        lam_net = lam.to(torch.float32)
        p_hat = {name: terms(xt, lam_net)[2].exp().numpy() for name, terms in estimates.items()}
        with torch.no_grad():
            x0 = (xt - sigma * model.denoiser(xt, lam_net)) / alpha
            f_at_mean = system.fn(model.to_physical(x0)).numpy()
            # The grid from this level on is the whole grid of the base schedule started at its time.
            t0 = (GRID_STEPS - level) / GRID_STEPS
            ends = samplers.sample("ddpm", model.denoiser, xt.repeat_interleave(args.continuations, 0),
                                   StartingAt(model.schedule, t0), GRID_STEPS - level, generator=generator)
            f_end = system.fn(model.to_physical(ends)).numpy().reshape(args.starts, args.continuations)
        p_model = (constraint(system, f_end) > 0).mean(1)
        row = {"step": level, "log_snr": float(lam), "p_model": float(p_model.mean()),
               "jensen_gap_median": float(np.median(f_at_mean - f_end.mean(1)))}
        for name, p in p_hat.items():
            row[f"p_{name}"] = float(p.mean())
            row[f"abs_error_{name}"] = float(np.abs(p - p_model).mean())
        rows.append(row)
        print(f"step {level:3d} log-SNR {float(lam):6.2f}: p(E|x_t) model {row['p_model']:.3f}, linearised "
              f"{row['p_linearised']:.3f} (|err| {row['abs_error_linearised']:.3f}), lookahead {row['p_lookahead']:.3f} "
              f"(|err| {row['abs_error_lookahead']:.3f}); f(x0_hat) - E[f] {row['jensen_gap_median']:+.3f}", flush=True)
    write_result(f"moment_calibration_{system.name}", {
        "device": device_info(torch.device("cpu")), "config": model.config.fields(), "config_key": model.config.key(),
        "threshold": system.threshold, "starts": args.starts, "continuations": args.continuations,
        "lookahead": args.lookahead, "starts_in_event": args.starts_in_event, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
