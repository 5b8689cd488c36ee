// Launcher API of the CUDA kernels of mgvq.VQGemm (see mgvq_compile/vqgemm.py for the contract).
//
// Plain C++ with no ONNX Runtime types: vq_gemm_cuda.cu (nvcc) implements it, vq_gemm_cuda_ops.cc
// (g++, with the ORT headers) calls it.

#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace mgvq_cuda {

constexpr int kMaxGroups = 64;

enum class DType { kFloat32, kFloat16 };

// Which kernel runs: kAuto picks the fast one whenever the layout allows it; tests force either.
enum class KernelPath { kAuto, kFast, kGeneric };

struct Group {
  int64_t start = 0, stop = 0;  // permuted columns [start, stop)
  int64_t code_bits = 0;        // each vector's code width: b * d for b bits per weight
  int64_t codebook_row = 0;     // first row of the group's codebook in `codebooks`
  int64_t code_byte = 0;        // first byte of the group's codes in `codes`
};

// Every pointer is device memory. Y[r, o] = sum_j X[r, perm[j]] * W_perm[o, j] (+ bias[o]).
struct VQGemmParams {
  int64_t rows = 0;         // activation rows (product of X's leading dimensions)
  int64_t n = 0, m = 0, d = 0;
  int64_t scale_group = 0;  // 0: no scales
  int num_groups = 0;
  Group groups[kMaxGroups];
  int64_t codebook_rows = 0, code_nbytes = 0;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;           // [rows, n] of dtype
  const int32_t* perm = nullptr;     // [n] or null
  const uint16_t* codebooks = nullptr;  // float16 [codebook_rows, d]
  const uint8_t* codes = nullptr;    // [code_nbytes]
  const uint16_t* scales = nullptr;  // float16 [m, n / scale_group] or null
  const void* bias = nullptr;        // [m] of dtype or null
  void* y = nullptr;                 // [rows, m] of dtype
  void* scratch = nullptr;           // scratch_bytes(params) bytes when that is > 0
  int device = 0;                    // the CUDA device all of the above live on
  KernelPath path = KernelPath::kAuto;
};

// Device scratch the launch needs (the permuted activations), 0 without a permutation.
size_t scratch_bytes(const VQGemmParams& p);

// Checks the layout and enqueues the kernels on `stream`; returns "" or an error message.
std::string launch_vq_gemm(const VQGemmParams& p, cudaStream_t stream);

// Which kernel launch_vq_gemm would use for `p` ("fast" or "generic"; "" when `p` is invalid).
const char* chosen_path(const VQGemmParams& p);

}  // namespace mgvq_cuda
