"""Correct a window denoiser's event probability with a data-vs-model classifier.

    python benchmarks/bench_density_ratio.py fitzhugh-nagumo [--model-samples 16000]
        [--data-windows 48000] [--classifier-steps 1000] [--smc-particles 1000] [--out results.json]

Draws unguided samples of the `densiformer events <system>` denoiser (trained or loaded
from the cache), simulates data windows (seed 777, apart from the training and truth
seeds), and fits two cross-fitted classifiers (guidance.density_ratio) whose logits are
log p_data / p_model. Reports, against the simulator's 10^6 windows (the events
command's cached truth):
- the model's plain Monte Carlo P(E) and the classifier-weighted one, each with its KS
  of C(x) in E against the simulator's conditional;
- moment + SMC (std stopped, as in the events table): the model's P(E) and conditional,
  and both multiplied / reweighted by the classifiers' mean log r on the particles.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from densiformer.diffusion.samplers import sample_ddpm
from densiformer.guidance.cli import _system, constraint, event, simulator_truth
from densiformer.guidance.density_ratio import (WindowClassifier, cross_fitted_log_ratios, log_ratio,
                                                reweighted_factor, reweighted_probability)
from densiformer.guidance.probability import binomial_estimate
from densiformer.guidance.smc import sample_twisted, weighted_ks
from densiformer.model.window_denoiser import WindowConfig, load_or_train

from common import RESULTS, device_info, write_result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=["lorenz63", "fitzhugh-nagumo"])
    parser.add_argument("--model-samples", type=int, default=16000)
    parser.add_argument("--data-windows", type=int, default=48000)
    parser.add_argument("--classifier-steps", type=int, default=1000)
    parser.add_argument("--smc-particles", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    system = _system(args.system, None)
    module = system.module
    config = WindowConfig(system.name, module.DIM, **system.denoiser)
    model = load_or_train(config, module.simulate)
    truth_c = constraint(system, simulator_truth(system, 1_000_000, 7, True))
    true_conditional = truth_c[truth_c > 0]

    def c_of(z):
        return constraint(system, system.fn(model.to_physical(z))).numpy()

    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, args.model_samples, 1000), desc="unguided samples", unit="batch"):
            noise = torch.randn(min(1000, args.model_samples - start), module.DIM, generator=generator)
            batches.append(sample_ddpm(model.denoiser, noise, model.schedule, 100, generator=generator))
    model_z = torch.cat(batches)
    sample_seconds = time.perf_counter() - t0
    data_z = model.from_physical(torch.from_numpy(module.simulate(args.data_windows, 777))).float()

    t0 = time.perf_counter()
    length = config.length
    log_r, classifiers = cross_fitted_log_ratios(lambda: WindowClassifier(length, module.DIM // length), data_z,
                                                 model_z, steps=args.classifier_steps, seed=args.seed)
    classifier_seconds = time.perf_counter() - t0
    c = c_of(model_z)
    inside = torch.from_numpy(c > 0)
    plain = binomial_estimate(inside)
    weighted = reweighted_probability(inside, log_r)
    ok = c > 0
    rows = [{"method": "unguided (model)", "p": float(plain.p), "p_se": float(plain.p_se),
             "ks": float(stats.ks_2samp(c[ok], true_conditional).statistic) if ok.sum() > 1 else None},
            {"method": "unguided, classifier-weighted", "p": float(weighted.p), "p_se": float(weighted.p_se),
             "ks": weighted_ks(c[ok], log_r.numpy()[ok], true_conditional) if ok.sum() > 1 else None}]

    if args.smc_particles:
        t0 = time.perf_counter()
        result = sample_twisted(model.denoiser, model.schedule, event(system).compose(model.to_physical),
                                (args.smc_particles, module.DIM), guidance="moment",
                                guidance_options={"std_grad": False}, generator=generator)
        smc_seconds = time.perf_counter() - t0
        particles = result.particles.reshape(-1, module.DIM)
        log_w = result.log_weights.reshape(-1).double()
        # Neither classifier saw these particles: their mean logit.
        particle_log_r = torch.stack([log_ratio(cl, particles) for cl in classifiers]).mean(0)
        finite = torch.isfinite(log_w)
        factor = reweighted_factor(particle_log_r[finite], log_w[finite], log_r)
        cp = c_of(particles)
        rows += [{"method": "moment + SMC (model)", "p": float(result.p), "p_se": float(result.p_se),
                  "ks": weighted_ks(cp, log_w.numpy(), true_conditional), "ess": float(result.ess),
                  "seconds": smc_seconds},
                 {"method": "moment + SMC, classifier-weighted", "p": float(result.p) * factor,
                  "p_se": float(result.p_se) * factor, "factor": factor,
                  "ks": weighted_ks(cp, (log_w + particle_log_r).numpy(), true_conditional)}]

    p_true = float((truth_c > 0).mean())
    print(f"{system.name}: P(E) truth {p_true:.4f} (10^6 simulated windows)")
    for row in rows:
        ks = "–" if row["ks"] is None else f"{row['ks']:.3f}"
        print(f"  {row['method']:<36} P(E) {row['p']:.5f} ± {row['p_se']:.5f} ({row['p'] / p_true - 1:+.0%})  "
              f"KS in E {ks}")
    write_result(f"density_ratio_{system.name}", {
        "system": system.name, "threshold": system.threshold, "p_true": p_true, "truth_windows": len(truth_c),
        "model_samples": args.model_samples, "data_windows": args.data_windows,
        "classifier_steps": args.classifier_steps, "smc_particles": args.smc_particles, "rows": rows,
        "sample_seconds": sample_seconds, "classifier_seconds": classifier_seconds,
        "config_key": config.key(), "seconds": time.perf_counter() - started,
        "device": device_info(torch.device("cpu"))},
        args.out or RESULTS / "events" / "density_ratio" / f"{system.name}.json")


if __name__ == "__main__":
    main()
