// densiformer._C_cuda: the CUDA C++ kernels. Functions take raw device pointers (Python
// ints, e.g. tensor.data_ptr()), sizes and the CUDA stream as an int
// (torch.cuda.current_stream().cuda_stream), so the module does not link against
// libtorch; the Python wrappers in python/densiformer/ops/ validate the tensors first.
// The CUDA runtime is linked statically: the module imports on a machine without a GPU
// or driver, and runtime_status() then says why nothing can run.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "cuda/kernels.h"

namespace py = pybind11;
namespace dc = densiformer::cuda;

namespace {

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void head_sample_loop(std::uintptr_t cond, std::uintptr_t request, std::uintptr_t w_in, std::uintptr_t b_in,
                      std::uintptr_t w_hidden, std::uintptr_t b_hidden, std::uintptr_t w_out, std::uintptr_t b_out,
                      std::uintptr_t time_emb, std::uintptr_t coefs, std::uintptr_t out, int64_t N, int64_t S, int K,
                      int W, int L, int steps, uint64_t seed, int64_t row_offset, int precision,
                      std::uintptr_t stream) {
  if (precision != 0 && precision != 1) throw std::invalid_argument("precision must be 0 (fp32) or 1 (bf16)");
  dc::head_sample_loop({ptr<const float>(cond), ptr<const float>(request), ptr<const float>(w_in),
                        ptr<const float>(b_in), ptr<const float>(w_hidden), ptr<const float>(b_hidden),
                        ptr<const float>(w_out), ptr<const float>(b_out), ptr<const float>(time_emb),
                        ptr<const float>(coefs), ptr<float>(out), N, S, K, W, L, steps, seed, row_offset,
                        static_cast<dc::Precision>(precision), stream});
}

void masked_attention_fwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t mask,
                          std::uintptr_t out, std::uintptr_t lse, int64_t B, int H, int L, int D, float scale,
                          int dtype_code, std::uintptr_t stream) {
  if (dtype_code < 0 || dtype_code > 2) throw std::invalid_argument("dtype_code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  dc::masked_attention_fwd({ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<const uint8_t>(mask),
                            ptr<void>(out), ptr<float>(lse), B, H, L, D, scale, static_cast<dc::DType>(dtype_code),
                            stream});
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "densiformer CUDA C++ kernels (raw device pointers, sizes and a stream; see densiformer.ops)";
  m.def("head_sample_loop", &head_sample_loop, py::call_guard<py::gil_scoped_release>(),
        "Fused denoising loop of the diffusion head on the GPU. The arguments of densiformer._C.head_sample_loop, "
        "with num_threads replaced by precision (0 = fp32 FMA, 1 = bf16 tensor cores) and stream; all pointers "
        "are fp32 device memory. Asynchronous on the stream.");
  m.def("masked_attention_fwd", &masked_attention_fwd, py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"),
        py::arg("mask_ptr"), py::arg("out_ptr"), py::arg("lse_ptr"), py::arg("B"), py::arg("H"), py::arg("L"),
        py::arg("D"), py::arg("scale"), py::arg("dtype_code"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Forward masked attention: contiguous (B, H, L, D) q, k, v, out in dtype_code (0 fp32, 1 bf16, 2 fp16), "
        "16-byte aligned, D in {8, 16, 32, 64, 128}; mask (B, L) bool bytes, True = padding; lse (B, H, L) fp32 "
        "written unless lse_ptr is 0 (-inf where every key is padding, and the output row is zeros). "
        "Asynchronous on the stream.");
  m.def("runtime_status", &dc::runtime_status,
        "'' when this module's CUDA runtime sees a GPU, else the reason it does not");
}
