"""Event-conditioned sampling of dynamical-system windows against simulator truth.

    python benchmarks/bench_events.py [--systems lorenz63,fitzhugh-nagumo] [--num-samples N]
        [--smc-particles N] [--smc-guidance moment,dps,interval] [--prob-samples N] [--width W]
        [--train-steps N] [--threshold T] [--sampling-steps N] [--sampling-band LO,HI|none]
        [--device cuda] [--out results.json]

For each system: trains (or loads from the cache) the window denoiser, then for every
guidance method ("moment" with and without the gradient through the std, "dps",
"interval"), plain and inside the twisted SMC sampler, reports the fraction of samples
in the event, the KS statistic of C(x) among them against the simulator's conditional
(rejection from 10^6 windows), P(E) (SMC's estimate; with --prob-samples also the
probability-flow direct and importance-sampling estimates) against the simulated rate,
and the time per guided sample against unguided. See densiformer/guidance/cli.py
(`densiformer events`), which writes the per-system JSON and histogram PNG to
benchmarks/results/events/.
"""
from __future__ import annotations

import argparse

import torch

from densiformer.guidance.cli import _parse_band, run

from common import RESULTS, device_info, write_result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--systems", default="lorenz63,fitzhugh-nagumo")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--smc-particles", type=int, default=2000)
    parser.add_argument("--smc-guidance", default="moment,dps,interval")
    parser.add_argument("--prob-samples", type=int, default=0)
    parser.add_argument("--truth-windows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=None, help="denoiser width (default: the CLI's, 32)")
    parser.add_argument("--train-steps", type=int, default=None, help="denoiser training steps (default: the system's)")
    parser.add_argument("--threshold", type=float, default=None, help="event threshold (default: the system's)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="DDPM steps of every sampler (default 100)")
    parser.add_argument("--sampling-band", default=None,
                        help="log-SNR band LO,HI of 8x denser steps, or none (default: the system's)")
    parser.add_argument("--device", default="cpu", help="where the denoiser trains and samples")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    options = (("width", args.width), ("steps", args.train_steps), ("threshold", args.threshold),
               ("ddpm", args.sampling_steps), ("band", args.sampling_band))
    denoiser = {k: v for k, v in options[:2] if v is not None}
    # Runs off the defaults get their own folder, e.g. results/events/width64_threshold0.25.
    tag = "_".join(f"{k}{v}" for k, v in options if v is not None)
    results = {name: run(name, out=RESULTS / "events" / tag,
                         threshold=args.threshold, denoiser=denoiser, num_samples=args.num_samples,
                         smc_particles=args.smc_particles, smc_methods=tuple(args.smc_guidance.split(",")),
                         prob_samples=args.prob_samples, truth_windows=args.truth_windows, device=args.device,
                         sampling_band=_parse_band(args.sampling_band),
                         **({"sampling_steps": args.sampling_steps} if args.sampling_steps else {}))
               for name in args.systems.split(",")}
    write_result("events", {"device": device_info(torch.device(args.device)), "threads": torch.get_num_threads(),
                            "results": results}, args.out)


if __name__ == "__main__":
    main()
