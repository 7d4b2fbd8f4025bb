"""The fused denoising loop of the diffusion head: every step, layer and sampler update in one op.

`head_sample_loop_ref` defines the op in plain PyTorch. Per network evaluation it
computes DiffusionHead.predict_v, the MLP output F:

    h = silu(W_in (x * req) + b_in + cond + temb[step])
    h = h + silu(W_l h + b_l)                      for each hidden layer l
    F = (W_out h + b_out) * req

DiffusionHead.forward's noise prediction is eps_hat = sigma x + alpha F, so the
denoised estimate x0_hat = (x - sigma eps_hat) / alpha = alpha x - sigma F. Every
sampler update is then written as

    x0 = a x - b F
    x <- c_x x + c_x0 x0 + c_prev x0_prev + c_noise z

with per-step coefficients (steps, 6) in the order of COEFS, computed by
`sampler_coefficients` from the formulas of diffusion/samplers.py: ancestral DDPM,
DDIM with its eta (its eps_hat term is (x - alpha x0_hat) / sigma, folded into c_x
and c_x0), and DPM-Solver++(2M), which needs the previous x0_hat. The last step of
each goes to log-SNR = +inf and returns x0_hat.

Noise. x_T and the step noise z come from Philox4x32-10 keyed by the seed, with the
counter (dim group, step, sample, row) and Box-Muller in fp32; the layout is
documented in csrc/cpu/philox.h. Step 0 draws x_T, step i + 1 the noise of update i;
the row counter is `row_offset` + the local row index, so a row's samples do not
depend on how rows are batched. Noise is multiplied by the request mask, so
unrequested dimensions stay exactly zero.

Backends: `torch` (the reference), `cpu` (C++, densiformer._C), `triton`
(ops/_head_sample_loop_triton.py; CUDA, or the interpreter with TRITON_INTERPRET=1) and
`cuda` (CUDA C++, densiformer._C_cuda: csrc/cuda/head_sample_loop.cu). `cuda` runs in
fp32 (plain FMA; matches the reference) or, with precision="bf16", on bf16 tensor cores.
`head_sample_loop_from_head` takes a DiffusionHead, a schedule and a sampler name and
prepares everything.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..diffusion import samplers
from ..diffusion.schedules import Schedule, alpha_sigma
from .backends import cpu_extension, cuda_extension, resolve_backend

COEFS = ("a", "b", "c_x", "c_x0", "c_prev", "c_noise")
FUSED_SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
PRECISIONS = {"fp32": 0, "bf16": 1}  # the cuda kernel's precision codes

# ---------------------------------------------------------------- Philox4x32-10 in int64
_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(m: int, x: torch.Tensor):
    """(hi, lo) 32-bit halves of m * x for m, x < 2^32, in int64 without overflow.

    x is split into 16-bit halves so that no partial product reaches 2^63.
    """
    lo_part = m * (x & 0xFFFF)                      # < 2^48
    hi_part = m * (x >> 16)                         # < 2^48; m * x = hi_part * 2^16 + lo_part
    low = lo_part + ((hi_part & 0xFFFF) << 16)      # < 2^49
    return (hi_part >> 16) + (low >> 32), low & _MASK32


def philox4x32_10(counter, key):
    """Philox4x32-10 of counters (4 int64 tensors holding uint32) under key (2 ints)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _box_muller(a, b):
    u1 = ((a >> 8) + 1).to(torch.float32) * 2.0**-24   # (0, 1]: the log is finite
    u2 = (b >> 8).to(torch.float32) * 2.0**-24         # [0, 1)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 6.2831855 * u2                              # 2 pi rounded to fp32
    return r * torch.cos(theta), r * torch.sin(theta)


def philox_normal(seed: int, rows: int, samples: int, k: int, step: int, row_offset: int = 0,
                  device=None) -> torch.Tensor:
    """Standard normals (rows, samples, k), fp32, as every backend draws them at `step`."""
    groups = (k + 3) // 4
    kw = dict(dtype=torch.int64, device=device)
    row = torch.arange(row_offset, row_offset + rows, **kw).view(-1, 1, 1)
    sample = torch.arange(samples, **kw).view(1, -1, 1)
    group = torch.arange(groups, **kw).view(1, 1, -1)
    shape = (rows, samples, groups)
    counter = (group.expand(shape), torch.full(shape, step, **kw), sample.expand(shape), row.expand(shape))
    w0, w1, w2, w3 = philox4x32_10(counter, (seed & _MASK32, seed >> 32))
    z = torch.stack([*_box_muller(w0, w1), *_box_muller(w2, w3)], dim=-1)
    return z.reshape(rows, samples, 4 * groups)[..., :k]


# ---------------------------------------------------------------- sampler coefficients
def sampler_coefficients(sampler: str, schedule: Schedule, steps: int, eta: float = 0.0, grid: str = "time"):
    """(log-SNR grid (steps + 1,) float64, coefficients (steps, 6) float64) of a sampler.

    The grid is the one samplers.py walks: `time` for ddpm and ddim, `grid` ("time" or
    "log_snr") for dpmpp2m; the network sees grid[:-1]. eta applies to ddim only.
    """
    if sampler not in FUSED_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} has no fused loop; choose one of {FUSED_SAMPLERS}")
    lam = samplers.log_snr_grid(schedule, steps, grid if sampler == "dpmpp2m" else "time")
    lams = lam.tolist()
    rows, h_prev = [], None
    for i in range(steps):
        alpha_t, sigma_t = (float(v) for v in alpha_sigma(lam[i]))
        alpha_s, sigma_s = (float(v) for v in alpha_sigma(lam[i + 1]))
        c_x = c_x0 = c_prev = c_noise = 0.0
        if sampler == "ddpm":  # the exact VP posterior; r = SNR_t / SNR_s
            r, one_minus_r = math.exp(lams[i] - lams[i + 1]), -math.expm1(lams[i] - lams[i + 1])
            c_x, c_x0, c_noise = alpha_s * r / alpha_t, alpha_s * one_minus_r, sigma_s * math.sqrt(one_minus_r)
        elif sampler == "ddim":  # alpha_s x0 + c_eps eps + c_noise z, eps = (x - alpha_t x0) / sigma_t
            c_noise = eta * sigma_s * math.sqrt(-math.expm1(lams[i] - lams[i + 1]))
            c_eps = math.sqrt(max(sigma_s**2 - c_noise**2, 0.0))
            c_x, c_x0 = c_eps / sigma_t, alpha_s - c_eps * alpha_t / sigma_t
        else:  # dpmpp2m, in the half log-SNR h
            h = 0.5 * (lams[i + 1] - lams[i])
            c_x, d = sigma_s / sigma_t, -alpha_s * math.expm1(-h)
            if h_prev is None or math.isinf(h):
                c_x0 = d
            else:
                half_inv_r = 0.5 * h / h_prev
                c_x0, c_prev = d * (1 + half_inv_r), -d * half_inv_r
            h_prev = h
        rows.append((alpha_t, sigma_t, c_x, c_x0, c_prev, c_noise))
    return lam, torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- the reference
def head_sample_loop_ref(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs,
                         num_samples: int, seed: int, row_offset: int = 0):
    """Samples x0 (N, num_samples, K), zero on unrequested dims; see the module docstring.

    cond (N, W); request (N, K) 0/1; w_in (W, K), b_in (W,); w_hidden (L - 1, W, W),
    b_hidden (L - 1, W); w_out (K, W), b_out (K,); time_emb (steps, W); coefs (steps, 6).
    """
    N, K = request.shape
    req = request.to(cond.dtype)[:, None, :]
    cond = cond[:, None, :]
    coefs = coefs.to(cond.dtype)
    x = philox_normal(seed, N, num_samples, K, 0, row_offset, cond.device) * req
    x0_prev = torch.zeros_like(x)
    for step in range(coefs.shape[0]):
        h = F.silu(F.linear(x * req, w_in, b_in) + cond + time_emb[step])
        for weight, bias in zip(w_hidden, b_hidden):
            h = h + F.silu(F.linear(h, weight, bias))
        v = F.linear(h, w_out, b_out) * req
        a, b, c_x, c_x0, c_prev, c_noise = coefs[step]
        x0 = a * x - b * v
        x_next = c_x * x + c_x0 * x0 + c_prev * x0_prev
        if c_noise != 0:
            x_next = x_next + c_noise * (philox_normal(seed, N, num_samples, K, step + 1, row_offset,
                                                       cond.device) * req)
        x, x0_prev = x_next, x0
    return x


# ---------------------------------------------------------------- the op
def _check(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs, num_samples, seed,
           row_offset):
    tensors = dict(cond=cond, request=request, w_in=w_in, b_in=b_in, w_hidden=w_hidden, b_hidden=b_hidden,
                   w_out=w_out, b_out=b_out, time_emb=time_emb, coefs=coefs)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        allowed = (torch.float32, torch.float64) if name == "coefs" else (torch.float32,)
        if t.dtype not in allowed:
            raise TypeError(f"{name} must be {' or '.join(map(str, allowed))}, got {t.dtype}")
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(devices)}")
    if cond.dim() != 2 or request.dim() != 2 or request.shape[0] != cond.shape[0]:
        raise ValueError(f"cond must be (N, W) and request (N, K); got {tuple(cond.shape)}, {tuple(request.shape)}")
    (N, W), K = cond.shape, request.shape[1]
    steps = time_emb.shape[0] if time_emb.dim() == 2 else -1
    hidden = w_hidden.shape[0] if w_hidden.dim() == 3 else -1
    expected = dict(w_in=(W, K), b_in=(W,), w_hidden=(hidden, W, W), b_hidden=(hidden, W), w_out=(K, W),
                    b_out=(K,), time_emb=(steps, W), coefs=(steps, len(COEFS)))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (N={N}, W={W}, K={K}, steps={steps}, "
                             f"hidden layers={hidden}); got {tuple(tensors[name].shape)}")
    if W < 1 or K < 1 or steps < 1:
        raise ValueError(f"need width, k and steps >= 1; got W={W}, K={K}, steps={steps}")
    if not 1 <= num_samples < 2**32:
        raise ValueError(f"num_samples must be in [1, 2^32), got {num_samples}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    if row_offset < 0 or row_offset + N > 2**32:
        raise ValueError(f"row indices row_offset + [0, N) must lie in [0, 2^32); got row_offset={row_offset}, N={N}")


@torch.library.custom_op("densiformer::head_sample_loop", mutates_args=())
def _head_sample_loop_op(cond: torch.Tensor, request: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
                         w_hidden: torch.Tensor, b_hidden: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
                         time_emb: torch.Tensor, coefs: torch.Tensor, num_samples: int, seed: int,
                         row_offset: int, backend: str, precision: str = "fp32") -> torch.Tensor:
    """The compiled backends on contiguous fp32 inputs (see head_sample_loop)."""
    (N, W), K = cond.shape, request.shape[1]
    out = cond.new_empty(N, num_samples, K)
    if backend == "cpu":
        cpu_extension().head_sample_loop(
            cond.data_ptr(), request.data_ptr(), w_in.data_ptr(), b_in.data_ptr(), w_hidden.data_ptr(),
            b_hidden.data_ptr(), w_out.data_ptr(), b_out.data_ptr(), time_emb.data_ptr(), coefs.data_ptr(),
            out.data_ptr(), N, num_samples, K, W, w_hidden.shape[0] + 1, time_emb.shape[0], seed, row_offset,
            torch.get_num_threads())
    elif backend == "cuda":
        with torch.cuda.device(cond.device):
            cuda_extension().head_sample_loop(
                cond.data_ptr(), request.data_ptr(), w_in.data_ptr(), b_in.data_ptr(), w_hidden.data_ptr(),
                b_hidden.data_ptr(), w_out.data_ptr(), b_out.data_ptr(), time_emb.data_ptr(), coefs.data_ptr(),
                out.data_ptr(), N, num_samples, K, W, w_hidden.shape[0] + 1, time_emb.shape[0], seed, row_offset,
                PRECISIONS[precision], torch.cuda.current_stream(cond.device).cuda_stream)
    elif backend == "triton":
        from ._head_sample_loop_triton import head_sample_loop_triton

        head_sample_loop_triton(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs,
                                out, seed, row_offset)
    else:
        raise ValueError(f"no compiled head_sample_loop backend {backend!r}")
    return out


@_head_sample_loop_op.register_fake
def _(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs, num_samples, seed, row_offset,
      backend, precision="fp32"):
    return cond.new_empty(cond.shape[0], num_samples, request.shape[1])


def head_sample_loop(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs,
                     num_samples: int, seed: int, *, row_offset: int = 0, backend: str = "auto",
                     precision: str = "fp32"):
    """Samples (N, num_samples, K) from the diffusion head; the meaning is head_sample_loop_ref.

    All tensors fp32 (coefs may be fp64; it is rounded to fp32 as the reference does)
    on one device; they are made contiguous here. backend: "auto", "torch", "cpu",
    "triton", "cuda"; naming one that cannot run here raises RuntimeError saying why.
    precision: "fp32", or "bf16" (the cuda backend's tensor-core path: bf16 weights and
    activations, fp32 accumulation and sampler state); auto then means cuda.
    """
    _check(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs, num_samples, seed,
           row_offset)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    name = resolve_backend("head_sample_loop", "cuda" if precision == "bf16" and backend == "auto" else backend,
                           cond.device)
    if precision != "fp32" and name != "cuda":
        raise ValueError(f"precision={precision!r} needs the cuda backend; {name!r} runs fp32 only")
    coefs = coefs.to(torch.float32)
    if name == "torch":
        return head_sample_loop_ref(cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs,
                                    num_samples, seed, row_offset)
    args = [t.contiguous() for t in (cond, request, w_in, b_in, w_hidden, b_hidden, w_out, b_out, time_emb, coefs)]
    return _head_sample_loop_op(*args, num_samples, seed, row_offset, name, precision)


def head_sample_loop_from_head(head, cond, request, schedule: Schedule, sampler: str, steps: int, num_samples: int,
                               seed: int, *, eta: float = 0.0, grid: str = "time", row_offset: int = 0,
                               backend: str = "auto", precision: str = "fp32"):
    """Sample a DiffusionHead with the fused loop: (N, num_samples, K), zero where not requested.

    cond: head.condition(context, request), (N, W); request: (N, K) 0/1. The sampler
    ("ddpm", "ddim" with `eta`, "dpmpp2m" with `grid`) walks `schedule` in `steps` steps
    as the sampler of the same name in diffusion/samplers.py does.
    """
    lam, coefs = sampler_coefficients(sampler, schedule, steps, eta, grid)
    with torch.no_grad():
        time_emb = head.time_embedding(lam[:-1].to(device=cond.device, dtype=torch.float32))
        width = head.input.out_features
        hidden = list(head.hidden)
        w_hidden = (torch.stack([layer.weight for layer in hidden]) if hidden
                    else cond.new_zeros(0, width, width))
        b_hidden = torch.stack([layer.bias for layer in hidden]) if hidden else cond.new_zeros(0, width)
        return head_sample_loop(cond, request.to(torch.float32), head.input.weight, head.input.bias, w_hidden,
                                b_hidden, head.output.weight, head.output.bias, time_emb, coefs.to(cond.device),
                                num_samples, seed, row_offset=row_offset, backend=backend, precision=precision)
