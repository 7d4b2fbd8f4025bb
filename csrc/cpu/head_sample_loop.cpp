// Fused denoising loop of the diffusion head on the CPU.
//
// The (row, sample) pairs are cut into tiles of kTileRows sample rows; OpenMP threads
// take whole tiles. A tile runs every step and every layer before the next tile
// starts, so its activations (two kTileRows x W buffers) stay in L2 and only the
// weights stream from L3. The hidden layers are a register-blocked GEMM: a kMR x P
// micro-tile of outputs lives in vector registers while the reduction runs over the
// full width, with the weights packed in P-column panels so each step of the
// reduction reads P contiguous floats. The bias, SiLU and residual add are applied
// to the accumulators before they are stored.
//
// The vector code (head_sample_loop_tile.inc) is written once with GCC vector
// extensions and compiled three times, each in its own namespace under
// `#pragma GCC target`: AVX-512 (16 lanes), AVX2+FMA (8) and a generic 4-lane path.
// The path is picked at run time with __builtin_cpu_supports, so the module runs on
// any x86-64-v2 CPU. DENSIFORMER_CPU_ISA=avx512|avx2|generic forces one (tests use it).
// (Clang ignores `#pragma GCC target`: it builds all three for the baseline, correct
// but slower. The supported compiler is GCC.)
#include "head_sample_loop.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "packed_head.h"
#include "tile_runner.h"
#include "philox.h"

#if defined(__x86_64__) || defined(__i386__)
#define DENSIFORMER_X86 1
#endif

namespace densiformer {
namespace {

// Sample rows per tile, a multiple of kMR. Each tile streams all hidden weights (4 MiB at
// 5 x 512) from L3 once per step, so larger tiles need less cache bandwidth; 96 keeps
// the tile's three W-wide buffers (576 KiB at W = 512) well inside a 2 MiB L2.
constexpr int kTileRows = 96;
constexpr int kMR = 6;         // rows of the register micro-tile

// Read-only state shared by all threads: the weights packed for the vector path.
struct Plan : PackedHead {
  const HeadSampleLoopArgs* a;

  Plan(const HeadSampleLoopArgs& args, int panel)
      : PackedHead(args.K, args.W, args.L, /*nodes=*/args.steps, panel, args.w_in, args.b_in, args.time_emb,
                   args.w_hidden, args.b_hidden, args.w_out),
        a(&args) {}
};

// One thread's tile state.
struct Workspace {
  FloatBuffer h, tmp;       // (kTileRows, Wp) activations, ping-pong between layers
  FloatBuffer cond;         // (kTileRows, Wp) each sample row's conditioning, zero-padded
  FloatBuffer x, x0, v;     // (kTileRows, K): sampler state, previous x0_hat, MLP output
  std::vector<float> noise;  // (K)

  explicit Workspace(const Plan& plan)
      : h(zeros(size_t(kTileRows) * plan.Wp)),
        tmp(zeros(size_t(kTileRows) * plan.Wp)),
        cond(zeros(size_t(kTileRows) * plan.Wp)),
        x(zeros(size_t(kTileRows) * plan.a->K)),
        x0(zeros(size_t(kTileRows) * plan.a->K)),
        v(zeros(size_t(kTileRows) * plan.a->K)),
        noise(plan.a->K) {}
};

using TileFn = void (*)(const Plan&, Workspace&, int64_t, int);

#ifdef DENSIFORMER_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
constexpr int V = 16, NR = 4;  // 6 x 64 micro-tile: 24 of the 32 zmm registers accumulate
#include "head_sample_loop_tile.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int V = 8, NR = 2;  // 6 x 16 micro-tile: 12 of the 16 ymm registers accumulate
#include "head_sample_loop_tile.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace generic {
constexpr int V = 4, NR = 2;  // SSE registers, or NEON on non-x86 CPUs
#include "head_sample_loop_tile.inc"
}  // namespace generic

struct Isa {
  const char* name;
  int panel;  // P = lanes x NR
  TileFn fn;
};

bool cpu_has(const std::string& name) {
#ifdef DENSIFORMER_X86
  if (name == "avx512") return __builtin_cpu_supports("avx512f");
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return name == "generic";
}

Isa select_isa() {
  const char* forced = std::getenv("DENSIFORMER_CPU_ISA");
  std::string name = forced != nullptr && *forced ? forced : "";
  if (!name.empty()) {
    if (name != "avx512" && name != "avx2" && name != "generic")
      throw std::invalid_argument("DENSIFORMER_CPU_ISA must be avx512, avx2 or generic; got " + name);
    if (!cpu_has(name)) throw std::runtime_error("DENSIFORMER_CPU_ISA=" + name + " but this CPU lacks it");
  } else {
    name = cpu_has("avx512") ? "avx512" : cpu_has("avx2") ? "avx2" : "generic";
  }
#ifdef DENSIFORMER_X86
  if (name == "avx512") return {"avx512", avx512::P, avx512::run_tile};
  if (name == "avx2") return {"avx2", avx2::P, avx2::run_tile};
#endif
  return {"generic", generic::P, generic::run_tile};
}

}  // namespace

const char* head_sample_loop_isa() { return select_isa().name; }

void head_sample_loop_cpu(const HeadSampleLoopArgs& args) {
  const Isa isa = select_isa();
  const Plan plan(args, isa.panel);
  run_tiles<Workspace>(plan, args.N * args.S, kTileRows, args.num_threads, isa.fn);
}

}  // namespace densiformer
