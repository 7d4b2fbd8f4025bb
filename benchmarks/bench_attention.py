"""Masked attention over millions of short sequences on a GPU: ops.masked_attention against PyTorch's options.

    python benchmarks/bench_attention.py [--sequences 1048576] [--repeats 5] [--out FILE]

Needs a CUDA GPU (exits saying so without one). Issue #5's targets, all bf16:
- forward, L in {16, 64, 128}, D in {8, 16, 64}, B x H >= 10^6 (fewer where the
  tensors would not fit; the count is recorded): >= 2x SDPA with the boolean mask,
  >= 1.5x FlexAttention with its block mask built once and reused, and against
  flash-attn varlen (unpad + varlen + pad, timed whole) where flash_attn imports;
- forward + backward: >= 1.5x SDPA;
- achieved TFLOP/s (dense L x L count, 4 B H L^2 D forward, 2.5x that backward) and
  the fraction of the GPU's dense bf16 peak;
- the paper-sized encoder (2 layers, d_model 192, 24 heads, 114 tokens with 0-50%
  missing per row): rows per second, ours against torch.nn.TransformerEncoder.
SDPA, FlexAttention and flash-attn cap the batch at 65,535 on a grid axis (pytorch#146704,
flash-attn#1786), so they run in chunks of at most 65,535 sequences (B x H), and their
chunk outputs are left apart (not copied into one tensor) so the chunking costs them only
launches; ours runs in one call. Every baseline's output is checked against ours at the
query positions that are not padding.
"""
from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from densiformer.model.encoder import Encoder
from densiformer.ops import available_backends, masked_attention

from common import best_time, device_info, write_result

LENGTHS = (16, 64, 128)
HEAD_DIMS = (8, 16, 64)
HEADS = 8
CHUNK = 65535 // HEADS  # batch entries per baseline call: B x H within the 65,535 grid limit
MEMORY_FRACTION = 0.3  # of GPU memory for the q, k, v, out (and gradients) of one case
DENSE_BF16_PEAK = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}  # TFLOP/s without sparsity


def peak_flops(name: str):
    for key, value in DENSE_BF16_PEAK.items():  # most specific first
        if key in name:
            return value
    return None


def attention_flops(n_seq, L, D, backward=False):
    forward = 4.0 * n_seq * L * L * D
    return forward * (3.5 if backward else 1.0)


def make_case(batch, L, D, device, dtype=torch.bfloat16, heads=HEADS, seed=0):
    """q, k, v (batch, heads, L, D) and a mask with 0-50% of each row padded (row 0 fully padded)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, L, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    missing = torch.rand(batch, 1, device=device, generator=gen) * 0.5
    mask = torch.rand(batch, L, device=device, generator=gen) < missing
    mask[0] = True
    return q, k, v, mask


def chunks(batch, size=CHUNK):
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def sdpa(q, k, v, mask):
    """SDPA with the boolean mask (True = attend): one output per chunk of the batch."""
    return [F.scaled_dot_product_attention(q[part], k[part], v[part], attn_mask=~mask[part, None, None, :])
            for part in chunks(q.shape[0])]


def flex_runner(mask, heads, L, device):
    """FlexAttention with block masks built here, once per chunk, and reused by every call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    parts = []
    for part in chunks(mask.shape[0]):
        pad = mask[part]

        def keep(b, h, q_idx, kv_idx, pad=pad):
            return ~pad[b, kv_idx]

        parts.append((part, create_block_mask(keep, pad.shape[0], None, L, L, device=device)))

    def run(q, k, v):
        return [compiled(q[part], k[part], v[part], block_mask=block_mask) for part, block_mask in parts]

    return run


def flash_varlen_runner():
    """flash-attn varlen with the unpad and the pad it needs, or None where flash_attn does not import."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def run(q, k, v, mask):
        B, H, L, D = q.shape
        out = torch.zeros(B, L, H, D, device=q.device, dtype=q.dtype)
        for part in chunks(B):
            keep = ~mask[part]
            lengths = keep.sum(1, dtype=torch.int32)
            cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            index = keep.flatten().nonzero().squeeze(1)
            # The max length comes from the host here, as flash-attn's varlen API needs it.
            unpad = [t[part].transpose(1, 2).reshape(-1, H, D)[index] for t in (q, k, v)]
            o = flash_attn_varlen_func(*unpad, cu, cu, L, L)
            out[part].view(-1, H, D)[index] = o
        return out.transpose(1, 2)

    return run


def fits(L, D, tensors, device):
    """Largest sequence count whose `tensors` (B, H, L, D) bf16 tensors fit MEMORY_FRACTION of the GPU."""
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * MEMORY_FRACTION // (tensors * L * D * 2))


def max_error(out, ref, mask):
    """Largest |out - ref| at unpadded query positions; out a tensor or a list of chunk outputs."""
    out = torch.cat(out) if isinstance(out, list) else out
    keep = ~mask
    return float((out.transpose(1, 2)[keep].float() - ref.transpose(1, 2)[keep].float()).abs().max())


def bench_forward(L, D, n_seq, backend, repeats, device, flash):
    batch = max(1, n_seq // HEADS)
    q, k, v, mask = make_case(batch, L, D, device)
    ours = lambda: masked_attention(q, k, v, mask, backend=backend)  # noqa: E731
    flex = flex_runner(mask, HEADS, L, device)
    fns = {"ours": ours, "sdpa": lambda: sdpa(q, k, v, mask), "flex": lambda: flex(q, k, v)}
    if flash is not None:
        fns["flash_varlen"] = lambda: flash(q, k, v, mask)
    with torch.no_grad():
        reference = ours()
        errors = {name: max_error(fn(), reference, mask) for name, fn in fns.items() if name != "ours"}
        seconds = {name: best_time(fn, repeats) for name, fn in fns.items()}
    flops = attention_flops(batch * HEADS, L, D)
    return {"L": L, "D": D, "sequences": batch * HEADS, "batch": batch, "heads": HEADS, "seconds": seconds,
            "tflops": {name: flops / s / 1e12 for name, s in seconds.items()},
            "speedup": {name: s / seconds["ours"] for name, s in seconds.items() if name != "ours"},
            "max_abs_diff_vs_ours": errors}


def bench_forward_backward(L, D, n_seq, backend, repeats, device):
    batch = max(1, n_seq // HEADS)
    q, k, v, mask = make_case(batch, L, D, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def step(forward):
        def run():
            q.grad = k.grad = v.grad = None
            outs = forward()
            torch.autograd.backward(outs, [dout[part] for part in chunks(batch)] if isinstance(outs, list) else dout)
        return run

    fns = {"ours": step(lambda: masked_attention(q, k, v, mask, backend=backend)),
           "sdpa": step(lambda: sdpa(q, k, v, mask))}
    seconds = {name: best_time(fn, repeats) for name, fn in fns.items()}
    flops = attention_flops(batch * HEADS, L, D, backward=True)
    return {"L": L, "D": D, "sequences": batch * HEADS, "seconds": seconds,
            "tflops": {name: flops / s / 1e12 for name, s in seconds.items()},
            "speedup_vs_sdpa": seconds["sdpa"] / seconds["ours"]}


def bench_encoder(rows, repeats, device, tokens=113, d_model=192, heads=24, layers=2):
    """Rows per second through the paper-sized encoder: ours (a summary token plus `tokens`) against
    torch.nn.TransformerEncoder on the same 114 tokens, bf16, inference."""
    torch.manual_seed(0)
    ours = Encoder(d_model, layers, heads).to(device, torch.bfloat16).eval()
    layer = torch.nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                             activation="gelu", batch_first=True, norm_first=True)
    theirs = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device, torch.bfloat16).eval()
    x = torch.randn(rows, tokens, d_model, device=device, dtype=torch.bfloat16)
    padding = torch.rand(rows, tokens, device=device) < torch.rand(rows, 1, device=device) * 0.5
    full_x = torch.cat([ours.summary.expand(rows, 1, -1), x], 1)
    full_padding = torch.cat([padding.new_zeros(rows, 1), padding], 1)
    with torch.inference_mode():
        seconds = {
            "ours": best_time(lambda: ours(x, padding), repeats),
            "torch_transformer_encoder": best_time(lambda: theirs(full_x, src_key_padding_mask=full_padding),
                                                   repeats),
        }
    return {"rows": rows, "tokens": tokens + 1, "d_model": d_model, "heads": heads, "layers": layers,
            "missing": "uniform 0-50% per row", "seconds": seconds,
            "rows_per_second": {name: rows / s for name, s in seconds.items()},
            "speedup_vs_torch": seconds["torch_transformer_encoder"] / seconds["ours"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=2**20, help="B x H per forward case (capped by memory)")
    parser.add_argument("--backward-sequences", type=int, default=2**18, help="B x H per forward+backward case")
    parser.add_argument("--encoder-rows", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU; none is visible to torch")
    status = available_backends()
    backend = "cuda" if status["cuda"] is True else "triton"
    if status[backend] is not True:
        raise SystemExit(f"no compiled masked_attention backend here: {status}")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name)
    flash = flash_varlen_runner()
    forward, backward = [], []
    for L in LENGTHS:
        for D in HEAD_DIMS:
            result = bench_forward(L, D, min(args.sequences, fits(L, D, 4, device)), backend, args.repeats, device,
                                   flash)
            forward.append(result)
            print(f"fwd L={L} D={D} n={result['sequences']}: ours {result['tflops']['ours']:.1f} TFLOP/s; speedup "
                  + ", ".join(f"{k} {s:.2f}x" for k, s in result["speedup"].items()))
            result = bench_forward_backward(L, D, min(args.backward_sequences, fits(L, D, 8, device)), backend,
                                            args.repeats, device)
            backward.append(result)
            print(f"fwd+bwd L={L} D={D}: {result['speedup_vs_sdpa']:.2f}x SDPA")
    for result in forward + backward:
        result["fraction_of_peak"] = {k: t * 1e12 / peak for k, t in result["tflops"].items()} if peak else None
    encoder = bench_encoder(args.encoder_rows, args.repeats, device)
    print(f"encoder: ours {encoder['rows_per_second']['ours']:.0f} rows/s, "
          f"{encoder['speedup_vs_torch']:.2f}x nn.TransformerEncoder")
    write_result(f"attention_{name.replace(' ', '_')}", {
        "device": device_info(device), "backend": backend, "dense_bf16_peak_flops": peak,
        "flash_attn": flash is not None, "baseline_chunk": CHUNK,
        "targets": {"forward_vs_sdpa": 2.0, "forward_vs_flex": 1.5, "forward_backward_vs_sdpa": 1.5},
        "forward": forward, "forward_backward": backward, "encoder": encoder}, args.out)


if __name__ == "__main__":
    main()
