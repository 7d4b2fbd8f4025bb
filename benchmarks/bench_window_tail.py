"""How much unguided mass a window denoiser puts on an event's tail, against the simulator.

    python benchmarks/bench_window_tail.py fitzhugh-nagumo [--width 32] [--train-steps 3000]
        [--tail-weight 10] [--num-samples 4000] [--thresholds 0.2,0.5,0.7] [--out results.json]

SMC estimates the *model's* P(E) without bias, so the model's unguided tail sets how
close any P(E) can get to the truth. This trains (or loads from the cache) the denoiser
of `densiformer events <system>` with the given overrides, draws unguided DDPM-100
samples and reports, per threshold, the model's event rate against the simulator's
(10^6 windows, the events command's cached truth), with binomial standard errors (for a
tail-tilted denoiser, its samples weighted back by 1 / w, self-normalised), and
the KS statistic of the event statistic over all windows and, per threshold, of C(x)
among the samples in the event against the simulator's conditional.
"""
from __future__ import annotations

import argparse
import time

import torch
from densiformer.guidance.cli import _system, constraint, simulator_truth, weighted_ks
from densiformer.guidance.probability import weighted_estimate
from densiformer.guidance.scores import sample_with_event
from densiformer.model.window_denoiser import WindowConfig, load_or_train

from common import RESULTS, device_info, write_result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["lorenz63", "fitzhugh-nagumo"])
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--tail-weight", type=float, default=None,
                        help="tail tilt: weight of the training windows beyond the tail quantile (see WindowConfig)")
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--thresholds", default=None, help="comma-separated event thresholds (default: the system's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    overrides = {k: v for k, v in (("width", args.width), ("steps", args.train_steps),
                                   ("tail_weight", args.tail_weight)) if v is not None}
    system = _system(args.system, None)
    config = WindowConfig(system.name, system.module.DIM, **{**system.denoiser, **overrides})
    model = load_or_train(config, system.module.simulate, device=args.device)
    truth = simulator_truth(system, 1_000_000, 7, progress=True)  # the events command's (seed 0 + 7)

    started = time.perf_counter()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    z = sample_with_event(model.denoiser, model.schedule, None, (args.num_samples, system.module.DIM),
                          guidance=None, generator=generator, device=args.device)
    values = system.fn(model.to_physical(z)).cpu().numpy()
    untilt = -model.log_tilt(z)  # a tail-tilted model's samples weigh 1 / w(z); zeros without a tilt
    weights = untilt.exp().cpu().numpy()
    sample_seconds = time.perf_counter() - started

    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else [system.threshold]
    rows = []
    for threshold in thresholds:
        at = _system(args.system, threshold)
        c_model, c_true = constraint(at, values), constraint(at, truth)
        model_p = weighted_estimate(torch.from_numpy(c_model > 0), untilt.cpu())
        p_model, p_true = float(model_p.p), float((c_true > 0).mean())
        # The shape of the model's conditional: C(x) of its samples in E against the simulator's.
        inside = c_model > 0
        ks_in_event = weighted_ks(c_model[inside], c_true[c_true > 0], weights[inside]) if inside.sum() > 1 else None
        rows.append({"threshold": threshold, "p_model": p_model, "p_model_se": float(model_p.p_se),
                     "samples_in_event": int(inside.sum()), "p_true": p_true,
                     "ratio": p_model / p_true if p_true else float("nan"), "ks_in_event": ks_in_event})
    ks = weighted_ks(values, truth, weights)
    print(f"{args.system} {config.key()} ({overrides or 'defaults'}): KS of the event statistic {ks:.3f}, "
          f"{args.num_samples} samples in {sample_seconds:.0f} s; training took {model.seconds / 60:.1f} min")
    print(f"{'threshold':>10}{'model':>18}{'simulator':>11}{'ratio':>8}{'KS in E':>9}")
    for r in rows:
        ks_in = "-" if r["ks_in_event"] is None else f"{r['ks_in_event']:.3f}"
        print(f"{r['threshold']:>10.3g}{r['p_model']:>11.4f} +- {r['p_model_se']:.4f}{r['p_true']:>11.4f}"
              f"{r['ratio']:>8.2f}{ks_in:>9}")
    tag = "_".join(f"{k}{v}" for k, v in overrides.items()) or "defaults"
    write_result("window_tail", {"device": device_info(torch.device(args.device)), "system": args.system,
                                 "config": config.fields(), "config_key": config.key(),
                                 "train_seconds": model.seconds, "num_samples": args.num_samples,
                                 "ks_all": ks, "rows": rows},
                 args.out or str(RESULTS / "events" / "tails" / f"{args.system}_{tag}.json"))


if __name__ == "__main__":
    main()
