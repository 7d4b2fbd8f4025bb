"""Training loop: random input and request subsets per row, noise-prediction loss.

Each row of a batch is turned into one conditional density problem: a random subset
of its observed targets is requested (at least one), and a random subset of its other
observed columns (possibly none) is kept as inputs. One model therefore learns the
joint density of any subset of targets given any subset of the other columns.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion.schedules import Schedule


@dataclass
class TrainingHistory:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self):
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "seconds": self.seconds}


def random_task(values: torch.Tensor, target_columns: torch.Tensor, generator: torch.Generator):
    """Pick, per row, the requested targets and the kept inputs.

    Returns (request (N, K) bool, inputs (N, C) with dropped columns set to NaN,
    weight (N,) 1 for rows with at least one observed target). Half of the rows keep
    every observed input (the usual case at inference); the others keep each one with
    a per-row probability drawn uniformly, so every subset size is trained, including
    the empty one (the unconditional density).
    """
    N, C = values.shape
    device = values.device
    observed = ~torch.isnan(values)
    target_observed = observed[:, target_columns]
    request = (torch.rand(target_observed.shape, generator=generator, device=device) < 0.5) & target_observed
    # Rows left with nothing requested get one observed target, chosen at random.
    empty = ~request.any(1) & target_observed.any(1)
    scores = torch.rand(target_observed.shape, generator=generator, device=device).masked_fill(~target_observed, -1)
    pick = torch.zeros_like(request)
    pick[torch.arange(N, device=device), scores.argmax(1)] = True
    request |= pick & empty[:, None]

    keep_prob = torch.rand(N, 1, generator=generator, device=device)
    keep_prob = torch.where(torch.rand(N, 1, generator=generator, device=device) < 0.5, 1.0, keep_prob)
    keep = torch.rand(N, C, generator=generator, device=device) < keep_prob
    inputs = values.masked_fill(~keep, float("nan"))
    weight = request.any(1).to(values.dtype)
    return request, inputs, weight


def diffusion_loss(model, schedule: Schedule, values, target_columns, generator, backend="auto"):
    """Mean squared error of the head's v prediction over requested targets.

    v = alpha eps - sigma x0 (see model/head.py); the per-row mean over requested
    targets, then the mean over rows. In terms of the noise prediction this is the
    noise MSE weighted by 1 / alpha^2, which demands the accuracy the samplers need
    near the noise end.
    """
    request, inputs, weight = random_task(values, target_columns, generator)
    N = values.shape[0]
    # Stratified times: one uniform offset, evenly spread, cut the loss variance.
    t = (torch.rand((), generator=generator, device=values.device)
         + torch.arange(N, device=values.device) / N) % 1.0
    t = t[torch.randperm(N, generator=generator, device=values.device)]
    log_snr = schedule.log_snr(t).to(values.dtype)
    alpha, sigma = torch.sigmoid(log_snr).sqrt()[:, None], torch.sigmoid(-log_snr).sqrt()[:, None]
    req = request.to(values.dtype)
    x0 = torch.nan_to_num(values[:, target_columns]) * req
    noise = torch.randn(x0.shape, generator=generator, device=values.device, dtype=values.dtype) * req
    xt = alpha * x0 + sigma * noise
    cond = model.condition(inputs, req, backend)
    v_hat = model.head.predict_v(xt, log_snr, cond, req)
    v = alpha * noise - sigma * x0
    per_row = ((v_hat.float() - v.float()) ** 2).sum(1) / req.sum(1).clamp(min=1)
    return (per_row * weight).sum() / weight.sum().clamp(min=1)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - d)


@torch.no_grad()
def validation_loss(model, schedule, values, target_columns, batch_size, seed, backend="auto"):
    """Loss on fixed tasks and noise (same seed every epoch), so epochs compare fairly."""
    generator = torch.Generator(values.device).manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, values.shape[0], batch_size):
        batch = values[start:start + batch_size]
        total += float(diffusion_loss(model, schedule, batch, target_columns, generator, backend)) * len(batch)
        count += len(batch)
    return total / max(count, 1)


def train(model, schedule: Schedule, train_values: np.ndarray, val_values: np.ndarray | None, *,
          epochs: int, batch_size: int, lr: float, weight_decay: float, ema_decay: float,
          grad_clip: float, device: torch.device, seed: int, progress: bool,
          on_epoch_end=None) -> tuple[torch.nn.Module, TrainingHistory]:
    """Train `model` in place; return (EMA copy of the model, history).

    `train_values`/`val_values` are (rows, columns) float32 arrays in normalised units
    with NaN = missing. On a GPU the forward pass runs in bf16 autocast. The same seed
    gives identical results on the CPU. `on_epoch_end(epoch, ema_model, history)` is
    called after each epoch (used to checkpoint).
    """
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    model.to(device).train()
    target_columns = model.target_columns
    data = torch.as_tensor(train_values, dtype=torch.float32, device=device)
    val = None if val_values is None else torch.as_tensor(val_values, dtype=torch.float32, device=device)
    steps_per_epoch = max(1, math.ceil(len(data) / batch_size))
    total_steps = epochs * steps_per_epoch
    warmup = min(500, max(1, total_steps // 20))

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    ema = EMA(model, ema_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = TrainingHistory()
    started = time.perf_counter()

    bar = tqdm(total=total_steps, disable=not progress, desc="training", unit="step", dynamic_ncols=True)
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=generator, device=device)
        running = 0.0
        for step in range(steps_per_epoch):
            batch = data[order[step * batch_size:(step + 1) * batch_size]]
            with autocast:
                loss = diffusion_loss(model, schedule, batch, target_columns, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)} at epoch {epoch}, step {step}; "
                                         f"try a lower learning rate (lr={lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            ema.update(model)
            running += loss.item()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / (step + 1):.4f}")
        history.train_loss.append(running / steps_per_epoch)
        if val is not None:
            history.val_loss.append(validation_loss(ema.model, schedule, val, target_columns, 4096, seed + 1))
            bar.set_postfix(epoch=epoch + 1, loss=f"{history.train_loss[-1]:.4f}", val=f"{history.val_loss[-1]:.4f}")
        history.seconds = time.perf_counter() - started
        if on_epoch_end is not None:
            on_epoch_end(epoch, ema.model, history)
    bar.close()
    return ema.model, history
