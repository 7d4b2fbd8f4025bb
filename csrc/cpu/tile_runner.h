// The OpenMP tile loop both fused head kernels use: rows are cut into tiles of
// tile_rows, threads take whole tiles, and each thread owns one workspace.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace densiformer {

// Calls fn(plan, workspace, first_row, rows_in_tile) for every tile of `rows`.
template <class Workspace, class Plan, class TileFn>
void run_tiles(const Plan& plan, int64_t rows, int tile_rows, int64_t num_threads, TileFn fn) {
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, tiles)));
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
    const int64_t first = tile * tile_rows;
    fn(plan, ws, first, int(std::min<int64_t>(tile_rows, rows - first)));
  }
}

}  // namespace densiformer
