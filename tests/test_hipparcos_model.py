"""A short CPU training on the real Hipparcos catalogue learns the HR diagram.

Red stars (B-V > 1) are either giants (M_Hp near 0-1) or dwarfs (M_Hp near 6-9).
Without the parallax, colours and proper motions only partly tell them apart, so
the posterior of M_Hp must be bimodal: the paper's Teff/logg bimodality, on real data.
"""
import numpy as np
import pytest
import torch

import densiformer as dfm
from densiformer.cli import HIPPARCOS_COLUMNS, HIPPARCOS_TARGETS
from densiformer.model import DensityModel
from densiformer.training import validation_loss

NO_PARALLAX = ["b_v", "v_i", "hpmag", "pmra", "pmdec"]
GIANT_LIMIT = 3.5  # M_Hp between the two branches (no star class sits at 3-5 for B-V > 1)


@pytest.fixture(scope="session")
def hipparcos_model():
    est = dfm.DensityEstimator(HIPPARCOS_COLUMNS, HIPPARCOS_TARGETS, dfm.ModelConfig())
    return est.fit(dfm.datasets.hipparcos("train"), epochs=4, batch_size=512, seed=0, progress=False)


@pytest.fixture(scope="session")
def red_stars():
    test = dfm.datasets.hipparcos("test")
    red = test[(test.b_v > 1.0) & test.abs_hpmag.notna()]
    return red.sample(400, random_state=0)


@pytest.mark.slow
def test_validation_loss_decreases(hipparcos_model):
    est = hipparcos_model
    losses = est.history.val_loss
    assert losses[-1] < losses[0], losses
    # ...and is far below the loss of the same network before training.
    torch.manual_seed(0)
    untrained = DensityModel(len(est.all_columns), est.model.target_columns.tolist(), est.config)
    val = torch.as_tensor(est.schema.normalize(dfm.datasets.hipparcos("val")[list(est.all_columns)].to_numpy()))
    before = validation_loss(untrained, est.schedule, val, untrained.target_columns, 4096, seed=1)
    assert losses[-1] < 0.5 * before, (before, losses)


@pytest.mark.slow
def test_red_stars_are_bimodal_and_calibrated(hipparcos_model, red_stars):
    samples = hipparcos_model.sample(red_stars[NO_PARALLAX], request=["abs_hpmag"], num_samples=200,
                                     sampler="dpmpp2m", steps=20, seed=0)[..., 0]
    pooled = samples.ravel()
    giants, dwarfs = pooled[pooled < GIANT_LIMIT], pooled[pooled > GIANT_LIMIT + 1]
    # Two modes where the catalogue has them ...
    assert -0.5 < np.median(giants) < 1.5 and 6.0 < np.median(dwarfs) < 9.0
    # ... with a gap between: the density per magnitude in the gap is far below both.
    per_mag = lambda lo, hi: ((pooled > lo) & (pooled < hi)).mean() / (hi - lo)  # noqa: E731
    gap = per_mag(3.0, 5.0)
    assert gap < per_mag(-1.0, 2.0) / 5 and gap < per_mag(6.0, 9.0) / 2
    # The giant fraction matches the held-out truth within 3 standard errors of the
    # 400-star sample (the samples' own Monte Carlo error is far smaller).
    truth = (red_stars.abs_hpmag < GIANT_LIMIT).mean()
    stderr = np.sqrt(truth * (1 - truth) / len(red_stars))
    predicted = (samples < GIANT_LIMIT).mean()
    assert abs(predicted - truth) < 3 * stderr, (predicted, truth, stderr)
