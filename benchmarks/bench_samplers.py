"""Few-step samplers against the paper's 120-step DDPM: quality (C2ST) and speed.

    python benchmarks/bench_samplers.py [--model DIR] [--out results.json]

Quality: for each sampler and step count, one joint sample of the requested labels per
held-out Hipparcos star is compared with one 120-step DDPM sample per star by a
classifier two-sample test on (star inputs, sample). Accuracy <= 0.55 counts as
indistinguishable. The quality-matched step count of a sampler is the smallest that
passes.

Speed: samples per second at 1000 joint samples of 3 labels per star, against the
paper's way of working on the same model: one label per call, 120-step ancestral DDPM,
and the context projection recomputed at every step, in torch eager.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import densiformer as dfm
from densiformer.diffusion import samplers
from densiformer.estimator import DEFAULT_SAMPLER, DEFAULT_STEPS, PAPER_DDPM_SCHEDULE
from densiformer.two_sample import c2st

from common import RESULTS, best_time, device_info, write_result

LABELS = ["abs_hpmag", "b_v", "v_i"]
# Two kinds of request. Without the parallax the posteriors are broad (and bimodal for
# red stars). With it, abs_hpmag = hpmag + 5 log10(plx / 100) is nearly deterministic:
# posteriors a few hundredths of a magnitude wide, the hardest case for few steps.
REQUESTS = {"no_parallax": ["hpmag", "pmra", "pmdec"],
            "with_parallax": ["hpmag", "plx", "e_plx", "pmra", "pmdec"]}
STEP_GRID = {"ddim": [20, 50], "heun": [5, 8, 12], "dpmpp2m": [8, 12, 20]}
PASS = 0.55


def load_model(path):
    if path:
        return dfm.DensityEstimator.load(path)
    from densiformer.assets import default_model

    return default_model()


def held_out_stars(inputs, n, seed=0):
    test = dfm.datasets.hipparcos("test")
    test = test[test[LABELS].notna().all(axis=1)]
    return test.sample(n, random_state=seed)[inputs]


def one_sample_per_star(est, stars, sampler, steps, seed):
    return est.sample(stars, request=LABELS, num_samples=1, sampler=sampler, steps=steps, seed=seed)[:, 0]


def quality_sweep(est, inputs, n_stars):
    """C2ST of each sampler against 120-step DDPM on (star inputs, joint sample) pairs.

    The reference and the candidate sample disjoint random halves of the stars: if one
    star's inputs appeared in both classes, cross-validation would reward memorising
    stars and push accuracies below 0.5.
    """
    stars = held_out_stars(inputs, 2 * n_stars)
    features = est.schema.normalize(stars.to_numpy(np.float64), inputs)
    features = np.nan_to_num(features)  # missing inputs -> the median, for the classifier only
    ref_stars, cand_stars = stars.iloc[:n_stars], stars.iloc[n_stars:]
    ref_x, cand_x = features[:n_stars], features[n_stars:]

    def pairs(subset, x, sampler, steps, seed):
        return np.hstack([x, est.schema.normalize(one_sample_per_star(est, subset, sampler, steps, seed), LABELS)])

    reference = pairs(ref_stars, ref_x, "ddpm", 120, seed=1)
    rows = []
    for name, grid in [("ddpm", [120])] + list(STEP_GRID.items()):
        for steps in grid:
            acc = c2st(reference, pairs(cand_stars, cand_x, name, steps, seed=2))
            rows.append({"sampler": name, "steps": steps, "nfe": samplers.nfe(name, steps), "c2st": acc})
            print(f"{name:7s} {steps:3d} steps  nfe {samplers.nfe(name, steps):3d}  c2st {acc:.3f}"
                  + ("  (the reference sampler itself)" if name == "ddpm" else ""), flush=True)
    return rows


def matched_steps(rows):
    """Smallest step count per sampler whose C2ST passes on every request."""
    best = {}
    for name, grid in STEP_GRID.items():
        for steps in grid:
            scores = [r["c2st"] for r in rows if r["sampler"] == name and r["steps"] == steps]
            if scores and max(scores) <= PASS:
                best[name] = steps
                break
    return best


def paper_way(est, values, num_samples, seed=0):
    """One label per call, 120-step DDPM, context projection recomputed every step."""
    model = est.model
    out = []
    for label in LABELS:
        j = est.targets.index(label)
        req = torch.zeros(len(values), len(est.targets))
        req[:, j] = 1
        batch = torch.as_tensor(values)
        with torch.no_grad():
            context = model.context(batch, model.observed_inputs(batch, req))
            context = context.repeat_interleave(num_samples, 0)  # one row per sample
            req_rows = req.repeat_interleave(num_samples, 0)

            def eps_fn(x, log_snr):
                cond = model.head.condition(context, req_rows)  # recomputed at every step
                full = x.new_zeros(len(x), len(est.targets))
                full[:, j] = x[:, 0]
                return model(full, log_snr, cond, req_rows)[:, j:j + 1]

            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(len(context), 1, generator=generator)
            out.append(samplers.sample_ddpm(eps_fn, noise, PAPER_DDPM_SCHEDULE, 120, generator=generator))
    return torch.cat(out, 1)


def speed(est, best, n_stars, num_samples):
    stars = held_out_stars(REQUESTS["with_parallax"], n_stars, seed=1)
    values = est._normalized(stars)
    results = {}
    t_paper = best_time(lambda: paper_way(est, values, num_samples), repeats=1)
    results["paper_way"] = {"seconds": t_paper, "samples_per_s": n_stars * num_samples / t_paper}
    print(f"paper way (3 x 1 label, ddpm 120, projection per step): {t_paper:.2f} s")
    configs = [("ddpm", 120)] + sorted(best.items())
    default = (DEFAULT_SAMPLER, DEFAULT_STEPS[DEFAULT_SAMPLER])
    configs += [default] if default not in configs else []
    for name, steps in configs:
        t = best_time(lambda: est.sample(stars, request=LABELS, num_samples=num_samples, sampler=name,
                                         steps=steps, progress=False), repeats=2)
        results[f"{name}@{steps}"] = {"seconds": t, "samples_per_s": n_stars * num_samples / t,
                                      "speedup_vs_paper_way": t_paper / t}
        print(f"{name:7s}@{steps:3d}: {t:.2f} s, {n_stars * num_samples / t:,.0f} joint samples/s, "
              f"{t_paper / t:.1f}x the paper's way")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the bundled Hipparcos model)")
    parser.add_argument("--quality-stars", type=int, default=1500)
    parser.add_argument("--speed-stars", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--speed-only", action="store_true",
                        help="re-time only, taking the quality results from the existing results file")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    est = load_model(args.model)
    started = time.perf_counter()
    if args.speed_only:
        rows = json.loads((Path(args.out) if args.out else RESULTS / "samplers.json").read_text())["quality"]
    else:
        rows = []
        for request, inputs in REQUESTS.items():
            print(f"request: {LABELS} given {inputs}")
            rows += [{"request": request, **row} for row in quality_sweep(est, inputs, args.quality_stars)]
    best = matched_steps(rows)
    print(f"quality-matched steps (C2ST <= {PASS}): {best}")
    timing = speed(est, best, args.speed_stars, args.num_samples)
    write_result("samplers", {"device": device_info(est.device), "labels": LABELS, "requests": REQUESTS,
                              "c2st_pass": PASS,
                              "quality": rows, "matched_steps": best, "speed": timing,
                              "num_samples": args.num_samples, "speed_stars": args.speed_stars,
                              "seconds": time.perf_counter() - started}, args.out)


if __name__ == "__main__":
    main()
