// mgvq.VQGemm for ONNX Runtime's CPU execution provider.
//
// Y = X[..., perm] @ W_perm^T (+ bias), W_perm decoded from vector-quantized codes (see
// mgvq_compile/vqgemm.py for the contract). W is never materialised: either
//  - LUT path: per activation row, table[j][k] = <x_perm[j*d : j*d+d], codeword_k> for every
//    vector position j, then y[o] = sum_j scale * table[j][code[o, j]] (AQLM/T-MAC style), or
//  - decode path: a few rows of W_perm at a time are decoded into a small buffer and dotted with
//    every activation row (for large codebooks where tables would not pay off).
// Hot loops exist in a portable version and an AVX2+FMA version chosen at load time.
// The library uses only the OrtApi pointer handed to RegisterCustomOps (no link to onnxruntime).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const char* kDomain = "mgvq";
const char* kOpName = "VQGemm";

// ------------------------------------------------------------------------------------------------
// float16 <-> float32 (portable; F16C is not assumed)

float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      mant &= 0x3ffu;
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
  if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // overflow to inf
  if (abs < 0x38800000u) {                                       // subnormal or zero
    if (abs < 0x33000000u) return (uint16_t)sign;
    uint32_t e = abs >> 23;
    uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e)
    uint32_t half_m = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_m & 1))) ++half_m;
    return (uint16_t)(sign | half_m);
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return (uint16_t)(sign | h);
}

// ------------------------------------------------------------------------------------------------
// Hot loops, portable versions

// out[k] = sum_t x[t] * cbT[t * K + k] for k < K (cbT: the group's codebook transposed, d x K).
void build_table_portable(const float* x, const float* cbT, int K, int d, float* out) {
  for (int k = 0; k < K; ++k) out[k] = 0.f;
  for (int t = 0; t < d; ++t) {
    const float xt = x[t];
    const float* row = cbT + (size_t)t * K;
    for (int k = 0; k < K; ++k) out[k] += xt * row[k];
  }
}

// sum_j table[j * K + codes[j]] for j < count.
float lookup_portable(const float* table, const uint16_t* codes, int count, int K) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int j = 0;
  for (; j + 4 <= count; j += 4) {
    a0 += table[(size_t)j * K + codes[j]];
    a1 += table[(size_t)(j + 1) * K + codes[j + 1]];
    a2 += table[(size_t)(j + 2) * K + codes[j + 2]];
    a3 += table[(size_t)(j + 3) * K + codes[j + 3]];
  }
  for (; j < count; ++j) a0 += table[(size_t)j * K + codes[j]];
  return (a0 + a1) + (a2 + a3);
}

// sum_j table[j * 256 + codes[j]] for byte codes (b * d = 8, the common 2-bit d=4 case).
float lookup_u8_portable(const float* table, const uint8_t* codes, int count) {
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int j = 0;
  for (; j + 8 <= count; j += 8, table += 8 * 256) {
    uint64_t c;
    std::memcpy(&c, codes + j, 8);
    a[0] += table[0 * 256 + (c & 0xff)];
    a[1] += table[1 * 256 + ((c >> 8) & 0xff)];
    a[2] += table[2 * 256 + ((c >> 16) & 0xff)];
    a[3] += table[3 * 256 + ((c >> 24) & 0xff)];
    a[4] += table[4 * 256 + ((c >> 32) & 0xff)];
    a[5] += table[5 * 256 + ((c >> 40) & 0xff)];
    a[6] += table[6 * 256 + ((c >> 48) & 0xff)];
    a[7] += table[7 * 256 + (c >> 56)];
  }
  for (int t = 0; j < count; ++j, ++t) a[0] += table[t * 256 + codes[j]];
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// out[i] = <w_i, x> for the `rows` rows w_i = w + i * n.
void dot_rows_portable(const float* w, int rows, const float* x, int64_t n, float* out) {
  for (int i = 0; i < rows; ++i) {
    const float* wi = w + (size_t)i * n;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t c = 0;
    for (; c + 4 <= n; c += 4) {
      a0 += wi[c] * x[c];
      a1 += wi[c + 1] * x[c + 1];
      a2 += wi[c + 2] * x[c + 2];
      a3 += wi[c + 3] * x[c + 3];
    }
    for (; c < n; ++c) a0 += wi[c] * x[c];
    out[i] = (a0 + a1) + (a2 + a3);
  }
}

// out[i * ldo + k] = <w_k, x_i> for k < nw, i < nx (rows of w and x are n floats apart).
void gemm_tile_portable(const float* w, int nw, const float* x, int64_t nx, int64_t n, float* out, int64_t ldo) {
  for (int64_t i = 0; i < nx; ++i) dot_rows_portable(w, nw, x + (size_t)i * n, n, out + (size_t)i * ldo);
}

// ------------------------------------------------------------------------------------------------
// Hot loops, AVX2 + FMA versions

#if defined(__x86_64__) || defined(__i386__)
#define MGVQ_HAVE_X86 1

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) void build_table_avx2(const float* x, const float* cbT, int K, int d,
                                                          float* out) {
  if (K < 8) {
    build_table_portable(x, cbT, K, d, out);
    return;
  }
  for (int k = 0; k < K; k += 8) {  // K is a power of two >= 8
    __m256 acc = _mm256_mul_ps(_mm256_set1_ps(x[0]), _mm256_loadu_ps(cbT + k));
    for (int t = 1; t < d; ++t)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(x[t]), _mm256_loadu_ps(cbT + (size_t)t * K + k), acc);
    _mm256_storeu_ps(out + k, acc);
  }
}

__attribute__((target("avx2,fma"))) float lookup_avx2(const float* table, const uint16_t* codes, int count,
                                                      int K) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i step = _mm256_set1_epi32(8 * K);
  __m256i base = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(K));
  int j = 0;
  for (; j + 16 <= count; j += 16) {
    __m256i c0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(codes + j)));
    __m256i c1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(codes + j + 8)));
    __m256i i0 = _mm256_add_epi32(base, c0);
    base = _mm256_add_epi32(base, step);
    __m256i i1 = _mm256_add_epi32(base, c1);
    base = _mm256_add_epi32(base, step);
    acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(table, i0, 4));
    acc1 = _mm256_add_ps(acc1, _mm256_i32gather_ps(table, i1, 4));
  }
  float sum = hsum256(_mm256_add_ps(acc0, acc1));
  for (; j < count; ++j) sum += table[(size_t)j * K + codes[j]];
  return sum;
}

__attribute__((target("avx2,fma"))) float lookup_u8_avx2(const float* table, const uint8_t* codes, int count) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i base = _mm256_setr_epi32(0, 256, 512, 768, 1024, 1280, 1536, 1792);
  int j = 0;
  for (; j + 16 <= count; j += 16, table += 16 * 256) {
    __m256i c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(codes + j)));
    __m256i c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(codes + j + 8)));
    acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(table, _mm256_add_epi32(base, c0), 4));
    acc1 = _mm256_add_ps(acc1, _mm256_i32gather_ps(table + 8 * 256, _mm256_add_epi32(base, c1), 4));
  }
  float sum = hsum256(_mm256_add_ps(acc0, acc1));
  for (int t = 0; j < count; ++j, ++t) sum += table[t * 256 + codes[j]];
  return sum;
}

__attribute__((target("avx2,fma"))) void dot_rows_avx2(const float* w, int rows, const float* x, int64_t n,
                                                       float* out) {
  int i = 0;
  for (; i + 4 <= rows; i += 4) {
    const float* w0 = w + (size_t)i * n;
    const float* w1 = w0 + n;
    const float* w2 = w1 + n;
    const float* w3 = w2 + n;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      __m256 xv = _mm256_loadu_ps(x + c);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + c), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + c), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + c), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + c), xv, a3);
    }
    float s0 = hsum256(a0), s1 = hsum256(a1), s2 = hsum256(a2), s3 = hsum256(a3);
    for (; c < n; ++c) {
      s0 += w0[c] * x[c];
      s1 += w1[c] * x[c];
      s2 += w2[c] * x[c];
      s3 += w3[c] * x[c];
    }
    out[i] = s0;
    out[i + 1] = s1;
    out[i + 2] = s2;
    out[i + 3] = s3;
  }
  for (; i < rows; ++i) {
    const float* wi = w + (size_t)i * n;
    __m256 a = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(wi + c), _mm256_loadu_ps(x + c), a);
    float s = hsum256(a);
    for (; c < n; ++c) s += wi[c] * x[c];
    out[i] = s;
  }
}

// 4 rows of w x 3 rows of x per step: 12 accumulators, 7 loads per 12 multiply-adds.
__attribute__((target("avx2,fma"))) void gemm_tile_avx2(const float* w, int nw, const float* x, int64_t nx,
                                                        int64_t n, float* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + 3 <= nx; i += 3) {
    const float* x0 = x + (size_t)i * n;
    const float* x1 = x0 + n;
    const float* x2 = x1 + n;
    int k = 0;
    for (; k + 4 <= nw && n % 8 == 0; k += 4) {
      const float* w0 = w + (size_t)k * n;
      __m256 acc[4][3];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 3; ++b) acc[a][b] = _mm256_setzero_ps();
      for (int64_t c = 0; c < n; c += 8) {
        __m256 xv0 = _mm256_loadu_ps(x0 + c), xv1 = _mm256_loadu_ps(x1 + c), xv2 = _mm256_loadu_ps(x2 + c);
        for (int a = 0; a < 4; ++a) {
          __m256 wv = _mm256_loadu_ps(w0 + (size_t)a * n + c);
          acc[a][0] = _mm256_fmadd_ps(wv, xv0, acc[a][0]);
          acc[a][1] = _mm256_fmadd_ps(wv, xv1, acc[a][1]);
          acc[a][2] = _mm256_fmadd_ps(wv, xv2, acc[a][2]);
        }
      }
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 3; ++b) out[(size_t)(i + b) * ldo + k + a] = hsum256(acc[a][b]);
    }
    if (k < nw) {
      for (int b = 0; b < 3; ++b)
        dot_rows_avx2(w + (size_t)k * n, nw - k, x + (size_t)(i + b) * n, n, out + (size_t)(i + b) * ldo + k);
    }
  }
  for (; i < nx; ++i) dot_rows_avx2(w, nw, x + (size_t)i * n, n, out + (size_t)i * ldo);
}
#endif

struct HotLoops {
  void (*build_table)(const float*, const float*, int, int, float*);
  float (*lookup)(const float*, const uint16_t*, int, int);
  void (*dot_rows)(const float*, int, const float*, int64_t, float*);
  float (*lookup_u8)(const float*, const uint8_t*, int);
  void (*gemm_tile)(const float*, int, const float*, int64_t, int64_t, float*, int64_t);
  const char* name;
};

HotLoops select_hot_loops() {
  const char* force = std::getenv("MGVQ_VQGEMM_ISA");
  bool portable = force != nullptr && std::string(force) == "portable";
#ifdef MGVQ_HAVE_X86
  __builtin_cpu_init();
  if (!portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {build_table_avx2, lookup_avx2, dot_rows_avx2, lookup_u8_avx2, gemm_tile_avx2, "avx2"};
#endif
  (void)portable;
  return {build_table_portable, lookup_portable, dot_rows_portable, lookup_u8_portable, gemm_tile_portable, "portable"};
}

// ------------------------------------------------------------------------------------------------
// Code unpacking: `count` codes of `bits` bits, LSB-first, starting at bit `bit0` of `data`.

void unpack_codes(const uint8_t* data, uint64_t bit0, int bits, int64_t count, uint16_t* out) {
  if (count <= 0) return;
  if ((bit0 & 7) == 0) {
    const uint8_t* p = data + (bit0 >> 3);
    if (bits == 8) {
      for (int64_t i = 0; i < count; ++i) out[i] = p[i];
      return;
    }
    if (bits == 16) {
      for (int64_t i = 0; i < count; ++i) out[i] = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
      return;
    }
    if (bits == 4) {
      int64_t i = 0;
      for (; i + 2 <= count; i += 2) {
        out[i] = p[i >> 1] & 0xf;
        out[i + 1] = p[i >> 1] >> 4;
      }
      if (i < count) out[i] = p[i >> 1] & 0xf;
      return;
    }
  }
  // General case: a bit buffer refilled one byte at a time, never reading past the last code.
  const uint32_t mask = (1u << bits) - 1u;
  uint64_t byte = bit0 >> 3;
  int shift = (int)(bit0 & 7);
  uint64_t buf = (uint64_t)data[byte++] >> shift;
  int have = 8 - shift;
  for (int64_t i = 0; i < count; ++i) {
    while (have < bits) {
      buf |= (uint64_t)data[byte++] << have;
      have += 8;
    }
    out[i] = (uint16_t)(buf & mask);
    buf >>= bits;
    have -= bits;
  }
}

// dst[v * D ...] = book[codes[v] * D ...] for v < count.
template <int D>
void gather_rows(const float* book, const uint16_t* codes, int64_t count, float* dst) {
  for (int64_t v = 0; v < count; ++v) std::memcpy(dst + v * D, book + (size_t)codes[v] * D, D * sizeof(float));
}

// ------------------------------------------------------------------------------------------------
// The op's layout (attributes), checked once at kernel creation.

struct Group {
  int64_t start, stop, bits, K, nvec;
  int64_t codebook_row;  // first row of this group's codebook in `codebooks`
  int64_t code_byte;     // first byte of this group's codes in `codes`
  int64_t code_nbytes;
  int64_t vec_offset;    // index of the group's first vector among all vector positions
};

// A run of vector positions inside one group and one scale block (scale_col = -1 without scales).
struct Segment {
  int group;
  int64_t vec_begin, count, scale_col;
};

struct Layout {
  int64_t n = 0, m = 0, d = 0, scale_group = 0, nvec = 0, codebook_rows = 0, code_nbytes = 0;
  std::vector<Group> groups;
  std::vector<Segment> segments;  // only when scale_group % d == 0 (or no scales)
  int64_t max_group_nvec = 0;
};

std::string str(int64_t v) { return std::to_string(v); }

Layout make_layout(int64_t n, int64_t m, int64_t d, const std::vector<int64_t>& bounds,
                   const std::vector<int64_t>& bits, int64_t scale_group) {
  Layout L;
  L.n = n;
  L.m = m;
  L.d = d;
  L.scale_group = scale_group;
  if (n <= 0 || m <= 0 || d <= 0) throw std::runtime_error("in_features, out_features and vector_dim must be > 0");
  if (bounds.size() != bits.size() + 1 || bits.empty())
    throw std::runtime_error("group_bounds must have one more entry than group_bits");
  if (bounds.front() != 0 || bounds.back() != n) throw std::runtime_error("group_bounds must go from 0 to in_features");
  if (scale_group < 0 || (scale_group > 0 && n % scale_group))
    throw std::runtime_error("scale_group_size must divide in_features");
  int64_t vec = 0, row = 0, byte = 0;
  for (size_t g = 0; g < bits.size(); ++g) {
    Group G;
    G.start = bounds[g];
    G.stop = bounds[g + 1];
    G.bits = bits[g];
    if (G.stop <= G.start || (G.stop - G.start) % d)
      throw std::runtime_error("group " + str(g) + " width is not a positive multiple of vector_dim");
    if (G.bits < 1 || G.bits * d > 16)
      throw std::runtime_error("group " + str(g) + ": bits * vector_dim must be in 1..16");
    G.K = int64_t(1) << (G.bits * d);
    G.nvec = (G.stop - G.start) / d;
    G.codebook_row = row;
    G.code_byte = byte;
    G.code_nbytes = (m * G.nvec * G.bits * d + 7) / 8;
    G.vec_offset = vec;
    row += G.K;
    byte += G.code_nbytes;
    vec += G.nvec;
    L.max_group_nvec = std::max(L.max_group_nvec, G.nvec);
    L.groups.push_back(G);
  }
  L.nvec = vec;
  L.codebook_rows = row;
  L.code_nbytes = byte;
  if (scale_group == 0 || scale_group % d == 0) {
    const int64_t per_block = scale_group ? scale_group / d : L.nvec;
    for (size_t g = 0; g < L.groups.size(); ++g) {
      const Group& G = L.groups[g];
      int64_t v = G.vec_offset, end = G.vec_offset + G.nvec;
      while (v < end) {
        int64_t block = v / per_block;
        int64_t stop = std::min(end, (block + 1) * per_block);
        L.segments.push_back({(int)g, v, stop - v, scale_group ? block : -1});
        v = stop;
      }
    }
  }
  return L;
}

// ------------------------------------------------------------------------------------------------
// The kernel

struct ParallelCtx {
  const OrtApi* api;
  const OrtKernelContext* ctx;
};

// Runs fn(i) for i < total on ORT's intra-op thread pool (serially when the call is unavailable).
template <typename F>
void parallel_for(const ParallelCtx& pc, size_t total, F&& fn) {
  if (total == 0) return;
  if (total == 1) {
    fn(size_t(0));
    return;
  }
  struct Closure {
    F* f;
  } closure{&fn};
  auto tramp = [](void* user, size_t i) { (*static_cast<Closure*>(user)->f)(i); };
  OrtStatus* status = pc.api->KernelContext_ParallelFor(pc.ctx, tramp, total, 0, &closure);
  if (status != nullptr) {
    pc.api->ReleaseStatus(status);
    for (size_t i = 0; i < total; ++i) fn(i);
  }
}

enum class Path { kAuto, kLut, kDecode };

struct VQGemmKernel {
  VQGemmKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api), loops_(select_hot_loops()) {
    Ort::ConstKernelInfo ki(info);
    std::vector<int64_t> bounds = ki.GetAttributes<int64_t>("group_bounds");
    std::vector<int64_t> bits = ki.GetAttributes<int64_t>("group_bits");
    int64_t scale_group = 0;
    try {
      scale_group = ki.GetAttribute<int64_t>("scale_group_size");
    } catch (const Ort::Exception&) {
      scale_group = 0;
    }
    layout_ = make_layout(ki.GetAttribute<int64_t>("in_features"), ki.GetAttribute<int64_t>("out_features"),
                          ki.GetAttribute<int64_t>("vector_dim"), bounds, bits, scale_group);
    const char* path = std::getenv("MGVQ_VQGEMM_PATH");  // lut | decode | auto (tests force a path)
    if (path != nullptr && std::string(path) == "lut") path_ = Path::kLut;
    if (path != nullptr && std::string(path) == "decode") path_ = Path::kDecode;
    const char* piece = std::getenv("MGVQ_VQGEMM_PIECE");  // vector positions per cached table slice
    if (piece != nullptr && std::atoi(piece) > 0) piece_vectors_ = std::min(std::atoi(piece), 4096);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api_.CreateStatus(e.GetOrtErrorCode(), (std::string("mgvq.VQGemm: ") + e.what()).c_str());
    } catch (const std::exception& e) {
      return api_.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("mgvq.VQGemm: ") + e.what()).c_str());
    }
  }

 private:
  bool use_lut(int64_t rows) const {
    const Layout& L = layout_;
    if (L.segments.empty()) return false;  // scale blocks cut vectors: only the decode path handles it
    if (path_ == Path::kLut) return true;
    if (path_ == Path::kDecode) return false;
    // Costs in ns measured on a 2-core AMD EPYC with AVX2 (4096 x 4096, 2 bits, d = 4): a table
    // lookup ~0.62, a table entry ~0.1 per codeword dimension; decoding ~0.9 per code once per call,
    // then ~0.021 per weight and activation row. Tables beyond 256 codewords per position fall out of
    // cache and are never chosen here.
    double build = 0, max_k = 0;
    for (const Group& G : L.groups) {
      build += (double)G.nvec * G.K * L.d;
      max_k = std::max(max_k, (double)G.K);
    }
    if (max_k > 256) return false;
    const double lut = (double)rows * (0.62 * L.m * L.nvec + 0.1 * build);
    const double dec = 0.9 * L.m * L.nvec + (double)rows * 0.021 * L.m * L.n;
    return lut < dec;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Layout& L = layout_;
    const size_t num_inputs = ctx.GetInputCount();
    auto input = [&](size_t i) -> Ort::ConstValue {
      if (i >= num_inputs) return Ort::ConstValue{nullptr};
      return ctx.GetInput(i);
    };
    Ort::ConstValue x_val = input(0), perm_val = input(1), cb_val = input(2), codes_val = input(3),
                    scales_val = input(4), bias_val = input(5);
    if (!x_val || !cb_val || !codes_val) throw std::runtime_error("inputs X, codebooks and codes are required");

    auto x_info = x_val.GetTensorTypeAndShapeInfo();
    const ONNXTensorElementDataType x_type = x_info.GetElementType();
    if (x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      throw std::runtime_error("X must be float or float16");
    std::vector<int64_t> x_shape = x_info.GetShape();
    if (x_shape.empty() || x_shape.back() != L.n)
      throw std::runtime_error("X's last dimension must be in_features = " + str(L.n));
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) rows *= x_shape[i];

    auto check = [](const Ort::ConstValue& v, ONNXTensorElementDataType type, const std::vector<int64_t>& shape,
                    const char* what) {
      auto info = v.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != type) throw std::runtime_error(std::string(what) + " has the wrong element type");
      if (info.GetShape() != shape) throw std::runtime_error(std::string(what) + " has the wrong shape");
    };
    check(cb_val, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {L.codebook_rows, L.d}, "codebooks");
    check(codes_val, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {L.code_nbytes}, "codes");
    const int32_t* perm = nullptr;
    if (perm_val) {
      check(perm_val, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {L.n}, "perm");
      perm = perm_val.GetTensorData<int32_t>();
      for (int64_t j = 0; j < L.n; ++j)
        if (perm[j] < 0 || perm[j] >= L.n) throw std::runtime_error("perm has an entry out of range");
    }
    const uint16_t* scales = nullptr;
    if (scales_val) {
      if (L.scale_group == 0) throw std::runtime_error("scales given but scale_group_size is 0");
      check(scales_val, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {L.m, L.n / L.scale_group}, "scales");
      scales = reinterpret_cast<const uint16_t*>(scales_val.GetTensorRawData());
    }
    std::vector<float> bias;
    if (bias_val) {
      check(bias_val, x_type, {L.m}, "bias");
      bias.resize(L.m);
      if (x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        std::memcpy(bias.data(), bias_val.GetTensorData<float>(), L.m * sizeof(float));
      } else {
        auto b16 = reinterpret_cast<const uint16_t*>(bias_val.GetTensorRawData());
        for (int64_t o = 0; o < L.m; ++o) bias[o] = half_to_float(b16[o]);
      }
    }

    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = L.m;
    Ort::UnownedValue y_val = ctx.GetOutput(0, y_shape);
    if (rows == 0) return;

    // X, permuted and as float32: xp[r][j] = X[r][perm[j]].
    std::vector<float> xp((size_t)rows * L.n);
    const void* x_raw = x_val.GetTensorRawData();
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = xp.data() + (size_t)r * L.n;
      if (x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        const float* src = static_cast<const float*>(x_raw) + (size_t)r * L.n;
        if (perm) {
          for (int64_t j = 0; j < L.n; ++j) dst[j] = src[perm[j]];
        } else {
          std::memcpy(dst, src, L.n * sizeof(float));
        }
      } else {
        const uint16_t* src = static_cast<const uint16_t*>(x_raw) + (size_t)r * L.n;
        for (int64_t j = 0; j < L.n; ++j) dst[j] = half_to_float(src[perm ? perm[j] : j]);
      }
    }

    const bool fp32_out = x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    std::vector<float> y_tmp;
    float* y = nullptr;
    if (fp32_out) {
      y = y_val.GetTensorMutableData<float>();
    } else {
      y_tmp.resize((size_t)rows * L.m);
      y = y_tmp.data();
    }

    const uint16_t* cb16 = reinterpret_cast<const uint16_t*>(cb_val.GetTensorRawData());
    const uint8_t* codes = codes_val.GetTensorData<uint8_t>();
    ParallelCtx pc{&api_, context};
    if (use_lut(rows)) {
      RunLut(pc, xp.data(), rows, cb16, codes, scales, y);
    } else {
      RunDecode(pc, xp.data(), rows, cb16, codes, scales, y);
    }
    if (!bias.empty()) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < L.m; ++o) y[(size_t)r * L.m + o] += bias[o];
    }
    if (!fp32_out) {
      uint16_t* y16 = reinterpret_cast<uint16_t*>(y_val.GetTensorMutableRawData());
      for (size_t i = 0; i < y_tmp.size(); ++i) y16[i] = float_to_half(y_tmp[i]);
    }
  }

  // Unpacks output row o's codes of every group into codes_out[vec_offset ...].
  void UnpackRow(const uint8_t* codes, int64_t o, uint16_t* codes_out) const {
    const Layout& L = layout_;
    for (const Group& G : L.groups) {
      const int bd = (int)(G.bits * L.d);
      uint64_t bit0 = (uint64_t)G.code_byte * 8 + (uint64_t)o * G.nvec * bd;
      unpack_codes(codes, bit0, bd, G.nvec, codes_out + G.vec_offset);
    }
  }

  void RunLut(const ParallelCtx& pc, const float* xp, int64_t rows, const uint16_t* cb16, const uint8_t* codes,
              const uint16_t* scales, float* y) const {
    const Layout& L = layout_;
    const int64_t d = L.d;
    // Transposed float32 codebooks (d x K per group) and table offsets (floats per activation row).
    std::vector<std::vector<float>> cbT(L.groups.size());
    std::vector<int64_t> table_off(L.groups.size());
    int64_t table_floats = 0;
    for (size_t g = 0; g < L.groups.size(); ++g) {
      const Group& G = L.groups[g];
      cbT[g].resize((size_t)G.K * d);
      for (int64_t k = 0; k < G.K; ++k)
        for (int64_t t = 0; t < d; ++t)
          cbT[g][(size_t)t * G.K + k] = half_to_float(cb16[(size_t)(G.codebook_row + k) * d + t]);
      table_off[g] = table_floats;
      table_floats += G.nvec * G.K;
    }
    table_floats += 16;  // rows of tables a cache line apart modulo 4 KiB: no set aliasing across rows
    // Activation rows go in chunks whose table slices (piece_vectors_ positions per row) stay within
    // ~128 KiB of cache together, and whose whole tables take at most ~16 MiB.
    int64_t max_k = 0;
    for (const Group& G : L.groups) max_k = std::max(max_k, G.K);
    int64_t chunk = std::min<int64_t>((int64_t(4) << 20) / table_floats, 32768 / (piece_vectors_ * max_k));
    chunk = std::max<int64_t>(1, std::min<int64_t>(rows, chunk));
    std::vector<float> tables((size_t)chunk * table_floats);
    std::vector<float> scale_f;
    if (scales) {
      scale_f.resize((size_t)L.m * (L.n / L.scale_group));
      for (size_t i = 0; i < scale_f.size(); ++i) scale_f[i] = half_to_float(scales[i]);
    }
    constexpr int64_t kVecBlock = 256;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t nr = std::min(chunk, rows - r0);
      // 1. Tables: tasks are (row, group, block of vector positions).
      struct Task {
        int64_t r, g, v0, v1;
      };
      std::vector<Task> tasks;
      for (int64_t r = 0; r < nr; ++r)
        for (size_t g = 0; g < L.groups.size(); ++g)
          for (int64_t v = 0; v < L.groups[g].nvec; v += kVecBlock)
            tasks.push_back({r, (int64_t)g, v, std::min(L.groups[g].nvec, v + kVecBlock)});
      parallel_for(pc, tasks.size(), [&](size_t i) {
        const Task& T = tasks[i];
        const Group& G = L.groups[T.g];
        const float* x = xp + (size_t)(r0 + T.r) * L.n + G.start;
        float* table = tables.data() + (size_t)T.r * table_floats + table_off[T.g];
        for (int64_t v = T.v0; v < T.v1; ++v)
          loops_.build_table(x + v * d, cbT[T.g].data(), (int)G.K, (int)d, table + (size_t)v * G.K);
      });
      // 2. Lookups: tasks are blocks of output rows. Within a task the vector positions go in pieces
      // whose table slices stay in cache while every output row of the block visits them.
      const int64_t out_block = std::max<int64_t>(1, std::min<int64_t>(64, L.m / 64));
      const size_t ntasks = (size_t)((L.m + out_block - 1) / out_block);
      parallel_for(pc, ntasks, [&](size_t i) {
        const int64_t o0 = (int64_t)i * out_block;
        const int64_t no = std::min<int64_t>(L.m, o0 + out_block) - o0;
        std::vector<float> acc((size_t)nr * no, 0.f);
        std::vector<uint16_t> piece_codes((size_t)piece_vectors_ + 16);
        for (const Segment& S : L.segments) {
          const Group& G = L.groups[S.group];
          const int bd = (int)(G.bits * d);
          for (int64_t p0 = S.vec_begin; p0 < S.vec_begin + S.count; p0 += piece_vectors_) {
            const int count = (int)std::min<int64_t>(piece_vectors_, S.vec_begin + S.count - p0);
            const int64_t local = p0 - G.vec_offset;
            for (int64_t k = 0; k < no; ++k) {
              const int64_t o = o0 + k;
              const float s = S.scale_col >= 0 ? scale_f[(size_t)o * (L.n / L.scale_group) + S.scale_col] : 1.f;
              if (bd == 8) {  // byte codes: looked up straight from the packed stream
                const uint8_t* row = codes + G.code_byte + o * G.nvec + local;
                for (int64_t r = 0; r < nr; ++r) {
                  const float* table = tables.data() + (size_t)r * table_floats + table_off[S.group] + (size_t)local * G.K;
                  acc[(size_t)r * no + k] += s * loops_.lookup_u8(table, row, count);
                }
                continue;
              }
              unpack_codes(codes, (uint64_t)G.code_byte * 8 + ((uint64_t)o * G.nvec + local) * bd, bd, count,
                           piece_codes.data());
              for (int64_t r = 0; r < nr; ++r) {
                const float* table = tables.data() + (size_t)r * table_floats + table_off[S.group] + (size_t)local * G.K;
                acc[(size_t)r * no + k] += s * loops_.lookup(table, piece_codes.data(), count, (int)G.K);
              }
            }
          }
        }
        for (int64_t r = 0; r < nr; ++r)
          std::memcpy(y + (size_t)(r0 + r) * L.m + o0, acc.data() + (size_t)r * no, no * sizeof(float));
      });
    }
  }

  void RunDecode(const ParallelCtx& pc, const float* xp, int64_t rows, const uint16_t* cb16, const uint8_t* codes,
                 const uint16_t* scales, float* y) const {
    const Layout& L = layout_;
    const int64_t d = L.d;
    std::vector<float> cb((size_t)L.codebook_rows * d);
    for (size_t i = 0; i < cb.size(); ++i) cb[i] = half_to_float(cb16[i]);
    constexpr int64_t kRows = 8;  // rows of W_perm decoded at a time
    const size_t ntasks = (size_t)((L.m + kRows - 1) / kRows);
    parallel_for(pc, ntasks, [&](size_t i) {
      const int64_t o0 = (int64_t)i * kRows;
      const int nrows = (int)std::min<int64_t>(kRows, L.m - o0);
      std::vector<float> w((size_t)nrows * L.n);
      std::vector<uint16_t> row_codes((size_t)L.nvec + 16);
      for (int k = 0; k < nrows; ++k) {
        const int64_t o = o0 + k;
        float* wr = w.data() + (size_t)k * L.n;
        UnpackRow(codes, o, row_codes.data());
        for (const Group& G : L.groups) {
          const float* book = cb.data() + (size_t)G.codebook_row * d;
          const uint16_t* c = row_codes.data() + G.vec_offset;
          float* dst = wr + G.start;
          switch (d) {  // fixed-size copies compile to plain moves
            case 2: gather_rows<2>(book, c, G.nvec, dst); break;
            case 4: gather_rows<4>(book, c, G.nvec, dst); break;
            case 8: gather_rows<8>(book, c, G.nvec, dst); break;
            default:
              for (int64_t v = 0; v < G.nvec; ++v)
                std::memcpy(dst + v * d, book + (size_t)c[v] * d, d * sizeof(float));
          }
        }
        if (scales) {
          const uint16_t* s = scales + (size_t)o * (L.n / L.scale_group);
          for (int64_t b = 0; b < L.n / L.scale_group; ++b) {
            const float f = half_to_float(s[b]);
            float* blk = wr + b * L.scale_group;
            for (int64_t c = 0; c < L.scale_group; ++c) blk[c] *= f;
          }
        }
      }
      loops_.gemm_tile(w.data(), nrows, xp, rows, L.n, y + o0, L.m);
    });
  }

  const OrtApi& api_;
  HotLoops loops_;
  Layout layout_;
  Path path_ = Path::kAuto;
  int64_t piece_vectors_ = 64;
};

// One registration per activation type (float, float16): ORT picks the kernel by X's type.
struct VQGemmOp : Ort::CustomOpBase<VQGemmOp, VQGemmKernel, true> {
  explicit VQGemmOp(ONNXTensorElementDataType type) : type_(type) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new VQGemmKernel(api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), (std::string("mgvq.VQGemm: ") + e.what()).c_str());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("mgvq.VQGemm: ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 1:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case 2:
      case 4:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      case 3:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      default:  // X and bias
        return type_;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return (index == 1 || index >= 4) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type_; }

 private:
  ONNXTensorElementDataType type_;
};

VQGemmOp& op_float() {
  static VQGemmOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  return op;
}

VQGemmOp& op_float16() {
  static VQGemmOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  return op;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) const char* MgvqVQGemmIsa() { return select_hot_loops().name; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // a runtime older than the 1.21 headers: report it through the oldest API
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 == nullptr ? nullptr
                         : v1->CreateStatus(ORT_FAIL, "mgvq custom ops need ONNX Runtime >= 1.21 (API version 21)");
  }
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain)) return status;
  // The domain must outlive every session using it; it is kept for the life of the process.
  static std::mutex mutex;
  static std::vector<OrtCustomOpDomain*> domains;
  {
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(domain);
  }
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op_float())) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op_float16())) return status;
  return api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
