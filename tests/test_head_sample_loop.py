"""head_sample_loop: every backend against head_sample_loop_ref, the reference against the
generic samplers, and the Philox noise against its published known answers.

The Triton kernel runs on the CPU under TRITON_INTERPRET=1, which must be set before
triton is first imported; this module sets it on import (where no GPU is visible). If
another module imported triton earlier in the session, the Triton tests skip and say so:
run this module on its own then.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from densiformer.diffusion import samplers  # noqa: E402
from densiformer.diffusion.schedules import CosineSchedule, DiscreteDDPMSchedule  # noqa: E402
from densiformer.model.head import DiffusionHead  # noqa: E402
from densiformer.ops import backends  # noqa: E402
from densiformer.ops.head_sample_loop import (  # noqa: E402
    head_sample_loop,
    head_sample_loop_from_head,
    head_sample_loop_ref,
    philox4x32_10,
    philox_normal,
    sampler_coefficients,
)

from conftest import skip_unless_backend  # noqa: E402

# Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from densiformer.ops._head_sample_loop_triton import _philox4x32_10

    @triton.jit
    def _philox_kat_kernel(words, out):
        """Row i of `words` holds counter[4] and key[2]; row i of `out` gets Philox's 4 words."""
        w = words + tl.program_id(0) * 6
        r = _philox4x32_10(tl.load(w).to(tl.uint32), tl.load(w + 1).to(tl.uint32), tl.load(w + 2).to(tl.uint32),
                           tl.load(w + 3).to(tl.uint32), tl.load(w + 4).to(tl.uint32), tl.load(w + 5).to(tl.uint32))
        o = out + tl.program_id(0) * 4
        tl.store(o, r[0].to(tl.int64))
        tl.store(o + 1, r[1].to(tl.int64))
        tl.store(o + 2, r[2].to(tl.int64))
        tl.store(o + 3, r[3].to(tl.int64))

RTOL = 1e-4  # of the largest reference value, for every fp32 backend and sampler
SCHEDULES = {"ddpm": DiscreteDDPMSchedule(120), "ddim": CosineSchedule(), "dpmpp2m": CosineSchedule()}


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _case(rows, k, width, layers, seed=0, device="cpu"):
    """A random head, per-row conditioning, and a request mask whose row 0 asks for nothing (if rows > 1)."""
    torch.manual_seed(seed)
    head = DiffusionHead(8, k, width, layers, 16).to(device)
    cond = torch.randn(rows, width, device=device)
    request = (torch.rand(rows, k, device=device) < 0.6).float()
    request[:, 0] = 1  # every other row asks for something
    if rows > 1:
        request[0] = 0
    return head, cond, request


def _relative_error(out, ref):
    assert ref.abs().max() > 0
    return float((out - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------ Philox
@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_reference_philox_known_answers(counter, key, expected):
    words = philox4x32_10([torch.tensor([c]) for c in counter], key)
    assert [int(w) for w in words] == list(expected)


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_cpu_philox_known_answers(counter, key, expected):
    skip_unless_backend("cpu")
    assert tuple(backends.cpu_extension().philox4x32_10(counter, key)) == expected


def test_triton_philox_known_answers():
    skip_unless_backend("triton")
    words = torch.tensor([list(c) + list(k) for c, k, _ in PHILOX_KAT], dtype=torch.int64)
    out = torch.zeros(len(PHILOX_KAT), 4, dtype=torch.int64)
    device = _device("triton")
    out = out.to(device)
    _philox_kat_kernel[(len(PHILOX_KAT),)](words.to(device), out)
    assert [tuple(int(v) & 0xFFFFFFFF for v in row) for row in out.cpu()] == [e for _, _, e in PHILOX_KAT]


def test_philox_normal_is_standard_normal():
    z = philox_normal(seed=7, rows=50, samples=400, k=5, step=3)
    assert z.shape == (50, 400, 5) and z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z[..., 0] * z[..., 1]).mean())) < 0.02  # the two Box-Muller outputs are independent
    assert not torch.equal(z, philox_normal(seed=7, rows=50, samples=400, k=5, step=4))
    assert not torch.equal(z[1], philox_normal(seed=7, rows=1, samples=400, k=5, step=3, row_offset=0)[0])


# ------------------------------------------------------------------ reference vs the generic samplers
@pytest.mark.parametrize("sampler, options", [("ddim", {}), ("dpmpp2m", {"grid": "time"}),
                                              ("dpmpp2m", {"grid": "log_snr"})])
def test_reference_matches_generic_sampler(sampler, options):
    """With the same x_T, the deterministic samplers give what samplers.py gives with DiffusionHead.forward."""
    head, cond, request = _case(rows=4, k=3, width=48, layers=3)
    steps, S, seed = 8, 16, 3
    with torch.no_grad():
        ours = head_sample_loop_from_head(head, cond, request, CosineSchedule(), sampler, steps, S, seed,
                                          backend="torch", **options)
        x_T = philox_normal(seed, 4, S, 3, 0) * request[:, None, :]
        generic = samplers.sample(sampler, lambda x, lam: head(x, lam, cond[:, None, :], request[:, None, :]), x_T,
                                  CosineSchedule(), steps, **options)
    assert _relative_error(ours, generic) < RTOL
    assert torch.equal(ours[0], torch.zeros_like(ours[0]))


def test_ddpm_step_without_noise_is_the_posterior_mean():
    """One ddpm update with its noise left out is sample_ddpm's posterior mean, given eps = sigma x + alpha F."""
    schedule = DiscreteDDPMSchedule(120)
    lam, coefs = sampler_coefficients("ddpm", schedule, 12)
    x, v = torch.randn(100, 2, dtype=torch.float64), torch.randn(100, 2, dtype=torch.float64)
    a, b, c_x, c_x0, c_prev, _ = coefs[1].tolist()
    alpha_t, sigma_t = (float(t) for t in samplers.alpha_sigma(lam[1]))
    alpha_s, _ = (float(t) for t in samplers.alpha_sigma(lam[2]))
    x0 = (x - sigma_t * (sigma_t * x + alpha_t * v)) / alpha_t
    r = float(torch.exp(lam[1] - lam[2]))
    expected = alpha_s * (r / alpha_t * x + (1 - r) * x0)
    torch.testing.assert_close(c_x * x + c_x0 * (a * x - b * v), expected)
    assert c_prev == 0 and coefs[-1, 5] == 0 and coefs[-1, 3] == 1  # the last step returns x0_hat


# ------------------------------------------------------------------ backends vs the reference
CASES = [  # rows, samples, k, width, layers
    (1, 1, 1, 48, 1),
    (3, 5, 3, 48, 3),
    (2, 6, 5, 96, 3),
    (3, 37, 2, 40, 1),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m", "ddpm"])
@pytest.mark.parametrize("rows, samples, k, width, layers", CASES)
def test_backend_matches_reference(backend, sampler, rows, samples, k, width, layers):
    skip_unless_backend(backend)
    device = _device(backend)
    head, cond, request = _case(rows, k, width, layers, device=device)
    steps = 6
    run = lambda b: head_sample_loop_from_head(head, cond, request, SCHEDULES[sampler], sampler, steps,  # noqa: E731
                                               samples, seed=11, backend=b)
    ref, out = run("torch"), run(backend)
    assert out.shape == (rows, samples, k) and out.dtype == torch.float32
    assert _relative_error(out, ref) < RTOL
    assert torch.equal(out * (1 - request[:, None, :]), torch.zeros_like(out))  # exactly zero where not requested


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_cpu_vector_path_matches_reference(isa, monkeypatch):
    skip_unless_backend("cpu")
    monkeypatch.setenv("DENSIFORMER_CPU_ISA", isa)
    head, cond, request = _case(3, 3, 72, 3)
    run = lambda b: head_sample_loop_from_head(head, cond, request, CosineSchedule(), "dpmpp2m", 5, 40,  # noqa: E731
                                               seed=2, backend=b)
    try:
        out = run("cpu")
    except RuntimeError as err:
        if "lacks" in str(err):
            pytest.skip(str(err))
        raise
    assert _relative_error(out, run("torch")) < RTOL


# ------------------------------------------------------------------ batching invariance
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_samples_do_not_depend_on_batching(backend):
    """A row's samples depend on (seed, global row, sample) only, not on the rows around it."""
    skip_unless_backend(backend)
    device = _device(backend)
    head, cond, request = _case(5, 3, 32, 2, device=device)
    run = lambda lo, hi: head_sample_loop_from_head(head, cond[lo:hi], request[lo:hi], CosineSchedule(), "ddpm",  # noqa: E731
                                                    5, 9, seed=4, row_offset=lo, backend=backend)
    whole = run(0, 5)
    split = torch.cat([run(0, 2), run(2, 3), run(3, 5)])
    if backend == "cpu":  # every sample row is computed alone, in the same order
        assert torch.equal(whole, split)
    else:  # matmul blocking may change with the batch size
        torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-6)


def test_cpu_result_does_not_depend_on_thread_count():
    skip_unless_backend("cpu")
    head, cond, request = _case(4, 3, 64, 3)
    run = lambda: head_sample_loop_from_head(head, cond, request, CosineSchedule(), "ddpm", 4, 50,  # noqa: E731
                                             seed=1, backend="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# ------------------------------------------------------------------ errors and loading
def _args(rows=2, k=3, width=16, layers=2, steps=3):
    head, cond, request = _case(rows, k, width, layers)
    _, coefs = sampler_coefficients("ddim", CosineSchedule(), steps)
    return dict(cond=cond, request=request, w_in=head.input.weight.detach(), b_in=head.input.bias.detach(),
                w_hidden=torch.stack([h.weight.detach() for h in head.hidden]),
                b_hidden=torch.stack([h.bias.detach() for h in head.hidden]), w_out=head.output.weight.detach(),
                b_out=head.output.bias.detach(), time_emb=torch.randn(steps, width), coefs=coefs,
                num_samples=4, seed=0)


def test_direct_call_matches_reference():
    args = _args()
    ref = head_sample_loop_ref(**args)
    assert torch.equal(head_sample_loop(**args, backend="torch"), ref)


@pytest.mark.parametrize("change, error, match", [
    (dict(cond=torch.randn(2, 16, dtype=torch.float64)), TypeError, "cond must be torch.float32"),
    (dict(request=torch.ones(2, 3, dtype=torch.int64)), TypeError, "request must be torch.float32"),
    (dict(cond=torch.randn(16)), ValueError, "cond must be"),
    (dict(w_hidden=torch.randn(1, 16, 15)), ValueError, "w_hidden must have shape"),
    (dict(b_out=torch.randn(4)), ValueError, "b_out must have shape"),
    (dict(coefs=torch.randn(3, 7, dtype=torch.float64)), ValueError, "coefs must have shape"),
    (dict(time_emb=torch.randn(3, 16, device="meta")), ValueError, "one device"),
    (dict(num_samples=0), ValueError, "num_samples"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = {**_args(), **change}
    with pytest.raises(error, match=match):
        head_sample_loop(**args, backend="torch")


def test_unavailable_backends_say_why(monkeypatch):
    args = _args()
    with pytest.raises(RuntimeError, match="cuda"):
        head_sample_loop(**args, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        head_sample_loop(**args, backend="fast")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="triton"):
            head_sample_loop(**args, backend="triton")
    monkeypatch.setattr(backends, "_import_cpu_extension", lambda: (None, "densiformer._C is not built (test)"))
    with pytest.raises(RuntimeError, match="not built"):
        head_sample_loop(**args, backend="cpu")
    assert torch.equal(head_sample_loop(**args), head_sample_loop_ref(**args))  # auto picks the reference


def test_heun_is_not_fused():
    head, cond, request = _case(2, 2, 16, 2)
    with pytest.raises(ValueError, match="no fused loop"):
        head_sample_loop_from_head(head, cond, request, CosineSchedule(), "heun", 4, 2, 0)


def test_available_backends_reports_the_cpu_extension():
    status = backends.available_backends()["cpu"]
    assert status is True or "pip install -e ." in status


def test_import_loads_no_extension_and_no_triton():
    code = ("import sys, densiformer, densiformer.ops.head_sample_loop; "
            "assert not {'densiformer._C', 'triton'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_custom_op_registration():
    """The op passes torch.library.opcheck (schema, fake tensor, tracing), so torch.compile can trace it."""
    skip_unless_backend("cpu")
    args = {k: (v.contiguous().float() if isinstance(v, torch.Tensor) else v) for k, v in _args().items()}
    names = ["cond", "request", "w_in", "b_in", "w_hidden", "b_hidden", "w_out", "b_out", "time_emb", "coefs"]
    op_args = tuple(args[n] for n in names) + (args["num_samples"], args["seed"], 0, "cpu")
    torch.library.opcheck(torch.ops.densiformer.head_sample_loop.default, op_args)
