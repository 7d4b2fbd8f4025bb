// 64-byte aligned, zero-filled float buffers for the CPU kernels' packed weights and tiles.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

namespace densiformer {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;

// 64-byte aligned, so every padded row is vector aligned.
inline FloatBuffer zeros(size_t n) {
  const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
  auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return FloatBuffer(p);
}

}  // namespace densiformer
