"""Correcting a model's event probabilities with a classifier (likelihood-free importance weights).

A classifier trained to tell data (label 1) from the model's own samples (label 0), with
the two classes balanced, has the logit log r(x) = log p_data(x) / p_model(x) at its
optimum (Grover et al. 2019, "Bias correction of learned generative models using
likelihood-free importance weighting"). Weighting model samples by r turns expectations
under the model into expectations under the data, so

    P_data(E) = E_model[r(x) 1_E(x)] / E_model[r(x)]

(self-normalised, so a constant offset in the logit cancels). The same weights correct
the conditional distribution of x in E, and a guided or SMC sample of p_model(x | E)
reweighted by r estimates P_data(E) = P_model(E) E_model[r | E] / E_model[r].

This corrects what the model gets systematically wrong where the data show it, such as
a rare mode it under-weights (the FitzHugh-Nagumo denoiser puts 0.2% of its mass on
spikes where the simulator has 1.4%); it cannot correct beyond the data: in a region
with no data windows the classifier only extrapolates. The weights for the model samples
that an estimate uses come from classifiers that did not see them (cross-fitting), so
the classifier's overfitting does not bias the estimate.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .probability import ProbabilityEstimate


class WindowClassifier(nn.Module):
    """log r(x) (...,) for time-major windows x (..., length * channels) in the model's coordinates.

    Dilated residual 1-D convolutions pooled by the mean and the maximum over time (a rare
    event such as a spike is local in time), then a small MLP to the logit.
    """

    def __init__(self, length: int, channels: int, width: int = 32, blocks: int = 6):
        super().__init__()
        self.length, self.channels = length, channels
        self.stem = nn.Conv1d(channels, width, 3, padding=1)
        dilations = [2 ** (i % 4) for i in range(blocks)]
        self.conv1 = nn.ModuleList(nn.Conv1d(width, width, 3, padding=d, dilation=d) for d in dilations)
        self.conv2 = nn.ModuleList(nn.Conv1d(width, width, 3, padding=d, dilation=d) for d in dilations)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-1]
        h = self.stem(x.reshape(-1, self.length, self.channels).transpose(1, 2))
        for conv1, conv2 in zip(self.conv1, self.conv2):
            h = h + 0.5 * conv2(F.silu(conv1(F.silu(h))))
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], -1)).reshape(batch)


def train_classifier(classifier: nn.Module, data: torch.Tensor, model_samples: torch.Tensor, *, steps: int = 1000,
                     batch_size: int = 256, lr: float = 1e-3, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train `classifier` in place on balanced batches of data (label 1) and model samples (label 0).

    Both are (n, k) in the same coordinates. Returns the classifier in eval mode.
    """
    if data.ndim != 2 or model_samples.ndim != 2 or data.shape[1] != model_samples.shape[1]:
        raise ValueError(f"data and model_samples must be (n, k) with the same k, got {tuple(data.shape)} and "
                         f"{tuple(model_samples.shape)}")
    if min(len(data), len(model_samples)) < 2 or steps < 1:
        raise ValueError("need at least two rows of each set and at least one step")
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    device = next(classifier.parameters()).device
    labels = torch.cat([torch.ones(batch_size), torch.zeros(batch_size)]).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    classifier.train()
    bar = tqdm(range(steps), disable=not progress, desc="training the density-ratio classifier", unit="step")
    for step in bar:
        rows = torch.cat([data[torch.randint(len(data), (batch_size,), generator=generator)],
                          model_samples[torch.randint(len(model_samples), (batch_size,), generator=generator)]])
        loss = F.binary_cross_entropy_with_logits(classifier(rows.float().to(device)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        cosine.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return classifier.eval().requires_grad_(False)


def log_ratio(classifier: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The classifier's log r(x) for x (..., k), in chunks, on x's device."""
    device = next(classifier.parameters()).device
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        out = torch.cat([classifier(c.float().to(device)).double().cpu() for c in flat.split(chunk)])
    return out.reshape(x.shape[:-1])


def cross_fitted_log_ratios(make_classifier, data: torch.Tensor, model_samples: torch.Tensor, *, folds: int = 2,
                            seed: int = 0, **train_options) -> tuple[torch.Tensor, list[nn.Module]]:
    """(log r of every model sample from the classifier that did not train on it, the classifiers).

    The data and the model samples are each split into `folds` parts; classifier j trains
    on every part but the j-th of both and scores the j-th part of the model samples.
    make_classifier() returns a fresh untrained classifier. train_options go to
    train_classifier (steps, batch_size, lr, progress).
    """
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if min(len(data), len(model_samples)) < 2 * folds:
        raise ValueError(f"need at least {2 * folds} rows of each set for {folds} folds")
    data_part = torch.arange(len(data)) % folds
    model_part = torch.arange(len(model_samples)) % folds
    out = torch.empty(len(model_samples), dtype=torch.float64)
    classifiers = []
    for j in range(folds):
        torch.manual_seed(seed + j)
        classifier = train_classifier(make_classifier(), data[data_part != j], model_samples[model_part != j],
                                      seed=seed + j, **train_options)
        out[model_part == j] = log_ratio(classifier, model_samples[model_part == j])
        classifiers.append(classifier)
    return out, classifiers


def reweighted_probability(inside: torch.Tensor, log_r: torch.Tensor) -> ProbabilityEstimate:
    """P_data(E) = sum r 1_E / sum r over model samples (1-D inside and log_r), with the
    delta-method standard error of the self-normalised estimate."""
    inside, log_r = inside.reshape(-1).double(), log_r.reshape(-1).double()
    if inside.shape != log_r.shape or len(inside) < 2:
        raise ValueError(f"inside and log_r must have the same length of at least 2, got {tuple(inside.shape)} "
                         f"and {tuple(log_r.shape)}")
    if not bool(torch.isfinite(log_r).all()):
        raise ValueError("log_r must be finite")
    w = torch.softmax(log_r, 0)
    p = (w * inside).sum()
    p_se = torch.sqrt((w**2 * (inside - p) ** 2).sum())
    return ProbabilityEstimate(p, p_se, p.log(), p_se / p, inside.mean(), len(inside))


def reweighted_factor(log_r_conditional: torch.Tensor, log_weights: torch.Tensor, log_r_model: torch.Tensor) -> float:
    """E_model[r | E] / E_model[r]: multiplies a P_model(E) (e.g. the SMC sampler's) into P_data(E).

    log_r_conditional and log_weights: a weighted sample of p_model(x | E) (SMC particles
    and their log weights; zeros for an equal-weight sample); log_r_model: unguided model
    samples.
    """
    weights = torch.softmax(log_weights.reshape(-1).double(), 0)
    conditional = (weights * log_r_conditional.reshape(-1).double().exp()).sum()
    return float(conditional / log_r_model.double().exp().mean())
