"""A short CPU training on the real Hipparcos catalogue learns the HR diagram.

Red stars (B-V > 1) are either giants (M_Hp near 0-1) or dwarfs (M_Hp near 6-9), and
their colours alone do not say which: p(M_Hp | B-V, V-I) must be bimodal, the paper's
Teff/logg bimodality, on real data. Dwarfs are only about 8% of the red stars here.
"""
import numpy as np
import pytest
import torch

import densiformer as dfm
from densiformer.model import DensityModel
from densiformer.training import validation_loss

COLOURS = ["b_v", "v_i"]
GIANT_LIMIT = 3.5  # M_Hp between the two branches


@pytest.fixture(scope="session")
def colour_model():
    est = dfm.DensityEstimator(COLOURS, ["abs_hpmag"], dfm.ModelConfig(d_model=32, heads=4, head_width=128))
    return est.fit(dfm.datasets.hipparcos("train"), epochs=6, batch_size=512, lr=3e-3, seed=0, progress=False)


@pytest.fixture(scope="session")
def red_stars():
    test = dfm.datasets.hipparcos("test")
    return test[(test.b_v > 1.0) & test.abs_hpmag.notna()].sample(400, random_state=0)


@pytest.mark.slow
def test_validation_loss_decreases(colour_model):
    est = colour_model
    torch.manual_seed(0)
    untrained = DensityModel(len(est.all_columns), est.model.target_columns.tolist(), est.config)
    val = torch.as_tensor(est.schema.normalize(dfm.datasets.hipparcos("val")[list(est.all_columns)].to_numpy()))
    before = validation_loss(untrained, est.schedule, val, untrained.target_columns, 4096, seed=1)
    losses = est.history.val_loss
    assert losses[-1] < losses[0] < before, (before, losses)


@pytest.mark.slow
def test_red_stars_are_bimodal_and_calibrated(colour_model, red_stars):
    samples = colour_model.sample(red_stars[COLOURS], request=["abs_hpmag"], num_samples=200, seed=0)[..., 0]
    pooled = samples.ravel()
    # Giants near 0-1 mag, dwarfs near 6-9 mag ...
    assert -0.5 < np.median(pooled[pooled < GIANT_LIMIT]) < 1.5
    assert 6.0 < np.median(pooled[pooled > GIANT_LIMIT + 1]) < 9.0
    # ... as two modes: the dwarf peak (densest 1-mag bin in 6-10) stands well above the
    # dip between the branches (sparsest 1-mag bin in 3-6).
    per_mag, _ = np.histogram(pooled, bins=np.arange(3.0, 11.0))
    dip, dwarf_peak = per_mag[:3].min(), per_mag[3:].max()
    assert dwarf_peak > 1.5 * dip, per_mag / pooled.size
    # The giant fraction matches the held-out truth within 3 standard errors of the
    # 400-star sample (the Monte Carlo error of 80,000 samples is far smaller).
    truth = (red_stars.abs_hpmag < GIANT_LIMIT).mean()
    stderr = np.sqrt(truth * (1 - truth) / len(red_stars))
    predicted = (samples < GIANT_LIMIT).mean()
    assert abs(predicted - truth) < 3 * stderr, (predicted, truth, stderr)
