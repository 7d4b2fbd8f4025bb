// The diffusion head's MLP weights re-laid out for the CPU kernels' vector path
// (head_sample_loop.cpp and head_log_prob.cpp share it).
//
// Widths are padded to Wp, a multiple of the panel width P, with zero weights and
// biases, so padded activations (and tangents) stay exactly zero and no loop needs a
// remainder. Hidden weights are packed in P-column panels so that each step of a
// register-blocked GEMM's reduction reads P contiguous floats.
#pragma once

#include <cstddef>

#include "aligned_buffer.h"

namespace densiformer {

struct PackedHead {
  int Wp;
  int P;
  FloatBuffer w_in_t;    // (K, Wp): column k of w_in
  FloatBuffer base;      // (nodes, Wp): b_in + time_emb[node]
  FloatBuffer w_hidden;  // (L - 1) x (Wp / P) panels of (W, P): panel[i][jj] = w[jp + jj][i]
  FloatBuffer b_hidden;  // (L - 1, Wp)
  FloatBuffer w_out;     // (K, Wp)

  // Torch layouts in: w_in (W, K), b_in (W), time_emb (nodes, W), w_hidden (L - 1, W, W)
  // as (out, in), b_hidden (L - 1, W), w_out (K, W). `nodes` time embeddings, one per
  // network evaluation point of the solver.
  PackedHead(int K, int W, int L, int nodes, int panel, const float* in_w, const float* in_b,
             const float* time_emb, const float* hidden_w, const float* hidden_b, const float* out_w)
      : Wp((W + panel - 1) / panel * panel), P(panel) {
    const int H = L - 1;
    w_in_t = zeros(size_t(K) * Wp);
    w_out = zeros(size_t(K) * Wp);
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < W; ++j) {
        w_in_t[size_t(k) * Wp + j] = in_w[size_t(j) * K + k];
        w_out[size_t(k) * Wp + j] = out_w[size_t(k) * W + j];
      }
    base = zeros(size_t(nodes) * Wp);
    for (int n = 0; n < nodes; ++n)
      for (int j = 0; j < W; ++j) base[size_t(n) * Wp + j] = in_b[j] + time_emb[size_t(n) * W + j];
    w_hidden = zeros(size_t(H) * Wp * W);
    b_hidden = zeros(size_t(H) * Wp);
    for (int l = 0; l < H; ++l) {
      const float* w = hidden_w + size_t(l) * W * W;
      float* packed = w_hidden.get() + size_t(l) * Wp * W;
      for (int jp = 0; jp < W; jp += P)
        for (int i = 0; i < W; ++i)
          for (int jj = 0; jj < P && jp + jj < W; ++jj)
            packed[size_t(jp) * W + size_t(i) * P + jj] = w[size_t(jp + jj) * W + i];
      for (int j = 0; j < W; ++j) b_hidden[size_t(l) * Wp + j] = hidden_b[size_t(l) * W + j];
    }
  }
};

}  // namespace densiformer
