// Fused denoising loop of the diffusion head on the GPU (issue #4); the meaning is
// head_sample_loop_ref in python/densiformer/ops/head_sample_loop.py.
//
// A persistent kernel: each thread block takes tiles of M sample rows in turn and runs
// every step and every layer on a tile before the next. The tile's activations
// (M x W, two buffers that swap between layers) and the sampler state (x, x0_prev,
// the request mask: M x K) stay in shared memory for the whole loop; only the
// per-row conditioning and the weights come from global memory (L2).
//
// Where the weights live. The paper's head has 4 hidden 512 x 512 layers: 4 MiB in
// fp32, 2 MiB in bf16, while an SM has at most 227 KiB of shared memory, and the tile's
// activations need 65 KiB of it per buffer (64 rows x 512, bf16). So the weights cannot
// stay in shared memory; they are streamed per layer through double-buffered
// shared-memory tiles (cp.async, overlapped with the tensor-core work on the previous
// tile) from L2, where all of them stay resident (50 MiB on an H100). Every block reads
// the whole head once per step and tile, i.e. 2 x M FLOPs per bf16 weight byte.
// Before the loop a small kernel repacks the hidden weights, transposed to (in, out)
// and zero-padded to a multiple of 128, into a stream-ordered workspace: padded rows
// and columns are zero, so no tile load needs a bounds check.
//
// Two precisions:
// - kBf16: activations bf16 in shared memory, weights bf16, tensor cores (WMMA
//   16x16x16, fp32 accumulation); bias, SiLU and the residual add in fp32. Like
//   torch's own bf16 run, the residual stream is rounded to bf16 after each layer.
// - kFp32: activations and weights fp32, plain FMA (SIMT), so the result matches the
//   fp32 reference to ~1e-6 (TF32 would not meet the 1e-4 target over many layers and
//   steps).
// The input layer (K inputs), the output layer (K outputs) and the sampler update are
// tiny beside the hidden layers and run in fp32 in both.
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "../cpu/philox.h"
#include "common.cuh"
#include "kernels.h"

namespace densiformer::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kNc = 128;  // output columns per weight tile; the padded width Wp is a multiple
constexpr int kNumCoefs = 6;
constexpr int kMaxK = 64;  // shared memory holds 4 x M x K floats of sampler state

using bf16 = __nv_bfloat16;

// Per-precision tile shapes. Kc: reduction rows per weight tile (a 16-byte cp.async chunk
// is 8 bf16 or 4 floats, so both tiles are 512 chunks, two per thread). Pad: extra
// elements per shared-memory row, which moves WMMA fragment rows to different banks
// (ldm stays a multiple of 16 bytes and fragments 32-byte aligned).
template <bool kBf16>
struct Prec {
  using T = std::conditional_t<kBf16, bf16, float>;
  static constexpr int Kc = kBf16 ? 32 : 16;
  static constexpr int HPad = kBf16 ? 8 : 0;
  static constexpr int BS = kNc + (kBf16 ? 8 : 0);  // row stride of a weight tile
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// As the CPU and Triton kernels: exp clamped so 1 + exp never overflows.
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(fminf(-x, 80.0f))); }

// The normal of dim k for one (row, sample, step), as philox_normals draws it.
__device__ __forceinline__ float philox_normal(uint64_t seed, uint32_t row, uint32_t sample, uint32_t step, int k) {
  uint32_t ctr[4] = {uint32_t(k / 4), step, sample, row};
  philox4x32_10(ctr, uint32_t(seed), uint32_t(seed >> 32));
  const int lane = k % 4;
  float z0, z1;
  box_muller(lane < 2 ? ctr[0] : ctr[2], lane < 2 ? ctr[1] : ctr[3], z0, z1);
  return (lane & 1) ? z1 : z0;
}

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Byte offsets into dynamic shared memory; the same on host (for the size) and device.
template <bool kBf16, int M>
struct Smem {
  using P = Prec<kBf16>;
  size_t h, btile, stage, x, x0, v, req, rows, samples, total;
  __host__ __device__ Smem(int Wp, int K) {
    const size_t hs = size_t(Wp + P::HPad);
    h = 0;
    btile = h + align128(2 * M * hs * sizeof(typename P::T));
    stage = btile + align128(2 * P::Kc * P::BS * sizeof(typename P::T));
    x = stage + (kBf16 ? align128(kWarps * 256 * sizeof(float)) : 0);
    x0 = x + align128(size_t(M) * K * sizeof(float));
    v = x0 + align128(size_t(M) * K * sizeof(float));
    req = v + align128(size_t(M) * K * sizeof(float));
    rows = req + align128(size_t(M) * K * sizeof(float));
    samples = rows + align128(M * sizeof(int64_t));
    total = samples + align128(M * sizeof(uint32_t));
  }
};

// Copies the weight tile (rows k0..k0+Kc, columns n0..n0+kNc) of one packed (Wp, Wp)
// layer into shared memory, asynchronously.
template <bool kBf16>
__device__ __forceinline__ void load_weight_tile(typename Prec<kBf16>::T* dst, const typename Prec<kBf16>::T* w,
                                                 int Wp, int n0, int k0) {
  using P = Prec<kBf16>;
  constexpr int E = 16 / sizeof(typename P::T);  // elements per 16-byte chunk
  constexpr int kPerRow = kNc / E;
  for (int c = threadIdx.x; c < P::Kc * kPerRow; c += kThreads) {
    const int kk = c / kPerRow, nn = (c % kPerRow) * E;
    cp_async16(dst + kk * P::BS + nn, w + size_t(k0 + kk) * Wp + n0 + nn);
  }
  cp_async_commit();
}

// dst = src + silu(src W^T + bias) on the M x Wp tile; columns >= W are written as 0.
// The (n0, k0) weight tiles are walked in one flat, double-buffered sequence: tile t + 1
// loads while tile t is multiplied. Ends with __syncthreads.
template <int M>
__device__ void hidden_layer(const bf16* src, bf16* dst, bf16* btile, float* stage, const bf16* w,
                             const float* bias, int W, int Wp) {
  using namespace nvcuda;
  using P = Prec<true>;
  constexpr int kWarpsM = M / 32, kWarpsN = kWarps / kWarpsM;  // each warp: 32 rows x WN columns
  constexpr int WN = kNc / kWarpsN, FN = WN / 16;
  static_assert(M % 32 == 0 && kWarps % kWarpsM == 0 && WN % 16 == 0, "warp tiling");
  const int hs = Wp + P::HPad;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int k_tiles = Wp / P::Kc, tiles = (Wp / kNc) * k_tiles;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][FN];
  load_weight_tile<true>(btile, w, Wp, 0, 0);
  for (int t = 0; t < tiles; ++t) {
    const int n0 = (t / k_tiles) * kNc, kt = t % k_tiles, k0 = kt * P::Kc;
    if (t + 1 < tiles) {
      load_weight_tile<true>(btile + ((t + 1) & 1) * P::Kc * P::BS, w, Wp, ((t + 1) / k_tiles) * kNc,
                             ((t + 1) % k_tiles) * P::Kc);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile t has landed for every thread
    if (kt == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    const bf16* b = btile + (t & 1) * P::Kc * P::BS;
#pragma unroll
    for (int kk = 0; kk < P::Kc; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> bw[FN];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], src + (wm * 32 + i * 16) * hs + k0 + kk, hs);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(bw[j], b + kk * P::BS + wn * WN + j * 16, P::BS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], bw[j], acc[i][j]);
    }
    if (kt == k_tiles - 1) {
      // Epilogue of columns n0..n0+kNc. Accumulator fragments have no documented element
      // layout, so each goes through the warp's 16 x 16 fp32 staging square.
      float* st = stage + warp * 256;
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) {
          wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
          __syncwarp();
          for (int e = lane; e < 256; e += 32) {
            const int r = wm * 32 + i * 16 + e / 16, c = n0 + wn * WN + j * 16 + e % 16;
            const float out = c < W ? to_float(src[r * hs + c]) + silu(st[e] + bias[c]) : 0.0f;
            dst[r * hs + c] = __float2bfloat16_rn(out);
          }
          __syncwarp();
        }
    }
    __syncthreads();  // everyone is done with buffer t & 1 before tile t + 2 overwrites it
  }
}

// The fp32 (SIMT) version: thread (warp wm, lane ln) owns rows wm*TM.. and the four
// columns n0 + 4 ln.. of each output chunk. A warp reads one activation (a broadcast)
// and 32 consecutive float4 of the weight tile per reduction step.
template <int M>
__device__ void hidden_layer(const float* src, float* dst, float* btile, float*, const float* w, const float* bias,
                             int W, int Wp) {
  using P = Prec<false>;
  constexpr int TM = M / kWarps;
  static_assert(TM * kWarps == M && kNc == 4 * 32, "thread tiling");
  const int hs = Wp;
  const int r0 = (threadIdx.x / 32) * TM, c_off = (threadIdx.x % 32) * 4;
  const int k_tiles = Wp / P::Kc, tiles = (Wp / kNc) * k_tiles;

  float acc[TM][4];
  load_weight_tile<false>(btile, w, Wp, 0, 0);
  for (int t = 0; t < tiles; ++t) {
    const int n0 = (t / k_tiles) * kNc, kt = t % k_tiles, k0 = kt * P::Kc;
    if (t + 1 < tiles) {
      load_weight_tile<false>(btile + ((t + 1) & 1) * P::Kc * P::BS, w, Wp, ((t + 1) / k_tiles) * kNc,
                              ((t + 1) % k_tiles) * P::Kc);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (kt == 0) {
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
    const float* b = btile + (t & 1) * P::Kc * P::BS;
#pragma unroll
    for (int kk = 0; kk < P::Kc; ++kk) {
      const float4 bv = *reinterpret_cast<const float4*>(b + kk * P::BS + c_off);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float a = src[(r0 + i) * hs + k0 + kk];
        acc[i][0] = fmaf(a, bv.x, acc[i][0]);
        acc[i][1] = fmaf(a, bv.y, acc[i][1]);
        acc[i][2] = fmaf(a, bv.z, acc[i][2]);
        acc[i][3] = fmaf(a, bv.w, acc[i][3]);
      }
    }
    if (kt == k_tiles - 1) {
      const int c = n0 + c_off;
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float4 res = *reinterpret_cast<const float4*>(src + (r0 + i) * hs + c);
        const float r[4] = {res.x, res.y, res.z, res.w};
        float o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = c + j < W ? r[j] + silu(acc[i][j] + bias[c + j]) : 0.0f;
        *reinterpret_cast<float4*>(dst + (r0 + i) * hs + c) = make_float4(o[0], o[1], o[2], o[3]);
      }
    }
    __syncthreads();
  }
}

struct Params {
  HeadSampleLoopArgs a;
  const void* w_packed;  // (L - 1, Wp, Wp) in the precision's type, (in, out) layout
  int Wp;
  int64_t pairs, tiles;
};

template <bool kBf16, int M>
__global__ void __launch_bounds__(kThreads, 1) head_sample_loop_kernel(const Params p) {
  using Pr = Prec<kBf16>;
  using T = typename Pr::T;
  extern __shared__ __align__(128) unsigned char smem[];
  const HeadSampleLoopArgs& a = p.a;
  const int K = a.K, W = a.W, Wp = p.Wp, hs = Wp + Pr::HPad;
  const Smem<kBf16, M> lay(Wp, K);
  T* h0 = reinterpret_cast<T*>(smem + lay.h);
  T* h1 = h0 + M * hs;
  T* btile = reinterpret_cast<T*>(smem + lay.btile);
  float* stage = reinterpret_cast<float*>(smem + lay.stage);
  float* xs = reinterpret_cast<float*>(smem + lay.x);
  float* x0s = reinterpret_cast<float*>(smem + lay.x0);
  float* vs = reinterpret_cast<float*>(smem + lay.v);
  float* reqs = reinterpret_cast<float*>(smem + lay.req);
  int64_t* rows = reinterpret_cast<int64_t*>(smem + lay.rows);  // -1: past the last sample row
  uint32_t* samples = reinterpret_cast<uint32_t*>(smem + lay.samples);
  const T* w_packed = static_cast<const T*>(p.w_packed);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    for (int r = threadIdx.x; r < M; r += kThreads) {
      const int64_t pair = tile * M + r;
      rows[r] = pair < p.pairs ? pair / a.S : -1;
      samples[r] = pair < p.pairs ? uint32_t(pair % a.S) : 0u;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < M * K; e += kThreads) {
      const int r = e / K, k = e % K;
      const float req = rows[r] >= 0 ? a.request[rows[r] * K + k] : 0.0f;
      reqs[e] = req;
      xs[e] = rows[r] >= 0 ? philox_normal(a.seed, uint32_t(a.row_offset + rows[r]), samples[r], 0, k) * req
                           : 0.0f;
      x0s[e] = 0.0f;
    }
    __syncthreads();

    for (int step = 0; step < a.steps; ++step) {
      // Input layer: h = silu(W_in x + b_in + cond[row] + temb[step]); padding columns 0.
      const float* temb = a.time_emb + size_t(step) * W;
      for (int e = threadIdx.x; e < M * Wp; e += kThreads) {
        const int r = e / Wp, j = e % Wp;
        float out = 0.0f;
        if (j < W) {
          float pre = 0.0f;
          for (int k = 0; k < K; ++k) pre = fmaf(a.w_in[j * K + k], xs[r * K + k], pre);
          pre += a.b_in[j];
          if (rows[r] >= 0) pre += a.cond[rows[r] * W + j];
          out = silu(pre + temb[j]);
        }
        h0[r * hs + j] = from_float<T>(out);
      }
      __syncthreads();

      T* src = h0;
      T* dst = h1;
      for (int l = 0; l < a.L - 1; ++l) {
        hidden_layer<M>(src, dst, btile, stage, w_packed + size_t(l) * Wp * Wp, a.b_hidden + size_t(l) * W, W, Wp);
        T* const done = src;  // std::swap is not a device function before C++20
        src = dst;
        dst = done;
      }

      // Output layer, one warp per (row, dim): v = (W_out h + b_out) * req.
      for (int e = warp; e < M * K; e += kWarps) {
        const int r = e / K, k = e % K;
        float s = 0.0f;
        for (int j = lane; j < W; j += 32) s = fmaf(to_float(src[r * hs + j]), a.w_out[k * W + j], s);
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) vs[e] = (s + a.b_out[k]) * reqs[e];
      }
      __syncthreads();

      // Sampler update: x0 = a x - b v; x <- c_x x + c_x0 x0 + c_prev x0_prev + c_noise z.
      const float* c = a.coefs + size_t(step) * kNumCoefs;
      const float c_noise = c[5];
      for (int e = threadIdx.x; e < M * K; e += kThreads) {
        const int r = e / K, k = e % K;
        if (rows[r] < 0) continue;
        const float x = xs[e];
        const float x0 = c[0] * x - c[1] * vs[e];
        float next = c[2] * x + c[3] * x0 + c[4] * x0s[e];
        if (c_noise != 0.0f)
          next += c_noise *
                  (philox_normal(a.seed, uint32_t(a.row_offset + rows[r]), samples[r], uint32_t(step + 1), k) * reqs[e]);
        xs[e] = next;
        x0s[e] = x0;
      }
      __syncthreads();
    }

    for (int e = threadIdx.x; e < M * K; e += kThreads) {
      const int r = e / K;
      if (rows[r] >= 0) a.out[(tile * M + r) * K + e % K] = xs[e];
    }
    __syncthreads();  // the next tile rewrites rows, samples and the state
  }
}

// packed[l][k][n] = w[l][n][k] for k, n < W, zero up to Wp.
template <class T>
__global__ void pack_hidden_weights(const float* w, T* packed, int layers, int W, int Wp) {
  const int64_t total = int64_t(layers) * Wp * Wp;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int n = int(i % Wp), k = int(i / Wp % Wp);
    const int64_t l = i / (int64_t(Wp) * Wp);
    packed[i] = from_float<T>(n < W && k < W ? w[(l * W + n) * W + k] : 0.0f);
  }
}

struct Device {
  int sms, smem_optin;
};

// Launches the M-row variant if its shared memory fits one block per SM; false if not.
template <bool kBf16, int M>
bool launch(const Params& p, const Device& dev, cudaStream_t stream) {
  const size_t smem = Smem<kBf16, M>(p.Wp, p.a.K).total;
  if (smem > size_t(dev.smem_optin)) return false;
  auto kernel = head_sample_loop_kernel<kBf16, M>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "head_sample_loop: cudaFuncSetAttribute");
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem),
        "head_sample_loop: occupancy");
  if (per_sm == 0) return false;
  const int64_t tiles = (p.pairs + M - 1) / M;
  Params q = p;
  q.tiles = tiles;
  const int grid = int(std::min<int64_t>(tiles, int64_t(per_sm) * dev.sms));
  kernel<<<grid, kThreads, smem, stream>>>(q);
  check(cudaGetLastError(), "head_sample_loop: launch");
  return true;
}

// The largest row tile that fits: more rows per tile means fewer weight reads per FLOP.
template <bool kBf16>
bool launch_largest(const Params& p, const Device& dev, cudaStream_t stream) {
  if constexpr (kBf16) {
    return launch<true, 128>(p, dev, stream) || launch<true, 64>(p, dev, stream) || launch<true, 32>(p, dev, stream);
  } else {
    return launch<false, 64>(p, dev, stream) || launch<false, 32>(p, dev, stream) ||
           launch<false, 16>(p, dev, stream);
  }
}

template <class T>
void run(const HeadSampleLoopArgs& a, const Device& dev, cudaStream_t stream) {
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  Params p{a, nullptr, (a.W + kNc - 1) / kNc * kNc, a.N * a.S, 0};
  const int hidden = a.L - 1;
  const size_t bytes = size_t(hidden) * p.Wp * p.Wp * sizeof(T);
  void* packed = nullptr;
  if (hidden > 0) {
    check(cudaMallocAsync(&packed, bytes, stream), "head_sample_loop: workspace");
    const int64_t total = int64_t(hidden) * p.Wp * p.Wp;
    const int blocks = int(std::min<int64_t>((total + 255) / 256, int64_t(dev.sms) * 8));
    pack_hidden_weights<T><<<blocks, 256, 0, stream>>>(a.w_hidden, static_cast<T*>(packed), hidden, a.W, p.Wp);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      cudaFreeAsync(packed, stream);
      check(err, "head_sample_loop: pack");
    }
  }
  p.w_packed = packed;
  bool launched = false;
  try {
    launched = launch_largest<kBf16>(p, dev, stream);
  } catch (...) {
    if (packed != nullptr) cudaFreeAsync(packed, stream);
    throw;
  }
  if (packed != nullptr) check(cudaFreeAsync(packed, stream), "head_sample_loop: free workspace");
  if (!launched)
    throw std::invalid_argument("head_sample_loop: width " + std::to_string(a.W) + " with k " + std::to_string(a.K) +
                                " needs more shared memory than this GPU has (" + std::to_string(dev.smem_optin) +
                                " bytes per block)");
}

}  // namespace

void head_sample_loop(const HeadSampleLoopArgs& a) {
  if (a.N < 0 || a.S < 1 || a.K < 1 || a.W < 1 || a.L < 1 || a.steps < 1 || a.row_offset < 0)
    throw std::invalid_argument("head_sample_loop: bad sizes");
  if (a.K > kMaxK) throw std::invalid_argument("head_sample_loop: the cuda kernel takes k <= 64");
  if (a.N == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  StreamDevice guard(stream);
  int device = 0;
  Device dev{};
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&dev.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  if (a.precision == Precision::kBf16) {
    run<bf16>(a, dev, stream);
  } else if (a.precision == Precision::kFp32) {
    run<float>(a, dev, stream);
  } else {
    throw std::invalid_argument("head_sample_loop: precision must be 0 (fp32) or 1 (bf16)");
  }
}

std::string runtime_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("the CUDA runtime of densiformer._C_cuda sees no GPU: ") + cudaGetErrorString(err);
  }
  return count > 0 ? "" : "the CUDA runtime of densiformer._C_cuda sees no GPU";
}

}  // namespace densiformer::cuda
