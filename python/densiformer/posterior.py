"""An sbi-style posterior object: a drop-in for code written against sbi's posteriors.

theta are the requested targets (k of them, physical units) and x are observations of
the model's input columns (`Posterior.x_columns`, NaN = missing). Shapes follow sbi:

    sample(sample_shape, x)           -> (*sample_shape, k)
    log_prob(theta, x)                -> theta.shape[:-1]
    sample_batched(sample_shape, x)   -> (*sample_shape, B, k)     for x of shape (B, n_x)
    log_prob_batched(theta, x)        -> theta.shape[:-1]          for theta (*sample_shape, B, k)

Batched calls run as one batched computation: each row's context is computed once and
broadcast over its samples.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class Posterior:
    def __init__(self, estimator, request, *, sampler=None, steps=None, ode_method="adaptive",
                 backend="auto", seed=0):
        self.estimator = estimator
        self.request = list(request)
        self.x_columns = list(estimator.columns)
        self.sampler, self.steps, self.ode_method, self.backend = sampler, steps, ode_method, backend
        self.seed = seed
        self.default_x = None
        self._calls = 0

    def set_default_x(self, x) -> "Posterior":
        self.default_x = x
        return self

    # -------------------------------------------------------------- x handling
    def _x_rows(self, x, batched: bool) -> np.ndarray:
        """x as normalised model input rows (B, all_columns)."""
        x = self.default_x if x is None else x
        if x is None:
            raise ValueError("no x given and no default x set (use set_default_x)")
        est = self.estimator
        if torch.is_tensor(x) or isinstance(x, (np.ndarray, list, tuple)):
            arr = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float64)
            arr = arr.reshape(-1, arr.shape[-1]) if batched else arr.reshape(1, -1)
            if arr.shape[1] != len(self.x_columns):
                raise ValueError(f"x has {arr.shape[1]} entries per row; expected {len(self.x_columns)} "
                                 f"in the order {self.x_columns}")
            x = {name: arr[:, j] for j, name in enumerate(self.x_columns)}
        values = est._normalized(x, what="x")
        if not batched and len(values) != 1:
            raise ValueError(f"x has {len(values)} rows; use sample_batched/log_prob_batched for several")
        return values

    def _seed(self) -> int:
        # A fresh seed for each call, like sbi's global RNG, but reproducible per object.
        self._calls += 1
        return self.seed * 1_000_003 + self._calls

    # -------------------------------------------------------------- sampling
    def _draw(self, sample_shape: torch.Size, values: np.ndarray) -> torch.Tensor:
        """(*sample_shape, B, k) samples for normalised x rows (B, ...), in one batched call."""
        est = self.estimator
        idx = [est.targets.index(r) for r in self.request]
        z = est._sample_normalized(values, idx, max(1, math.prod(sample_shape)), self.sampler, self.steps,
                                   self.backend, self._seed(), progress=None)
        theta = torch.from_numpy(est.schema.denormalize(z, self.request).astype(np.float32))  # (B, S, k)
        return theta.transpose(0, 1).reshape(*sample_shape, len(values), len(self.request))

    def sample_batched(self, sample_shape, x=None) -> torch.Tensor:
        return self._draw(torch.Size(sample_shape), self._x_rows(x, batched=True))

    def sample(self, sample_shape=(), x=None) -> torch.Tensor:
        return self._draw(torch.Size(sample_shape), self._x_rows(x, batched=False))[..., 0, :]

    # -------------------------------------------------------------- densities
    def log_prob_batched(self, theta, x=None) -> torch.Tensor:
        """theta (*sample_shape, B, k) -> (*sample_shape, B) log densities, physical units."""
        values = self._x_rows(x, batched=True)
        theta = torch.as_tensor(theta)
        if theta.dim() < 2 or theta.shape[-2:] != (len(values), len(self.request)):
            raise ValueError(f"theta must have shape (*sample_shape, {len(values)}, {len(self.request)}); "
                             f"got {tuple(theta.shape)}")
        return self._log_prob(theta, values)

    def log_prob(self, theta, x=None) -> torch.Tensor:
        """theta (..., k) -> (...) log densities at one x."""
        values = self._x_rows(x, batched=False)
        theta = torch.as_tensor(theta)
        if theta.shape[-1:] != (len(self.request),):
            raise ValueError(f"theta must end with {len(self.request)} entries ({self.request}); "
                             f"got {tuple(theta.shape)}")
        return self._log_prob(theta[..., None, :], values)[..., 0]

    def _log_prob(self, theta: torch.Tensor, values: np.ndarray) -> torch.Tensor:
        est = self.estimator
        idx = [est.targets.index(r) for r in self.request]
        z = est.schema.normalize(theta.detach().cpu().numpy(), self.request)
        cond = est._condition(values, idx)  # (B, width), once per x row
        logp = est._log_prob_normalized(torch.as_tensor(z, device=est.device), cond, idx,
                                        method=self.ode_method)
        return (logp + est.schema.log_abs_det(self.request)).float().cpu()

    def __repr__(self):
        return f"Posterior(request={self.request}, x_columns={self.x_columns})"
