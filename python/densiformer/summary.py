"""Per-row summaries of posterior samples: moments, quantiles, a robust width, and the number of modes.

`summarize_samples` turns samples (n_rows, num_samples, k) into the table that
`DensityEstimator.summarize` returns. `count_modes` counts the modes of each row's
sample distribution, vectorised over rows.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .data.schema import MAD_TO_STD

# Column suffix -> percentile, in table order after mean and std.
PERCENTILES = {"median": 50.0, "q025": 2.5, "q16": 16.0, "q84": 84.0, "q975": 97.5}
STATISTICS = ("mean", "std", "median", "q025", "q16", "q84", "q975", "mad_std", "n_modes")


def summary_schema(names) -> pa.Schema:
    """The schema of `summarize_samples(samples, names)`: nine columns per name."""
    return pa.schema([(f"{name}_{stat}", pa.int32() if stat == "n_modes" else pa.float64())
                      for name in names for stat in STATISTICS])


def summarize_samples(samples, names) -> pa.Table:
    """Summaries of each row's samples, per column name, as a pyarrow Table.

    samples: (n_rows, num_samples, k) in physical units; names: the k column names.
    For each name, in this order: <name>_mean, _std, _median, _q025, _q16, _q84, _q975
    (percentiles 2.5/16/84/97.5, numpy's default linear interpolation), _mad_std
    (1.4826 * median |x - median|, the robust width of Leung, Bovy & Speagle 2024) and
    _n_modes (int32, see `count_modes`). std is the sample standard deviation
    (ddof=1) when num_samples > 1, and 0 for a single sample.
    """
    samples = np.asarray(samples, dtype=np.float64)
    names = list(names)
    if samples.ndim != 3 or samples.shape[2] != len(names):
        raise ValueError(f"samples must be (n_rows, num_samples, {len(names)}) for names {names}; "
                         f"got shape {samples.shape}")
    if samples.shape[1] == 0:
        raise ValueError("samples must hold at least one sample per row")
    n_rows, num_samples, k = samples.shape
    x = np.ascontiguousarray(np.moveaxis(samples, 2, 0))  # (k, n_rows, num_samples): rows contiguous
    stats = dict(zip(PERCENTILES, np.percentile(x, list(PERCENTILES.values()), axis=-1)))
    stats["mean"] = x.mean(axis=-1)
    stats["std"] = x.std(axis=-1, ddof=1 if num_samples > 1 else 0)
    stats["mad_std"] = MAD_TO_STD * np.median(np.abs(x - stats["median"][..., None]), axis=-1)
    stats["n_modes"] = np.array([count_modes(column) for column in x], np.int32).reshape(k, n_rows)
    columns = [stats[stat][j] for j in range(k) for stat in STATISTICS]
    return pa.Table.from_arrays(columns, schema=summary_schema(names))


# count_modes' rule; its docstring says why each value.
_BINS = 128                          # histogram bins between the _TAIL quantiles
_TAIL = 0.005
_PAD = 64                            # empty bins on each side, so smoothing spills into zeros
_BANDWIDTH = 0.6                     # pilot width / (min(std, IQR/1.34) n^-1/5)
_ADAPT = 0.5                         # local width ~ pilot^-_ADAPT (Abramson's square-root law)
_OCTAVES = np.arange(0.0, 2.5, 0.5)  # log2 of the local widths' factors on the pilot's
_MIN_HEIGHT = 0.05                   # of the row's highest peak
_MAX_DIP = 0.7                       # of the peak on either side of a dip
_Z = 2.25                            # standard errors of the smoothed counts
_ROWS_PER_CHUNK = 2048               # bounds the temporaries (about 20 arrays of rows x 256)


def count_modes(samples) -> np.ndarray:
    """Number of modes of each row's sample distribution: samples (n_rows, num_samples) -> int32 (n_rows,).

    The rule, vectorised over rows (the only Python loops run over bandwidths and bins):

    1. Histogram each row on 128 bins between its 0.5% and 99.5% quantiles (the
       extreme 1% of a heavy tail would otherwise take most of the grid).
    2. Smooth it with a Gaussian kernel, adaptive in the tails. The pilot's width is
       0.6 min(std, IQR/1.34) n^-1/5, 2/3 of Silverman's robust rule: the full rule
       smooths three components 6 sigma apart into two at 200 samples. Where the pilot
       is below its geometric mean over the samples, the samples' kernels widen by
       (pilot / geometric mean)^-1/2 (Abramson's square-root law), up to 4x, in
       half-octave steps blended linearly: otherwise the sparse tails of lognormal or
       Student t samples show bumps.
    3. Walk each curve once with hysteresis, looking for a peak and a dip in turn: a
       peak is confirmed once the curve has fallen from it far enough, a dip once the
       curve has risen from it far enough. Far enough means both
       - to 0.7 x the higher end or below (a prominence rule: shoulders, flat tops and
         shallow wiggles are not modes), and
       - by at least 2.25 standard errors of the difference, with Poisson errors of
         the smoothed counts (var = count / (2 sqrt(pi) h) for a kernel of h bins),
         so that with few samples only dips that noise is unlikely to make count.
       A confirmed peak counts if it is at least 5% as high as the row's highest.

    Measured on 2000 rows per case and per num_samples in 200, 500, 1000, 2000, 5000,
    the share of rows counted right is at least 99.6% for: normal, lognormal (sigma
    1 and 1.5), Student t (2 and 3 dof), exponential, gamma(2), and 0.8 N(0,1) + 0.2
    N(2,1) (1 mode); N(-3,1)/N(3,1) with weights 0.5/0.5 to 0.15/0.85, N(-2,1)/N(2,1),
    and 0.4 N(-3,0.5) + 0.6 N(3,1.5) (2 modes); N(-6,1)/N(0,1)/N(6,1) equally
    weighted and N(-5,1)/N(0,1)/N(5,1) (3 modes). Misses are at 200 samples, where a
    component of 30 samples is near the noise; three components weighted 0.2/0.3/0.5
    reach 99.1% there. Flat-topped distributions are the weak case: uniform samples
    give 1 mode in 92% of rows at 200 samples, 98% at 1000, 100% at 5000.

    A row whose 0.5% and 99.5% quantiles coincide (a constant row) has 1 mode, a row
    with a non-finite sample 0, any other at least 1.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"samples must be (n_rows, num_samples); got shape {x.shape}")
    chunks = [_count_modes(x[i:i + _ROWS_PER_CHUNK]) for i in range(0, len(x), _ROWS_PER_CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int32)


def _count_modes(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        x = np.where(finite[:, None], x, 0.0)
    lo, q25, q75, hi = np.quantile(x, [_TAIL, 0.25, 0.75, 1 - _TAIL], axis=1)
    spread = hi > lo
    bin_width = np.where(spread, hi - lo, 1.0) / _BINS
    hist = _histogram(x, lo, bin_width)

    scale = np.minimum(x.std(axis=1), (q75 - q25) / 1.34)
    h = np.maximum(_BANDWIDTH * scale * x.shape[1] ** -0.2 / bin_width, 1.0)  # in bins
    pilot = np.maximum(_smooth(hist, h), 1e-9)
    log_ratio = np.log(pilot) - ((hist * np.log(pilot)).sum(1) / hist.sum(1))[:, None]
    octave = -_ADAPT * log_ratio / np.log(2)  # log2 of each bin's bandwidth factor
    level = np.clip((octave - _OCTAVES[0]) / (_OCTAVES[1] - _OCTAVES[0]), 0, len(_OCTAVES) - 1)
    # smoothing is linear: blend the widths' spectra, then one inverse transform
    spectrum = 0.0
    width = np.zeros_like(hist)
    for i, factor in enumerate(2.0 ** _OCTAVES):
        weight = np.maximum(0.0, 1 - np.abs(level - i))  # linear blend of the two nearest widths
        spectrum = spectrum + np.fft.rfft(weight * hist) * _gaussian_filter(h * factor, hist.shape[1])
        width += weight * factor
    dens = np.maximum(np.fft.irfft(spectrum, n=hist.shape[1]), 0.0)
    var = dens / (2 * np.sqrt(np.pi) * h[:, None] * width)

    count = np.maximum(_count_peaks(dens.T.copy(), var.T.copy()), 1)
    return np.where(finite, np.where(spread, count, 1), 0).astype(np.int32)


def _histogram(x, lo, bin_width):
    """Counts on _BINS bins from lo, _PAD empty bins each side: (n_rows, _BINS + 2 * _PAD)."""
    n_rows = len(x)
    size = _BINS + 2 * _PAD
    pos = (x - lo[:, None]) / bin_width[:, None]
    inside = (pos >= 0) & (pos <= _BINS)
    index = np.minimum(pos, _BINS - 1).astype(np.int64) + _PAD + size * np.arange(n_rows)[:, None]
    return np.bincount(index[inside], minlength=n_rows * size).reshape(n_rows, size).astype(np.float64)


def _gaussian_filter(h, size):
    """Fourier transfer function of Gaussian kernels of h bins (one per row) on `size` bins."""
    freq = np.fft.rfftfreq(size)
    return np.exp(-2 * (np.pi * freq * h[:, None]) ** 2)


def _smooth(hist, h):
    return np.fft.irfft(np.fft.rfft(hist) * _gaussian_filter(h, hist.shape[1]), n=hist.shape[1])


def _count_peaks(dens, var):
    """Peaks per column of dens (bins, n_rows) under the hysteresis rule of `count_modes`."""
    n_rows = dens.shape[1]
    floor = _MIN_HEIGHT * dens.max(axis=0)
    count = np.zeros(n_rows, np.int32)
    seeking_peak = np.ones(n_rows, bool)
    top, top_var = np.zeros(n_rows), np.zeros(n_rows)
    bottom, bottom_var = np.zeros(n_rows), np.zeros(n_rows)
    for d, v in zip(dens, var):
        higher = seeking_peak & (d > top)
        top, top_var = np.where(higher, d, top), np.where(higher, v, top_var)
        lower = ~seeking_peak & (d < bottom)
        bottom, bottom_var = np.where(lower, d, bottom), np.where(lower, v, bottom_var)
        fell = seeking_peak & _separated(top, top_var, d, v)
        rose = ~seeking_peak & _separated(d, v, bottom, bottom_var)
        count += fell & (top >= floor)
        # a confirmed peak starts the search for the next dip from here, and vice versa
        bottom, bottom_var = np.where(fell, d, bottom), np.where(fell, v, bottom_var)
        top, top_var = np.where(rose, d, top), np.where(rose, v, top_var)
        seeking_peak ^= fell | rose
    return count


def _separated(peak, peak_var, dip, dip_var):
    return (dip <= _MAX_DIP * peak) & (peak - dip >= _Z * np.sqrt(peak_var + dip_var))
