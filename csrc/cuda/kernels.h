// Host entry points of the CUDA kernels, called by csrc/bindings_cuda.cpp. Plain C++:
// streams travel as integers (a cudaStream_t's value), so the bindings compile with the
// host compiler and without CUDA headers.
#pragma once

#include <cstdint>
#include <string>

namespace densiformer::cuda {

// head_sample_loop on the GPU; the meaning is head_sample_loop_ref
// (python/densiformer/ops/head_sample_loop.py), the layout that of the CPU kernel
// (csrc/cpu/head_sample_loop.h). All pointers are device pointers to fp32 data; the
// hidden weights are repacked (and rounded to bf16 for kBf16) on the stream first.
enum class Precision : int { kFp32 = 0, kBf16 = 1 };

struct HeadSampleLoopArgs {
  const float* cond;      // (N, W)
  const float* request;   // (N, K) 0/1
  const float* w_in;      // (W, K)
  const float* b_in;      // (W)
  const float* w_hidden;  // (L - 1, W, W), torch Linear layout (out, in)
  const float* b_hidden;  // (L - 1, W)
  const float* w_out;     // (K, W)
  const float* b_out;     // (K)
  const float* time_emb;  // (steps, W)
  const float* coefs;     // (steps, 6): a, b, c_x, c_x0, c_prev, c_noise
  float* out;             // (N, S, K)
  int64_t N, S;
  int K, W, L, steps;
  uint64_t seed;
  int64_t row_offset;
  Precision precision;
  std::uintptr_t stream;
};

void head_sample_loop(const HeadSampleLoopArgs& args);

// Forward masked attention for many short sequences; the meaning is masked_attention_ref
// (python/densiformer/ops/masked_attention.py). q, k, v, out: contiguous (B, H, L, D) in
// `dtype`; mask: (B, L) bytes, nonzero = padding; lse: (B, H, L) fp32 or null.
enum class DType : int { kFp32 = 0, kBf16 = 1, kFp16 = 2 };

struct MaskedAttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;
  void* out;
  float* lse;
  int64_t B;
  int H, L, D;
  float scale;
  DType dtype;
  std::uintptr_t stream;
};

void masked_attention_fwd(const MaskedAttentionArgs& args);

// "" when the CUDA runtime sees at least one GPU, else why not.
std::string runtime_status();

}  // namespace densiformer::cuda
