// densiformer._C: the C++ CPU kernels. Functions take raw data pointers (Python ints,
// e.g. tensor.data_ptr()) and sizes, so the module does not link against libtorch;
// the Python wrappers in python/densiformer/ops/ validate the tensors first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "cpu/head_log_prob.h"
#include "cpu/head_sample_loop.h"
#include "cpu/philox.h"

namespace py = pybind11;
using densiformer::HeadLogProbArgs;
using densiformer::HeadSampleLoopArgs;

namespace {

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void head_sample_loop(std::uintptr_t cond, std::uintptr_t request, std::uintptr_t w_in, std::uintptr_t b_in,
                      std::uintptr_t w_hidden, std::uintptr_t b_hidden, std::uintptr_t w_out, std::uintptr_t b_out,
                      std::uintptr_t time_emb, std::uintptr_t coefs, std::uintptr_t out, int64_t N, int64_t S, int K,
                      int W, int L, int steps, uint64_t seed, int64_t row_offset, int num_threads) {
  if (N < 0 || S < 1 || K < 1 || W < 1 || L < 1 || steps < 1 || row_offset < 0 || num_threads < 1)
    throw std::invalid_argument("head_sample_loop: bad sizes");
  HeadSampleLoopArgs args{ptr<const float>(cond),     ptr<const float>(request), ptr<const float>(w_in),
                          ptr<const float>(b_in),     ptr<const float>(w_hidden), ptr<const float>(b_hidden),
                          ptr<const float>(w_out),    ptr<const float>(b_out),    ptr<const float>(time_emb),
                          ptr<const float>(coefs),    ptr<float>(out),            N,
                          S,                          K,                          W,
                          L,                          steps,                      seed,
                          row_offset,                 num_threads};
  densiformer::head_sample_loop_cpu(args);
}

void head_log_prob(std::uintptr_t cond, std::uintptr_t request, std::uintptr_t w_in, std::uintptr_t b_in,
                   std::uintptr_t w_hidden, std::uintptr_t b_hidden, std::uintptr_t w_out, std::uintptr_t b_out,
                   std::uintptr_t time_emb, std::uintptr_t scale, std::uintptr_t h, std::uintptr_t x0,
                   std::uintptr_t out, int64_t N, int K, int W, int L, int steps, int num_threads) {
  if (N < 0 || K < 1 || W < 1 || L < 1 || steps < 1 || num_threads < 1)
    throw std::invalid_argument("head_log_prob: bad sizes");
  HeadLogProbArgs args{ptr<const float>(cond),  ptr<const float>(request),  ptr<const float>(w_in),
                       ptr<const float>(b_in),  ptr<const float>(w_hidden), ptr<const float>(b_hidden),
                       ptr<const float>(w_out), ptr<const float>(b_out),    ptr<const float>(time_emb),
                       ptr<const float>(scale), ptr<const float>(h),        ptr<const float>(x0),
                       ptr<float>(out),         N,                          K,
                       W,                       L,                          steps,
                       num_threads};
  densiformer::head_log_prob_cpu(args);
}

std::array<uint32_t, 4> philox(std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
  densiformer::philox4x32_10(ctr.data(), key[0], key[1]);
  return ctr;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "densiformer C++ CPU kernels (raw pointers and sizes; see densiformer.ops)";
  m.def("head_sample_loop", &head_sample_loop, py::call_guard<py::gil_scoped_release>(),
        "Fused denoising loop of the diffusion head; fp32 pointers, see csrc/cpu/head_sample_loop.h");
  m.def("head_sample_loop_isa", &densiformer::head_sample_loop_isa,
        "The vector path head_sample_loop runs on this CPU: avx512, avx2 or generic");
  m.def("head_log_prob", &head_log_prob, py::call_guard<py::gil_scoped_release>(),
        "Fused probability-flow log densities of the diffusion head; fp32 pointers, see csrc/cpu/head_log_prob.h");
  m.def("philox4x32_10", &philox, py::arg("counter"), py::arg("key"),
        "Philox4x32-10 of one counter under one key, as the kernels draw it (for tests)");
}
