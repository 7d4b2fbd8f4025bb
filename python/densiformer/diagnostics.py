"""Calibration diagnostics of posterior samples against known true values: PIT, coverage, plots.

A calibrated model's truth is a draw from its own predictive distribution, so the
probability integral transform (PIT) of the truth is uniform on (0, 1), and the
truth falls in the central L interval in a fraction L of the rows.

The plots draw on `matplotlib.figure.Figure` objects made directly, never through
pyplot: no backend is chosen or switched (an interactive session keeps its own),
nothing needs a display, and figures are freed when dropped. Jupyter shows a
returned Figure; `fig.savefig` writes it anywhere.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def _check(samples, truth):
    samples = np.asarray(samples, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if samples.ndim != 3 or truth.shape != (samples.shape[0], samples.shape[2]):
        raise ValueError(f"samples must be (n_rows, num_samples, k) and truth (n_rows, k); "
                         f"got {samples.shape} and {truth.shape}")
    return samples, truth


def pit(samples, truth, seed: int = 0) -> np.ndarray:
    """Probability integral transform of each truth under its row's samples: (n_rows, k).

    samples (n_rows, num_samples, k), truth (n_rows, k). The randomised PIT
    (n_below + V * (n_equal + 1)) / (num_samples + 1), V ~ U(0, 1) from
    `np.random.default_rng(seed)`: the fraction of samples below the truth, up to
    O(1/num_samples), with ties (and the truth's own rank among the samples) split at
    random, so that a calibrated model gives exactly uniform values at any
    num_samples, discrete samples included. NaN truths give NaN.
    """
    samples, truth = _check(samples, truth)
    below = (samples < truth[:, None]).sum(axis=1)
    equal = (samples == truth[:, None]).sum(axis=1)
    v = np.random.default_rng(seed).uniform(size=truth.shape)
    u = (below + v * (equal + 1)) / (samples.shape[1] + 1)
    return np.where(np.isnan(truth), np.nan, u)


def coverage(samples, truth, levels=(0.68, 0.95)) -> dict[float, np.ndarray]:
    """Fraction of rows whose truth lies in its row's central interval, per level: {level: (k,)}.

    The interval of level L runs between the (1-L)/2 and (1+L)/2 quantiles of the
    row's samples (numpy's default interpolation, as in `summary.summarize_samples`,
    so 0.68 and 0.95 check its q16-q84 and q025-q975 columns). Rows with a NaN truth
    are left out. For a calibrated model the expected value is L (num_samples - 1) /
    (num_samples + 1), a bias of -2L/(num_samples + 1), and the standard error is
    `coverage_stderr(L, n)` over the n rows with a truth.
    """
    samples, truth = _check(samples, truth)
    levels = [float(level) for level in levels]
    bounds = np.quantile(samples, [q for L in levels for q in ((1 - L) / 2, (1 + L) / 2)], axis=1)
    known = ~np.isnan(truth)
    n = known.sum(axis=0)
    result = {}
    for i, level in enumerate(levels):
        inside = (truth >= bounds[2 * i]) & (truth <= bounds[2 * i + 1])
        with np.errstate(invalid="ignore", divide="ignore"):
            result[level] = inside.sum(axis=0) / n
    return result


def coverage_stderr(level, n):
    """Binomial standard error of a calibrated model's observed coverage at `level` over n rows."""
    return np.sqrt(level * (1 - level) / np.asarray(n, dtype=np.float64))


def calibration_plot(samples, truth, names, path=None, ax=None) -> Figure:
    """PIT histograms (left) and expected vs observed coverage (right), one line per column.

    The shaded bands are +-2 sigma binomial errors for a calibrated model with the
    fewest rows of any column. The coverage curve uses the PIT: the truth lies in
    the central L interval exactly when |PIT - 1/2| <= L/2. ax: optionally two Axes
    to draw into (left, right); path: optionally a PNG file to write.
    """
    u = pit(samples, truth)
    names = list(names)
    if len(names) != u.shape[1]:
        raise ValueError(f"{len(names)} names for {u.shape[1]} columns")
    if ax is None:
        fig = Figure(figsize=(10.5, 4.5), layout="constrained")
        ax = fig.subplots(1, 2, width_ratios=[1.4, 1])
    left, right = ax
    fig = left.figure
    n = int(np.isfinite(u).sum(axis=0).min())

    bins = int(np.clip(n // 25, 5, 20))  # about 25 or more expected per bin
    sigma = np.sqrt((1 - 1 / bins) * bins / max(n, 1))  # of a bin's density, calibrated
    left.axhspan(1 - 2 * sigma, 1 + 2 * sigma, color="0.85", label=rf"$\pm 2\sigma$ for {n} rows")
    left.axhline(1, color="k", lw=1, label="uniform")
    for j, name in enumerate(names):
        left.hist(u[:, j][np.isfinite(u[:, j])], bins=bins, range=(0, 1), density=True,
                  histtype="step", lw=1.5, label=name)
    left.set(xlim=(0, 1), xlabel="PIT (fraction of samples below the truth)", ylabel="density",
             title="PIT histogram")
    left.legend(fontsize="small")

    levels = np.linspace(0, 1, 101)
    band = 2 * np.sqrt(levels * (1 - levels) / max(n, 1))
    right.fill_between(levels, levels - band, levels + band, color="0.85", label=rf"$\pm 2\sigma$ for {n} rows")
    right.plot([0, 1], [0, 1], color="k", lw=1, label="calibrated")
    for j, name in enumerate(names):
        dist = np.sort(np.abs(u[:, j][np.isfinite(u[:, j])] - 0.5))
        right.plot(levels, np.searchsorted(dist, levels / 2, side="right") / max(len(dist), 1),
                   lw=1.5, label=name)
    right.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="expected coverage (central interval level)",
              ylabel="observed coverage", title="Coverage of central intervals")
    right.legend(fontsize="small", loc="upper left")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def corner_plot(samples, names, truth=None, path=None) -> Figure:
    """Corner plot of one row's samples (num_samples, k): histograms on the diagonal, 2-D below.

    truth: optionally the k true values, drawn as lines and markers. Axes span the
    0.5%-99.5% sample quantiles (widened to include the truth). path: optionally a
    PNG file to write.
    """
    samples = np.asarray(samples, dtype=np.float64)
    names = list(names)
    if samples.ndim != 2 or samples.shape[1] != len(names):
        raise ValueError(f"samples must be (num_samples, {len(names)}) for names {names}; got {samples.shape}")
    k = len(names)
    bins_2d = int(np.clip(np.sqrt(len(samples)) / 2, 10, 40))  # a few samples per cell
    lo, hi = np.quantile(samples, [0.005, 0.995], axis=0)
    if truth is not None:
        truth = np.asarray(truth, dtype=np.float64).reshape(k)
        lo, hi = np.fmin(lo, truth), np.fmax(hi, truth)
    pad = np.where(hi > lo, 0.05 * (hi - lo), 0.5)
    lo, hi = lo - pad, hi + pad

    size = 2.3 * k + 0.7
    fig = Figure(figsize=(size, size), layout="constrained")
    axes = fig.subplots(k, k, squeeze=False)
    for i in range(k):
        for j in range(k):
            a = axes[i, j]
            if j > i:
                a.set_axis_off()
                continue
            if i == j:
                a.hist(samples[:, j], bins=40, range=(lo[j], hi[j]), histtype="stepfilled",
                       color="C0", alpha=0.6)
                a.set_yticks([])
                if truth is not None:
                    a.axvline(truth[j], color="C3", lw=1.5)
            else:
                a.hist2d(samples[:, j], samples[:, i], bins=bins_2d, range=[[lo[j], hi[j]], [lo[i], hi[i]]],
                         cmap="Greys", cmin=1)
                a.set_ylim(lo[i], hi[i])
                if truth is not None:
                    a.axvline(truth[j], color="C3", lw=1)
                    a.axhline(truth[i], color="C3", lw=1)
                    a.plot(truth[j], truth[i], "s", color="C3", ms=5)
            a.set_xlim(lo[j], hi[j])
            if i == k - 1:
                a.set_xlabel(names[j])
            else:
                a.set_xticklabels([])
            if j == 0 and i > 0:
                a.set_ylabel(names[i])
            elif j > 0 and i != j:
                a.set_yticklabels([])
    title = f"{len(samples)} samples" + (" (red: truth)" if truth is not None else "")
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
