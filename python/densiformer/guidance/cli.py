"""`densiformer events`: event-conditioned sampling of dynamical-system windows, against the simulator.

For Lorenz-63 or the two-unit FitzHugh-Nagumo system it trains (or loads from the cache)
a window denoiser, draws windows conditioned on the paper's event with each guidance
method, plain and inside the twisted SMC sampler (guidance.smc), and compares with the
truth from the simulator: the event rate from at least 10^6 simulated windows and the
true conditional (the simulated windows in the event).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..diffusion.schedules import BandedSchedule

# The paper's moment method, with and without the gradient through the std, then both with
# the lookahead step (scores.py: f(x0_hat) of the blurred Tweedie mean understates E[f] for
# the convex event statistics at high noise).
LOOKAHEAD = 4.0
METHODS = (("moment", {}), ("moment", {"std_grad": False}), ("moment", {"lookahead": LOOKAHEAD}),
           ("moment", {"std_grad": False, "lookahead": LOOKAHEAD}), ("dps", {}), ("interval", {}))
# Inside the twisted sampler, moment runs without the gradient through the std: the SMC
# weights correct the proposal either way, and it is 4x cheaper.
SMC_OPTIONS = {"moment": {"std_grad": False}, "dps": {}, "interval": {}}
# The probability-flow P(E) in 180-240 dimensions: fixed-step RK4 (the adaptive solver's
# shared step size collapses on the stiffest sample of the guided field).
ODE_FIXED = {"method": "fixed", "steps": 24}
# The second Monte Carlo P(E): unguided samples of the probability-flow ODE, Heun with 50
# steps (99 evaluations, about DDPM-100's cost). The deterministic flow keeps a mode that
# coarse ancestral steps merge into the bulk: on FitzHugh-Nagumo's exact denoiser it keeps
# the whole spike mode where DDPM-100 keeps 44% (81% on the banded grid;
# benchmarks/results/events/tails/README.md). SMC runs on the DDPM chain and estimates
# that chain's P(E).
ODE_MC = ("heun", 50)
BAND_DENSITY = 8.0  # steps per unit of time inside a system's sampling band, relative to outside


@dataclass(frozen=True)
class System:
    name: str
    module: object
    fn: object  # event statistic of a physical window
    kind: str  # "below" or "above"
    threshold: float
    # WindowConfig fields; the 1-D convolution matches the simulator far better than the MLP.
    # FitzHugh-Nagumo's is tail-tilted (tail_weight): untilted, the network makes a quarter of
    # its spikes; tilted 10x, 80% of them on the banded grid, weighted back exactly.
    denoiser: dict
    # The log-SNR from which the SMC sampler twists: where the moment twist agrees with the
    # model's own p(E | x_t) (benchmarks/bench_moment_calibration.py). Lorenz-63's agrees from
    # the start; FitzHugh-Nagumo's underrates the spike 700x at log-SNR -6.55 and agrees from
    # -5.3 on (benchmarks/results/events/smc_fitzhugh-nagumo/), on both denoisers measured.
    smc_twist_from: float = -math.inf
    # The log-SNR band (lo, hi) where the samplers take BAND_DENSITY times denser steps, or
    # None: where the event is decided between two modes of the posterior, which coarse
    # ancestral steps merge. FitzHugh-Nagumo's spike is decided in [-8, -4]: on its exact
    # denoiser, DDPM-100 keeps 44% of the spike mode on the cosine grid and 81% with the band
    # (benchmarks/results/events/tails/README.md). Lorenz-63's grid loses no mass.
    sampling_band: tuple | None = None
    # Unguided samples behind each Monte Carlo P(E) row; None: num_samples. A 1.4% event
    # needs thousands for a standard error well under the 25% figure.
    mc_samples: int | None = None


def _system(name: str, threshold: float | None) -> System:
    from ..datasets import fitzhugh_nagumo, lorenz63

    if name == "lorenz63":
        return System(name, lorenz63, lorenz63.spectral_energy, "below",
                      lorenz63.DEFAULT_THRESHOLD if threshold is None else threshold,
                      {"architecture": "conv", "length": lorenz63.STEPS, "width": 32, "layers": 8, "steps": 3000,
                       "train_windows": 400_000})
    if name == "fitzhugh-nagumo":
        # 24,000 steps (71 min on 2 CPU cores): the moment sampler's KS in E is 0.152 at 3000,
        # 0.126-0.139 at 6000, 0.088-0.122 at 12,000 and 0.081-0.082 at 24,000 (two seeds); the
        # probability-flow P(E) gap stays 11-22% from 12,000 on (benchmarks/results/events/tails/README.md).
        return System(name, fitzhugh_nagumo, fitzhugh_nagumo.max_mean_voltage, "above",
                      fitzhugh_nagumo.DEFAULT_THRESHOLD if threshold is None else threshold,
                      {"architecture": "conv", "length": fitzhugh_nagumo.STEPS, "width": 32, "layers": 8,
                       "steps": 24_000, "tail_weight": 10.0}, smc_twist_from=-5.5, sampling_band=(-8.0, -4.0),
                      mc_samples=4000)
    raise ValueError(f"unknown system {name!r}; choose 'lorenz63' or 'fitzhugh-nagumo'")


def constraint(system: System, v):
    """C(x) > 0 inside the event, from the event statistic v = fn(x) in physical units."""
    return system.threshold - v if system.kind == "below" else v - system.threshold


def event(system: System):
    from .events import Above, Below

    return (Below if system.kind == "below" else Above)(system.fn, system.threshold)


def simulator_truth(system: System, n: int, seed: int, progress: bool) -> np.ndarray:
    """The event statistic fn(x) of n simulated windows (cached beside the model weights)."""
    from tqdm.auto import tqdm

    from ..model.window_denoiser import cache_dir

    path = cache_dir().parent / "truth" / f"{system.name}-{n}-{seed}.npy"
    if path.is_file():
        return np.load(path)
    chunk = 100_000
    values = []
    for start in tqdm(range(0, n, chunk), disable=not progress, desc=f"simulating {n} windows", unit="chunk"):
        windows = system.module.simulate(min(chunk, n - start), seed * 1_000_003 + start)
        values.append(system.fn(torch.from_numpy(windows)).numpy())
    values = np.concatenate(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, values)
    return values


def run(system_name: str, *, threshold=None, out=None, num_samples=500, smc_particles=1000, smc_methods=("moment",),
        smc_twist_from=None, prob_samples=0, truth_windows=1_000_000, seed=0, retrain=False, progress=True,
        denoiser=None, device="cpu", sampling_steps=100, sampling_band="system", mc_samples=None) -> dict:
    """Sample the system's event with every method and compare with the simulator; returns the table.

    denoiser: WindowConfig fields that override the system's (a smaller model for tests).
    device: where the denoiser trains and samples (the simulator's truth stays on the CPU).
    smc_twist_from: the SMC sampler's twist_from (guidance.smc.sample_twisted); None: the system's.
    sampling_steps: DDPM steps of every sampler, plain and SMC.
    sampling_band: (lo, hi), the log-SNR band where those steps are BAND_DENSITY times denser
        (diffusion.schedules.BandedSchedule); None: the schedule's own grid; "system": the system's.
    mc_samples: unguided samples of each Monte Carlo P(E) row (DDPM and the ODE); None: the
        system's, or num_samples.
    """
    from ..model.window_denoiser import WindowConfig, load_or_train
    from .probability import estimate_from_log_ratios, flow_log_ratios, weighted_estimate
    from .scores import guided_eps_fn, sample_with_event
    from .smc import sample_twisted, weighted_ks

    torch.manual_seed(seed)
    system = _system(system_name, threshold)
    if smc_twist_from is None:
        smc_twist_from = system.smc_twist_from
    if sampling_band == "system":
        sampling_band = system.sampling_band
    if mc_samples is None:
        mc_samples = system.mc_samples or num_samples
    started = time.perf_counter()
    config = WindowConfig(system.name, system.module.DIM, **{**system.denoiser, **(denoiser or {})})
    if config.tilted and prob_samples:
        raise ValueError("the probability-flow P(E) (prob_samples) does not take a tail-tilted denoiser's weights; "
                         "use the SMC rows, or a denoiser with tail_weight 1")
    model = load_or_train(config, system.module.simulate, retrain=retrain, progress=progress, device=device)
    trained = time.perf_counter() - started
    truth_values = simulator_truth(system, truth_windows, seed + 7, progress)
    truth_c = constraint(system, truth_values)
    inside = truth_c > 0
    p_true = inside.mean()
    p_true_se = np.sqrt(p_true * (1 - p_true) / len(truth_c))
    true_conditional = truth_c[inside]

    event_z = event(system).compose(model.to_physical)
    denoiser, schedule = model.denoiser, model.schedule
    # The samplers walk the banded grid; the probability-flow ODE keeps the model's schedule.
    sampler_schedule = sampling_schedule(schedule, sampling_band)
    k = system.module.DIM
    generator = torch.Generator(device).manual_seed(seed)

    def satisfied_and_ks(z, untilt=True):
        """C(x), log weights, the fraction in E and the KS in E. A tail-tilted model's samples
        weigh 1 / w (untilt); SMC's come out of the sampler already weighted back."""
        c = constraint(system, system.fn(model.to_physical(z))).cpu().numpy()
        log_w = -model.log_tilt(z).cpu().double().numpy() if untilt else np.zeros(len(c))
        ok = c > 0
        ks = weighted_ks(c[ok], log_w[ok], true_conditional) if ok.sum() > 1 else None  # too few in E
        return c, log_w, float(ok.mean()), ks

    def draw(guidance, options, n, sampler="ddpm", steps=sampling_steps, schedule=sampler_schedule):
        """n samples and the seconds per sample, drawn in batches of at most num_samples so
        that every row's time is per sample at the same batch size (a CPU's per-sample time
        grows with the batch once it outgrows the caches)."""
        t0 = time.perf_counter()
        z = torch.cat([sample_with_event(denoiser, schedule, event_z, (min(num_samples, n - start), k),
                                         guidance=guidance, guidance_options=options, sampler=sampler, steps=steps,
                                         generator=generator, device=device)
                       for start in range(0, n, num_samples)])
        if z.is_cuda:
            torch.cuda.synchronize()
        return z, (time.perf_counter() - t0) / n

    def monte_carlo_row(label, z, seconds):
        """P(E) from unguided samples, a tilted model's weighted back by 1 / w (equal
        weights give the binomial estimate); "satisfied" is that same weighted fraction."""
        c, log_w, _, ks = satisfied_and_ks(z)
        mc = weighted_estimate(torch.from_numpy(c > 0), torch.from_numpy(log_w))
        return {"method": label, "satisfied": float(mc.p), "ks": ks, "p": float(mc.p),
                "p_se": float(mc.p_se), "p_estimator": "monte carlo", "ms_per_sample": 1e3 * seconds}

    draw("moment", None, 2)  # warm-up, so that the first timed method does not pay for it
    unguided, t_plain = draw(None, None, mc_samples)
    untilt = -model.log_tilt(unguided)  # log 1 / w: zeros without a tilt
    # E_model[1 / w] of the DDPM chain: turns SMC's E_model[1_E / w] into P(E) under the untilted model.
    normaliser = float(untilt.exp().mean())
    normaliser_se = float(untilt.exp().std() / len(untilt) ** 0.5)
    ode_sampler, ode_steps = ODE_MC
    rows = [monte_carlo_row("unguided", unguided, t_plain),
            monte_carlo_row(f"unguided ODE ({ode_sampler} {ode_steps})",
                            *draw(None, None, mc_samples, ode_sampler, ode_steps, schedule))]
    histograms = {}
    for guidance, options in METHODS:
        label = _label(guidance, options)
        z, t_guided = draw(guidance, options, num_samples)
        c, log_w, satisfied, ks = satisfied_and_ks(z)
        histograms[label] = (c, log_w, satisfied)
        row = {"method": label, "satisfied": satisfied, "ks": ks, "p": float("nan"), "p_se": float("nan"),
               "ms_per_sample": 1e3 * t_guided}
        if prob_samples:
            # P(E) through the probability-flow ODE: prob_samples draws of the guided ODE
            # with their log q, and the unguided ODE for log p (Hutchinson's divergence at
            # these dimensions, probability.HUTCHINSON_PROBES probes).
            noise = torch.randn((prob_samples, k), generator=generator, device=device)
            guided = guided_eps_fn(denoiser, event_z, guidance, options)
            _, ratio, ok = flow_log_ratios(denoiser, guided, noise, schedule, event_z, ODE_FIXED)
            est = estimate_from_log_ratios(ratio, ok, "direct")
            imp = estimate_from_log_ratios(ratio, ok, "importance")
            row.update(p=float(est.p), p_se=float(est.p_se), p_estimator="ODE direct", p_importance=float(imp.p),
                       p_importance_se=float(imp.p_se), ode_failed=int((ok & ~torch.isfinite(ratio)).sum()))
        rows.append(row)
        if progress:
            print(f"  {label}: done", flush=True)
    for guidance in smc_methods if smc_particles else ():
        t0 = time.perf_counter()
        result = sample_twisted(denoiser, sampler_schedule, event_z, (smc_particles, k), guidance=guidance,
                                guidance_options=SMC_OPTIONS[guidance], twist_from=smc_twist_from,
                                steps=sampling_steps, generator=generator, device=device,
                                log_weight=(lambda x: -model.log_tilt(x)) if model.tilt else None)
        if result.x.is_cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / smc_particles
        label = f"{guidance} + SMC"
        _, _, satisfied, ks_resampled = satisfied_and_ks(result.x, untilt=False)
        # The KS from the weighted particles before the last resampling: the same
        # distribution as the resampled ones, without the resampling's duplicates.
        c = constraint(system, system.fn(model.to_physical(result.particles))).cpu().numpy()
        log_w = result.log_weights.cpu().numpy()
        histograms[label] = (c, log_w, satisfied)
        ks = weighted_ks(c, log_w, true_conditional) if np.isfinite(log_w).any() else None
        p = float(result.p) / normaliser
        p_se = float(np.hypot(float(result.p_se) / normaliser, p * normaliser_se / normaliser))
        rows.append({"method": label, "satisfied": satisfied, "ks": ks, "ks_resampled": ks_resampled,
                     "p": p, "p_se": p_se, "p_estimator": "SMC",
                     "ms_per_sample": 1e3 * seconds, "distinct": int(result.distinct.sum()),
                     "particles": smc_particles, "ess": float(result.ess), "min_ess": result.min_ess,
                     "resamplings": result.resamplings,
                     "twist_from": None if smc_twist_from == -math.inf else smc_twist_from})
        if progress:
            print(f"  {label}: done", flush=True)
    for row in rows:
        row["time_vs_unguided"] = row["ms_per_sample"] / rows[0]["ms_per_sample"]
    result = {"system": system.name, "threshold": system.threshold, "p_true": float(p_true),
              "p_true_se": float(p_true_se), "truth_windows": len(truth_c), "num_samples": num_samples,
              "smc_particles": smc_particles, "prob_samples": prob_samples, "mc_samples": mc_samples,
              "sampling_steps": sampling_steps,
              "sampling_band": None if sampling_band is None else [float(v) for v in sampling_band],
              "tilt_normaliser": normaliser if model.tilt else None,
              "train_seconds": model.seconds, "setup_seconds": trained, "config": model.config.fields(),
              "config_key": model.config.key(),
              "rows": rows, "seconds": time.perf_counter() - started}
    print(format_table(result))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"events_{system.name}.json").write_text(json.dumps(result, indent=2))
        plot_histograms(histograms, true_conditional, out / f"events_{system.name}.png", system)
        print(f"table and histogram written to {out}")
    return result


def _label(guidance: str, options: dict) -> str:
    details = ([] if options.get("std_grad", True) else ["std stopped"]) + \
              ([f"lookahead {options['lookahead']:g}"] if options.get("lookahead") else [])
    return guidance + (f" ({', '.join(details)})" if details else "")


def sampling_schedule(schedule, band):
    """The schedule the samplers walk: `schedule` itself, or with BAND_DENSITY times denser
    steps in the log-SNR band (lo, hi)."""
    return schedule if band is None else BandedSchedule(schedule, *band, BAND_DENSITY)


def format_table(result: dict) -> str:
    band = result["sampling_band"]
    width = max(24, 2 + max(len(r["method"]) for r in result["rows"]))
    lines = [f"{result['system']}: P(E) true = {result['p_true']:.4g} +- {result['p_true_se']:.2g} "
             f"({result['truth_windows']} simulated windows); {result['num_samples']} samples per plain method, "
             f"{result['mc_samples']} per Monte Carlo row, "
             f"{result['smc_particles']} particles per SMC run, {result['sampling_steps']} DDPM steps"
             + ("" if band is None else f" ({BAND_DENSITY:g}x denser in log-SNR [{band[0]:g}, {band[1]:g}])")
             + ("" if result["tilt_normaliser"] is None else
                f"; the denoiser learnt a tail-tilted density (x{result['config']['tail_weight']:g} beyond the "
                f"{result['config']['tail_quantile']:g} Mahalanobis quantile), weighted back by 1 / w "
                f"(E_model[1 / w] = {result['tilt_normaliser']:.3f})"),
             f"{'method':<{width}}{'satisfied':>10}{'KS':>7}{'P(E)':>24} {'(how)':<12}{'P(E) importance':>24}"
             f"{'distinct':>9}{'ESS':>7}{'ms/sample':>11}{'x unguided':>11}"]
    for r in result["rows"]:
        imp = f"{r['p_importance']:.4g} +- {r['p_importance_se']:.2g}" if "p_importance" in r else "-"
        p = f"{r['p']:.4g} +- {r['p_se']:.2g}" if np.isfinite(r["p"]) else "-"
        distinct = f"{r['distinct']}" if "distinct" in r else "-"
        ess = f"{r['ess']:.0f}" if "ess" in r else "-"
        ks = "-" if r["ks"] is None else f"{r['ks']:.3f}"
        lines.append(f"{r['method']:<{width}}{r['satisfied']:>10.3f}{ks:>7}{p:>24} {r.get('p_estimator', ''):<12}"
                     f"{imp:>24}{distinct:>9}{ess:>7}{r['ms_per_sample']:>11.2f}{r['time_vs_unguided']:>11.1f}")
    lines.append("KS: C(x) of the samples in the event against the simulator's conditional (unguided: its own "
                 "samples in the event; SMC: its weighted particles before the last resampling); distinct: SMC "
                 "particles with different ancestors at the start; ESS: effective size of those weights.")
    return "\n".join(lines)


def plot_histograms(histograms: dict, true_conditional: np.ndarray, path: Path, system: System):
    """C(x) of each method's samples in the event against the simulator's conditional:
    plain guidance on the left, inside the twisted SMC sampler on the right (its weighted
    particles). histograms: label -> (C(x), log weights, the table's fraction in E)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    bins = np.linspace(0, np.quantile(true_conditional, 0.995), 40)
    panels = (("plain guidance", lambda label: "SMC" not in label), ("twisted SMC", lambda label: "SMC" in label))
    for i, (title, keep) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.hist(true_conditional, bins=bins, density=True, color="0.75", label="simulator, in event")
        for label, (c, log_w, satisfied) in histograms.items():
            shown = (c > 0) & (c <= bins[-1]) & np.isfinite(log_w)
            if keep(label) and shown.sum() > 1:  # the samples in the event, as in the KS column
                weights = np.exp(log_w - log_w[np.isfinite(log_w)].max())  # 0 where log_w is -inf
                ax.hist(c[shown], bins=bins, weights=weights[shown], density=True, histtype="step", linewidth=1.4,
                        label=f"{label} ({satisfied:.0%} in E)")
        ax.set_xlabel("C(x)  (> 0: in the event)")
        ax.set_ylabel("density")
        ax.set_title(f"{system.name}: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_events_parser(subparsers):
    p = subparsers.add_parser("events", help="event-conditioned sampling of Lorenz-63 / FitzHugh-Nagumo windows")
    p.add_argument("system", choices=["lorenz63", "fitzhugh-nagumo"])
    p.add_argument("--event", default=None, choices=["low-energy", "spike"],
                   help="the event: low-energy (Lorenz-63: C = T - mean_k>=1 |rfft(x_1)_k|) or spike "
                        "(FitzHugh-Nagumo: C = max_t mean voltage - T); default: the system's")
    p.add_argument("--threshold", type=float, default=None, help="T (default: the system's DEFAULT_THRESHOLD)")
    p.add_argument("--out", default=None, help="directory for the JSON table and the histogram PNG")
    p.add_argument("--num-samples", type=int, default=500, help="samples per plain guidance method")
    p.add_argument("--smc-particles", type=int, default=1000,
                   help="particles of the twisted SMC sampler (a multiple of 4; 0: skip it)")
    p.add_argument("--smc-twist-from", type=float, default=None, metavar="LOG_SNR",
                   help="start the SMC twist (and guidance) at this log-SNR, with unguided steps before; "
                        "--smc-twist-from=-inf: from the start (default: the system's, where its twist is "
                        "calibrated: -inf for lorenz63, -5.5 for fitzhugh-nagumo, see "
                        "benchmarks/results/events/smc_fitzhugh-nagumo)")
    p.add_argument("--smc-guidance", default="moment",
                   help="comma-separated guidance methods to run inside the SMC sampler (default: moment)")
    # Off by default: the guided probability-flow ODE in 180-240 dimensions takes many
    # minutes on a CPU; the SMC rows give P(E) at the cost of sampling.
    p.add_argument("--prob-samples", type=int, default=0,
                   help="guided samples per probability-flow P(E) estimate (default 0: skip it; slow in 180+ "
                        "dimensions)")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="unguided samples of each Monte Carlo P(E) row, DDPM and probability-flow ODE (default: "
                        "--num-samples for lorenz63, 4000 for fitzhugh-nagumo)")
    p.add_argument("--truth-windows", type=int, default=1_000_000)
    p.add_argument("--sampling-steps", type=int, default=100,
                   help="DDPM steps of every sampler, plain and SMC (default 100; the time per sample grows with "
                        "them)")
    p.add_argument("--sampling-band", default=None, metavar="LO,HI",
                   help=f"take the sampling steps {BAND_DENSITY:g}x denser where the log-SNR is in [LO, HI], "
                        "where the event is decided; 'none': the schedule's own grid (default: the system's: "
                        "none for lorenz63, -8,-4 for fitzhugh-nagumo, see benchmarks/results/events/tails)")
    p.add_argument("--width", type=int, default=None,
                   help="channels of the convolutional denoiser (default 32; 64 matches the simulator's tails "
                        "better at about twice the training and sampling time, see benchmarks/results/events)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps of the denoiser (default: 3000 for Lorenz-63, 24000 for FitzHugh-Nagumo)")
    p.add_argument("--layers", type=int, default=None, help="residual blocks of the denoiser (default 8)")
    p.add_argument("--device", default="cpu",
                   help="where the denoiser trains and samples: cpu (default), cuda, cuda:1, ... (a GPU makes "
                        "wider, longer-trained denoisers affordable; the cache is shared with the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train the denoiser again, ignoring the cache")
    p.set_defaults(func=cmd_events)
    return p


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device here (torch sees {torch.cuda.device_count()})")
    return device


def _parse_band(text: str | None):
    """--sampling-band: None -> "system", "none" -> None, "LO,HI" -> (lo, hi)."""
    if text is None:
        return "system"
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--sampling-band must be LO,HI (two log-SNRs) or none, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"--sampling-band needs finite LO < HI, got {text!r}")
    return lo, hi


def cmd_events(args) -> int:
    expected = {"lorenz63": "low-energy", "fitzhugh-nagumo": "spike"}[args.system]
    if args.event not in (None, expected):
        raise ValueError(f"{args.system} has the event {expected!r}, not {args.event!r}")
    if args.sampling_steps < 2:
        raise ValueError(f"--sampling-steps must be at least 2, got {args.sampling_steps}")
    if args.num_samples < 2 or not (args.prob_samples == 0 or 2 <= args.prob_samples <= args.num_samples):
        raise ValueError("need --num-samples >= --prob-samples >= 2, or --prob-samples 0")
    if args.mc_samples is not None and args.mc_samples < 2:
        raise ValueError(f"--mc-samples must be at least 2, got {args.mc_samples}")
    from .smc import GROUPS

    if args.smc_particles and (args.smc_particles < 2 * GROUPS or args.smc_particles % GROUPS):
        raise ValueError(f"--smc-particles must be 0 or a multiple of {GROUPS} of at least {2 * GROUPS}")
    smc_methods = tuple(m.strip() for m in args.smc_guidance.split(",") if m.strip())
    unknown = set(smc_methods) - set(SMC_OPTIONS)
    if unknown:
        raise ValueError(f"--smc-guidance: unknown method(s) {sorted(unknown)}; choose from {sorted(SMC_OPTIONS)}")
    if (args.width is not None and (args.width < 8 or args.width % 8)) or \
            (args.train_steps is not None and args.train_steps < 1) or (args.layers is not None and args.layers < 1):
        raise ValueError("--width must be a positive multiple of 8 (GroupNorm's 8 groups), --train-steps and "
                         "--layers positive")
    if args.smc_twist_from is not None and math.isnan(args.smc_twist_from):
        raise ValueError("--smc-twist-from must be a number (a log-SNR)")
    sampling_band = _parse_band(args.sampling_band)
    device = _check_device(args.device)
    denoiser = {key: value for key, value in (("width", args.width), ("steps", args.train_steps),
                                              ("layers", args.layers)) if value is not None}
    run(args.system, threshold=args.threshold, out=args.out, num_samples=args.num_samples,
        smc_particles=args.smc_particles, smc_methods=smc_methods,
        smc_twist_from=args.smc_twist_from, prob_samples=args.prob_samples,
        truth_windows=args.truth_windows, seed=args.seed, retrain=args.retrain, denoiser=denoiser, device=device,
        sampling_steps=args.sampling_steps, sampling_band=sampling_band, mc_samples=args.mc_samples)
    return 0
