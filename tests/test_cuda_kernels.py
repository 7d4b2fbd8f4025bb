"""The CUDA C++ kernels (densiformer._C_cuda) against their references, and the build around them.

GPU tests skip without a GPU. Where a GPU is visible they call the module directly, so a
missing or broken build fails them instead of skipping. The build and error tests run
on any machine: where nvcc exists the module must have been built, must import without
a GPU, and must say why it cannot run.

Error measure: max |out - truth| / max |truth| over the whole output.
- head_sample_loop: truth is the fp32 reference on the CPU; fp32 within 1e-4 for every
  sampler (ddpm included: the same Philox draws, so only rounding differs). bf16: at
  most 2x the error of PyTorch's own bf16 run (the reference under torch.autocast,
  which runs every Linear in bf16) against the same truth, measured on the same inputs.
- masked_attention_fwd: truth is masked_attention_ref in float64 on the same (already
  rounded) inputs; fp32 within 1e-5; bf16 and fp16 within 2x the reference's own error
  in that dtype.
"""
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from densiformer.diffusion.schedules import CosineSchedule, DiscreteDDPMSchedule
from densiformer.model.head import DiffusionHead
from densiformer.ops import backends
from densiformer.ops.head_sample_loop import head_sample_loop, head_sample_loop_from_head, sampler_coefficients
from densiformer.ops.masked_attention import masked_attention_ref

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCHEDULES = {"ddpm": DiscreteDDPMSchedule(120), "ddim": CosineSchedule(), "dpmpp2m": CosineSchedule()}
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _relative_error(out, truth):
    out, truth = out.double().cpu(), truth.double().cpu()
    assert truth.abs().max() > 0
    return float((out - truth).abs().max() / truth.abs().max())


def _nvcc_present():
    return shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX"))


# ------------------------------------------------------------------ the build, on any machine
def _built_module():
    if os.environ.get("DENSIFORMER_CUDA") == "0":
        pytest.skip("DENSIFORMER_CUDA=0: the CUDA module is deliberately not built")
    if not _nvcc_present():
        pytest.skip("no nvcc on this machine: densiformer._C_cuda is not built here")
    assert importlib.util.find_spec("densiformer._C_cuda") is not None, (
        "nvcc is present but densiformer._C_cuda was not built; run `pip install -e .`")
    return importlib.import_module("densiformer._C_cuda")


def test_cuda_module_is_built_where_nvcc_is():
    module = _built_module()
    for name in ("head_sample_loop", "masked_attention_fwd", "runtime_status"):
        assert callable(getattr(module, name))


def test_cuda_module_imports_and_reports_without_crashing():
    """Importing it never takes the process down, GPU or not; without one it says why."""
    _built_module()
    code = "import densiformer._C_cuda as m; print(repr(m.runtime_status()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    status = eval(done.stdout.strip())  # the repr of a str
    if torch.cuda.is_available():
        assert status == ""
    else:
        assert "sees no GPU" in status


def test_masked_attention_fwd_rejects_bad_arguments_before_touching_the_gpu():
    module = _built_module()
    args = dict(q_ptr=256, k_ptr=256, v_ptr=256, mask_ptr=256, out_ptr=256, lse_ptr=0, B=1, H=1, L=4, D=8,
                scale=1.0, dtype_code=1, stream=0)
    with pytest.raises(ValueError, match="head dim"):
        module.masked_attention_fwd(**{**args, "D": 12})
    with pytest.raises(ValueError, match="aligned"):
        module.masked_attention_fwd(**{**args, "q_ptr": 258})
    with pytest.raises(ValueError, match="dtype_code"):
        module.masked_attention_fwd(**{**args, "dtype_code": 3})


def test_head_sample_loop_direct_call_checks_arguments_before_touching_the_gpu():
    module = _built_module()
    with pytest.raises(ValueError, match="k <= 64"):
        module.head_sample_loop(*([0] * 11), 1, 1, 65, 16, 2, 3, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="precision"):
        module.head_sample_loop(*([0] * 11), 1, 1, 3, 16, 2, 3, 0, 0, 2, 0)


def test_available_backends_says_why_cuda_cannot_run():
    status = backends.available_backends()["cuda"]
    if torch.cuda.is_available():
        assert status is True, status  # the GPU session builds the module first
    else:
        assert status == "no CUDA GPU visible to torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_backend_without_gpu_raises_clear_errors():
    torch.manual_seed(0)
    head, cond, request = _case(2, 3, 16, 2)
    run = lambda **kw: head_sample_loop_from_head(head, cond, request, CosineSchedule(), "ddim", 3, 2, 0, **kw)  # noqa: E731
    with pytest.raises(RuntimeError, match="no CUDA GPU visible to torch"):
        run(backend="cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU visible to torch"):
        run(precision="bf16")  # bf16 exists on the cuda backend only
    with pytest.raises(ValueError, match="precision"):
        run(precision="fp16")
    with pytest.raises(RuntimeError, match="no CUDA GPU visible to torch"):
        backends.cuda_extension()


# ------------------------------------------------------------------ head_sample_loop on the GPU
def _case(rows, k, width, layers, seed=0, device="cpu"):
    """A random head, per-row conditioning, and a request mask whose row 0 asks for nothing (if rows > 1)."""
    torch.manual_seed(seed)
    head = DiffusionHead(8, k, width, layers, 16).to(device)
    cond = torch.randn(rows, width, device=device)
    request = (torch.rand(rows, k, device=device) < 0.6).float()
    request[:, 0] = 1
    if rows > 1:
        request[0] = 0
    return head, cond, request


def _run(head, cond, request, sampler, steps, samples, backend, seed=11, **kw):
    with torch.no_grad():
        return head_sample_loop_from_head(head, cond, request, SCHEDULES[sampler], sampler, steps, samples, seed,
                                          backend=backend, **kw)


CASES = [  # rows, samples, k, width, layers: odd sizes, several tiles, the paper's head
    (1, 1, 1, 48, 1),
    (3, 5, 3, 48, 3),
    (2, 6, 5, 96, 3),
    (3, 37, 2, 40, 1),
    (5, 130, 3, 200, 4),
    (3, 50, 3, 512, 5),
]


@gpu
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m", "ddpm"])
@pytest.mark.parametrize("rows, samples, k, width, layers", CASES)
def test_head_sample_loop_fp32_matches_reference(sampler, rows, samples, k, width, layers):
    backends.cuda_extension()  # fails, not skips, when the module is missing on a GPU machine
    head, cond, request = _case(rows, k, width, layers)
    truth = _run(head, cond, request, sampler, 6, samples, "torch")
    out = _run(head.cuda(), cond.cuda(), request.cuda(), sampler, 6, samples, "cuda")
    assert out.shape == (rows, samples, k) and out.dtype == torch.float32 and out.is_cuda
    assert _relative_error(out, truth) < 1e-4
    assert torch.equal(out.cpu() * (1 - request[:, None, :]), torch.zeros(rows, samples, k))


@gpu
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m", "ddpm"])
@pytest.mark.parametrize("rows, samples, k, width, layers", [(3, 40, 3, 512, 5), (4, 70, 2, 200, 3), (1, 300, 1, 48, 2)])
def test_head_sample_loop_bf16_error_is_within_twice_torch_bf16(sampler, rows, samples, k, width, layers):
    head, cond, request = _case(rows, k, width, layers)
    truth = _run(head, cond, request, sampler, 8, samples, "torch")
    head, cond, request = head.cuda(), cond.cuda(), request.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch_bf16 = _run(head, cond, request, sampler, 8, samples, "torch")
    ours = _run(head, cond, request, sampler, 8, samples, "cuda", precision="bf16")
    assert ours.dtype == torch.float32
    err, torch_err = _relative_error(ours, truth), _relative_error(torch_bf16, truth)
    assert err <= 2 * torch_err, f"bf16 kernel error {err:.3g} vs torch bf16 {torch_err:.3g}"


@gpu
def test_head_sample_loop_many_tiles_and_batching():
    """64,000 sample rows (hundreds of tiles over a persistent grid); a row's samples do not
    depend on the rows batched with it (row_offset keys the noise)."""
    head, cond, request = _case(64, 3, 64, 3, device="cuda")
    run = lambda lo, hi: head_sample_loop_from_head(  # noqa: E731
        head, cond[lo:hi], request[lo:hi], SCHEDULES["ddpm"], "ddpm", 5, 1000, seed=4, row_offset=lo, backend="cuda")
    with torch.no_grad():
        whole = run(0, 64)
        split = torch.cat([run(0, 7), run(7, 8), run(8, 64)])
        truth = head_sample_loop_from_head(head.cpu(), cond.cpu(), request.cpu(), SCHEDULES["ddpm"], "ddpm", 5, 1000,
                                           seed=4, backend="torch")
    assert _relative_error(whole, truth) < 1e-4
    torch.testing.assert_close(whole, split, rtol=0, atol=0)  # the same tile arithmetic row by row


@gpu
def test_head_sample_loop_runs_on_a_side_stream():
    head, cond, request = _case(3, 3, 64, 3, device="cuda")
    truth = _run(head, cond, request, "ddim", 4, 20, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = _run(head, cond, request, "ddim", 4, 20, "cuda")
    stream.synchronize()
    assert torch.equal(out, truth)


# ------------------------------------------------------------------ masked_attention_fwd on the GPU
def _attention_case(B, H, L, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(dtype).cuda() for _ in range(3))
    mask = torch.rand(B, L, generator=gen) < 0.4
    mask[0] = True  # fully padded
    if B > 1:
        mask[1] = False  # nothing padded
    return q, k, v, mask.cuda()


def _fwd(q, k, v, mask, scale=None, lse=True):
    B, H, L, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    lse_t = torch.empty(B, H, L, device=q.device, dtype=torch.float32) if lse else None
    backends.cuda_extension().masked_attention_fwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
        lse_t.data_ptr() if lse else 0, B, H, L, D, scale, DTYPES[q.dtype], torch.cuda.current_stream().cuda_stream)
    return out, lse_t


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("L", [1, 7, 16, 64, 127, 300])
def test_masked_attention_fwd_matches_reference(L, D, dtype):
    q, k, v, mask = _attention_case(4, 3, L, D, dtype)
    out, lse = _fwd(q, k, v, mask)
    assert not out.isnan().any()
    truth = masked_attention_ref(q.double(), k.double(), v.double(), mask)
    padded = mask.all(dim=1)
    assert torch.equal(out[padded].float().cpu(), torch.zeros_like(out[padded].float().cpu()))
    err = _relative_error(out, truth)
    if dtype == torch.float32:
        assert err <= 1e-5
    else:
        torch_err = _relative_error(masked_attention_ref(q, k, v, mask), truth)
        assert err <= max(2 * torch_err, 1e-5), f"{err:.3g} vs torch {dtype} {torch_err:.3g}"
    scores = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    truth_lse = scores.masked_fill(mask[:, None, None, :], float("-inf")).logsumexp(-1)
    assert torch.equal(lse[padded].cpu(), torch.full_like(lse[padded].cpu(), float("-inf")))
    torch.testing.assert_close(lse[~padded].double(), truth_lse[~padded], rtol=1e-5, atol=1e-5)


@gpu
def test_masked_attention_fwd_scale_and_no_lse():
    q, k, v, mask = _attention_case(3, 2, 20, 16, torch.float32)
    out, lse = _fwd(q, k, v, mask, scale=0.3, lse=False)
    assert lse is None
    assert _relative_error(out, masked_attention_ref(q.double(), k.double(), v.double(), mask, scale=0.3)) <= 1e-5


@gpu
def test_masked_attention_fwd_one_hundred_thousand_sequences():
    """B = 100,000 in one call (FA2 and SDPA stop at 65,535 on grid.y); more blocks than the grid holds."""
    q, k, v, mask = _attention_case(100_000, 2, 16, 8, torch.bfloat16, seed=1)
    out, _ = _fwd(q, k, v, mask)
    truth = torch.cat([masked_attention_ref(q[i:i + 20_000].double(), k[i:i + 20_000].double(),
                                            v[i:i + 20_000].double(), mask[i:i + 20_000])
                       for i in range(0, 100_000, 20_000)])
    torch_err = _relative_error(masked_attention_ref(q, k, v, mask), truth)
    assert _relative_error(out, truth) <= max(2 * torch_err, 1e-5)


@gpu
def test_coefficients_fit_the_kernel_layout():
    """The kernel reads coefs as (steps, 6) fp32 rows; the wrapper must hand them over contiguous."""
    _, coefs = sampler_coefficients("dpmpp2m", CosineSchedule(), 5)
    head, cond, request = _case(2, 2, 32, 2, device="cuda")
    args = dict(cond=cond, request=request, w_in=head.input.weight.detach(), b_in=head.input.bias.detach(),
                w_hidden=head.hidden[0].weight.detach()[None], b_hidden=head.hidden[0].bias.detach()[None],
                w_out=head.output.weight.detach(), b_out=head.output.bias.detach(),
                time_emb=torch.randn(5, 32, device="cuda"), num_samples=3, seed=0)
    ref = head_sample_loop(**args, coefs=coefs.cuda(), backend="torch")
    out = head_sample_loop(**args, coefs=coefs.cuda().t().contiguous().t(), backend="cuda")  # a strided view
    assert _relative_error(out, ref) < 1e-4
