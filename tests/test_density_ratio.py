"""Classifier-weighted event probabilities against analytic truth.

The "model" is N(0, I) and the "data" N(mu 1, I) in k dimensions, so the exact log
density ratio is mu * sum(x) - k mu^2 / 2, and for the event mean(x) > c both
probabilities are normal tails: P_model = Phi(-c sqrt(k)), P_data = Phi(-(c - mu) sqrt(k)).
Tolerances: 4 standard errors of the estimate under test (its own delta-method error,
itself checked against the spread over repeated draws), plus, for a trained classifier,
an allowance of 10% of P for its approximation error.
"""
import math

import pytest
import torch
from scipy import stats

from densiformer.guidance.density_ratio import (WindowClassifier, cross_fitted_log_ratios, log_ratio,
                                                reweighted_factor, reweighted_probability, train_classifier)

K, MU, C = 8, 0.3, 0.6
P_MODEL = stats.norm.sf(C * math.sqrt(K))
P_DATA = stats.norm.sf((C - MU) * math.sqrt(K))


def exact_log_r(x):
    return MU * x.sum(-1) - K * MU**2 / 2


def draws(n, mean, seed):
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + mean


def test_exact_weights_recover_the_data_probability():
    x = draws(20000, 0.0, 1)
    est = reweighted_probability(x.mean(-1) > C, exact_log_r(x))
    assert P_DATA / P_MODEL > 4  # the correction is large, so the test can fail
    assert abs(float(est.p) - P_DATA) < 4 * float(est.p_se)
    # A constant offset in the logit cancels (self-normalised).
    shifted = reweighted_probability(x.mean(-1) > C, exact_log_r(x) + 3.0)
    assert torch.allclose(shifted.p, est.p)


def test_standard_error_matches_the_spread_over_repeats():
    estimates, errors = [], []
    for seed in range(40):
        x = draws(2000, 0.0, 100 + seed)
        est = reweighted_probability(x.mean(-1) > C, exact_log_r(x))
        estimates.append(float(est.p))
        errors.append(float(est.p_se))
    spread = torch.tensor(estimates).std().item()
    # The sample std of 40 draws is within about 25% of the truth at 2.2 sigma.
    assert 0.7 < spread / (sum(errors) / len(errors)) < 1.4


def test_factor_turns_the_model_probability_into_the_data_one():
    x = draws(200_000, 0.0, 2)
    inside = x.mean(-1) > C
    conditional = x[inside]  # an exact sample of p_model(x | E), equal weights
    factor = reweighted_factor(exact_log_r(conditional), torch.zeros(len(conditional)), exact_log_r(x))
    p = P_MODEL * factor
    # The factor is a ratio of two means of r; its error is dominated by the conditional one.
    r = exact_log_r(conditional).exp()
    rel_se = float(r.std() / r.mean()) / math.sqrt(len(r))
    assert abs(p / P_DATA - 1) < 4 * rel_se + 4 * float(exact_log_r(x).exp().std()) / math.sqrt(len(x))


def test_trained_classifier_corrects_the_model():
    torch.manual_seed(0)
    model_samples, data = draws(4000, 0.0, 3).float(), draws(4000, MU, 4).float()
    log_r, classifiers = cross_fitted_log_ratios(lambda: WindowClassifier(K, 1, width=16, blocks=2), data,
                                                 model_samples, steps=400, progress=False)
    assert len(classifiers) == 2 and log_r.shape == (4000,)
    inside = model_samples.mean(-1) > C
    est = reweighted_probability(inside, log_r)
    plain = float(inside.double().mean())
    assert abs(plain - P_DATA) > 0.5 * P_DATA  # the uncorrected model is far off
    assert abs(float(est.p) - P_DATA) < 4 * float(est.p_se) + 0.1 * P_DATA
    # The learned logit tracks the exact one (up to its constant offset).
    fresh = draws(2000, 0.0, 5).float()
    corr = torch.corrcoef(torch.stack([log_ratio(classifiers[0], fresh), exact_log_r(fresh.double())]))[0, 1]
    assert corr > 0.9


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same length"):
        reweighted_probability(torch.ones(5, dtype=torch.bool), torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        reweighted_probability(torch.ones(3, dtype=torch.bool), torch.tensor([0.0, math.inf, 0.0]))
    with pytest.raises(ValueError, match="folds"):
        cross_fitted_log_ratios(lambda: WindowClassifier(K, 1), torch.zeros(10, K), torch.zeros(10, K), folds=1)
    with pytest.raises(ValueError, match="same k"):
        train_classifier(WindowClassifier(K, 1), torch.zeros(10, K), torch.zeros(10, K + 1))
