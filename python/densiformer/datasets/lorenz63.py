"""Lorenz-63 windows: a vectorised RK4 simulator and the low-spectral-energy event.

dx/dt = sigma (y - x), dy/dt = x (rho - z) - y, dz/dt = x y - beta z with rho = 28,
sigma = 10, beta = 8/3 (Lorenz 1963). Each window starts from an independent random state
(x, y ~ N(0, 10^2), z ~ N(25, 10^2): from states near the origin all trajectories leave
along its one unstable direction and stay bunched together for many time units, with a
mean z of 26.7 instead of the attractor's 23.6), runs a burn-in of 3 time units onto
the attractor, then records 60 states
at a spacing of dt = 0.1 (6 time units), scaled by 1/20: a (60, 3) window, flattened to
180 values in time-major order (t0 x, t0 y, t0 z, t1 x, ...). RK4 integrates with
`substeps` steps per sample (dt 0.02 by default: a local error of about 4e-5 per step
at states of size 20, tests/test_events.py). Single trajectories diverge chaotically under any step
change, so it is the distribution of windows that matters.
"""
from __future__ import annotations

import numpy as np
import torch

RHO, SIGMA, BETA = 28.0, 10.0, 8.0 / 3.0
DT, BURN_IN, STEPS, SCALE = 0.1, 3.0, 60, 1.0 / 20.0
DIM = 3 * STEPS


def _rhs(x, y, z):
    return SIGMA * (y - x), x * (RHO - z) - y, x * y - BETA * z


def _rk4(state, h):
    x, y, z = state
    k1 = _rhs(x, y, z)
    k2 = _rhs(*(s + 0.5 * h * k for s, k in zip(state, k1)))
    k3 = _rhs(*(s + 0.5 * h * k for s, k in zip(state, k2)))
    k4 = _rhs(*(s + h * k for s, k in zip(state, k3)))
    return tuple(s + (h / 6) * (a + 2 * b + 2 * c + d) for s, a, b, c, d in zip(state, k1, k2, k3, k4))


def simulate(n: int, seed: int = 0, *, substeps: int = 5, chunk: int = 200_000, progress: bool = False) -> np.ndarray:
    """`n` independent windows, float32 (n, 180) in scaled units; the same seed gives the same windows."""
    from tqdm.auto import tqdm

    if n < 0 or substeps < 1:
        raise ValueError(f"need n >= 0 and substeps >= 1, got {n}, {substeps}")
    out = np.empty((n, STEPS, 3), dtype=np.float32)
    h = DT / substeps
    rng = np.random.default_rng(seed)
    for start in tqdm(range(0, n, chunk), disable=not progress, desc="simulating Lorenz-63", unit="chunk"):
        state = tuple(rng.standard_normal((3, min(chunk, n - start))) * 10 + np.array([[0.0], [0.0], [25.0]]))
        for _ in range(round(BURN_IN / h)):
            state = _rk4(state, h)
        for t in range(STEPS):
            out[start:start + len(state[0]), t] = np.stack(state, -1) * SCALE
            for _ in range(substeps):
                state = _rk4(state, h)
    return out.reshape(n, DIM)


def spectral_energy(x: torch.Tensor) -> torch.Tensor:
    """mean_{k >= 1} |rfft(x_1)_k| of the first coordinate of windows (..., 180) -> (...)."""
    first = x.reshape(*x.shape[:-1], STEPS, 3)[..., 0]
    return torch.fft.rfft(first, dim=-1).abs()[..., 1:].mean(-1)


def low_energy_event(threshold: float = 0.6):
    """The event C(x) = threshold - spectral_energy(x) > 0 of Finzi et al. (2023): calm windows."""
    from ..guidance.events import Below

    return Below(spectral_energy, threshold)


# The paper's threshold; P(energy < 0.6) is about 9.7% (10^5 simulated windows).
DEFAULT_THRESHOLD = 0.6
