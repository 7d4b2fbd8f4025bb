// The fused denoising loop of the diffusion head on the CPU; the meaning is defined by
// head_sample_loop_ref in python/densiformer/ops/head_sample_loop.py.
#pragma once

#include <cstdint>

namespace densiformer {

// Per-step sampler coefficients, in this order. With F the MLP's output (the head's
// v-prediction; its noise prediction is sigma x + alpha F),
//   x0 = a x - b F
//   x' = c_x x + c_x0 x0 + c_prev x0_prev + c_noise z
// which covers ancestral DDPM, DDIM and DPM-Solver++(2M).
constexpr int kNumCoefs = 6;

struct HeadSampleLoopArgs {
  const float* cond;      // (N, W) per-row conditioning
  const float* request;   // (N, K) 0/1
  const float* w_in;      // (W, K)
  const float* b_in;      // (W)
  const float* w_hidden;  // (L - 1, W, W), torch Linear layout (out, in)
  const float* b_hidden;  // (L - 1, W)
  const float* w_out;     // (K, W)
  const float* b_out;     // (K)
  const float* time_emb;  // (steps, W)
  const float* coefs;     // (steps, kNumCoefs)
  float* out;             // (N, S, K)
  int64_t N, S;
  int K, W, L, steps;
  uint64_t seed;
  int64_t row_offset;  // global index of row 0, for the noise counter
  int num_threads;
};

void head_sample_loop_cpu(const HeadSampleLoopArgs& args);

// The vector code path this CPU runs: "avx512", "avx2" or "generic".
const char* head_sample_loop_isa();

}  // namespace densiformer
