// mgvq.VQGemm on CUDA: Y = X[..., perm] @ W_perm^T (+ bias), W_perm decoded from vector-quantized
// codes on the fly (see mgvq_compile/vqgemm.py for the contract). W is never materialised.
//
// Kernels:
//  - permute_columns: X[..., perm] into scratch, once per call, so that every block of the main
//    kernel reads the activations coalesced instead of gathering them.
//  - vq_gemv_fast (d in {2, 4, 8}, 1..4 bits, scale blocks made of whole vectors): built for batch-1
//    decoding, which is bound by reading the packed codes. A block stages MB activation rows (float32)
//    and the codebooks (float32 or float16; codebooks too big for shared memory stay in global memory)
//    in shared memory, then each warp takes kRowsPerWarp output rows; lanes take consecutive runs of
//    packed bits ("chunks") of those rows, decode each code's codeword and dot it with the activations.
//    Accumulation is float32; a warp-shuffle reduction finishes each output. For M > 1 activation rows
//    MB = 4 rows share each decoded codeword; blocks loop over tiles of MB rows (blockIdx.y strides
//    them), re-decoding the codes from cache. Activations may be float32 or float16 (a runtime flag:
//    only the staging and the stores differ); outputs have the activations' type.
//  - vq_gemm_generic: one warp per (output row, activation row), any layout the contract allows
//    (any d, scale blocks that cut vectors, huge rows); the slow but simple fallback.
// No ONNX Runtime header is included: vq_gemm_cuda_ops.cc is the ORT glue.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "vq_gemm_cuda.h"

namespace mgvq_cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerWarp = 2;  // output rows decoded side by side: shares the activation loads
constexpr int kFastWarps = 8;
constexpr int kGenericWarps = 8;
constexpr int kMaxFastBits = 4;

struct DevGroup {
  const __half* codebook;  // the group's codebook in global memory
  unsigned long long code_bit0;  // first bit of the group's codes in `codes`
  int start;     // first permuted column
  int nvec;      // vectors per output row
  int bits;       // per weight, for the fast kernel (whole there); 0 when the code is a fraction of d bits
  int code_bits;  // each vector's code width
  int cb_smem;   // offset (codebook elements) of its copy in shared memory, -1: read from global memory
};

struct KernelArgs {
  DevGroup groups[kMaxGroups];
  const void* x;  // [rows, n], columns already permuted
  const uint8_t* codes;
  unsigned long long code_nbytes;
  const __half* scales;
  const void* bias;
  void* y;
  int rows, n, m, d, scale_group, num_groups;
  int f16;           // activations, bias and output are float16 (else float32)
  int cb_smem_byte;  // where the staged codebooks start in shared memory
};

// ------------------------------------------------------------------------------------------------
// Small device helpers

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float half_bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

constexpr int gcd_int(int a, int b) { return b == 0 ? a : gcd_int(b, a % b); }

// Packed words a lane reads per chunk for b*d = BD bits per code: a whole number of codes, and at
// least 16 bytes when that divides evenly (BD in {6, 12}: 3 words hold 16 or 8 codes).
template <int BD>
struct ChunkShape {
  static constexpr int kWordsPerUnit = BD / gcd_int(BD, 32);
  static constexpr int kWords = kWordsPerUnit == 1 ? 4 : kWordsPerUnit;
  static constexpr int kCodes = kWords * 32 / BD;
};

// Word `w` of the code stream; bytes past its end read as zero.
__device__ __forceinline__ uint32_t load_word(const uint8_t* codes, unsigned long long nbytes, unsigned long long w) {
  if ((w + 1) * 4 <= nbytes) return __ldg(reinterpret_cast<const uint32_t*>(codes) + w);
  uint32_t v = 0;
  for (int b = 0; b < 4; ++b) {
    const unsigned long long i = w * 4 + b;
    if (i < nbytes) v |= (uint32_t)codes[i] << (8 * b);
  }
  return v;
}

// u[0..W) = the W * 32 bits of the code stream starting at bit `bit` (any alignment).
template <int W>
__device__ __forceinline__ void load_bits(const uint8_t* codes, unsigned long long nbytes, unsigned long long bit,
                                          uint32_t (&u)[W]) {
  const unsigned long long w0 = bit >> 5;
  const unsigned int shift = (unsigned int)(bit & 31);
  uint32_t w[W + 1];
  if ((w0 + W + 1) * 4 <= nbytes) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(codes) + w0;
#pragma unroll
    for (int k = 0; k <= W; ++k) w[k] = __ldg(words + k);
  } else {
#pragma unroll
    for (int k = 0; k <= W; ++k) w[k] = load_word(codes, nbytes, w0 + k);
  }
#pragma unroll
  for (int k = 0; k < W; ++k) u[k] = __funnelshift_r(w[k], w[k + 1], shift);
}

// Code t of a chunk (t is a compile-time constant once the caller's loop is unrolled).
template <int BD, int W>
__device__ __forceinline__ uint32_t extract_code(const uint32_t (&u)[W], int t) {
  const int bit = t * BD;
  const int k = bit >> 5;
  const int offset = bit & 31;
  const uint32_t mask = (1u << BD) - 1u;
  const int next = k + 1 < W ? k + 1 : k;
  const uint32_t v = offset + BD <= 32 ? (u[k] >> offset) : __funnelshift_r(u[k], u[next], offset);
  return v & mask;
}

template <int D>
__device__ __forceinline__ void load_floats(const float* p, float (&v)[D]) {
  if constexpr (D % 4 == 0) {
#pragma unroll
    for (int k = 0; k < D; k += 4) {
      const float4 t = *reinterpret_cast<const float4*>(p + k);
      v[k] = t.x, v[k + 1] = t.y, v[k + 2] = t.z, v[k + 3] = t.w;
    }
  } else if constexpr (D == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    v[0] = t.x, v[1] = t.y;
  } else {
#pragma unroll
    for (int k = 0; k < D; ++k) v[k] = p[k];
  }
}

template <int D>
__device__ __forceinline__ void load_floats(const __half* p, float (&v)[D]) {
  if constexpr (D == 8) {
    const uint4 t = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) v[2 * k] = half_bits(words[k] & 0xffffu), v[2 * k + 1] = half_bits(words[k] >> 16);
  } else if constexpr (D == 4) {
    const uint2 t = *reinterpret_cast<const uint2*>(p);
    v[0] = half_bits(t.x & 0xffffu), v[1] = half_bits(t.x >> 16);
    v[2] = half_bits(t.y & 0xffffu), v[3] = half_bits(t.y >> 16);
  } else if constexpr (D == 2) {
    const uint32_t t = *reinterpret_cast<const uint32_t*>(p);
    v[0] = half_bits(t & 0xffffu), v[1] = half_bits(t >> 16);
  } else {
#pragma unroll
    for (int k = 0; k < D; ++k) v[k] = __half2float(p[k]);
  }
}

// ------------------------------------------------------------------------------------------------
// The fast kernel

// Scale of the current scale block for each of a warp's rows. Columns only grow along a lane's
// work, so a block change is detected by one comparison (next = INT_MAX without scales).
struct ScaleTrack {
  int next;
  float s[kRowsPerWarp];

  __device__ void init(const KernelArgs& a) {
    next = a.scales != nullptr ? -1 : INT_MAX;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = a.scales != nullptr ? 0.f : 1.f;
  }

  template <int MB>
  __device__ __forceinline__ void flush(float (&part)[kRowsPerWarp][MB], float (&acc)[kRowsPerWarp][MB]) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int b = 0; b < MB; ++b) {
        acc[r][b] = fmaf(s[r], part[r][b], acc[r][b]);
        part[r][b] = 0.f;
      }
  }

  __device__ void advance(int col, const int (&row)[kRowsPerWarp], const KernelArgs& a) {
    const int block = col / a.scale_group;
    next = (block + 1) * a.scale_group;
    const int nblocks = a.n / a.scale_group;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = __half2float(a.scales[(long long)row[r] * nblocks + block]);
  }
};

// Dot products of one chunk: `nv` codes per row (u[r]) starting at permuted column col0. CHECK is
// false for chunks that are full and inside the current scale block.
template <bool CHECK, typename CB, int D, int BD, int MB>
__device__ __forceinline__ void chunk_dot(const uint32_t (&u)[kRowsPerWarp][ChunkShape<BD>::kWords], int nv,
                                          int col0, const float* xs, int n, const CB* cb,
                                          const int (&row)[kRowsPerWarp], const KernelArgs& a, ScaleTrack& st,
                                          float (&acc)[kRowsPerWarp][MB]) {
  constexpr int W = ChunkShape<BD>::kWords;
  constexpr int CV = ChunkShape<BD>::kCodes;
  float part[kRowsPerWarp][MB];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int b = 0; b < MB; ++b) part[r][b] = 0.f;
#pragma unroll
  for (int t = 0; t < CV; ++t) {
    const int col = col0 + t * D;
    if (CHECK) {
      if (t >= nv) break;
      if (col >= st.next) {
        st.flush<MB>(part, acc);
        st.advance(col, row, a);
      }
    }
    float xv[MB][D];
#pragma unroll
    for (int b = 0; b < MB; ++b) load_floats<D>(xs + (size_t)b * n + col, xv[b]);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const uint32_t code = extract_code<BD, W>(u[r], t);
      float w[D];
      load_floats<D>(cb + (size_t)code * D, w);
#pragma unroll
      for (int b = 0; b < MB; ++b)
#pragma unroll
        for (int k = 0; k < D; ++k) part[r][b] = fmaf(w[k], xv[b][k], part[r][b]);
    }
  }
  st.flush<MB>(part, acc);
}

template <typename CB>
__device__ __forceinline__ const CB* group_codebook(const DevGroup& g, const CB* staged) {
  if (g.cb_smem >= 0) return staged + g.cb_smem;
  if constexpr (std::is_same<CB, __half>::value) return g.codebook;
  return nullptr;  // unreachable: float codebooks are always staged (see make_plan)
}

// One group's share of a warp's rows: lanes take chunks j = lane, lane + 32, ...
template <typename CB, int D, int BITS, int MB>
__device__ __forceinline__ void row_group(const DevGroup& g, const KernelArgs& a, const int (&row)[kRowsPerWarp], const float* xs,
                          const CB* staged, int lane, ScaleTrack& st, float (&acc)[kRowsPerWarp][MB]) {
  constexpr int BD = BITS * D;
  constexpr int W = ChunkShape<BD>::kWords;
  constexpr int CV = ChunkShape<BD>::kCodes;
  const CB* cb = group_codebook<CB>(g, staged);
  const int nvec = g.nvec;
  const int nchunks = (nvec + CV - 1) / CV;
  unsigned long long row_bit[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) row_bit[r] = g.code_bit0 + (unsigned long long)row[r] * nvec * BD;
  for (int j = lane; j < nchunks; j += kWarpSize) {
    uint32_t u[kRowsPerWarp][W];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
      load_bits<W>(a.codes, a.code_nbytes, row_bit[r] + (unsigned long long)j * W * 32, u[r]);
    const int v0 = j * CV;
    const int nv = min(CV, nvec - v0);
    const int col0 = g.start + v0 * D;
    if (col0 >= st.next) st.advance(col0, row, a);  // nothing is pending between chunks
    if (nv == CV && col0 + CV * D <= st.next) {
      chunk_dot<false, CB, D, BD, MB>(u, nv, col0, xs, a.n, cb, row, a, st, acc);
    } else {
      chunk_dot<true, CB, D, BD, MB>(u, nv, col0, xs, a.n, cb, row, a, st, acc);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_outputs(const KernelArgs& a, const float (&v)[kRowsPerWarp], int o0, int r) {
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y) + (size_t)r * a.m;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int o = o0 + k;
    if (o < a.m) y[o] = from_float<T>(v[k] + (bias != nullptr ? to_float(bias[o]) : 0.f));
  }
}

template <typename CB, int D, int MB>
__device__ __forceinline__ void warp_rows(const KernelArgs& a, const float* xs, const CB* staged, int o0, int r0, int lane) {
  int row[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) row[r] = min(o0 + r, a.m - 1);  // rows past m: computed, not written
  float acc[kRowsPerWarp][MB];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int b = 0; b < MB; ++b) acc[r][b] = 0.f;
  ScaleTrack st;
  st.init(a);
  for (int gi = 0; gi < a.num_groups; ++gi) {
    const DevGroup& g = a.groups[gi];
    switch (g.bits) {
      case 1:
        row_group<CB, D, 1, MB>(g, a, row, xs, staged, lane, st, acc);
        break;
      case 2:
        if constexpr (2 * D <= 16) row_group<CB, D, 2, MB>(g, a, row, xs, staged, lane, st, acc);
        break;
      case 3:
        if constexpr (3 * D <= 16) row_group<CB, D, 3, MB>(g, a, row, xs, staged, lane, st, acc);
        break;
      case 4:
        if constexpr (4 * D <= 16) row_group<CB, D, 4, MB>(g, a, row, xs, staged, lane, st, acc);
        break;
      default:
        break;  // excluded by make_plan
    }
  }
#pragma unroll
  for (int b = 0; b < MB; ++b) {
    float v[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) v[r] = warp_sum(acc[r][b]);
    if (lane != 0 || r0 + b >= a.rows) continue;
    if (a.f16) {
      store_outputs<__half>(a, v, o0, r0 + b);
    } else {
      store_outputs<float>(a, v, o0, r0 + b);
    }
  }
}

// xs[b * n + j] = float(X[r0 + b, j]) for b < MB (zero for rows past the end).
template <typename T, int MB>
__device__ __forceinline__ void stage_rows(const KernelArgs& a, float* xs, int r0) {
  for (int b = 0; b < MB; ++b) {
    const bool present = r0 + b < a.rows;
    const T* xr = static_cast<const T*>(a.x) + (size_t)(r0 + b) * a.n;
    for (int j = threadIdx.x; j < a.n; j += blockDim.x) xs[(size_t)b * a.n + j] = present ? to_float(xr[j]) : 0.f;
  }
}

// Register caps: at least 3 (MB = 1) or 2 resident blocks per SM keep enough loads in flight.
template <typename CB, int D, int MB>
__global__ void __launch_bounds__(kFastWarps * kWarpSize, MB == 1 ? 3 : 2)
    vq_gemv_fast(const __grid_constant__ KernelArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* xs = reinterpret_cast<float*>(smem);  // [MB][n] activation rows, float32
  CB* staged = reinterpret_cast<CB*>(smem + a.cb_smem_byte);
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int rows_per_tile = (nthreads / kWarpSize) * kRowsPerWarp;
  const int ntiles = (a.m + rows_per_tile - 1) / rows_per_tile;

  for (int gi = 0; gi < a.num_groups; ++gi) {
    const DevGroup& g = a.groups[gi];
    if (g.cb_smem < 0) continue;
    const int count = (1 << g.code_bits) * a.d;
    for (int i = tid; i < count; i += nthreads) {
      if constexpr (std::is_same<CB, float>::value) {
        staged[g.cb_smem + i] = __half2float(g.codebook[i]);
      } else {
        staged[g.cb_smem + i] = g.codebook[i];
      }
    }
  }

  for (int r0 = blockIdx.y * MB; r0 < a.rows; r0 += gridDim.y * MB) {
    __syncthreads();  // the previous tile is done with xs
    if (a.f16) {
      stage_rows<__half, MB>(a, xs, r0);
    } else {
      stage_rows<float, MB>(a, xs, r0);
    }
    __syncthreads();
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
      const int o0 = tile * rows_per_tile + warp * kRowsPerWarp;
      if (o0 < a.m) warp_rows<CB, D, MB>(a, xs, staged, o0, r0, lane);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The generic kernel and the permutation

// `bits` (<= 16) bits of the code stream from bit `bit`.
__device__ __forceinline__ uint32_t read_bits(const uint8_t* codes, unsigned long long nbytes, unsigned long long bit,
                                              int bits) {
  const unsigned long long byte = bit >> 3;
  uint32_t v = 0;
  for (int k = 0; k < 3; ++k)
    if (byte + k < nbytes) v |= (uint32_t)codes[byte + k] << (8 * k);
  return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

template <typename T>
__global__ void __launch_bounds__(kGenericWarps * kWarpSize)
    vq_gemm_generic(const __grid_constant__ KernelArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const long long o = (long long)blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (o >= a.m) return;
  const T* bias = static_cast<const T*>(a.bias);
  const int nblocks = a.scale_group > 0 ? a.n / a.scale_group : 0;
  for (int r = blockIdx.y; r < a.rows; r += gridDim.y) {
    const T* x = static_cast<const T*>(a.x) + (size_t)r * a.n;
    float acc = 0.f;
    for (int gi = 0; gi < a.num_groups; ++gi) {
      const DevGroup& g = a.groups[gi];
      const int bd = g.code_bits;
      const int width = g.nvec * a.d;
      for (int j = lane; j < width; j += kWarpSize) {
        const int v = j / a.d;
        const int t = j - v * a.d;
        const uint32_t code = read_bits(a.codes, a.code_nbytes, g.code_bit0 + ((unsigned long long)o * g.nvec + v) * bd, bd);
        float w = __half2float(g.codebook[(size_t)code * a.d + t]);
        const int col = g.start + j;
        if (a.scales != nullptr) w *= __half2float(a.scales[o * nblocks + col / a.scale_group]);
        acc = fmaf(w, to_float(x[col]), acc);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      const float add = bias != nullptr ? to_float(bias[o]) : 0.f;
      static_cast<T*>(a.y)[(size_t)r * a.m + o] = from_float<T>(acc + add);
    }
  }
}

// xp[r, j] = x[r, perm[j]]; an out-of-range perm entry gives NaN rather than a stray read.
template <typename T>
__global__ void permute_columns(const T* x, const int32_t* perm, T* xp, long long rows, int n) {
  const long long total = rows * n;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / n;
    const int j = (int)(i - r * n);
    const int p = perm[j];
    xp[i] = (p >= 0 && p < n) ? x[r * n + p] : from_float<T>(__int_as_float(0x7fc00000));
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: checks, planning, dispatch

std::string str(long long v) { return std::to_string(v); }

std::string check_params(const VQGemmParams& p) {
  if (p.n <= 0 || p.m <= 0 || p.d <= 0 || p.rows < 0) return "in_features, out_features and vector_dim must be > 0";
  if (p.n > INT_MAX / 2 || p.m > INT_MAX / 2 || p.rows > INT_MAX) return "the CUDA kernel handles dimensions below 2^30";
  if (p.num_groups < 1 || p.num_groups > kMaxGroups) return "the CUDA kernel handles 1.." + str(kMaxGroups) + " groups";
  if (p.scale_group < 0 || (p.scale_group > 0 && p.n % p.scale_group)) return "scale_group_size must divide in_features";
  if ((p.scales != nullptr) != (p.scale_group > 0)) return "scales and scale_group_size must be given together";
  if (p.x == nullptr || p.codebooks == nullptr || p.codes == nullptr || p.y == nullptr) return "missing input or output";
  long long column = 0, row = 0, byte = 0;
  for (int g = 0; g < p.num_groups; ++g) {
    const Group& G = p.groups[g];
    if (G.start != column || G.stop <= G.start || (G.stop - G.start) % p.d)
      return "group " + str(g) + " does not continue the tiling of in_features by multiples of vector_dim";
    if (G.code_bits < 1 || G.code_bits > 16) return "group " + str(g) + ": code bits (bits * vector_dim) must be in 1..16";
    if (G.codebook_row != row || G.code_byte != byte) return "group " + str(g) + ": inconsistent offsets";
    row += 1LL << G.code_bits;
    byte += (p.m * ((G.stop - G.start) / p.d) * G.code_bits + 7) / 8;
    column = G.stop;
  }
  if (column != p.n) return "groups do not end at in_features";
  if (row != p.codebook_rows || byte != p.code_nbytes) return "codebooks or codes do not match the group layout";
  return "";
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  return cudaDeviceGetAttribute(&value, attribute, device) == cudaSuccess ? value : 0;
}

size_t align16(size_t v) { return (v + 15) / 16 * 16; }

struct Plan {
  bool fast = false;
  bool cb_float = false;
  int mb = 1;
  int cb_smem[kMaxGroups];
  size_t smem = 0, cb_smem_byte = 0;
  dim3 grid, block;
};

// Shared memory for the fast kernel: the activation rows plus as many codebooks as fit (float32
// when they are small, else float16; the others are read from global memory through the cache).
void plan_shared_memory(const VQGemmParams& p, int optin, Plan& plan) {
  const size_t kFloatCodebooks = 16 << 10;  // float32 codebooks stay small: they cost every block a copy
  const size_t kHalfCodebooks = 64 << 10;
  size_t book32 = 0;
  for (int g = 0; g < p.num_groups; ++g) book32 += ((size_t)1 << p.groups[g].code_bits) * p.d * 4;
  plan.cb_smem_byte = align16((size_t)plan.mb * p.n * 4);
  plan.cb_float = book32 <= kFloatCodebooks && plan.cb_smem_byte + book32 <= (size_t)optin;
  size_t used = 0;  // elements
  const size_t element = plan.cb_float ? 4 : 2;
  for (int g = 0; g < p.num_groups; ++g) {
    const size_t count = ((size_t)1 << p.groups[g].code_bits) * p.d;
    const size_t bytes = (used + count) * element;
    if (plan.cb_float || (bytes <= kHalfCodebooks && plan.cb_smem_byte + bytes <= (size_t)optin)) {
      plan.cb_smem[g] = (int)used;
      used += count;
    } else {
      plan.cb_smem[g] = -1;
    }
  }
  plan.smem = plan.cb_smem_byte + align16(used * element);
}

Plan make_plan(const VQGemmParams& p) {
  Plan plan;
  bool fast = p.path != KernelPath::kGeneric && (p.d == 2 || p.d == 4 || p.d == 8) &&
              (p.scale_group == 0 || p.scale_group % p.d == 0) && reinterpret_cast<uintptr_t>(p.codes) % 4 == 0;
  for (int g = 0; g < p.num_groups; ++g)
    fast = fast && p.groups[g].code_bits % p.d == 0 && p.groups[g].code_bits / p.d <= kMaxFastBits;
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device);
  const int per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, p.device);
  const int sms = std::max(1, device_attribute(cudaDevAttrMultiProcessorCount, p.device));
  const int threads_per_sm = std::max(kFastWarps * kWarpSize,
                                      device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor, p.device));
  if (fast) {
    plan.mb = p.rows > 1 ? 4 : 1;
    if (plan.mb > 1 && align16((size_t)plan.mb * p.n * 4) + (16 << 10) > (size_t)optin) plan.mb = 1;
    fast = align16((size_t)p.n * 4) + 1024 <= (size_t)optin;
  }
  if (fast) {
    plan_shared_memory(p, optin, plan);
    fast = plan.smem <= (size_t)optin;
  }
  plan.fast = fast;
  if (fast) {
    const int blocks_per_sm = std::max(1, std::min(threads_per_sm / (kFastWarps * kWarpSize),
                                                   per_sm / (int)(plan.smem + 1024)));
    const long long ntiles = (p.m + kFastWarps * kRowsPerWarp - 1) / (kFastWarps * kRowsPerWarp);
    const long long act_tiles = (p.rows + plan.mb - 1) / plan.mb;
    const long long grid_y = std::min<long long>(std::max<long long>(act_tiles, 1), 65535);
    const long long slots = (long long)sms * blocks_per_sm;
    const long long grid_x = std::max<long long>(1, std::min<long long>(ntiles, (slots + grid_y - 1) / grid_y));
    plan.grid = dim3((unsigned)grid_x, (unsigned)grid_y);
    plan.block = dim3(kFastWarps * kWarpSize);
  } else {
    plan.grid = dim3((unsigned)((p.m + kGenericWarps - 1) / kGenericWarps),
                     (unsigned)std::min<long long>(std::max<long long>(p.rows, 1), 65535));
    plan.block = dim3(kGenericWarps * kWarpSize);
  }
  return plan;
}

KernelArgs make_args(const VQGemmParams& p, const Plan& plan, const void* x) {
  KernelArgs a{};
  for (int g = 0; g < p.num_groups; ++g) {
    const Group& G = p.groups[g];
    DevGroup& dg = a.groups[g];
    dg.codebook = reinterpret_cast<const __half*>(p.codebooks) + G.codebook_row * p.d;
    dg.code_bit0 = (unsigned long long)G.code_byte * 8;
    dg.start = (int)G.start;
    dg.nvec = (int)((G.stop - G.start) / p.d);
    dg.code_bits = (int)G.code_bits;
    dg.bits = G.code_bits % p.d == 0 ? (int)(G.code_bits / p.d) : 0;
    dg.cb_smem = plan.fast ? plan.cb_smem[g] : -1;
  }
  a.x = x;
  a.codes = p.codes;
  a.code_nbytes = (unsigned long long)p.code_nbytes;
  a.scales = reinterpret_cast<const __half*>(p.scales);
  a.bias = p.bias;
  a.y = p.y;
  a.rows = (int)p.rows;
  a.n = (int)p.n;
  a.m = (int)p.m;
  a.d = (int)p.d;
  a.scale_group = (int)p.scale_group;
  a.num_groups = p.num_groups;
  a.f16 = p.dtype == DType::kFloat16;
  a.cb_smem_byte = (int)plan.cb_smem_byte;
  return a;
}

template <typename CB, int D, int MB>
cudaError_t launch_fast_kernel(const KernelArgs& a, const Plan& plan, cudaStream_t stream) {
  auto kernel = vq_gemv_fast<CB, D, MB>;
  if (plan.smem > (48 << 10)) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<plan.grid, plan.block, plan.smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename CB, int D>
cudaError_t launch_fast_mb(const KernelArgs& a, const Plan& plan, cudaStream_t stream) {
  return plan.mb == 1 ? launch_fast_kernel<CB, D, 1>(a, plan, stream) : launch_fast_kernel<CB, D, 4>(a, plan, stream);
}

template <typename CB>
cudaError_t launch_fast_d(const KernelArgs& a, const Plan& plan, cudaStream_t stream) {
  switch (a.d) {
    case 2: return launch_fast_mb<CB, 2>(a, plan, stream);
    case 4: return launch_fast_mb<CB, 4>(a, plan, stream);
    default: return launch_fast_mb<CB, 8>(a, plan, stream);
  }
}

template <typename T>
cudaError_t launch_typed(const VQGemmParams& p, const Plan& plan, cudaStream_t stream) {
  const void* x = p.x;
  if (p.perm != nullptr) {
    const long long total = p.rows * p.n;
    const int threads = 256;
    const long long blocks = std::min<long long>((total + threads - 1) / threads, 65535);
    permute_columns<T><<<(unsigned)blocks, threads, 0, stream>>>(static_cast<const T*>(p.x), p.perm,
                                                                  static_cast<T*>(p.scratch), p.rows, (int)p.n);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    x = p.scratch;
  }
  const KernelArgs a = make_args(p, plan, x);
  if (!plan.fast) {
    vq_gemm_generic<T><<<plan.grid, plan.block, 0, stream>>>(a);
    return cudaGetLastError();
  }
  return plan.cb_float ? launch_fast_d<float>(a, plan, stream) : launch_fast_d<__half>(a, plan, stream);
}

std::string cuda_error(const char* what, cudaError_t e) {
  std::string message = std::string(what) + ": " + cudaGetErrorString(e);
  if (e == cudaErrorInsufficientDriver)
    message += " (the library was built with CUDA " + str(CUDART_VERSION / 1000) + "." + str(CUDART_VERSION % 1000 / 10) +
               "; rebuild it with the nvcc of an older CUDA: python custom_ops/build.py --cuda --nvcc PATH)";
  return message;
}

}  // namespace

size_t scratch_bytes(const VQGemmParams& p) {
  if (p.perm == nullptr || p.rows <= 0) return 0;
  return (size_t)p.rows * p.n * (p.dtype == DType::kFloat16 ? 2 : 4);
}

const char* chosen_path(const VQGemmParams& p) {
  if (!check_params(p).empty()) return "";
  return make_plan(p).fast ? "fast" : "generic";
}

std::string launch_vq_gemm(const VQGemmParams& p, cudaStream_t stream) {
  const std::string problem = check_params(p);
  if (!problem.empty()) return problem;
  if (p.rows == 0) return "";
  if (p.perm != nullptr && p.scratch == nullptr) return "no scratch buffer for the permuted activations";
  int current = -1;
  cudaError_t e = cudaGetDevice(&current);
  if (e == cudaSuccess && current != p.device) e = cudaSetDevice(p.device);
  if (e != cudaSuccess) return cuda_error("selecting the CUDA device", e);
  const Plan plan = make_plan(p);
  e = p.dtype == DType::kFloat16 ? launch_typed<__half>(p, plan, stream) : launch_typed<float>(p, plan, stream);
  return e == cudaSuccess ? "" : cuda_error("launching the VQGemm kernels", e);
}

}  // namespace mgvq_cuda
