"""MaskedSelfAttention: MultiheadAttention's self-attention with a key padding mask, on ops.masked_attention."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import masked_attention


class MaskedSelfAttention(nn.Module):
    """A drop-in for ``torch.nn.MultiheadAttention`` used as self-attention with ``key_padding_mask``.

    Same constructor arguments, parameter names and initialisation as MultiheadAttention
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), so each
    loads the other's state_dict. ``forward`` returns ``(output, None)``, as
    MultiheadAttention does with ``need_weights=False``.

    Differences:
    - ``need_weights`` defaults to False and True raises: the fused kernel never forms
      the attention weights. ``attn_mask``, ``is_causal`` and attention dropout raise too.
    - query, key and value must have one shape (self-attention, or the same-length
      sequences of another source); key_padding_mask must be bool (True = padding).
    - A sequence whose keys are all padding gets attention output zeros, so
      ``out_proj.bias`` after the output projection, always. MultiheadAttention gives the
      same on its need_weights=False path in PyTorch 2.13, but NaN with need_weights=True
      and in older versions.
    - add_bias_kv, add_zero_attn, and kdim or vdim other than embed_dim raise
      NotImplementedError.

    backend: passed to ops.masked_attention ("auto", "torch", "triton", "cuda"); an
    attribute, so it can be changed after construction.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=True, device=None, dtype=None, *, backend="auto"):
        super().__init__()
        unsupported = {"add_bias_kv": add_bias_kv, "add_zero_attn": add_zero_attn,
                       "kdim != embed_dim": kdim not in (None, embed_dim),
                       "vdim != embed_dim": vdim not in (None, embed_dim), "dropout > 0": dropout > 0}
        named = [name for name, flag in unsupported.items() if flag]
        if named:
            raise NotImplementedError(f"MaskedSelfAttention does not support {', '.join(named)}; "
                                      "use torch.nn.MultiheadAttention for these")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = self.vdim = embed_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.xavier_uniform_(self.in_proj_weight)  # as MultiheadAttention
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """query, key, value (N, L, E) (batch_first; (L, N, E) otherwise, or (L, E) unbatched) ->
        (output of the same shape, None). key_padding_mask: (N, L) bool, True = padding."""
        if need_weights:
            raise NotImplementedError("MaskedSelfAttention never forms attention weights; pass need_weights=False")
        if attn_mask is not None or is_causal:
            raise NotImplementedError("MaskedSelfAttention takes key_padding_mask only, not attn_mask or is_causal")
        if not query.shape == key.shape == value.shape or query.dim() not in (2, 3) \
                or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query, key and value must share one shape (N, L, {self.embed_dim}) (or unbatched "
                             f"(L, {self.embed_dim})); got {tuple(query.shape)}, {tuple(key.shape)}, "
                             f"{tuple(value.shape)}")
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(N, L, dtype=torch.bool, device=query.device)
        if key is query and value is query:  # one GEMM for all three projections
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(N, L, 3, self.num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        else:
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = (F.linear(x, w, b).view(N, L, self.num_heads, -1).transpose(1, 2)
                       for x, w, b in zip((query, key, value), self.in_proj_weight.chunk(3), biases))
        attn = masked_attention(q, k, v, key_padding_mask, backend=self.backend)
        out = self.out_proj(attn.transpose(1, 2).reshape(N, L, E))
        if unbatched:
            return out[0], None
        return (out if self.batch_first else out.transpose(0, 1)), None
