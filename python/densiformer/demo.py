"""The main job on the bundled default: infer over the Hipparcos test split, then plot.

The parallax is withheld from the catalogue the demo writes, so the model has to infer
each star's absolute magnitude M_Hp from its apparent magnitude, colours and proper
motion; the catalogue's own M_Hp (from the parallax) is kept for comparison only (it
is a requested target, so the model never sees it as an input).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# What the demo catalogue holds: photometry and proper motions, no parallax.
CATALOG_COLUMNS = ["hip", "hpmag", "b_v", "v_i", "pmra", "pmdec", "abs_hpmag"]
COLOUR_INPUTS = ["b_v", "v_i"]
REQUEST = ["abs_hpmag"]
GIANT_LIMIT = 3.5        # M_Hp between the red-giant and red-dwarf branches
HR_LIMITS = dict(xlim=(-0.4, 2.2), ylim=(13, -4))


def write_catalog(path: Path) -> int:
    from .datasets import hipparcos

    test = hipparcos("test")[CATALOG_COLUMNS]
    test.to_parquet(path, row_group_size=4096)
    return len(test)


def hr_diagram(catalog, posteriors, path: Path) -> None:
    """Catalogue HR diagram (M_Hp from good parallaxes) next to the posterior medians."""
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True, sharey=True)
    good = catalog[np.isfinite(catalog.abs_hpmag)]
    left.hexbin(good.b_v, good.abs_hpmag, gridsize=90, bins="log", mincnt=1, cmap="viridis",
                extent=(*HR_LIMITS["xlim"], -4, 13))
    left.set(title=f"Catalogue: M_Hp from the parallax ({len(good):,} stars)", xlabel="B-V", ylabel="M_Hp",
             **HR_LIMITS)
    right.hexbin(catalog.b_v, posteriors.abs_hpmag_median, gridsize=90, bins="log", mincnt=1, cmap="viridis",
                 extent=(*HR_LIMITS["xlim"], -4, 13))
    right.set(title=f"densiformer: posterior median, parallax withheld ({len(posteriors):,} stars)",
              xlabel="B-V", **HR_LIMITS)
    fig.savefig(path, dpi=120)


def pick_red_star(catalog, colour_est, num_samples: int = 400):
    """The red star whose colours alone leave giant and dwarf most evenly likely."""
    red = catalog[(catalog.b_v > 1.2) & np.isfinite(catalog.abs_hpmag)]
    draws = colour_est.sample(red[COLOUR_INPUTS], request=REQUEST, num_samples=num_samples, seed=0)[..., 0]
    giant = (draws < GIANT_LIMIT).mean(axis=1)
    return red.iloc[int(np.argmax(np.minimum(giant, 1 - giant)))]


def red_star_posterior(est, colour_est, star, path: Path, num_samples: int = 20_000) -> dict:
    """p(M_Hp | colours) (the colour-only model) and p(M_Hp | colours, Hp, proper motion)."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(-4, 13, 120)
    fractions = {}
    for label, model, columns, colour in (
            ("given B-V, V-I", colour_est, COLOUR_INPUTS, "tab:orange"),
            ("given B-V, V-I, Hp, proper motion", est, ["hpmag", *COLOUR_INPUTS, "pmra", "pmdec"], "tab:blue")):
        draws = model.sample({c: [star[c]] for c in columns}, request=REQUEST, num_samples=num_samples, seed=1)
        draws = draws[0, :, 0]
        fractions[label] = float((draws < GIANT_LIMIT).mean())
        ax.hist(draws, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=colour,
                label=f"{label}: P(giant) = {fractions[label]:.2f}")
    ax.axvline(star["abs_hpmag"], color="k", lw=1.5, label=f"catalogue M_Hp = {star['abs_hpmag']:.2f}")
    ax.axvline(GIANT_LIMIT, color="0.5", lw=1, ls=":")
    # Log scale: red dwarfs are about 8% of red stars, so their branch is a low second peak.
    ax.set_yscale("log")
    ax.set_ylim(1e-3, None)
    ax.set(xlabel="M_Hp", ylabel="posterior density (log scale)",
           title=f"HIP {int(star['hip'])}, B-V = {star['b_v']:.2f}: giant or dwarf?")
    ax.text(0.02, 0.97, "giants", transform=ax.transAxes, va="top")
    ax.text(0.98, 0.97, "dwarfs", transform=ax.transAxes, va="top", ha="right")
    ax.legend(fontsize="small", loc="lower center")
    fig.savefig(path, dpi=120)
    return fractions


def run(est, out: Path, num_samples: int = 200, progress: bool = True) -> dict:
    """Write the demo's catalogue, posteriors and plots under `out`; return their paths."""
    import pyarrow.parquet as pq

    from .assets import colour_model
    from .diagnostics import calibration_plot
    from .inference import infer

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"catalog": out / "hipparcos_test.parquet", "posteriors": out / "posteriors.parquet",
             "hr_diagram": out / "hr_diagram.png", "red_star": out / "red_star_posterior.png",
             "calibration": out / "calibration.png"}
    rows = write_catalog(paths["catalog"])
    shutil.rmtree(paths["posteriors"], ignore_errors=True)  # a demo run starts afresh
    print(f"inferring M_Hp for {rows:,} Hipparcos test stars, parallax withheld, {num_samples} samples each ...")
    result = infer(paths["catalog"], est, paths["posteriors"], request=REQUEST, num_samples=num_samples,
                   id_column="hip", samples=True, progress=progress)
    catalog = pq.read_table(paths["catalog"]).to_pandas()
    posteriors = pq.read_table(paths["posteriors"]).to_pandas()
    if not (posteriors.hip.to_numpy() == catalog.hip.to_numpy()).all():
        raise RuntimeError("the posteriors are not in catalogue order")

    hr_diagram(catalog, posteriors, paths["hr_diagram"])
    # The bundled default smooths the red-dwarf branch away; the colour-only model keeps it.
    colour_est = colour_model(est.device)
    star = pick_red_star(catalog, colour_est)
    fractions = red_star_posterior(est, colour_est, star, paths["red_star"])
    known = np.isfinite(catalog.abs_hpmag.to_numpy())
    samples = np.stack(posteriors.abs_hpmag_samples.to_numpy())[known][..., None]
    calibration_plot(samples, catalog.abs_hpmag.to_numpy()[known, None], REQUEST, path=paths["calibration"])
    inside = np.abs((samples[..., 0] < catalog.abs_hpmag.to_numpy()[known, None]).mean(1) - 0.5) <= 0.34
    return {"paths": paths, "rows": rows, "infer_seconds": result.seconds, "star": star, "fractions": fractions,
            "coverage68": float(inside.mean()), "seconds": time.perf_counter() - started}
