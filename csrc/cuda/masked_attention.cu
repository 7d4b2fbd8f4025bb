// Forward masked attention over many short sequences (issue #5); the meaning is
// masked_attention_ref in python/densiformer/ops/masked_attention.py.
//
// The regime: L up to ~300 tokens, head dims 8 to 128, and 10^6 or more (batch, head)
// sequences. FlashAttention-style 128 x 128 tiles would be mostly empty here, so the
// unit of work is one query row: G = D / 8 consecutive lanes own one query, 8 dims each,
// and walk all L keys of its sequence with an online softmax (log2 domain, fp32). The
// query rows of all sequences are flattened into one index, so a block of 128 threads
// covers 128 / G consecutive queries: at D = 8 and L = 16 that is 8 whole sequences per
// block, and a 20-token set costs 20 keys per query, never a padded tile. Lanes of one
// warp that serve the same sequence read the same key row at the same time, which the
// L1 serves as one broadcast. The grid walks the flattened queries on grid.x only (a
// grid-stride loop), so B x H has no limit but memory, and nothing on the host depends
// on the mask.
//
// A row whose keys are all padding outputs zeros and log-sum-exp -inf. Inputs and
// outputs are fp32, bf16 or fp16; scores, softmax and accumulation are fp32.
// All pointers must be 16-byte aligned (each lane moves its 8 elements in one or two
// 16-byte accesses).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace densiformer::cuda {
namespace {

constexpr int kThreads = 128;

using bf16 = __nv_bfloat16;

__device__ __forceinline__ void load8(const float* p, float* o) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float* o) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    o[2 * i] = f.x, o[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __half* p, float* o) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    o[2 * i] = f.x, o[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store8(float* p, const float* o) {
  reinterpret_cast<float4*>(p)[0] = make_float4(o[0], o[1], o[2], o[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(o[4], o[5], o[6], o[7]);
}
__device__ __forceinline__ void store8(bf16* p, const float* o) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(o[2 * i], o[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}
__device__ __forceinline__ void store8(__half* p, const float* o) {
  uint4 u;
  __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(o[2 * i], o[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}

template <int D, class T>
__global__ void __launch_bounds__(kThreads) masked_attention_fwd_kernel(const T* __restrict__ q,
                                                                         const T* __restrict__ k,
                                                                         const T* __restrict__ v,
                                                                         const uint8_t* __restrict__ mask,
                                                                         T* __restrict__ out, float* __restrict__ lse,
                                                                         int H, int L, float scale_log2,
                                                                         int64_t queries) {
  constexpr int G = D / 8;  // lanes per query
  constexpr int kQueriesPerBlock = kThreads / G;
  static_assert(D % 8 == 0 && 32 % G == 0, "D must be 8, 16, 32, 64 or 128");
  const int g = threadIdx.x % G;
  // The loop bound is the same for the whole block, so every lane reaches every shuffle.
  for (int64_t first = blockIdx.x * int64_t(kQueriesPerBlock); first < queries;
       first += int64_t(gridDim.x) * kQueriesPerBlock) {
    const int64_t wanted = first + threadIdx.x / G;
    const bool live = wanted < queries;
    const int64_t qi = live ? wanted : queries - 1;  // past the end: recompute the last row, store nothing
    const int64_t bh = qi / L;
    const T* kp = k + bh * L * D + g * 8;
    const T* vp = v + bh * L * D + g * 8;
    const uint8_t* mp = mask + (bh / H) * L;

    float qv[8], o[8];
    load8(q + qi * D + g * 8, qv);
#pragma unroll
    for (int d = 0; d < 8; ++d) {
      qv[d] *= scale_log2;  // scores in log2 units: softmax with exp2
      o[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < L; ++j) {
      float kv[8];
      load8(kp + size_t(j) * D, kv);
      float s = 0.0f;
#pragma unroll
      for (int d = 0; d < 8; ++d) s = fmaf(qv[d], kv[d], s);
#pragma unroll
      for (int off = G / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (mp[j]) continue;  // padding: weight exactly 0
      float vv[8];
      load8(vp + size_t(j) * D, vv);
      if (s > m) {  // new running maximum: rescale what was summed so far
        const float corr = exp2f(m - s);
        l *= corr;
#pragma unroll
        for (int d = 0; d < 8; ++d) o[d] *= corr;
        m = s;
      }
      const float p = exp2f(s - m);
      l += p;
#pragma unroll
      for (int d = 0; d < 8; ++d) o[d] = fmaf(p, vv[d], o[d]);
    }
    if (live) {
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no unmasked key: zeros, not NaN
#pragma unroll
      for (int d = 0; d < 8; ++d) o[d] *= inv;
      store8(out + qi * D + g * 8, o);
      if (lse != nullptr && g == 0) lse[qi] = l > 0.0f ? (m + log2f(l)) * 0.69314718055994531f : -INFINITY;
    }
  }
}

template <int D, class T>
void launch(const MaskedAttentionArgs& a, cudaStream_t stream) {
  constexpr int kQueriesPerBlock = kThreads / (D / 8);
  const int64_t queries = a.B * a.H * a.L;
  int device = 0, sms = 0, per_sm = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  auto kernel = masked_attention_fwd_kernel<D, T>;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0), "masked_attention: occupancy");
  // Enough blocks to fill the GPU a few times over; the grid-stride loop does the rest.
  const int64_t blocks = (queries + kQueriesPerBlock - 1) / kQueriesPerBlock;
  const int grid = int(std::min<int64_t>(blocks, int64_t(std::max(per_sm, 1)) * sms * 8));
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a.q), static_cast<const T*>(a.k),
                                        static_cast<const T*>(a.v), a.mask, static_cast<T*>(a.out), a.lse, a.H, a.L,
                                        a.scale * 1.4426950408889634f, queries);
  check(cudaGetLastError(), "masked_attention: launch");
}

template <class T>
void dispatch_d(const MaskedAttentionArgs& a, cudaStream_t stream) {
  switch (a.D) {
    case 8: return launch<8, T>(a, stream);
    case 16: return launch<16, T>(a, stream);
    case 32: return launch<32, T>(a, stream);
    case 64: return launch<64, T>(a, stream);
    case 128: return launch<128, T>(a, stream);
    default: throw std::invalid_argument("masked_attention_fwd: head dim D must be 8, 16, 32, 64 or 128");
  }
}

}  // namespace

void masked_attention_fwd(const MaskedAttentionArgs& a) {
  if (a.B < 0 || a.H < 0 || a.L < 0) throw std::invalid_argument("masked_attention_fwd: negative size");
  for (const void* p : {a.q, a.k, a.v, static_cast<const void*>(a.out)})
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0)
      throw std::invalid_argument("masked_attention_fwd: q, k, v and out must be 16-byte aligned");
  if (a.B == 0 || a.H == 0 || a.L == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  StreamDevice guard(stream);
  switch (a.dtype) {
    case DType::kFp32: return dispatch_d<float>(a, stream);
    case DType::kBf16: return dispatch_d<bf16>(a, stream);
    case DType::kFp16: return dispatch_d<__half>(a, stream);
    default: throw std::invalid_argument("masked_attention_fwd: dtype_code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  }
}

}  // namespace densiformer::cuda
