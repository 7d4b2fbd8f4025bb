"""Calibration diagnostics: PIT and coverage of calibrated and miscalibrated models, and the plots."""
import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats

from densiformer.diagnostics import calibration_plot, corner_plot, coverage, coverage_stderr, pit

ROWS, SAMPLES = 2000, 1000


def _model(rng, truth_scale=1.0, rows=ROWS, k=2):
    """Gaussian predictive samples per row; the truth is drawn with truth_scale x the predicted sigma."""
    mu = rng.normal(0.0, 5.0, size=(rows, k))
    sigma = rng.uniform(0.5, 3.0, size=(rows, k))
    samples = mu[:, None] + sigma[:, None] * rng.normal(size=(rows, SAMPLES, k))
    truth = mu + truth_scale * sigma * rng.normal(size=(rows, k))
    return samples, truth


def test_calibrated_model_is_uniform_and_covers():
    samples, truth = _model(np.random.default_rng(0))
    u = pit(samples, truth)
    assert u.shape == (ROWS, 2) and ((u > 0) & (u < 1)).all()
    for j in range(2):
        assert stats.kstest(u[:, j], "uniform").pvalue > 1e-3
    cov = coverage(samples, truth)
    for level in (0.68, 0.95):
        expected = level * (SAMPLES - 1) / (SAMPLES + 1)  # sample-quantile intervals (see coverage)
        assert cov[level].shape == (2,)
        assert np.all(np.abs(cov[level] - expected) < 3 * coverage_stderr(level, ROWS)), cov


def test_too_narrow_model_under_covers():
    samples, truth = _model(np.random.default_rng(1), truth_scale=1.5)
    cov = coverage(samples, truth, levels=(0.5, 0.68, 0.95))
    for level in cov:
        # truth 1.5x wider than predicted: coverage P(|Z| < z_level / 1.5), far below nominal
        assert np.all(cov[level] < level - 10 * coverage_stderr(level, ROWS)), cov
    assert stats.kstest(pit(samples, truth)[:, 0], "uniform").pvalue < 1e-6


def test_ties_are_split_at_random():
    """Discrete samples (three values): the randomised PIT of a calibrated model is still uniform."""
    rng = np.random.default_rng(2)
    samples = rng.binomial(2, 0.3, size=(ROWS, 200, 1)).astype(float)
    truth = rng.binomial(2, 0.3, size=(ROWS, 1)).astype(float)
    u = pit(samples, truth, seed=5)
    assert stats.kstest(u[:, 0], "uniform").pvalue > 1e-3
    np.testing.assert_array_equal(u, pit(samples, truth, seed=5))
    assert not np.array_equal(u, pit(samples, truth, seed=6))


def test_nan_truth_is_left_out():
    samples, truth = _model(np.random.default_rng(3), rows=300)
    truth[::3, 0] = np.nan
    u = pit(samples, truth)
    assert np.isnan(u[::3, 0]).all() and np.isfinite(u[:, 1]).all()
    assert np.isfinite(np.delete(u[:, 0], np.s_[::3])).all()
    known = ~np.isnan(truth[:, 0])
    cov = coverage(samples, truth)
    sub = coverage(samples[known], truth[known])
    for level in cov:
        assert cov[level][0] == sub[level][0]
    truth[:, 1] = np.nan
    assert np.isnan(coverage(samples, truth)[0.68][1])


def test_shape_errors():
    with pytest.raises(ValueError, match="truth"):
        pit(np.zeros((5, 10, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="names"):
        calibration_plot(np.zeros((5, 10, 2)), np.zeros((5, 2)), ["a"])


def test_calibration_plot(tmp_path):
    samples, truth = _model(np.random.default_rng(4), rows=300)
    path = tmp_path / "calibration.png"
    fig = calibration_plot(samples, truth, ["teff", "logg"], path=path)
    assert isinstance(fig, Figure) and path.stat().st_size > 0
    left, right = fig.axes[:2]
    assert left.get_xlabel() and right.get_ylabel() and left.get_legend() is not None

    target = Figure()
    axes = target.subplots(1, 2)
    assert calibration_plot(samples, truth, ["teff", "logg"], ax=axes) is target


@pytest.mark.parametrize("k", [1, 3])
def test_corner_plot(tmp_path, k):
    rng = np.random.default_rng(5)
    samples = rng.normal(size=(500, k))
    names = ["teff", "logg", "feh"][:k]
    path = tmp_path / "corner.png"
    fig = corner_plot(samples, names, truth=np.zeros(k), path=path)
    assert isinstance(fig, Figure) and path.stat().st_size > 0
    assert len(fig.axes) == k * k
    assert fig.axes[-1].get_xlabel() == names[-1]
    assert isinstance(corner_plot(samples, names), Figure)
