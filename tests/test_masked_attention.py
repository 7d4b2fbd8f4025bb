"""masked_attention: every backend against masked_attention_ref, forward and gradients; the encoder
on it; densiformer.nn.MaskedSelfAttention against torch.nn.MultiheadAttention.

Error measure: for each of out, dq, dk, dv, max |backend - truth| / max |truth|, where
truth is the reference run in float64 on the same (already rounded) inputs. Elementwise
relative error would be meaningless here: outputs are weighted means of random values
and cross zero. Dividing by the tensor's largest entry gives its error in units of its
own scale, and float64 keeps the reference's own rounding out of the measure.
- fp32: at most 1e-5.
- bf16, fp16: at most 2x PyTorch's own error, the same measure for the reference run in
  that dtype, taken in the same test on the same inputs (or at most the fp32 bound,
  where torch's error is below it: dq, dk at L = 1, which torch gets exactly).
- A gradient that is identically zero in truth (dq, dk at L = 1: one key, so the
  softmax is constant) is measured in units of the case's largest gradient instead: the
  kernel gets it as the difference of two equal sums, rounded differently.

The Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set before
triton is first imported; this module sets it on import (where no GPU is visible). If
another module imported triton earlier in the session, the Triton tests skip and say so:
run this module on its own then. The interpreter is slow, so the CPU cases are small:
B = 3 (one sequence fully padded, one not padded at all, one random) and H = 2, or at
L = 300 B = 2 (fully padded, random) and H = 1; fp32 over every (L, D), bf16 and fp16
over pairs that cover every L and every D.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import densiformer as dfm  # noqa: E402
from densiformer.model.encoder import Encoder  # noqa: E402
from densiformer.ops import backends  # noqa: E402
from densiformer.ops.masked_attention import masked_attention, masked_attention_ref  # noqa: E402

from conftest import skip_unless_backend  # noqa: E402

LENGTHS = (1, 7, 16, 64, 127, 300)
HEAD_DIMS = (8, 16, 32, 64, 128)
LOW_PRECISION = [(1, 8), (7, 16), (16, 32), (64, 64), (127, 128), (300, 8)]
FP32_RTOL = 1e-5


def _device(backend):
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def _case(L, D, dtype, device, B=None, H=None, seed=0):
    """q, k, v, dout (B, H, L, D) in dtype, and a mask: row 0 all padding, the last row random, any
    between none. B, H default to the module docstring's sizes."""
    B = B or (2 if L > 127 else 3)
    H = H or (1 if L > 127 else 2)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0] = True
    mask[-1] = torch.rand(L, generator=gen) < 0.4
    return q, k, v, dout, mask.to(device)


def _run(backend, q, k, v, dout, mask, dtype=None):
    """(out, dq, dk, dv) of one backend, inputs cast to dtype first (float64 for the truth)."""
    leaves = [t.to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    if backend == "ref":
        out = masked_attention_ref(*leaves, mask)
    else:
        out = masked_attention(*leaves, mask, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return (out.detach(), *grads)


def _relative_errors(results, truth):
    """max |x - t| / max |t| per tensor; for a t that is all zero, over the largest max |t| of all."""
    scales = [float(t.abs().max()) for t in truth]
    return [float((x.double() - t).abs().max()) / (scale or max(scales))
            for x, t, scale in zip(results, truth, scales)]


NAMES = ("out", "dq", "dk", "dv")


# ------------------------------------------------------------------ the reference's meaning
def test_reference_padding_and_fully_padded_rows():
    q, k, v, _, mask = _case(7, 8, torch.float64, "cpu")
    out = masked_attention_ref(q, k, v, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # all keys padded: zeros, not NaN
    # Changing a padded key or value changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[mask[:, None, :, None].expand_as(k2)] = 1e3
    v2[mask[:, None, :, None].expand_as(v2)] = -1e3
    torch.testing.assert_close(masked_attention_ref(q, k2, v2, mask), out, rtol=0, atol=1e-12)
    # Unpadded row: plain softmax attention.
    expected = torch.softmax(q[1] @ k[1].transpose(-1, -2) / 8**0.5, -1) @ v[1]
    torch.testing.assert_close(out[1], expected)


# ------------------------------------------------------------------ backends against the reference
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("L", LENGTHS)
def test_fp32_matches_reference(backend, L, D):
    skip_unless_backend(backend)
    case = _case(L, D, torch.float32, _device(backend))
    truth = _run("ref", *case, dtype=torch.float64)
    results = _run(backend, *case)
    assert all(r.dtype == torch.float32 for r in results)
    assert torch.equal(results[0][0], torch.zeros_like(results[0][0]))
    assert all(torch.equal(g[0], torch.zeros_like(g[0])) for g in results[1:])  # fully padded: zero gradients
    errors = dict(zip(NAMES, _relative_errors(results, truth)))
    assert max(errors.values()) <= FP32_RTOL, errors


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L, D", LOW_PRECISION)
def test_low_precision_within_twice_torch_error(backend, dtype, L, D):
    skip_unless_backend(backend)
    case = _case(L, D, dtype, _device(backend))
    truth = _run("ref", *case, dtype=torch.float64)
    ours = _relative_errors(_run(backend, *case), truth)
    torch_own = _relative_errors(_run("ref", *case), truth)
    for name, err, budget in zip(NAMES, ours, torch_own):
        assert err <= max(2 * budget, FP32_RTOL), f"{name}: {err:.3g} vs torch {dtype} {budget:.3g}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_non_contiguous_inputs_and_explicit_scale(backend):
    skip_unless_backend(backend)
    q, k, v, _, mask = _case(9, 16, torch.float32, _device(backend))
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    out = masked_attention(qt, kt, vt, mask, scale=0.3, backend=backend)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), mask, 0.3)
    assert _relative_errors([out], [ref])[0] <= FP32_RTOL


def test_custom_op_registration():
    """Schema, fake tensor, autograd registration and torch.compile tracing of the compiled op."""
    skip_unless_backend("triton")
    q, k, v, _, mask = _case(5, 8, torch.float32, _device("triton"), B=2)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, 0.25, "triton")
    result = torch.library.opcheck(torch.ops.densiformer.masked_attention_fwd.default, args)
    assert all(status == "SUCCESS" for status in result.values()), result


def test_encoder_dispatches_to_the_op():
    """The encoder runs the same with triton as with the reference, forward and parameter gradients."""
    skip_unless_backend("triton")
    device = _device("triton")
    torch.manual_seed(0)
    encoder = Encoder(d_model=16, layers=2, heads=2).to(device)
    tokens = torch.randn(4, 6, 16, device=device)
    padding = torch.rand(4, 6, device=device) < 0.5
    padding[0] = True  # nothing observed: only the summary token attends
    weights = torch.randn(4, 16, device=device)  # a random projection: LayerNorm's backward stays well conditioned
    results = {}
    for backend in ("torch", "triton"):
        encoder.zero_grad()
        out = encoder(tokens, padding, backend)
        (out * weights).sum().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in encoder.parameters()]
    errors = _relative_errors(results["triton"], [r.double() for r in results["torch"]])
    assert max(errors) <= FP32_RTOL, errors  # fp32 on both sides


def test_encoder_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the encoder through the op's dispatch (the backend
    choice is a compile-time constant) and computes what eager computes."""
    torch.manual_seed(0)
    encoder = Encoder(d_model=16, layers=2, heads=2)
    tokens = torch.randn(3, 5, 16)
    padding = torch.rand(3, 5) < 0.5
    compiled = torch.compile(encoder, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(tokens, padding), encoder(tokens, padding), rtol=0, atol=0)


# ------------------------------------------------------------------ dispatch and validation
def test_auto_never_picks_the_interpreter_on_cpu():
    assert backends.resolve_backend("masked_attention", "auto", torch.device("cpu")) == "torch"


def test_unavailable_backends_raise_and_say_why(monkeypatch):
    q, k, v, _, mask = _case(4, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        masked_attention(q, k, v, mask, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        masked_attention(q, k, v, mask, backend="triton")
    with pytest.raises(RuntimeError, match="backend .cpu."):
        masked_attention(q, k, v, mask, backend="cpu")


def test_invalid_inputs_raise():
    q, k, v, _, mask = _case(4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="key_padding_mask"):
        masked_attention(q, k, v, mask.float())
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        masked_attention(q, k[:, :, :3], v, mask)
    with pytest.raises(TypeError, match="share a dtype"):
        masked_attention(q, k.double(), v, mask)
    skip_unless_backend("triton")
    device = _device("triton")
    with pytest.raises(TypeError, match="float64"):
        masked_attention(q.double().to(device), k.double().to(device), v.double().to(device), mask.to(device),
                         backend="triton")
    big = torch.zeros(1, 1, 2, 256, device=device)
    with pytest.raises(ValueError, match="head dim"):
        masked_attention(big, big, big, torch.zeros(1, 2, dtype=torch.bool, device=device), backend="triton")


# ------------------------------------------------------------------ on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_hundred_thousand_sequences_in_one_call(backend):
    """B = 100,000, H = 2: past the 65,535 grid.y limit that FA2 and SDPA hit."""
    skip_unless_backend(backend)
    q, k, v, _, mask = _case(16, 8, torch.bfloat16, "cuda", B=100_000, H=2)
    mask[1:-1] = torch.rand(mask.shape[0] - 2, 16, device="cuda") < 0.4
    out = masked_attention(q, k, v, mask, backend=backend)
    truth = masked_attention_ref(q.float(), k.float(), v.float(), mask)
    torch_own = masked_attention_ref(q, k, v, mask)
    assert _relative_errors([out], [truth])[0] <= 2 * _relative_errors([torch_own], [truth])[0]
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_runs_head_dims_the_cuda_kernel_lacks():
    q, k, v, _, mask = _case(20, 24, torch.float32, "cuda")
    out = masked_attention(q, k, v, mask)
    truth = masked_attention_ref(q.double(), k.double(), v.double(), mask)
    assert _relative_errors([out], [truth])[0] <= FP32_RTOL


# ------------------------------------------------------------------ MaskedSelfAttention
def _mha_pair(E=24, heads=3, batch_first=True, backend="auto", bias=True, seed=0):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(E, heads, batch_first=batch_first, bias=bias)
    if bias:
        with torch.no_grad():  # nonzero biases, so that loading them is tested
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    ours = dfm.nn.MaskedSelfAttention(E, heads, batch_first=batch_first, bias=bias, backend=backend)
    ours.load_state_dict(mha.state_dict())
    return mha, ours


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches_multihead_attention(backend, bias):
    if backend == "triton":
        skip_unless_backend("triton")
    mha, ours = _mha_pair(backend=backend, bias=bias)
    x = torch.randn(4, 9, 24, requires_grad=True)
    mask = torch.rand(4, 9) < 0.4
    mask[0], mask[1] = True, False
    w = torch.randn(4, 9, 24)
    live = ~mask.all(1)  # MultiheadAttention may give NaN on fully padded rows
    grads = {}
    for name, module in (("mha", mha), ("ours", ours)):
        out, weights = module(x, x, x, key_padding_mask=mask, need_weights=False)
        assert weights is None
        grads[name] = [out.detach()] + list(torch.autograd.grad((out[live] * w[live]).sum(),
                                                                [x, *module.parameters()]))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in mha.named_parameters()]
    for a, b in zip(grads["ours"][1:], grads["mha"][1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["ours"][0][live], grads["mha"][0][live], rtol=1e-4, atol=1e-5)
    expected = mha.out_proj.bias if bias else torch.zeros(24)
    torch.testing.assert_close(grads["ours"][0][0], expected.detach().expand(9, 24))  # fully padded row


def test_self_attention_state_dict_round_trip_and_layouts():
    mha, ours = _mha_pair(batch_first=False)
    assert set(ours.state_dict()) == set(mha.state_dict())
    fresh = torch.nn.MultiheadAttention(24, 3, batch_first=False)
    fresh.load_state_dict(ours.state_dict())  # strict, the other way round
    x, y, z = torch.randn(3, 9, 5, 24).unbind(0)  # (L, N, E): batch_first=False
    mask = torch.rand(5, 9) < 0.3
    mask[:, 0] = False  # no fully padded row
    torch.testing.assert_close(ours(x, y, z, key_padding_mask=mask)[0],
                               fresh(x, y, z, key_padding_mask=mask, need_weights=False)[0])
    torch.testing.assert_close(ours(x[:, 0], x[:, 0], x[:, 0])[0],  # unbatched, no mask
                               fresh(x[:, 0], x[:, 0], x[:, 0], need_weights=False)[0])


@pytest.mark.parametrize("kwargs", [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 5}, {"vdim": 5},
                                    {"dropout": 0.1}])
def test_self_attention_unsupported_options_raise(kwargs):
    with pytest.raises(NotImplementedError, match="does not support"):
        dfm.nn.MaskedSelfAttention(24, 3, **kwargs)


def test_self_attention_invalid_arguments_raise():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        dfm.nn.MaskedSelfAttention(24, 5)
    module = dfm.nn.MaskedSelfAttention(24, 3)
    x = torch.randn(2, 4, 24)
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        module(x, x, x, need_weights=True)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        module(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        module(x, x, x, key_padding_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one shape"):
        module(x, x[:, :3], x[:, :3])
