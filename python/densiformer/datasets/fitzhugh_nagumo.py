"""Two coupled FitzHugh-Nagumo units with extreme events: a vectorised RK4 simulator.

The system of Ansmann, Karnatak, Lehnertz & Feudel (2013), the example of extreme
events in excitable systems reviewed by Farazmand & Sapsis (arXiv 1803.06277):

    dx_i/dt = x_i (a - x_i)(x_i - 1) - y_i + k (x_j - x_i)
    dy_i/dt = b_i x_i - c y_i,            i, j in {1, 2}, j != i

with a = -0.025794, b_1 = 0.0065, b_2 = 0.0135, c = 0.02, k = 0.128. Each unit mostly
makes small oscillations; now and then both fire together and the mean voltage
(x_1 + x_2) / 2 spikes to about 0.85, against a typical maximum of about 0.15.

Sampling: independent trajectories start from uniform states, run a burn-in of 2000
time units onto the attractor, then are cut into consecutive windows of 120 samples at
a spacing of 1 time unit (a spike lasts about 30). RK4 integrates with step 0.1. A
window holds the two voltages: (120, 2), flattened time-major to 240 values. Windows
from one trajectory are consecutive pieces of it, which makes 10^6 windows affordable.
"""
from __future__ import annotations

import numpy as np
import torch

A, B1, B2, C, K = -0.025794, 0.0065, 0.0135, 0.02, 0.128
DT, H, BURN_IN, STEPS = 1.0, 0.1, 2000.0, 120
DIM = 2 * STEPS


def _rhs(x1, x2, y1, y2):
    return (x1 * (A - x1) * (x1 - 1) - y1 + K * (x2 - x1),
            x2 * (A - x2) * (x2 - 1) - y2 + K * (x1 - x2),
            B1 * x1 - C * y1,
            B2 * x2 - C * y2)


def _rk4(state, h):
    k1 = _rhs(*state)
    k2 = _rhs(*(s + 0.5 * h * k for s, k in zip(state, k1)))
    k3 = _rhs(*(s + 0.5 * h * k for s, k in zip(state, k2)))
    k4 = _rhs(*(s + h * k for s, k in zip(state, k3)))
    return tuple(s + (h / 6) * (a + 2 * b + 2 * c + d) for s, a, b, c, d in zip(state, k1, k2, k3, k4))


def simulate(n: int, seed: int = 0, *, trajectories: int | None = None, burn_in: float = BURN_IN,
             progress: bool = False) -> np.ndarray:
    """`n` windows, float32 (n, 240), from `trajectories` parallel runs (default: n / 100).

    Windows are ordered by time, then trajectory; the same arguments give the same windows.
    """
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    trajectories = trajectories or max(1, min(n, -(-n // 100)))
    per_run = -(-n // trajectories)
    rng = np.random.default_rng(seed)
    state = (rng.uniform(-0.3, 0.8, trajectories), rng.uniform(-0.3, 0.8, trajectories),
             rng.uniform(-0.05, 0.2, trajectories), rng.uniform(-0.05, 0.2, trajectories))
    substeps = round(DT / H)
    for _ in range(round(burn_in / H)):
        state = _rk4(state, H)
    out = np.empty((per_run, trajectories, STEPS, 2), dtype=np.float32)
    for w in tqdm(range(per_run), disable=not progress, desc="simulating FitzHugh-Nagumo", unit="window"):
        for t in range(STEPS):
            out[w, :, t, 0], out[w, :, t, 1] = state[0], state[1]
            for _ in range(substeps):
                state = _rk4(state, H)
    return out.reshape(-1, DIM)[:n]


def max_mean_voltage(x: torch.Tensor) -> torch.Tensor:
    """The largest mean voltage (x_1 + x_2) / 2 over a window (..., 240) -> (...)."""
    return x.reshape(*x.shape[:-1], STEPS, 2).mean(-1).amax(-1)


def spike_event(threshold: float):
    """An extreme spike: the largest mean voltage in the window exceeds `threshold`."""
    from ..guidance.events import Above

    return Above(max_mean_voltage, threshold)


# Single-unit firings keep the mean voltage below about 0.5; joint firings reach 0.85.
# P(max mean voltage > 0.5) is about 1.4% (see `densiformer events fitzhugh-nagumo`).
DEFAULT_THRESHOLD = 0.5
