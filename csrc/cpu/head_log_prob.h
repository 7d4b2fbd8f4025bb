// Exact log densities of the diffusion head on the CPU: the probability-flow ODE with
// its divergence, fused; the meaning is defined by head_log_prob_ref in
// python/densiformer/ops/head_log_prob.py.
#pragma once

#include <cstdint>

namespace densiformer {

// RK4 in `steps` steps: step i evaluates the network at nodes 2i, 2i + 1 (twice) and
// 2i + 2. With F the MLP's output, dx/dlambda = scale[node] * F and its divergence is
// scale[node] * tr(dF/dx), scale = -0.5 alpha sigma.
struct HeadLogProbArgs {
  const float* cond;      // (N, W) per-row conditioning
  const float* request;   // (N, K) 0/1
  const float* w_in;      // (W, K)
  const float* b_in;      // (W)
  const float* w_hidden;  // (L - 1, W, W), torch Linear layout (out, in)
  const float* b_hidden;  // (L - 1, W)
  const float* w_out;     // (K, W)
  const float* b_out;     // (K)
  const float* time_emb;  // (2 steps + 1, W): the time embedding at each node
  const float* scale;     // (2 steps + 1): -0.5 alpha sigma at each node
  const float* h;         // (steps): each step's size in log-SNR (negative: data to noise)
  const float* x0;        // (N, K): the points; unrequested entries are ignored
  float* out;             // (N): log p(x0) over each row's requested targets
  int64_t N;
  int K, W, L, steps;
  int num_threads;
};

void head_log_prob_cpu(const HeadLogProbArgs& args);

}  // namespace densiformer
