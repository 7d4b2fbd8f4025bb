// Helpers shared by the CUDA kernels: error checks, the device guard, cp.async.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace densiformer::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Makes the stream's device current for the launches in scope, and restores the
// previous one. This module has its own (static) CUDA runtime, so it does not assume
// torch's notion of the current device reached it.
class StreamDevice {
 public:
  explicit StreamDevice(cudaStream_t stream) {
    int device = -1;
    if (stream == nullptr || cudaStreamGetDevice(stream, &device) != cudaSuccess) {
      cudaGetLastError();  // the legacy stream has no device of its own: keep the current one
      return;
    }
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ == device) {
      previous_ = -1;
    } else {
      check(cudaSetDevice(device), "cudaSetDevice");
    }
  }
  ~StreamDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  StreamDevice(const StreamDevice&) = delete;
  StreamDevice& operator=(const StreamDevice&) = delete;

 private:
  int previous_ = -1;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace densiformer::cuda
