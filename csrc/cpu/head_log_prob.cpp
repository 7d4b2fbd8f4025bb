// Fused probability-flow log densities of the diffusion head on the CPU.
//
// Rows are cut into tiles of kTileRows; OpenMP threads take whole tiles. A tile runs
// every RK4 step, stage and layer before the next tile starts. Beside its activations
// h (kTileRows x W) it carries K tangent vectors per row, T_j = dh/dx_j (K x kTileRows x
// W), through every layer in forward mode, so the divergence is exact. Activations,
// tangents and SiLU slopes (about 1 MiB at W = 512, K = 3) stay in L2; only the weights
// stream from L3, once per evaluation for (1 + K) x kTileRows rows.
//
// The hidden layers reuse head_sample_loop's register-blocked GEMM scheme (weights
// packed in P-column panels, a kMR x P micro-tile of accumulators): per panel the
// forward rows run first and keep silu'(pre), then each tangent block runs through the
// same panel while it is hot, with T' = T + silu'(pre) * (W T) applied in registers.
// The vector code (head_log_prob_tile.inc) is compiled per instruction set like
// head_sample_loop's, and the path is the one head_sample_loop_isa() picks (so
// DENSIFORMER_CPU_ISA forces both kernels alike).
#include "head_log_prob.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "head_sample_loop.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define DENSIFORMER_X86 1
#endif

namespace densiformer {
namespace {

// Rows per tile, a multiple of kMR. Each evaluation streams all hidden weights once per
// tile for (1 + K) x kTileRows rows (192 at K = 3), and the tile's eight-plus W-wide
// buffers (about 1 MiB at W = 512, K = 3) fit a 2 MiB L2.
constexpr int kTileRows = 48;
constexpr int kMR = 6;  // rows of the register micro-tile

// Read-only state shared by all threads: weights re-laid out for the vector path, as in
// head_sample_loop.cpp. Widths are padded to Wp (a multiple of P) with zero weights and
// biases, so padded activations and tangents stay exactly zero.
struct Plan {
  const HeadLogProbArgs* a;
  int Wp;
  int P;
  FloatBuffer w_in_t;    // (K, Wp): column k of w_in
  FloatBuffer base;      // (nodes, Wp): b_in + time_emb[node]
  FloatBuffer w_hidden;  // (L - 1) x (Wp / P) panels of (W, P): panel[i][jj] = w[jp + jj][i]
  FloatBuffer b_hidden;  // (L - 1, Wp)
  FloatBuffer w_out;     // (K, Wp)

  Plan(const HeadLogProbArgs& args, int panel) : a(&args), P(panel) {
    const int K = args.K, W = args.W, H = args.L - 1, nodes = 2 * args.steps + 1;
    Wp = (W + P - 1) / P * P;
    w_in_t = zeros(size_t(K) * Wp);
    w_out = zeros(size_t(K) * Wp);
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < W; ++j) {
        w_in_t[size_t(k) * Wp + j] = args.w_in[size_t(j) * K + k];
        w_out[size_t(k) * Wp + j] = args.w_out[size_t(k) * W + j];
      }
    base = zeros(size_t(nodes) * Wp);
    for (int n = 0; n < nodes; ++n)
      for (int j = 0; j < W; ++j) base[size_t(n) * Wp + j] = args.b_in[j] + args.time_emb[size_t(n) * W + j];
    w_hidden = zeros(size_t(H) * Wp * W);
    b_hidden = zeros(size_t(H) * Wp);
    for (int l = 0; l < H; ++l) {
      const float* w = args.w_hidden + size_t(l) * W * W;
      float* packed = w_hidden.get() + size_t(l) * Wp * W;
      for (int jp = 0; jp < W; jp += P)
        for (int i = 0; i < W; ++i)
          for (int jj = 0; jj < P && jp + jj < W; ++jj)
            packed[size_t(jp) * W + size_t(i) * P + jj] = w[size_t(jp + jj) * W + i];
      for (int j = 0; j < W; ++j) b_hidden[size_t(l) * Wp + j] = args.b_hidden[size_t(l) * W + j];
    }
  }
};

// One thread's tile state.
struct Workspace {
  FloatBuffer h, tmp, slope, cond;  // (kTileRows, Wp): activations (ping-pong), silu'(pre), conditioning
  FloatBuffer t, t_tmp;             // (K, kTileRows, Wp): tangents dh/dx_k (ping-pong)
  FloatBuffer x, y, v, acc_x;       // (kTileRows, K): ODE state, stage input, velocity, RK4 sum
  FloatBuffer div, log_det, acc_l;  // (kTileRows): divergence, its integral, RK4 sum

  explicit Workspace(const Plan& plan) {
    const size_t wide = size_t(kTileRows) * plan.Wp, narrow = size_t(kTileRows) * plan.a->K;
    h = zeros(wide), tmp = zeros(wide), slope = zeros(wide), cond = zeros(wide);
    t = zeros(wide * plan.a->K), t_tmp = zeros(wide * plan.a->K);
    x = zeros(narrow), y = zeros(narrow), v = zeros(narrow), acc_x = zeros(narrow);
    div = zeros(kTileRows), log_det = zeros(kTileRows), acc_l = zeros(kTileRows);
  }
};

using TileFn = void (*)(const Plan&, Workspace&, int64_t, int);

#ifdef DENSIFORMER_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
constexpr int V = 16, NR = 4;  // as head_sample_loop: 6 x 64 micro-tile in 24 zmm registers
#include "head_log_prob_tile.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int V = 8, NR = 2;
#include "head_log_prob_tile.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace generic {
constexpr int V = 4, NR = 2;
#include "head_log_prob_tile.inc"
}  // namespace generic

struct Isa {
  int panel;
  TileFn fn;
};

Isa select_isa() {
  const std::string name = head_sample_loop_isa();  // honours DENSIFORMER_CPU_ISA, checks the CPU
#ifdef DENSIFORMER_X86
  if (name == "avx512") return {avx512::P, avx512::run_tile};
  if (name == "avx2") return {avx2::P, avx2::run_tile};
#endif
  return {generic::P, generic::run_tile};
}

}  // namespace

void head_log_prob_cpu(const HeadLogProbArgs& args) {
  const Isa isa = select_isa();
  const Plan plan(args, isa.panel);
  const int64_t tiles = (args.N + kTileRows - 1) / kTileRows;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(args.num_threads, tiles)));
  // Allocated here, not inside the parallel region, so an allocation failure throws
  // to the caller instead of terminating.
  std::vector<Workspace> spaces;
  spaces.reserve(threads);
  for (int t = 0; t < threads; ++t) spaces.emplace_back(plan);

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
#ifdef _OPENMP
    Workspace& ws = spaces[omp_get_thread_num()];
#else
    Workspace& ws = spaces[0];
#endif
    const int64_t first = tile * kTileRows;
    isa.fn(plan, ws, first, int(std::min<int64_t>(kTileRows, args.N - first)));
  }
}

}  // namespace densiformer
