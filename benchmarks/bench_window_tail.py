"""How much unguided mass a window denoiser puts on an event's tail, and where it loses it.

    python benchmarks/bench_window_tail.py fitzhugh-nagumo [--width 32] [--train-steps N] [--layers 8]
        [--tail-weight 10] [--num-samples 4000] [--sampler ddpm --steps 100] [--band LO,HI] [--thresholds 0.2,0.5,0.7]
        [--restart=-8,-6,-5,-4,-2,0] [--empirical 20000] [--x0-check=-6,-4,-2,0,2] [--out results.json]

SMC estimates the *model's* P(E) without bias, so the model's unguided tail sets how
close any P(E) can get to the truth. This trains (or loads from the cache) the denoiser
of `densiformer events <system>` with the given overrides, draws unguided samples and
reports, per threshold, the model's event rate against the simulator's (10^6 windows,
the events command's cached truth) with binomial standard errors (a tail-tilted
denoiser's samples weighted back by 1 / w, self-normalised), the KS statistic of the
event statistic over all windows and, per threshold, of C(x) among the samples in the
event against the simulator's conditional.

--restart LAMS finds the noise level where the model loses the event's mass: it noises
simulated windows (in the event and not, at the system's threshold) to each log-SNR lam,
runs the model's DDPM chain from there to the data, and reports the fraction that ends
in the event per starting class and the rate they imply,
P(E) P(end in E | start in E) + (1 - P(E)) P(end in E | start out of E). An exact model
gives the true P(E) from every lam; the lam where the implied rate falls is where the
denoiser misses the event's mode.

--empirical N replaces the network by the exact denoiser of N simulated windows
(diffusion.empirical.EmpiricalDenoiser, windows standardised per channel): the sampler
then runs without network error, so the gap between its event rate and the N windows'
own rate (reported as "reference") is the sampler's alone. It costs N * dim * 4 flops per
sample and step.

--x0-check LAMS compares the network's denoised estimate x0_hat with the posterior mean
under 200,000 simulated windows (their exact denoiser, seed 123), on held-out windows in
the event (at the first of --thresholds) and on windows at large, noised to each
log-SNR: the mean squared error of each (model coordinates) and the fraction of x0_hats
in the event. At the noise levels where the reference spreads its weight over many
windows, its posterior mean is close to the true one, so a model error well above the
reference's there is the network's.
--num-samples 0 skips the unguided samples. --band LO,HI samples on the schedule
re-timed so that the steps are 8x denser in that log-SNR band (the events command's
--sampling-band; default: none, the schedule's own grid).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from densiformer.diffusion import samplers
from densiformer.diffusion.empirical import EmpiricalDenoiser
from densiformer.diffusion.schedules import Schedule, alpha_sigma
from densiformer.guidance.cli import BAND_DENSITY, _parse_band, _system, constraint, sampling_schedule, simulator_truth
from densiformer.guidance.probability import weighted_estimate
from densiformer.guidance.smc import weighted_ks
from densiformer.guidance.scores import as_eps_fn
from densiformer.model.window_denoiser import WindowConfig, WindowModel, load_or_train, per_channel_standardisation

from common import RESULTS, device_info, write_result


class StartingAt(Schedule):
    """`base` from time t0 down to 0, rescaled to [0, 1]: a sampler run on it starts at base's t0."""

    def __init__(self, base: Schedule, t0: float):
        self.base, self.t0 = base, t0

    def log_snr(self, t):
        return self.base.log_snr(t * self.t0)

    def time(self, log_snr):
        return self.base.time(log_snr) / self.t0


def empirical_model(system, config: WindowConfig, n: int) -> tuple[WindowModel, np.ndarray]:
    """A WindowModel whose denoiser is the exact one of n simulated windows (seed 123, apart
    from the training and truth seeds), and those windows' event statistic."""
    windows = np.asarray(system.module.simulate(n, 123), dtype=np.float64)
    mean, basis = per_channel_standardisation(windows, config.length)
    points = torch.from_numpy((windows - mean) / np.diag(basis)).float()
    model = WindowModel(replace(config, tail_weight=1.0), EmpiricalDenoiser(points), mean, basis, 0.0)
    return model, system.fn(torch.from_numpy(windows)).numpy()


def in_event(model, system, z) -> float:
    """The fraction of windows z (model coordinates) in the system's event."""
    return float((constraint(system, system.fn(model.to_physical(z))) > 0).float().mean())


def restart_rates(model, system, p_true, lams, n_in, n_out, generator, device) -> list[dict]:
    """Per starting log-SNR: the fraction of noised simulated windows, in E or not, that the
    model's DDPM chain brings back into E, and the P(E) they imply (see the module docstring)."""
    windows = torch.from_numpy(system.module.simulate(max(200_000, 50 * n_in), 99))
    c = constraint(system, system.fn(windows))
    # The starts in the model's coordinates, once for every log-SNR.
    starts = {name: model.from_physical(x.to(device))
              for name, x in (("in", windows[c > 0][:n_in]), ("out", windows[c <= 0][:n_out]))}
    eps_fn = as_eps_fn(model.denoiser)
    rows = []
    for lam in lams:
        t0 = float(model.schedule.time(torch.tensor(lam, dtype=torch.float64)))
        steps = max(2, round(100 * t0))  # the 100-step chain's own grid spacing
        alpha, sigma = (float(v) for v in alpha_sigma(torch.tensor(lam, dtype=torch.float64)))
        ends = {}
        for name, z0 in starts.items():
            zt = alpha * z0 + sigma * torch.randn(z0.shape, generator=generator, device=device)
            with torch.no_grad():
                z = samplers.sample("ddpm", eps_fn, zt, StartingAt(model.schedule, t0), steps, generator=generator)
            ends[name] = in_event(model, system, z)
        implied = p_true * ends["in"] + (1 - p_true) * ends["out"]
        rows.append({"log_snr": lam, "steps": steps, "end_in_event_from_in": ends["in"],
                     "end_in_event_from_out": ends["out"], "implied_p": implied, "starts_in": len(starts["in"]),
                     "starts_out": len(starts["out"])})
        print(f"  from log-SNR {lam:+5.1f} ({steps:3d} steps): in E at the end {ends['in']:.3f} of "
              f"{len(starts['in'])} starts in E, {ends['out']:.4f} of {len(starts['out'])} out; implied P(E) "
              f"{implied:.4f} (truth {p_true:.4f})", flush=True)
    return rows


def x0_check(model, system, lams, n_reference, n_queries, generator, device) -> list[dict]:
    """Per log-SNR and query set (windows in E, any windows): the network's x0_hat against the
    posterior mean under n_reference simulated windows (see the module docstring)."""
    def coordinates(x):
        return model.from_physical(x.to(device))

    reference = EmpiricalDenoiser(coordinates(torch.from_numpy(system.module.simulate(n_reference, 123))))
    held_out = torch.from_numpy(system.module.simulate(max(20_000, 100 * n_queries), 99))
    inside = constraint(system, system.fn(held_out)) > 0
    queries = {"in E": coordinates(held_out[inside][:n_queries]), "any": coordinates(held_out[:n_queries])}
    rows = []
    for lam in lams:
        log_snr = torch.tensor(lam, device=device)
        alpha, sigma = (float(v) for v in alpha_sigma(log_snr.double()))
        for name, z0 in queries.items():
            zt = alpha * z0 + sigma * torch.randn(z0.shape, generator=generator, device=device)
            with torch.no_grad():
                x0_model = (zt - sigma * model.denoiser(zt, log_snr)) / alpha
            x0_reference = reference.x0_hat(zt, log_snr)
            row = {"log_snr": lam, "queries": name, "count": len(z0)}
            for who, x0 in (("model", x0_model), ("reference", x0_reference)):
                row[f"mse_{who}"] = float((x0 - z0).square().mean())
                row[f"in_event_{who}"] = in_event(model, system, x0)
            rows.append(row)
            print(f"  log-SNR {lam:+5.1f}, {len(z0)} windows {name:>4}: MSE of x0_hat model {row['mse_model']:.4f}, "
                  f"reference {row['mse_reference']:.4f} (ratio {row['mse_model'] / row['mse_reference']:.2f}); "
                  f"x0_hat in E model {row['in_event_model']:.3f}, reference {row['in_event_reference']:.3f}",
                  flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["lorenz63", "fitzhugh-nagumo"])
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="residual blocks of the denoiser (default 8)")
    parser.add_argument("--tail-weight", type=float, default=None,
                        help="the tail tilt's weight (WindowConfig.tail_weight; 1: untilted; default: the system's)")
    parser.add_argument("--train-windows", type=int, default=None, help="simulated training windows")
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--sampler", default="ddpm", help="ddpm (the events command's), ddim, dpmpp2m or heun")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--band", default=None, help="log-SNR band LO,HI of 8x denser sampling steps")
    parser.add_argument("--thresholds", default=None, help="comma-separated event thresholds (default: the system's)")
    parser.add_argument("--restart", default=None,
                        help="comma-separated starting log-SNRs for the restart diagnostic (write --restart=-8,-4)")
    parser.add_argument("--restart-windows", default="600,1500", help="simulated starts in E, out of E")
    parser.add_argument("--empirical", type=int, default=None,
                        help="use the exact denoiser of this many simulated windows instead of the network")
    parser.add_argument("--x0-check", default=None,
                        help="comma-separated log-SNRs at which to compare x0_hat with the empirical posterior mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    overrides = {k: v for k, v in (("width", args.width), ("steps", args.train_steps), ("layers", args.layers),
                                   ("train_windows", args.train_windows), ("tail_weight", args.tail_weight))
                 if v is not None}
    system = _system(args.system, None)
    config = WindowConfig(system.name, system.module.DIM, **{**system.denoiser, **overrides})
    reference = None  # the event statistic of the empirical denoiser's windows
    if args.empirical:
        model, reference = empirical_model(system, config, args.empirical)
        model.denoiser.to(args.device)
    else:
        model = load_or_train(config, system.module.simulate, device=args.device)
    truth = simulator_truth(system, 1_000_000, 7, progress=True)  # the events command's (seed 0 + 7)
    generator = torch.Generator(args.device).manual_seed(args.seed)

    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else [system.threshold]
    band = _parse_band(args.band) if args.band else None
    schedule = sampling_schedule(model.schedule, band)
    rows, ks = [], None
    if args.num_samples > 0:
        started = time.perf_counter()
        noise = torch.randn((args.num_samples, system.module.DIM), generator=generator, device=args.device)
        with torch.no_grad():
            z = samplers.sample(args.sampler, as_eps_fn(model.denoiser), noise, schedule, args.steps,
                                generator=generator)
        values = system.fn(model.to_physical(z)).cpu().numpy()
        untilt = -model.log_tilt(z).cpu().double()  # log 1 / w: zeros without a tilt
        sample_seconds = time.perf_counter() - started
        for threshold in thresholds:
            at = _system(args.system, threshold)
            c_model, c_true = constraint(at, values), constraint(at, truth)
            inside = c_model > 0
            estimate = weighted_estimate(torch.from_numpy(inside), untilt)
            p_model, p_true = float(estimate.p), float((c_true > 0).mean())
            # The shape of the model's conditional: C(x) of its samples in E against the simulator's.
            ks_in_event = (weighted_ks(c_model[inside], untilt.numpy()[inside], c_true[c_true > 0])
                           if inside.sum() > 1 else None)
            rows.append({"threshold": threshold, "p_model": p_model, "p_model_se": float(estimate.p_se),
                         "samples_in_event": int(inside.sum()),
                         "p_true": p_true, "ratio": p_model / p_true if p_true else float("nan"),
                         "ks_in_event": ks_in_event,
                         "p_reference": None if reference is None else float((constraint(at, reference) > 0).mean())})
        ks = weighted_ks(values, untilt.numpy(), truth)
        what = (f"the exact denoiser of {args.empirical} simulated windows" if args.empirical else
                f"{config.key()} ({overrides or 'defaults'}), trained in {model.seconds / 60:.1f} min")
        grid = f" (band {band})" if band else ""
        print(f"{args.system}, {what}, {args.sampler} {args.steps} steps{grid}: KS of the event statistic {ks:.3f}, "
              f"{args.num_samples} samples in {sample_seconds:.0f} s")
        print(f"{'threshold':>10}{'model':>18}{'simulator':>11}{'ratio':>8}{'KS in E':>9}"
              + (f"{'reference':>11}" if args.empirical else ""))
        for r in rows:
            ks_in = "-" if r["ks_in_event"] is None else f"{r['ks_in_event']:.3f}"
            print(f"{r['threshold']:>10.3g}{r['p_model']:>11.4f} +- {r['p_model_se']:.4f}{r['p_true']:>11.4f}"
                  f"{r['ratio']:>8.2f}{ks_in:>9}" + (f"{r['p_reference']:>11.4f}" if args.empirical else ""))
    restart = None
    if args.restart:
        n_in, n_out = (int(n) for n in args.restart_windows.split(","))
        p_true = float((constraint(system, truth) > 0).mean())
        restart = restart_rates(model, system, p_true, [float(v) for v in args.restart.split(",")], n_in, n_out,
                                generator, args.device)
    checks = None
    if args.x0_check:
        checks = x0_check(model, _system(args.system, thresholds[0]), [float(v) for v in args.x0_check.split(",")],
                          200_000, 200, generator, args.device)
    tag = "_".join([f"{k}{v}" for k, v in overrides.items()]
                   + ([f"empirical{args.empirical}"] if args.empirical else [])
                   + (["x0check"] if args.x0_check else [])
                   + ([] if (args.sampler, args.steps) == ("ddpm", 100) else [f"{args.sampler}{args.steps}"])
                   + ([f"band{band[0]:g},{band[1]:g}"] if band else []))
    write_result("window_tail", {"device": device_info(torch.device(args.device)), "system": args.system,
                                 "config": config.fields(), "config_key": config.key(), "empirical": args.empirical,
                                 "train_seconds": model.seconds, "sampler": args.sampler, "steps": args.steps,
                                 "band": None if band is None else list(band), "band_density": BAND_DENSITY,
                                 "num_samples": args.num_samples, "ks_all": ks, "rows": rows, "restart": restart,
                                 "x0_check": checks},
                 args.out or str(RESULTS / "events" / "tails" / f"{args.system}_{tag or 'defaults'}.json"))


if __name__ == "__main__":
    main()
