// Counter-based normal noise shared by every backend of head_sample_loop.
//
// Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"),
// keyed by the seed and counted by (dim group, step, sample, row):
//   key = (seed & 0xffffffff, seed >> 32)
//   ctr = (g, step, sample, row), g = dim / 4; step 0 draws x_T, step i + 1 the noise
//         that sampler step i adds; row is the global row index (row_offset + local row).
// Each call gives 4 uint32 words; Box-Muller turns words (0, 1) into the normals of
// dims 4g, 4g + 1 and words (2, 3) into those of dims 4g + 2, 4g + 3, in fp32.
// The torch reference (python/densiformer/ops/head_sample_loop.py) and the Triton
// kernel use the same layout, so all draw the same noise for a (seed, row, sample).
#pragma once

#include <cmath>
#include <cstdint>

// The CUDA kernels (csrc/cuda/) include this header too: under nvcc every function
// here is compiled for both host and device.
#ifdef __CUDACC__
#define DENSIFORMER_HD __host__ __device__
#else
#define DENSIFORMER_HD
#endif

namespace densiformer {

DENSIFORMER_HD inline void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = uint64_t(0xD2511F53u) * ctr[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * ctr[2];
    const uint32_t c0 = uint32_t(p1 >> 32) ^ ctr[1] ^ k0;
    const uint32_t c2 = uint32_t(p0 >> 32) ^ ctr[3] ^ k1;
    ctr[0] = c0;
    ctr[1] = uint32_t(p1);
    ctr[2] = c2;
    ctr[3] = uint32_t(p0);
  }
}

// Two N(0, 1) draws from two uint32 words. u1 is in (0, 1] so the log is finite;
// 24-bit uniforms convert to fp32 exactly, so only log/cos/sin may round differently
// between backends (by an ulp or so).
DENSIFORMER_HD inline void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float u1 = float((a >> 8) + 1u) * 0x1p-24f;
  const float u2 = float(b >> 8) * 0x1p-24f;
  const float r = std::sqrt(-2.0f * std::log(u1));
  const float theta = 6.2831855f * u2;  // 2 pi rounded to fp32
  z0 = r * std::cos(theta);
  z1 = r * std::sin(theta);
}

// The normals of dims [0, K) for one (row, sample, step), written to z[0..K).
DENSIFORMER_HD inline void philox_normals(uint64_t seed, uint32_t row, uint32_t sample, uint32_t step, int K, float* z) {
  for (int g = 0; 4 * g < K; ++g) {
    uint32_t ctr[4] = {uint32_t(g), step, sample, row};
    philox4x32_10(ctr, uint32_t(seed), uint32_t(seed >> 32));
    float n[4];
    box_muller(ctr[0], ctr[1], n[0], n[1]);
    box_muller(ctr[2], ctr[3], n[2], n[3]);
    for (int j = 0; j < 4 && 4 * g + j < K; ++j) z[4 * g + j] = n[j];
  }
}

}  // namespace densiformer
