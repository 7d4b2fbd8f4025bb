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
#include "packed_head.h"
#include "tile_runner.h"

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

// Read-only state shared by all threads: the weights packed for the vector path.
struct Plan : PackedHead {
  const HeadLogProbArgs* a;

  Plan(const HeadLogProbArgs& args, int panel)
      : PackedHead(args.K, args.W, args.L, /*nodes=*/2 * args.steps + 1, panel, args.w_in, args.b_in,
                   args.time_emb, args.w_hidden, args.b_hidden, args.w_out),
        a(&args) {}
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
  run_tiles<Workspace>(plan, args.N, kTileRows, args.num_threads, isa.fn);
}

}  // namespace densiformer
