"""Small denoisers for fixed-length windows of a dynamical system, with a weight cache.

Two architectures, both preconditioned so that the untrained network is the exact
denoiser of the Gaussian fitted to the training windows (the network only learns the
non-Gaussian part, with a unit-scale target), conditioned on the log-SNR through
sinusoidal features, a small MLP and a FiLM scale and shift in every block, and trained
with the library's cosine schedule (stratified times), AdamW with warmup and cosine
decay, and an EMA of the weights:

"conv" (ConvWindowDenoiser, the default of `densiformer events`): a 1-D convolutional
    residual network over time (kernel 3, dilations 1, 2, 4, 8 repeating, so eight blocks
    see the whole 60-step window), on windows standardised per channel. It sees the
    noisy window and the Gaussian denoiser's estimate as input channels. Its prior is the
    simulator's: a window is a piece of a trajectory, the same local dynamics everywhere.
"mlp" (WindowDenoiser): pre-norm residual SiLU blocks over the flattened window, on
    PCA-whitened windows (variances floored at `variance_floor` of the largest).

Measured on Lorenz-63 (unguided DDPM, 100 steps, 2,000 samples against the simulator;
`densiformer events` reports the same per run):

| model | training | P(energy < 0.6) | KS of the energy | 5/25/50% energy quantiles |
|---|---|---|---|---|
| simulator | | 0.097 | | 0.40 / 1.60 / 1.77 |
| mlp, 6000 steps | 4 min, 1 thread | 0.019 | 0.424 | 0.72 / 1.21 / 1.50 |
| mlp, 24000 steps, 400k windows | 17 min | 0.100 | 0.435 | 0.49 / 1.18 / 1.52 |
| conv, 3000 steps, 400k windows | 13 min, 1 loaded thread | 0.100 | 0.046 | 0.43 / 1.54 / 1.75 |

The MLP, whatever its training, blurs switching and calm windows into intermediate
ones; the convolution gets the energy distribution nearly right at a quarter of the
steps. Its width and training length set the tail (4,000 samples, same seed; simulator P(energy < 0.25)
= 0.0255, P(< 0.12) = 0.0091):

| conv width, steps | training, 2 threads | KS of the energy | P(< 0.6) | P(< 0.25) | P(< 0.12) | KS in E |
|---|---|---|---|---|---|---|
| 32, 3000 (`densiformer events` default) | 7.5 min | 0.029 | 0.089 | 0.0145 | 0.0035 | 0.110 |
| 32, 6000 | 15-20 min | 0.026 | 0.092 | 0.0190 | 0.0070 | 0.070 |
| 64, 3000 (`--width 64`) | 18 min | 0.012 | 0.088 | 0.0217 | 0.0055 | 0.053 |
| 64, 6000 (`--width 64 --train-steps 6000`) | 36-46 min | 0.019 | 0.094 | 0.0250 | 0.0100 | 0.041 |
| 64, 12000 (8,000 samples) | 53 min | 0.009 | 0.0945 | 0.0235 | 0.0088 | 0.060 |

Width and steps both buy the tail; 64 wide with 6000 steps gets the rare events' rates
within 10%, inside the Monte Carlo error of 4,000 samples (0.0025 and 0.0015); with
12000 steps P(< 0.05) is 0.0020 against the simulator's 0.0020.

(History: a plain v-predicting MLP had collapsed the leading PCA modes to 0.46 of
their std; the Gaussian skip fixed the second moments, not the shape.)

A tail tilt (`tail_weight` > 1, FitzHugh-Nagumo's default in `densiformer events`) trains
on p_w(x) ∝ w(x) p(x), w rising to tail_weight beyond a quantile of the Mahalanobis
distance; `WindowModel.log_tilt` gives log w of any window, and the events command weighs
samples back by 1 / w (exactly, inside SMC). Untilted, the FitzHugh-Nagumo network makes a
quarter of the simulator's 1.4% joint spikes; tilted 10x (10.6% spikes in p_w) and trained 3000
steps it makes 73-80% of its training share on the banded DDPM-100 grid (the exact denoiser:
81%) and 75-84% on the probability-flow ODE; trained 12,000 steps 81-89% on the ODE, and 24,000
steps (the events default) 78-85%, while its spikes' shape keeps improving
(benchmarks/results/events/tails/README.md).

Trained weights are cached under $XDG_CACHE_HOME/densiformer/window_denoiser/<key>/
(default ~/.cache), `key` a hash of the training config, as model.safetensors and
config.json. The config fully determines the result on the CPU, so the cache is
reproducible by `densiformer events <system> --retrain`. While it trains, the run keeps
checkpoint.safetensors there (weights, EMA, optimizer moments and the random stream,
every CHECKPOINT_EVERY steps and on an interruption): the next call with the same config
resumes from it, and on the CPU ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..diffusion.schedules import alpha_sigma, get_schedule
from .head import LOG_SNR_RANGE


@dataclass(frozen=True)
class WindowConfig:
    system: str  # "lorenz63" or "fitzhugh-nagumo"
    dim: int
    train_windows: int = 100_000
    width: int = 256
    layers: int = 3  # residual blocks
    steps: int = 6000
    batch_size: int = 256
    lr: float = 2e-3
    ema_decay: float = 0.998
    seed: int = 0
    schedule: str = "cosine"
    variance_floor: float = 1e-3  # relative; see load_or_train
    version: int = 2  # 2: Gaussian-skip preconditioning, FiLM residual blocks
    loss_weighting: str = "unit"  # "unit": every whitened dimension alike; "variance": by its variance
    architecture: str = "mlp"  # "mlp" (WindowDenoiser) or "conv" (ConvWindowDenoiser)
    length: int = 0  # time steps per window (conv only; the channels are dim // length)
    # > 0: the model sees asinh_scale * asinh(x / asinh_scale), the astronomers' asinh stretch:
    # linear within about one scale of zero, logarithmic beyond, which brings rare large
    # excursions (FitzHugh-Nagumo's spikes, 8 sigma) within reach of the denoiser.
    asinh_scale: float = 0.0
    # Tail tilt (1: off). The model learns p_w(x) ∝ w(x) p(x), where w rises smoothly from 1
    # to tail_weight for the training windows whose Mahalanobis distance (under the Gaussian
    # fitted to them) lies beyond their tail_quantile; WindowModel.log_tilt gives log w of any
    # window, so p(x) ∝ p_w(x) / w(x) comes back exactly through importance weights (SMC's
    # last weight, the weighted Monte Carlo estimate). Why: FitzHugh-Nagumo's joint spikes
    # (1.4%, all beyond the 98% quantile) are a rare far mode that the network learns at a
    # fraction of its weight; at 10x (11% of the tilted density) it makes as many spikes as
    # the sampler's grid lets through (benchmarks/results/events/tails/README.md).
    tail_weight: float = 1.0
    tail_quantile: float = 0.98

    def __post_init__(self):
        if not self.asinh_scale >= 0:
            raise ValueError(f"asinh_scale must be 0 (off) or positive, got {self.asinh_scale}")
        if not (self.tail_weight >= 1 and 0 < self.tail_quantile < 1):
            raise ValueError(f"need tail_weight >= 1 (1: off) and 0 < tail_quantile < 1, got {self.tail_weight}, "
                             f"{self.tail_quantile}")

    @property
    def tilted(self) -> bool:
        return self.tail_weight != 1.0

    def fields(self) -> dict:
        """The config as a dict, leaving out fields added later while they hold their
        default, so that weights cached before them keep their key."""
        fields = asdict(self)
        if fields["asinh_scale"] == 0.0:
            del fields["asinh_scale"]
        if not self.tilted:
            del fields["tail_weight"], fields["tail_quantile"]
        return fields

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:16]


def _moments(z: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of z (n, dim), with optional per-row weights. Unweighted,
    the mean is z's own float32 mean: the rounding that weights cached before the tilt had."""
    if weights is None:
        return z.mean(0).double(), torch.cov(z.T.double())
    weights, z = weights.double(), z.double()
    return (weights[:, None] * z).sum(0) / weights.sum(), torch.cov(z.T, aweights=weights)


class WindowDenoiser(nn.Module):
    """eps_hat(z, log_snr) on whitened windows z (..., dim); see the module docstring.

    Preconditioned on the training windows' per-dimension mean mu and variance v (z's
    covariance is diagonal by construction): with alpha, sigma at log_snr and
    total = alpha^2 v + sigma^2,

        x0_hat = x0_gauss + c_out * F(c_in (z - alpha mu), log_snr),
        x0_gauss = mu + alpha v (z - alpha mu) / total,   (the exact posterior mean of N(mu, v))
        c_out = sigma sqrt(v / total),  c_in = total^-1/2,

    so the untrained network (F = 0, its output layer starts at zero) is already the
    exact denoiser of the Gaussian fitted to the data and samples with the right
    covariance; F only learns the non-Gaussian part, with a unit-variance target
    (x0 - x0_gauss) / c_out in every dimension at every noise level.
    """

    def __init__(self, dim: int, width: int, layers: int, time_features: int = 32):
        super().__init__()
        self.register_buffer("frequencies", math.pi * torch.logspace(0, math.log10(64), time_features // 2),
                             persistent=False)
        self.register_buffer("data_mean", torch.zeros(dim))
        self.register_buffer("data_var", torch.ones(dim))
        self.time_mlp = nn.Sequential(nn.Linear(time_features, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.input = nn.Linear(dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.films = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(layers))
        self.inner = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.outer = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.out_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def set_data_moments(self, z, weights=None):
        """The Gaussian skip's moments: of the windows z (n, dim), each weighing `weights` (n,)."""
        if weights is None:  # float32, as weights cached before the tilt were trained
            self.data_mean.copy_(z.mean(0))
            self.data_var.copy_(z.var(0))
            return
        mean, cov = _moments(z, weights)
        self.data_mean.copy_(mean.float())
        self.data_var.copy_(cov.diagonal().float())

    def network(self, u, log_snr):
        angles = (log_snr.to(u.dtype) / LOG_SNR_RANGE)[..., None] * self.frequencies.to(u.dtype)
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], -1))
        h = self.input(u)
        for norm, film, inner, outer in zip(self.norms, self.films, self.inner, self.outer):
            scale, shift = film(emb).chunk(2, -1)
            h = h + outer(F.silu(inner(norm(h)) * (1 + scale) + shift))
        return self.output(self.out_norm(h))

    def _coefficients(self, z, log_snr):
        alpha, sigma = alpha_sigma(log_snr.to(z.dtype))
        alpha, sigma = alpha[..., None], sigma[..., None]
        var, mu = self.data_var.to(z.dtype), self.data_mean.to(z.dtype)
        total = alpha**2 * var + sigma**2
        centred = z - alpha * mu
        return alpha, sigma, var, mu, total, centred

    def x0_and_target_scale(self, z, log_snr):
        """(x0_gauss, c_out, F): the pieces of x0_hat = x0_gauss + c_out F (training)."""
        alpha, sigma, var, mu, total, centred = self._coefficients(z, log_snr)
        f = self.network(centred * total.rsqrt(), log_snr)
        return mu + alpha * var * centred / total, sigma * (var / total).sqrt(), f

    def forward(self, z, log_snr):
        alpha, sigma, var, mu, total, centred = self._coefficients(z, log_snr)
        f = self.network(centred * total.rsqrt(), log_snr)
        # eps = (z - alpha x0_hat) / sigma, written without dividing by sigma.
        return sigma * centred / total - alpha * (var / total).sqrt() * f


class ConvWindowDenoiser(nn.Module):
    """eps_hat(z, log_snr) on standardised windows z (..., length * channels), time-major.

    With the training windows' mean mu and covariance U diag(lam) U^T (stored as buffers),
    alpha, sigma at log_snr and total = alpha^2 lam + sigma^2 per eigen-direction:

        x0_hat = x0_gauss + c_out * F(c_in (z - alpha mu), x0_gauss, log_snr),
        x0_gauss = mu + U diag(alpha lam / total) U^T (z - alpha mu),
        c_out = sigma * sqrt(mean(lam / total)),  c_in = mean(total)^-1/2,

    where x0_gauss is the exact posterior mean of N(mu, U lam U^T) and the scalar c_out
    is its posterior's average standard deviation; F's output convolution starts at zero.
    """

    def __init__(self, length, channels, width, blocks, time_features=32):
        super().__init__()
        dim = length * channels
        self.length, self.channels = length, channels
        self.register_buffer("frequencies", math.pi * torch.logspace(0, math.log10(64), time_features // 2),
                             persistent=False)
        self.register_buffer("data_mean", torch.zeros(dim))
        self.register_buffer("eigvec", torch.eye(dim))
        self.register_buffer("eigval", torch.ones(dim))
        self.time_mlp = nn.Sequential(nn.Linear(time_features, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.stem = nn.Conv1d(2 * channels, width, 3, padding=1)
        dilations = [2 ** (i % 4) for i in range(blocks)]
        self.norm1 = nn.ModuleList(nn.GroupNorm(8, width) for _ in dilations)
        self.conv1 = nn.ModuleList(nn.Conv1d(width, width, 3, padding=d, dilation=d) for d in dilations)
        self.norm2 = nn.ModuleList(nn.GroupNorm(8, width) for _ in dilations)
        self.film = nn.ModuleList(nn.Linear(width, 2 * width) for _ in dilations)
        self.conv2 = nn.ModuleList(nn.Conv1d(width, width, 3, padding=d, dilation=d) for d in dilations)
        self.out_norm = nn.GroupNorm(8, width)
        self.out = nn.Conv1d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def set_data_moments(self, z, weights=None):
        """The Gaussian skip's moments: of the windows z (n, dim), each weighing `weights` (n,)."""
        mean, cov = _moments(z, weights)
        self.data_mean.copy_(mean.float())
        val, vec = torch.linalg.eigh(cov)
        self.eigval.copy_(val.clamp_min(0).float())
        self.eigvec.copy_(vec.float())

    def to_time(self, v):
        return v.reshape(*v.shape[:-1], self.length, self.channels).transpose(-1, -2)

    def network(self, u, x0g, log_snr):
        # Convolutions take (batch, channels, time): flatten any leading dims into one.
        batch = u.shape[:-1]
        log_snr = log_snr.to(u.dtype).expand(batch).reshape(-1)
        angles = (log_snr / LOG_SNR_RANGE)[..., None] * self.frequencies.to(u.dtype)
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], -1))
        flat = (-1, u.shape[-1])
        h = self.stem(torch.cat([self.to_time(u.reshape(flat)), self.to_time(x0g.reshape(flat))], -2))
        for norm1, conv1, norm2, film, conv2 in zip(self.norm1, self.conv1, self.norm2, self.film, self.conv2):
            scale, shift = film(emb)[..., None].chunk(2, -2)
            r = conv1(F.silu(norm1(h)))
            h = h + conv2(F.silu(norm2(r) * (1 + scale) + shift))
        out = self.out(F.silu(self.out_norm(h)))
        return out.transpose(-1, -2).reshape(u.shape)

    def _parts(self, z, log_snr):
        """(alpha, sigma, lam, total, U, coords, x0_gauss, F): everything x0_hat and eps need."""
        alpha, sigma = alpha_sigma(log_snr.to(z.dtype))
        alpha, sigma = alpha[..., None], sigma[..., None]
        lam, U = self.eigval.to(z.dtype), self.eigvec.to(z.dtype)
        total = alpha**2 * lam + sigma**2
        centred = z - alpha * self.data_mean.to(z.dtype)
        coords = centred @ U
        x0_gauss = self.data_mean.to(z.dtype) + (coords * alpha * lam / total) @ U.T
        f = self.network(centred * total.mean(-1, keepdim=True).rsqrt(), x0_gauss, log_snr)
        return alpha, sigma, lam, total, U, coords, x0_gauss, f

    def x0_and_target_scale(self, z, log_snr):
        """(x0_gauss, c_out, F): the pieces of x0_hat = x0_gauss + c_out F (training)."""
        alpha, sigma, lam, total, U, coords, x0_gauss, f = self._parts(z, log_snr)
        return x0_gauss, sigma * (lam / total).mean(-1, keepdim=True).sqrt(), f

    def forward(self, z, log_snr):
        # eps = (z - alpha x0_hat) / sigma, written without dividing by sigma.
        alpha, sigma, lam, total, U, coords, x0_gauss, f = self._parts(z, log_snr)
        return (coords * sigma / total) @ U.T - alpha * (lam / total).mean(-1, keepdim=True).sqrt() * f


def build_denoiser(config: WindowConfig) -> nn.Module:
    if config.architecture == "mlp":
        return WindowDenoiser(config.dim, config.width, config.layers)
    if config.architecture == "conv":
        if config.length < 1 or config.dim % config.length:
            raise ValueError(f"conv needs a window length dividing dim {config.dim}, got {config.length}")
        return ConvWindowDenoiser(config.length, config.dim // config.length, config.width, config.layers)
    raise ValueError(f"unknown architecture {config.architecture!r}; choose 'mlp' or 'conv'")


# Width, in log squared Mahalanobis distance, of the tail tilt's smooth step.
TILT_WIDTH = 0.25


def mahalanobis2(z: torch.Tensor, mean: torch.Tensor, eigvec: torch.Tensor, eigval: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of z (..., dim) under N(mean, U diag(eigval) U^T), with
    the eigenvalues floored at 1e-3 of the largest (the near-deterministic modes would
    otherwise make the distance of a generated window hinge on its rounding)."""
    floor = eigval.clamp_min(1e-3 * float(eigval.max()))
    return (((z - mean) @ eigvec) ** 2 / floor).sum(-1)


def log_tail_weight(m2: torch.Tensor, log_threshold: float, weight: float) -> torch.Tensor:
    """log w: w rises from 1 to `weight` around squared distance exp(log_threshold)."""
    step = torch.sigmoid((m2.clamp_min(1e-30).log() - log_threshold) / TILT_WIDTH)
    return torch.log1p((weight - 1) * step)


def fit_tilt(config: WindowConfig, z: torch.Tensor) -> tuple[dict | None, torch.Tensor | None]:
    """(tilt, weights): the Gaussian and threshold of the tail tilt fitted to the training
    windows z (n, dim), JSON-ready, and each window's weight w; (None, None) untilted."""
    if not config.tilted:
        return None, None
    mean, cov = _moments(z)
    eigval, eigvec = torch.linalg.eigh(cov)
    eigval = eigval.clamp_min(0)
    m2 = mahalanobis2(z.double(), mean, eigvec, eigval)
    log_threshold = float(torch.quantile(m2, config.tail_quantile).log())
    weights = log_tail_weight(m2, log_threshold, config.tail_weight).exp().float()
    tilt = {"mean": mean.tolist(), "eigvec": eigvec.tolist(), "eigval": eigval.tolist(),
            "log_threshold": log_threshold, "mean_weight": float(weights.mean())}
    return tilt, weights


class WindowModel:
    """A trained denoiser with its whitening: x = g^-1(mean + z @ basis.T), basis = U L^1/2,
    g the asinh stretch where config.asinh_scale > 0 (else the identity). With a tail tilt
    (config.tilted) the denoiser models p_w(z) ∝ w(z) p(z), and log_tilt(z) = log w(z)."""

    def __init__(self, config: WindowConfig, denoiser: WindowDenoiser, mean, basis, seconds: float,
                 tilt: dict | None = None):
        self.config, self.denoiser, self.seconds = config, denoiser.eval().requires_grad_(False), seconds
        self.mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        self.basis = torch.as_tensor(np.asarray(basis), dtype=torch.float32)
        self.schedule = get_schedule(config.schedule)
        if config.tilted and tilt is None:
            raise ValueError("a tilted config needs its tilt (the Gaussian and threshold it was trained with)")
        self.tilt = None if tilt is None else {k: float(v) if k in ("log_threshold", "mean_weight") else
                                               torch.as_tensor(np.asarray(v), dtype=torch.float64)
                                               for k, v in tilt.items()}

    def log_tilt(self, z: torch.Tensor) -> torch.Tensor:
        """log w(z) of the tail tilt for windows z (..., dim) in the model's coordinates; 0 untilted."""
        if self.tilt is None:
            return z.new_zeros(z.shape[:-1])
        t = self.tilt
        m2 = mahalanobis2(z.double(), t["mean"].to(z.device), t["eigvec"].to(z.device), t["eigval"].to(z.device))
        return log_tail_weight(m2, t["log_threshold"], self.config.tail_weight).to(z.dtype)

    def to_physical(self, z: torch.Tensor) -> torch.Tensor:
        u = self.mean.to(z) + z @ self.basis.to(z).T
        scale = self.config.asinh_scale
        return scale * torch.sinh(u / scale) if scale > 0 else u

    def from_physical(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of to_physical: physical windows (..., dim) in the model's coordinates."""
        scale = self.config.asinh_scale
        u = scale * torch.asinh(x / scale) if scale > 0 else x
        return torch.linalg.solve(self.basis.to(u), (u - self.mean.to(u)).mT).mT


def per_channel_standardisation(data: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, basis) standardising each channel of time-major windows (n, length * channels)
    over all windows and time steps: the time layout the convolutions work on."""
    per_channel = data.reshape(len(data), length, -1)
    mean = np.tile(per_channel.mean((0, 1)), length)
    return mean, np.diag(np.tile(per_channel.std((0, 1)), length))


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "densiformer" / "window_denoiser"


def load_or_train(config: WindowConfig, simulate, *, retrain: bool = False, progress: bool = True,
                  device="cpu") -> WindowModel:
    """The cached model for `config`, or a freshly trained one (then cached).

    simulate(n, seed) -> (n, dim) float array of physical windows: the training data.
    device: where to train and where the returned denoiser lives. Training draws its
    random numbers on the CPU either way, so a GPU-trained model is the CPU one up to
    rounding, and both share the cache.
    """
    from safetensors.torch import load_file, save_file

    path = cache_dir() / config.key()
    if not retrain and (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        meta = json.loads((path / "config.json").read_text())
        if meta.get("config") == config.fields():
            denoiser = build_denoiser(config)
            denoiser.load_state_dict(load_file(str(path / "model.safetensors")))
            denoiser.to(device)
            return WindowModel(config, denoiser, np.array(meta["mean"]), np.array(meta["basis"]), meta["seconds"],
                               meta.get("tilt"))
    data = np.asarray(simulate(config.train_windows, config.seed + 1), dtype=np.float64)
    if config.asinh_scale > 0:
        data = config.asinh_scale * np.arcsinh(data / config.asinh_scale)
    if config.architecture == "conv":
        mean, basis = per_channel_standardisation(data, config.length)
    else:
        mean = data.mean(0)
        eigval, eigvec = np.linalg.eigh(np.cov(data - mean, rowvar=False))
        # Modes below 1e-3 of the largest variance keep that floor: fully whitened, the
        # hundred-odd near-deterministic fast modes took the loss over and the model lost the
        # slow ones (its 50% quantile of the Lorenz energy fell to the simulator's 10%).
        basis = eigvec * np.sqrt(np.maximum(eigval, config.variance_floor * eigval.max()))
    z = torch.from_numpy(np.linalg.solve(basis, (data - mean).T).T.astype(np.float32))
    tilt, weights = fit_tilt(config, z)
    path.mkdir(parents=True, exist_ok=True)
    checkpoint = path / "checkpoint.safetensors"
    if retrain:
        checkpoint.unlink(missing_ok=True)
    denoiser, seconds = train(config, z, progress, device, checkpoint=checkpoint, weights=weights)
    save_file({k: v.cpu().contiguous() for k, v in denoiser.state_dict().items()}, str(path / "model.safetensors.tmp"))
    meta = {"config": config.fields(), "mean": mean.tolist(), "basis": basis.tolist(), "seconds": seconds,
            "command": f"densiformer events {config.system} --retrain"}
    if tilt is not None:
        meta["tilt"] = tilt
    (path / "config.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    os.replace(path / "config.json.tmp", path / "config.json")
    checkpoint.unlink(missing_ok=True)
    return WindowModel(config, denoiser, mean, basis, seconds, tilt)


CHECKPOINT_EVERY = 200  # training steps; a killed run loses at most this many


def train(config: WindowConfig, z: torch.Tensor, progress: bool = True, device="cpu", *,
          checkpoint: Path | None = None, weights: torch.Tensor | None = None) -> tuple[nn.Module, float]:
    """Train on standardised windows z (n, dim) for config.steps steps; returns the EMA model
    (on device) and the training time in seconds, earlier runs of a resumed training included.

    Batches, times and noise are drawn on the CPU from config.seed, then moved: the same
    config gives the same random stream on any device. With `checkpoint` (a file path),
    training resumes from it, saves it every CHECKPOINT_EVERY steps and, when SIGINT or
    SIGTERM stops the run, after the step under way; the caller deletes it when done.
    weights: per-window sampling weights (the tail tilt, fit_tilt), None for uniform batches.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    schedule = get_schedule(config.schedule)
    model = build_denoiser(config)
    model.set_data_moments(z, weights)  # the tilted density's Gaussian under a tilted model
    model.to(device)
    weight = z.var(0) / z.var(0).mean() if config.loss_weighting == "variance" else torch.ones(z.shape[-1])
    z, weight = z.to(device), weight.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    warmup = max(1, config.steps // 20)
    start, seconds_before = 0, 0.0
    if checkpoint is not None and checkpoint.is_file():
        start, seconds_before = _load_checkpoint(checkpoint, config, model, ema, optimizer, generator)
    started = time.perf_counter()

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
               desc=f"training {config.system} denoiser", unit="step")
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    with _StopBetweenSteps(enabled=checkpoint is not None) as stop:
        for step in bar:
            # Linear warmup, then cosine decay (set here rather than by a scheduler so
            # that a resumed run needs no scheduler state).
            factor = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor
            index = (torch.randint(len(z), (config.batch_size,), generator=generator) if weights is None else
                     torch.multinomial(weights, config.batch_size, replacement=True, generator=generator))
            x0 = z[index.to(device)]
            # Stratified times, as in training.diffusion_loss.
            t = (torch.rand((), generator=generator) + torch.arange(config.batch_size) / config.batch_size) % 1.0
            log_snr = schedule.log_snr(t).float().to(device)
            alpha, sigma = alpha_sigma(log_snr)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            xt = alpha[:, None] * x0 + sigma[:, None] * noise
            x0_gauss, c_out, f = model.x0_and_target_scale(xt, log_snr)
            loss = ((f - (x0 - x0_gauss) / c_out) ** 2 * weight).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():  # one fused update (a few kernel launches on a GPU, not one per tensor)
                torch._foreach_lerp_(ema_params, model_params, 1 - decay)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            stopping = stop.signum is not None
            if checkpoint is not None and (stopping or ((step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < config.steps)):
                _save_checkpoint(checkpoint, config, step + 1, seconds_before + time.perf_counter() - started,
                                 model, ema, optimizer, generator)
            if stopping:
                bar.close()
                break
    if stop.signum is not None:
        stop.deliver()
    return ema, seconds_before + time.perf_counter() - started


class _StopBetweenSteps:
    """Holds SIGINT and SIGTERM while training, so that an interrupted run (Ctrl-C, or a
    job's time limit) first finishes its step and saves a checkpoint of whole steps; then
    `deliver` passes the signal on to the handler that was there before."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum = None
        self.previous: dict = {}

    def __enter__(self):
        if self.enabled:
            for signum in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(signum)
                if handler is not signal.SIG_IGN:
                    self.previous[signum] = handler
                    signal.signal(signum, self._hold)
        return self

    def _hold(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def deliver(self):
        signal.raise_signal(self.signum)
        raise KeyboardInterrupt  # the previous handler returned: stop anyway, the checkpoint is saved


def _save_checkpoint(path: Path, config: WindowConfig, step: int, seconds: float, model: nn.Module,
                     ema: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in state.items()})
    tensors["generator"] = generator.get_state()
    metadata = {"step": str(step), "seconds": repr(seconds), "config": json.dumps(config.fields(), sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, config: WindowConfig, model: nn.Module, ema: nn.Module,
                     optimizer: torch.optim.Optimizer, generator: torch.Generator) -> tuple[int, float]:
    """Restore a checkpoint of this config in place; returns (steps done, seconds spent)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if json.loads(metadata["config"]) != config.fields():
        raise ValueError(f"{path} is a checkpoint of another config; delete it or pass retrain")
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    model.load_state_dict(part("model."))
    ema.load_state_dict(part("ema."))
    state: dict[int, dict] = {}
    for name, value in part("optimizer.").items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    generator.set_state(tensors["generator"])
    return int(metadata["step"]), float(metadata["seconds"])
