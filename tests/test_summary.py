"""Per-row sample summaries: table layout, values against numpy, and mode counting."""
import numpy as np
import pyarrow as pa
import pytest

from densiformer.summary import count_modes, summarize_samples, summary_schema

NAMES = ["teff", "log_g"]


def test_columns_order_and_dtypes():
    samples = np.random.default_rng(0).normal(size=(7, 50, 2))
    table = summarize_samples(samples, NAMES)
    assert table.column_names == [f"{n}_{s}" for n in NAMES for s in
                                  ("mean", "std", "median", "q025", "q16", "q84", "q975", "mad_std", "n_modes")]
    assert table.schema == summary_schema(NAMES)
    for name in NAMES:
        assert table.schema.field(f"{name}_n_modes").type == pa.int32()
        assert table.schema.field(f"{name}_mean").type == pa.float64()
    frame = table.to_pandas()
    assert frame.shape == (7, 18) and frame["teff_n_modes"].dtype == np.int32


def test_values_match_numpy():
    rng = np.random.default_rng(1)
    samples = rng.standard_t(4, size=(13, 301, 2)) * [1.0, 50.0] + [0.0, 5000.0]
    table = summarize_samples(samples.astype(np.float32), NAMES).to_pandas()
    x = samples.astype(np.float32).astype(np.float64)
    for j, name in enumerate(NAMES):
        col = x[:, :, j]
        median = np.median(col, axis=1)
        expected = {
            "mean": col.mean(1), "std": col.std(1, ddof=1), "median": median,
            "q025": np.percentile(col, 2.5, axis=1), "q16": np.percentile(col, 16, axis=1),
            "q84": np.percentile(col, 84, axis=1), "q975": np.percentile(col, 97.5, axis=1),
            "mad_std": 1.4826 * np.median(np.abs(col - median[:, None]), axis=1),
        }
        for stat, value in expected.items():
            np.testing.assert_allclose(table[f"{name}_{stat}"], value, rtol=1e-12, err_msg=stat)
        np.testing.assert_array_equal(table[f"{name}_n_modes"], count_modes(col))


def test_mad_std_of_a_gaussian_is_its_sigma():
    n, sigma = 200_000, 2.5
    samples = np.random.default_rng(2).normal(3.0, sigma, size=(1, n, 1))
    mad_std = summarize_samples(samples, ["x"])["x_mad_std"][0].as_py()
    # the MAD estimator of sigma has asymptotic variance 1.36 sigma^2 / n
    assert abs(mad_std - sigma) < 4 * sigma * np.sqrt(1.36 / n)


def test_no_rows_and_one_sample():
    empty = summarize_samples(np.zeros((0, 10, 2)), NAMES)
    assert empty.num_rows == 0 and empty.schema == summary_schema(NAMES)
    assert empty.to_pandas().shape == (0, 18)

    one = summarize_samples(np.array([[[1.5, -2.0]], [[3.0, 4.0]]]), NAMES).to_pandas()
    np.testing.assert_array_equal(one["teff_std"], [0.0, 0.0])
    np.testing.assert_array_equal(one["teff_mad_std"], [0.0, 0.0])
    for stat in ("mean", "median", "q025", "q975"):
        np.testing.assert_array_equal(one[f"log_g_{stat}"], [-2.0, 4.0])
    np.testing.assert_array_equal(one["teff_n_modes"], [1, 1])


def test_bad_shapes():
    with pytest.raises(ValueError, match="n_rows, num_samples, 2"):
        summarize_samples(np.zeros((3, 10, 3)), NAMES)
    with pytest.raises(ValueError, match="at least one sample"):
        summarize_samples(np.zeros((3, 0, 2)), NAMES)
    with pytest.raises(ValueError, match="n_rows, num_samples"):
        count_modes(np.zeros(10))


# ------------------------------------------------------------------ mode counting
ROWS = 200
MIN_RATE = 0.97


def _mixture(rng, shape, centers, weights):
    which = rng.choice(len(centers), size=shape, p=weights)
    return np.asarray(centers, dtype=float)[which] + rng.normal(size=shape)


CASES = {
    "normal": (1, lambda rng, s: rng.normal(10.0, 3.0, size=s)),
    "lognormal": (1, lambda rng, s: rng.lognormal(0.0, 1.0, size=s)),
    "student_t3": (1, lambda rng, s: rng.standard_t(3, size=s)),
    "two_equal": (2, lambda rng, s: _mixture(rng, s, [-3, 3], [0.5, 0.5])),
    "two_30_70": (2, lambda rng, s: _mixture(rng, s, [-3, 3], [0.3, 0.7])),
    "two_15_85": (2, lambda rng, s: _mixture(rng, s, [-3, 3], [0.15, 0.85])),
    "three": (3, lambda rng, s: _mixture(rng, s, [-6, 0, 6], [1 / 3, 1 / 3, 1 / 3])),
}


@pytest.mark.parametrize("num_samples", [200, 1000, 5000])
@pytest.mark.parametrize("case", list(CASES))
def test_count_modes_rates(case, num_samples):
    modes, draw = CASES[case]
    rng = np.random.default_rng([num_samples, list(CASES).index(case)])
    counts = count_modes(draw(rng, (ROWS, num_samples)))
    assert counts.dtype == np.int32 and counts.shape == (ROWS,)
    rate = np.mean(counts == modes)
    assert rate >= MIN_RATE, f"{case}: {rate:.3f} right; counts {np.bincount(counts).tolist()}"


ONE_MODE_AT_5000 = {
    "uniform": lambda rng, s: rng.uniform(size=s),
    "shoulder": lambda rng, s: _mixture(rng, s, [0.0, 2.5], [0.7, 0.3]),
    "flat_top": lambda rng, s: _mixture(rng, s, [-1.2, 1.2], [0.5, 0.5]),  # dip at 0.92 of the peaks
}


@pytest.mark.parametrize("case", list(ONE_MODE_AT_5000))
def test_count_modes_flat_tops_and_shoulders_are_one_mode(case):
    """With many samples noise is small, and the prominence rule decides."""
    counts = count_modes(ONE_MODE_AT_5000[case](np.random.default_rng(5), (ROWS, 5000)))
    assert np.mean(counts == 1) >= MIN_RATE, f"{case}: counts {np.bincount(counts).tolist()}"


def test_count_modes_degenerate_rows():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 100))
    x[0] = 4.2                       # constant
    x[1, :99] = 0.0                  # 99% identical
    x[2, 5] = np.nan                 # not finite
    x[3, 7] = np.inf
    x[4] = rng.integers(0, 2, 100)   # two values, equally often: two modes
    np.testing.assert_array_equal(count_modes(x), [1, 1, 0, 0, 2, 1])
    assert count_modes(np.zeros((0, 10))).shape == (0,)
    np.testing.assert_array_equal(count_modes(rng.normal(size=(4, 1))), 1)
    assert (count_modes(rng.normal(size=(50, 3))) >= 1).all()


def test_count_modes_is_per_row():
    rng = np.random.default_rng(4)
    uni, bi = rng.normal(size=(1, 1000)), _mixture(rng, (1, 1000), [-4, 4], [0.5, 0.5])
    np.testing.assert_array_equal(count_modes(np.concatenate([uni, bi, uni * 1e6 + 1e9])), [1, 2, 1])
