"""A small denoiser for fixed-length windows of a dynamical system, with a weight cache.

An MLP with residual SiLU layers over the flattened window (the windows are short:
180 or 240 values), conditioned on the log-SNR by the head's sinusoidal features and
v-parameterised like the head: eps_hat = sigma x + alpha F. It works on PCA-whitened
windows, z = L^-1/2 U^T (x - mean) from the training windows' covariance U L U^T, with
L floored at `variance_floor` times its largest entry: the windows are smooth, so most
of their variance sits in a few slow modes, and in raw coordinates the denoiser's small
white errors swamp the fast modes. Known limitation: at the default budget (4000 steps,
about 4 minutes on one core) the Lorenz-63 model under-disperses its leading modes
(sample std 0.23 against 0.40 per coordinate), so its event rates are off (see the
table of `densiformer events lorenz63`); the guidance and probability code is validated on
exact denoisers in tests/test_guidance.py. Trained with the library's cosine schedule, the v-loss of training.py and
an EMA of the weights.

Trained weights are cached under $XDG_CACHE_HOME/densiformer/window_denoiser/<key>/
(default ~/.cache), `key` a hash of the training config, as model.safetensors and
config.json. The config fully determines the result on the CPU, so the cache is
reproducible by `densiformer events <system> --retrain`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
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
    width: int = 512
    layers: int = 3
    steps: int = 4000
    batch_size: int = 512
    lr: float = 2e-3
    ema_decay: float = 0.999
    seed: int = 0
    schedule: str = "cosine"
    variance_floor: float = 1e-3  # relative; see load_or_train

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class WindowDenoiser(nn.Module):
    """eps_hat(z, log_snr) on standardised windows z (..., dim); see the module docstring."""

    def __init__(self, dim: int, width: int, layers: int, time_features: int = 32):
        super().__init__()
        self.register_buffer("frequencies", math.pi * torch.logspace(0, math.log10(64), time_features // 2),
                             persistent=False)
        self.time_proj = nn.Linear(time_features, width)
        self.input = nn.Linear(dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers - 1))
        self.output = nn.Linear(width, dim)

    def predict_v(self, z, log_snr):
        angles = (log_snr.to(z.dtype) / LOG_SNR_RANGE)[..., None] * self.frequencies.to(z.dtype)
        h = F.silu(self.input(z) + self.time_proj(torch.cat([angles.sin(), angles.cos()], -1)))
        for layer in self.hidden:
            h = h + F.silu(layer(h))
        return self.output(h)

    def forward(self, z, log_snr):
        alpha, sigma = alpha_sigma(log_snr.to(z.dtype))
        return sigma[..., None] * z + alpha[..., None] * self.predict_v(z, log_snr)


class WindowModel:
    """A trained denoiser with its whitening: x = mean + z @ basis.T, basis = U L^1/2."""

    def __init__(self, config: WindowConfig, denoiser: WindowDenoiser, mean, basis, seconds: float):
        self.config, self.denoiser, self.seconds = config, denoiser.eval().requires_grad_(False), seconds
        self.mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        self.basis = torch.as_tensor(np.asarray(basis), dtype=torch.float32)
        self.schedule = get_schedule(config.schedule)

    def to_physical(self, z: torch.Tensor) -> torch.Tensor:
        return self.mean.to(z) + z @ self.basis.to(z).T

    def to_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.basis.to(x), (x - self.mean.to(x)).T).T

    def log_abs_det(self) -> float:
        """log |dz/dx|: add to a density of z to get the density of x."""
        return float(-torch.linalg.slogdet(self.basis.double())[1])


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "densiformer" / "window_denoiser"


def load_or_train(config: WindowConfig, simulate, *, retrain: bool = False, progress: bool = True) -> WindowModel:
    """The cached model for `config`, or a freshly trained one (then cached).

    simulate(n, seed) -> (n, dim) float array of physical windows: the training data.
    """
    from safetensors.torch import load_file, save_file

    path = cache_dir() / config.key()
    if not retrain and (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        meta = json.loads((path / "config.json").read_text())
        if meta.get("config") == asdict(config):
            denoiser = WindowDenoiser(config.dim, config.width, config.layers)
            denoiser.load_state_dict(load_file(str(path / "model.safetensors")))
            return WindowModel(config, denoiser, np.array(meta["mean"]), np.array(meta["basis"]), meta["seconds"])
    data = np.asarray(simulate(config.train_windows, config.seed + 1), dtype=np.float64)
    mean = data.mean(0)
    eigval, eigvec = np.linalg.eigh(np.cov(data - mean, rowvar=False))
    # Modes below 1e-3 of the largest variance keep that floor: fully whitened, the
    # hundred-odd near-deterministic fast modes took the loss over and the model lost the
    # slow ones (its 50% quantile of the Lorenz energy fell to the simulator's 10%).
    basis = eigvec * np.sqrt(np.maximum(eigval, config.variance_floor * eigval.max()))
    z = np.linalg.solve(basis, (data - mean).T).T.astype(np.float32)
    started = time.perf_counter()
    denoiser = train(config, torch.from_numpy(z), progress)
    seconds = time.perf_counter() - started
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in denoiser.state_dict().items()}, str(path / "model.safetensors.tmp"))
    meta = {"config": asdict(config), "mean": mean.tolist(), "basis": basis.tolist(), "seconds": seconds,
            "command": f"densiformer events {config.system} --retrain"}
    (path / "config.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    os.replace(path / "config.json.tmp", path / "config.json")
    return WindowModel(config, denoiser, mean, basis, seconds)


def train(config: WindowConfig, z: torch.Tensor, progress: bool = True) -> WindowDenoiser:
    """Train on standardised windows z (n, dim) for config.steps steps; returns the EMA model."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    schedule = get_schedule(config.schedule)
    model = WindowDenoiser(config.dim, config.width, config.layers)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    warmup = max(1, config.steps // 20)
    lr_at = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    bar = tqdm(range(config.steps), disable=not progress, desc=f"training {config.system} denoiser", unit="step")
    for step in bar:
        x0 = z[torch.randint(len(z), (config.batch_size,), generator=generator)]
        # Stratified times, as in training.diffusion_loss.
        t = (torch.rand((), generator=generator) + torch.arange(config.batch_size) / config.batch_size) % 1.0
        log_snr = schedule.log_snr(t).float()
        alpha, sigma = alpha_sigma(log_snr)
        noise = torch.randn(x0.shape, generator=generator)
        xt = alpha[:, None] * x0 + sigma[:, None] * noise
        loss = ((model.predict_v(xt, log_snr) - (alpha[:, None] * noise - sigma[:, None] * x0)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_at.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema
