"""head_log_prob: the reference against the generic probability-flow likelihood, every
backend against the reference, and the estimator's fused path against its generic one.

The Triton kernel runs on the CPU under TRITON_INTERPRET=1, which must be set before
triton is first imported; this module sets it on import (where no GPU is visible). If
another module imported triton earlier in the session, the Triton tests skip and say so:
run this module on its own then.
"""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from densiformer.diffusion import likelihood  # noqa: E402
from densiformer.diffusion.schedules import CosineSchedule, DiscreteDDPMSchedule  # noqa: E402
from densiformer.model.head import DiffusionHead  # noqa: E402
from densiformer.ops import backends  # noqa: E402
from densiformer.ops.head_log_prob import (  # noqa: E402
    head_log_prob,
    head_log_prob_from_head,
    head_log_prob_ref,
    head_weights,
    rk4_nodes,
)

from conftest import skip_unless_backend  # noqa: E402

RTOL = 1e-4  # fp32 backends against the fp32 reference, relative, per row


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _case(rows, k, width, layers, seed=0, device="cpu", dtype=torch.float32):
    """A random head, conditioning, points, and a request mask whose row 0 asks for nothing (if rows > 1)."""
    torch.manual_seed(seed)
    head = DiffusionHead(8, k, width, layers, 16).to(device=device, dtype=dtype)
    cond = torch.randn(rows, width, device=device, dtype=dtype)
    request = (torch.rand(rows, k, device=device) < 0.6).to(dtype)
    request[:, 0] = 1  # every other row asks for something
    if rows > 1:
        request[0] = 0
    x0 = 1.5 * torch.randn(rows, k, device=device, dtype=dtype)
    return head, cond, request, x0


def _row_error(out, ref):
    """Largest per-row relative error; rows whose reference is 0 (nothing requested) must be 0 exactly."""
    zero = ref == 0
    assert torch.equal(out[zero], ref[zero])
    assert (~zero).any()
    return float(((out - ref).abs()[~zero] / ref.abs()[~zero]).max())


# ------------------------------------------------------------------ the meaning
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("schedule", [CosineSchedule(), DiscreteDDPMSchedule(120)], ids=["cosine", "ddpm"])
def test_reference_matches_generic_likelihood(dtype, tol, schedule):
    """Row by row, the fused reference is likelihood.log_prob(method="fixed") with the head's
    forward as the denoiser, over that row's requested targets (rows grouped by request)."""
    head, cond, request, x0 = _case(rows=6, k=3, width=24, layers=3, dtype=dtype)
    steps = 5
    ours = head_log_prob_from_head(head, cond, request, x0, schedule, steps, backend="torch")
    assert ours.dtype == dtype and ours.shape == (6,)
    assert ours[0] == 0  # nothing requested
    checked = 0
    for mask in torch.unique(request[1:], dim=0):
        rows = (request == mask).all(-1).nonzero()[:, 0]
        idx = mask.nonzero()[:, 0]

        def eps_fn(x, log_snr, rows=rows, idx=idx, mask=mask):
            full = x.new_zeros(*x.shape[:-1], 3)
            full[..., idx] = x
            return head(full, log_snr, cond[rows], mask)[..., idx]

        with torch.no_grad():
            generic = likelihood.log_prob(eps_fn, x0[rows][:, idx], schedule, method="fixed", steps=steps)
        torch.testing.assert_close(ours[rows], generic, rtol=tol, atol=0)
        checked += len(rows)
    assert checked == 5


def test_unrequested_entries_are_ignored():
    head, cond, request, x0 = _case(rows=5, k=3, width=16, layers=2)
    noisy = x0 + 7.0 * (1 - request)
    run = lambda x: head_log_prob_from_head(head, cond, request, x, CosineSchedule(), 3, backend="torch")  # noqa: E731
    assert torch.equal(run(x0), run(noisy))


def test_rk4_nodes_are_the_generic_integrators():
    schedule = CosineSchedule()
    nodes = rk4_nodes(schedule, 4)
    grid = torch.linspace(schedule.log_snr_max, schedule.log_snr_min, 5, dtype=torch.float64).tolist()
    expected = []
    for lam, lam_next in zip(grid[:-1], grid[1:]):
        expected += [lam, lam + (lam_next - lam) / 2]
    assert nodes.tolist() == expected + [grid[-1]]


# ------------------------------------------------------------------ backends vs the reference
CASES = [  # rows, k, width, layers, steps
    (1, 1, 48, 1, 3),
    (7, 3, 40, 3, 3),
    (53, 5, 72, 2, 2),
    (50, 3, 96, 4, 2),
]
TRITON_CASES = [(1, 1, 20, 1, 1), (18, 3, 24, 2, 1)]  # the interpreter is slow


def _check_backend(backend, rows, k, width, layers, steps, schedule=None):
    schedule = schedule or CosineSchedule()
    device = _device(backend)
    head, cond, request, x0 = _case(rows, k, width, layers, device=device)
    run = lambda b: head_log_prob_from_head(head, cond, request, x0, schedule, steps, backend=b)  # noqa: E731
    ref, out = run("torch"), run(backend)
    assert out.shape == (rows,) and out.dtype == torch.float32
    assert _row_error(out, ref) < RTOL
    assert float((out - ref).abs().max() / ref.abs().max()) < RTOL


@pytest.mark.parametrize("rows, k, width, layers, steps", CASES)
def test_cpu_matches_reference(rows, k, width, layers, steps):
    skip_unless_backend("cpu")
    _check_backend("cpu", rows, k, width, layers, steps)


@pytest.mark.parametrize("rows, k, width, layers, steps", TRITON_CASES)
def test_triton_matches_reference(rows, k, width, layers, steps):
    skip_unless_backend("triton")
    _check_backend("triton", rows, k, width, layers, steps, DiscreteDDPMSchedule(120))


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_cpu_vector_path_matches_reference(isa, monkeypatch):
    skip_unless_backend("cpu")
    monkeypatch.setenv("DENSIFORMER_CPU_ISA", isa)
    try:
        _check_backend("cpu", 13, 3, 72, 3, 2)
    except RuntimeError as err:
        if "lacks" in str(err):
            pytest.skip(str(err))
        raise


def test_cpu_paper_sized_head_matches_reference():
    """The 5 x 512 head: several panels per layer and tangents on every one."""
    skip_unless_backend("cpu")
    _check_backend("cpu", 8, 3, 512, 5, 1)


def test_cpu_rows_are_independent_of_batching_and_threads():
    skip_unless_backend("cpu")
    head, cond, request, x0 = _case(100, 3, 32, 2)
    run = lambda lo, hi: head_log_prob_from_head(head, cond[lo:hi], request[lo:hi], x0[lo:hi],  # noqa: E731
                                                 CosineSchedule(), 2, backend="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(0, 100)
        torch.set_num_threads(2)
        two = run(0, 100)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    # A tile that lacks some target skips its tangents; the others still match.
    assert torch.equal(one[:2], run(0, 2)) and torch.equal(one[50:], run(50, 100))


# ------------------------------------------------------------------ the estimator
def test_estimator_fixed_method_uses_the_fused_op_and_matches_generic(tiny_estimator, monkeypatch):
    skip_unless_backend("cpu")
    est = tiny_estimator
    rng = np.random.default_rng(1)
    values = np.column_stack([rng.normal(size=9), 10 + 3 * rng.normal(size=9)])
    values[4, 1] = np.nan
    inputs = {"a": rng.normal(size=9), "b": np.where(np.arange(9) % 3 == 0, np.nan, rng.normal(size=9))}
    options = dict(request=["y", "z"], method="fixed", steps=4)
    calls = []
    real = likelihood.log_prob
    monkeypatch.setattr(likelihood, "log_prob", lambda *a, **k: calls.append(k) or real(*a, **k))
    fused = {b: est.log_prob(values, inputs, backend=b, **options) for b in ("auto", "cpu", "torch")}
    assert not calls  # method="fixed" never reaches the generic integrator
    monkeypatch.undo()
    with torch.no_grad():  # the generic path itself
        cond = est._condition(est._normalized(inputs), [0, 1])
        z = torch.as_tensor(est.schema.normalize(values, ["y", "z"]))
        generic = (likelihood.log_prob(est._denoiser(cond, [0, 1]), z, est.schedule, method="fixed", steps=4)
                   .numpy() + est.schema.log_abs_det(["y", "z"]))
    ok = ~np.isnan(values).any(1)
    for out in fused.values():
        assert np.isnan(out[~ok]).all()
        np.testing.assert_allclose(out[ok], generic[ok], rtol=RTOL)
    # One requested target of two, as the posterior's batched (sample, row, k) points.
    one = est.log_prob(values[:, :1], inputs, request=["y"], method="fixed", steps=4)
    with torch.no_grad():
        cond = est._condition(est._normalized(inputs), [0])  # the condition depends on the request
        z1 = torch.as_tensor(est.schema.normalize(values[:, :1], ["y"]))
        ref1 = likelihood.log_prob(est._denoiser(cond, [0]), z1, est.schedule, method="fixed", steps=4).numpy()
        batched = est._log_prob_normalized(z1.expand(2, 9, 1), cond, [0], method="fixed", steps=4).numpy()
    np.testing.assert_allclose(one, ref1 + est.schema.log_abs_det(["y"]), rtol=RTOL)
    np.testing.assert_allclose(batched, np.stack([ref1, ref1]), rtol=RTOL)


def test_estimator_adaptive_rejects_a_compiled_backend(tiny_estimator):
    with pytest.raises(ValueError, match="method='fixed'"):
        tiny_estimator.log_prob(np.zeros((2, 2)), request=["y", "z"], backend="cpu")


# ------------------------------------------------------------------ errors
def _args(rows=2, k=3, width=16, layers=2, steps=2):
    head, cond, request, x0 = _case(rows, k, width, layers)
    w_in, b_in, w_hidden, b_hidden, w_out, b_out = head_weights(head)
    lambdas = rk4_nodes(CosineSchedule(), steps)
    return dict(cond=cond, request=request, w_in=w_in, b_in=b_in, w_hidden=w_hidden, b_hidden=b_hidden,
                w_out=w_out, b_out=b_out, time_emb=torch.randn(2 * steps + 1, width), lambdas=lambdas, x0=x0)


def test_direct_call_matches_reference():
    args = _args()
    assert torch.equal(head_log_prob(**args, backend="torch"), head_log_prob_ref(**args))


@pytest.mark.parametrize("change, error, match", [
    (dict(cond=torch.randn(2, 16, dtype=torch.float64)), TypeError, "request must be torch.float64"),
    (dict(request=torch.ones(2, 3, dtype=torch.int64)), TypeError, "request must be torch.float32"),
    (dict(cond=torch.randn(16)), ValueError, "cond must be"),
    (dict(w_hidden=torch.randn(1, 16, 15)), ValueError, "w_hidden must have shape"),
    (dict(b_out=torch.randn(4)), ValueError, "b_out must have shape"),
    (dict(x0=torch.randn(3, 3)), ValueError, "x0 must have shape"),
    (dict(lambdas=torch.zeros(4, dtype=torch.float64)), ValueError, "lambdas must be"),
    (dict(time_emb=torch.randn(4, 16)), ValueError, "time_emb must have shape"),
    (dict(time_emb=torch.randn(5, 16, device="meta")), ValueError, "one device"),
    (dict(x0=[[0.0] * 3] * 2), TypeError, "x0 must be a tensor"),
])
def test_bad_inputs_raise_clear_errors(change, error, match):
    with pytest.raises(error, match=match):
        head_log_prob(**{**_args(), **change}, backend="torch")


def test_fp64_runs_on_torch_only():
    skip_unless_backend("cpu")
    args = {k: v.double() for k, v in _args().items()}
    assert head_log_prob(**args, backend="torch").dtype == torch.float64
    with pytest.raises(TypeError, match="fp32 only"):
        head_log_prob(**args, backend="cpu")


def test_unavailable_backends_say_why(monkeypatch):
    args = _args()
    with pytest.raises(RuntimeError, match="cuda"):
        head_log_prob(**args, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        head_log_prob(**args, backend="fast")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="triton"):
            head_log_prob(**args, backend="triton")
    monkeypatch.setattr(backends, "_import_cpu_extension", lambda: (None, "densiformer._C is not built (test)"))
    with pytest.raises(RuntimeError, match="not built"):
        head_log_prob(**args, backend="cpu")
    assert torch.equal(head_log_prob(**args), head_log_prob_ref(**args))  # auto picks the reference


def test_custom_op_registration():
    """The op passes torch.library.opcheck (schema, fake tensor, tracing), so torch.compile can trace it."""
    skip_unless_backend("cpu")
    args = {k: v.contiguous() for k, v in _args().items()}
    torch.library.opcheck(torch.ops.densiformer.head_log_prob.default, tuple(args.values()) + ("cpu",))
