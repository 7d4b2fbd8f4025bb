"""Exact log densities of the diffusion head in one op: the probability-flow ODE, fused.

`head_log_prob_ref` defines the op in plain PyTorch. It is
diffusion.likelihood.log_prob(method="fixed") with DiffusionHead.forward as the denoiser,
over each row's requested targets, written out so that a kernel can run it whole:

Network. Per evaluation at log-SNR lambda (node n of the RK4 grid) the MLP output is

    h = silu(W_in (x * req) + b_in + cond + temb[n])
    h = h + silu(W_l h + b_l)                      for each hidden layer l
    F = (W_out h + b_out) * req

and the head's noise prediction eps_hat = sigma x + alpha F on requested targets.

Velocity and divergence. dx/dlambda = 0.5 (sigma^2 x - sigma eps_hat) = -0.5 alpha sigma F,
and its divergence 0.5 (k sigma^2 - sigma tr(d eps_hat / dx)) with
tr(d eps_hat / dx) = sigma k + alpha tr(dF/dx) is -0.5 alpha sigma tr(dF/dx): the sigma^2
terms cancel exactly, so both are `scale[n] * (F, tr dF/dx)` with scale = -0.5 alpha sigma.
The trace is exact: each row carries K tangent vectors through the MLP in forward mode,
T_j = dh/dx_j, one per target, beside the activations:

    T_j = silu'(pre_in) * W_in[:, j] * req_j
    T_j = T_j + silu'(pre_l) * (W_l T_j)           for each hidden layer l
    tr dF/dx = sum_j req_j * (W_out[j] . T_j)

Integration. Classical RK4 from the schedule's log_snr_max (data) to log_snr_min (noise)
in `steps` steps uniform in lambda, as likelihood._rk4. Step i evaluates the network at
lambdas[2i], lambdas[2i+1] (twice) and lambdas[2i+2]: `lambdas` holds the 2 steps + 1
distinct nodes (`rk4_nodes`) and `time_emb` the time embedding at each. Then

    log p(x0) = log N(x1; 0, I_k) + integral of div,   k = the row's requested targets.

Unrequested entries of x0 are ignored (the op masks them), and a row with nothing
requested gets 0. Backends: `torch` (the reference), `cpu` (C++, densiformer._C:
csrc/cpu/head_log_prob.cpp) and `triton` (ops/_head_log_prob_triton.py).
`head_log_prob_from_head` takes a DiffusionHead and a schedule and prepares everything.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..diffusion.schedules import Schedule, alpha_sigma
from .backends import cpu_extension, resolve_backend


def rk4_nodes(schedule: Schedule, steps: int) -> torch.Tensor:
    """The log-SNR nodes (2 steps + 1,) float64 of likelihood._rk4: grid points and midpoints interleaved."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(schedule.log_snr_max, schedule.log_snr_min, steps + 1, dtype=torch.float64)
    nodes = torch.empty(2 * steps + 1, dtype=torch.float64)
    nodes[0::2] = grid
    nodes[1::2] = grid[:-1] + (grid[1:] - grid[:-1]) / 2  # lam + h / 2, as _rk4 computes it
    return nodes


def rk4_tables(lambdas: torch.Tensor):
    """(scale (2 steps + 1,), h (steps,)) in float64: -0.5 alpha sigma at each node, and each step's size."""
    lam = lambdas.detach().to(device="cpu", dtype=torch.float64)
    alpha, sigma = alpha_sigma(lam)
    return -0.5 * alpha * sigma, lam[2::2] - lam[:-2:2]


def _silu_and_slope(pre):
    s = torch.sigmoid(pre)
    return F.silu(pre), s * (1 + pre * (1 - s))


# ---------------------------------------------------------------- the reference
def head_log_prob_ref(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, lambdas, x0):
    """log p(x0) per row (N,) over each row's requested targets; see the module docstring.

    cond (N, W); request (N, K) 0/1; w_in (W, K), b_in (W,); w_hidden (L - 1, W, W),
    b_hidden (L - 1, W); w_out (K, W), b_out (K,); time_emb (2 steps + 1, W), the time
    embedding at each of `lambdas` (2 steps + 1,); x0 (N, K). Runs in cond's dtype.
    """
    dtype = cond.dtype
    req = request.to(dtype)
    scale, h = rk4_tables(lambdas)
    scale = scale.tolist()
    # (N, K, W): W_in[:, j] * req_j, row-major so that the tangents' matmuls are plain GEMMs
    w_in_req = w_in.t().contiguous()[None] * req[:, :, None]

    def velocity(x, node):
        """(dx/dlambda (N, K), its divergence (N,)) at node `node`."""
        act, slope = _silu_and_slope(F.linear(x * req, w_in, b_in) + cond + time_emb[node])
        tangents = slope[:, None, :] * w_in_req  # (N, K, W): dh/dx_j
        for weight, bias in zip(w_hidden, b_hidden):
            out, slope = _silu_and_slope(F.linear(act, weight, bias))
            act = act + out
            tangents = tangents + slope[:, None, :] * F.linear(tangents, weight)
        out = F.linear(act, w_out, b_out) * req
        trace = ((tangents * w_out).sum(-1) * req).sum(-1)
        return scale[node] * out, scale[node] * trace

    x = x0 * req
    log_det = x.new_zeros(x.shape[0])
    for i, step in enumerate(h.tolist()):
        v1, d1 = velocity(x, 2 * i)
        v2, d2 = velocity(x + (step / 2) * v1, 2 * i + 1)
        v3, d3 = velocity(x + (step / 2) * v2, 2 * i + 1)
        v4, d4 = velocity(x + step * v3, 2 * i + 2)
        x = x + (step / 6) * (v1 + 2 * v2 + 2 * v3 + v4)
        log_det = log_det + (step / 6) * (d1 + 2 * d2 + 2 * d3 + d4)
    prior = -0.5 * (x**2).sum(-1) - 0.5 * math.log(2 * math.pi) * req.sum(-1)
    return prior + log_det


# ---------------------------------------------------------------- the op
_NAMES = ("cond", "request", "w_in", "b_in", "w_hidden", "b_hidden", "w_out", "b_out", "time_emb", "lambdas", "x0")


def _check(tensors: dict):
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    dtype = tensors["cond"].dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cond must be torch.float32 or torch.float64, got {dtype}")
    for name, t in tensors.items():
        allowed = (torch.float32, torch.float64) if name == "lambdas" else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(f"{name} must be {' or '.join(map(str, allowed))} (as cond), got {t.dtype}")
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(devices)}")
    cond, request = tensors["cond"], tensors["request"]
    if cond.dim() != 2 or request.dim() != 2 or request.shape[0] != cond.shape[0]:
        raise ValueError(f"cond must be (N, W) and request (N, K); got {tuple(cond.shape)}, {tuple(request.shape)}")
    (N, W), K = cond.shape, request.shape[1]
    lambdas, w_hidden = tensors["lambdas"], tensors["w_hidden"]
    nodes = lambdas.shape[0] if lambdas.dim() == 1 else -1
    if nodes < 3 or nodes % 2 == 0:
        raise ValueError(f"lambdas must be (2 steps + 1,) with steps >= 1 (see rk4_nodes); got {tuple(lambdas.shape)}")
    hidden = w_hidden.shape[0] if w_hidden.dim() == 3 else -1
    expected = dict(w_in=(W, K), b_in=(W,), w_hidden=(hidden, W, W), b_hidden=(hidden, W), w_out=(K, W),
                    b_out=(K,), time_emb=(nodes, W), x0=(N, K))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (N={N}, W={W}, K={K}, nodes={nodes}, "
                             f"hidden layers={hidden}); got {tuple(tensors[name].shape)}")
    if W < 1 or K < 1:
        raise ValueError(f"need width and k >= 1; got W={W}, K={K}")


def _kernel_tables(lambdas):
    scale, h = rk4_tables(lambdas)
    return scale.to(torch.float32), h.to(torch.float32)


@torch.library.custom_op("densiformer::head_log_prob", mutates_args=())
def _head_log_prob_op(cond: torch.Tensor, request: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
                      w_hidden: torch.Tensor, b_hidden: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
                      time_emb: torch.Tensor, lambdas: torch.Tensor, x0: torch.Tensor, backend: str) -> torch.Tensor:
    """The compiled backends on contiguous fp32 inputs (see head_log_prob)."""
    (N, W), K = cond.shape, request.shape[1]
    out = cond.new_empty(N)
    scale, h = (t.to(cond.device) for t in _kernel_tables(lambdas))
    if backend == "cpu":
        cpu_extension().head_log_prob(
            cond.data_ptr(), request.data_ptr(), w_in.data_ptr(), b_in.data_ptr(), w_hidden.data_ptr(),
            b_hidden.data_ptr(), w_out.data_ptr(), b_out.data_ptr(), time_emb.data_ptr(), scale.data_ptr(),
            h.data_ptr(), x0.data_ptr(), out.data_ptr(), N, K, W, w_hidden.shape[0] + 1, h.shape[0],
            torch.get_num_threads())
    elif backend == "triton":
        from ._head_log_prob_triton import head_log_prob_triton

        head_log_prob_triton(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, scale, h, x0,
                             out)
    else:
        raise ValueError(f"no compiled head_log_prob backend {backend!r}")
    return out


@_head_log_prob_op.register_fake
def _(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, lambdas, x0, backend):
    return cond.new_empty(cond.shape[0])


def head_log_prob(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, lambdas, x0, *,
                  backend: str = "auto"):
    """log p(x0) per row (N,); the meaning is head_log_prob_ref.

    All tensors fp32, or all fp64 on the torch backend (lambdas may be fp64 either way:
    the kernels take -0.5 alpha sigma and the step sizes computed from it in fp64, then
    rounded to fp32), on one device; they are made contiguous here. backend: "auto",
    "torch", "cpu", "triton"; naming one that cannot run here raises RuntimeError saying why.
    """
    tensors = dict(zip(_NAMES, (cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, lambdas,
                                x0)))
    _check(tensors)
    name = resolve_backend("head_log_prob", backend, cond.device)
    if name == "torch":
        return head_log_prob_ref(**tensors)
    if cond.dtype != torch.float32:
        raise TypeError(f"the {name} backend runs fp32 only; got {cond.dtype} (fp64 runs on backend='torch')")
    args = [t.contiguous() for t in tensors.values()]
    return _head_log_prob_op(*args, name)


def head_weights(head, dtype=None):
    """(w_in, b_in, w_hidden, b_hidden, w_out, b_out) of a DiffusionHead, as the fused ops take them."""
    width = head.input.out_features
    weight = head.input.weight
    hidden = list(head.hidden)
    w_hidden = (torch.stack([layer.weight for layer in hidden]) if hidden
                else weight.new_zeros(0, width, width))
    b_hidden = torch.stack([layer.bias for layer in hidden]) if hidden else weight.new_zeros(0, width)
    out = (head.input.weight, head.input.bias, w_hidden, b_hidden, head.output.weight, head.output.bias)
    return tuple(t.detach().to(dtype or t.dtype) for t in out)


def head_log_prob_from_head(head, cond, request, x0, schedule: Schedule, steps: int, backend: str = "auto"):
    """log p(x0) (N,) under a DiffusionHead, by RK4 in `steps` steps along the probability-flow ODE.

    cond: head.condition(context, request), (N, W); request: (N, K) 0/1; x0: (N, K), its
    unrequested entries ignored. Equals likelihood.log_prob(head's noise prediction, x0
    over the requested targets, schedule, method="fixed", steps=steps) row by row.
    """
    lambdas = rk4_nodes(schedule, steps)
    with torch.no_grad():
        time_emb = head.time_embedding(lambdas.to(device=cond.device, dtype=cond.dtype)).to(cond.dtype)
        return head_log_prob(cond, request.to(cond.dtype), *head_weights(head, cond.dtype), time_emb,
                             lambdas.to(cond.device), x0.to(cond.dtype), backend=backend)
