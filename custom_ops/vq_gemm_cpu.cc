// mgvq.VQGemm for ONNX Runtime's CPU execution provider.
//
// Y = X[..., perm] @ W_perm^T (+ bias), W_perm decoded from vector-quantized codes (see
// mgvq_compile/vqgemm.py for the contract). W is never materialised: either
//  - register path: codebooks of at most 64 codewords held in vector registers (few activation rows),
//  - gather path: larger codebooks, few activation rows: each code's codeword loaded and multiplied
//    with the activations straight from the bit-packed stream,
//  - LUT path: per activation row, table[j][k] = <x_perm[j*d : j*d+d], codeword_k> for every
//    vector position j, then y[o] = sum_j scale * table[j][code[o, j]] (AQLM/T-MAC style), or
//  - decode path: a few rows of W_perm at a time are decoded into a small buffer and dotted with
//    every activation row (many activation rows).
// Hot loops exist in a portable version and an AVX2+FMA version chosen at load time.
// The library uses only the OrtApi pointer handed to RegisterCustomOps (no link to onnxruntime).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include "vq_gemm_op.h"

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

using mgvq_op::str;
constexpr const char* kLabel = "mgvq.VQGemm";  // error messages start with it

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

void halves_to_floats_portable(const uint16_t* src, size_t count, float* dst) {
  for (size_t i = 0; i < count; ++i) dst[i] = half_to_float(src[i]);
}

// ------------------------------------------------------------------------------------------------
// Gather path, for few activation rows and codebooks too large for the register path (d = 4 codes of
// 7 to 12 bits at mgvq's 2-bit widths, d = 2 codes of 7 and 8 bits at its 3-bit ones). Each output row
// is dotted with the activations straight from its bit-packed codes: per code one load of its codeword
// (float32, d floats) and a multiply-add; no table per call, no decoded weight, no unpacked code buffer.
//
// out[r] = sum_{v < count} <codeword code_v, x[r * x_stride + v * D ...]> for r < NR, code_v the
// `bits`-bit code at bit bit0 + v * bits of `codes`; `end` is one past the last byte that may be read.
using GatherDotFn = void (*)(const uint8_t* codes, const uint8_t* end, uint64_t bit0, int bits, int64_t count,
                             const float* book, const float* x, int64_t x_stride, float* out);
constexpr int kGatherMaxRows = 4;        // activation rows per call
constexpr int64_t kGatherRowLimit = 8;   // more activation rows: the LUT or decode path
constexpr int kGatherDims[4] = {1, 2, 4, 8};
constexpr int kWindowMaxCodeBits = 14;   // 4 codes and a 7-bit offset fit one 8-byte load

// The `bits`-bit code at bit `bit` of data; reads only the bytes that hold it.
inline uint32_t code_at(const uint8_t* data, uint64_t bit, int bits) {
  const uint8_t* p = data + (bit >> 3);
  const int shift = (int)(bit & 7);
  uint32_t v = 0;
  for (int i = 0; 8 * i < shift + bits; ++i) v |= (uint32_t)p[i] << (8 * i);
  return (v >> shift) & ((1u << bits) - 1u);
}

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Fixed code widths (B bits, rows starting on a byte): every 8 codes take B whole bytes, so where each
// code sits in the two 8-byte loads of its step is known at compile time.
constexpr int kFixedMinCodeBits = 5, kFixedMaxCodeBits = kWindowMaxCodeBits;

// Steps of 8 codes (B bytes each, from p) whose two 8-byte loads (at p and p + B / 2) stay before `end`.
template <int B>
inline int64_t fixed_steps(const uint8_t* p, const uint8_t* end, int64_t count) {
  const int64_t avail = end - p, reach = 4 * B / 8 + 8;  // bytes the last step reads
  return avail < reach ? 0 : std::min<int64_t>(count / 8, (avail - reach) / B + 1);
}

// Byte offset of code J's codeword (D = 2 or 4 floats) in the window w of B-bit codes.
template <int D, int B, int J>
inline uint64_t codeword_offset(uint64_t w) {
  constexpr int kShift = D == 2 ? 3 : 4;  // log2 of a codeword's bytes
  constexpr uint64_t kMask = ((uint64_t(1) << B) - 1) << kShift;
  if constexpr (J * B >= kShift) {
    return (w >> (J * B - kShift)) & kMask;
  } else {
    return (w << (kShift - J * B)) & kMask;
  }
}

template <int D, int B, int J>
inline const float* codeword_at(const float* book, uint64_t w) {
  return reinterpret_cast<const float*>(reinterpret_cast<const char*>(book) + codeword_offset<D, B, J>(w));
}

// The codewords of one step's 8 codes: B-bit codes from the byte p.
template <int D, int B>
inline void fixed_step_codewords(const float* book, const uint8_t* p, const float* (&cw)[8]) {
  const uint64_t w0 = load_u64(p), w1 = load_u64(p + 4 * B / 8) >> (4 * B % 8);
  cw[0] = codeword_at<D, B, 0>(book, w0);
  cw[1] = codeword_at<D, B, 1>(book, w0);
  cw[2] = codeword_at<D, B, 2>(book, w0);
  cw[3] = codeword_at<D, B, 3>(book, w0);
  cw[4] = codeword_at<D, B, 0>(book, w1);
  cw[5] = codeword_at<D, B, 1>(book, w1);
  cw[6] = codeword_at<D, B, 2>(book, w1);
  cw[7] = codeword_at<D, B, 3>(book, w1);
}

// The same for `bits`-bit codes (at most kWindowMaxCodeBits) from bit `bit` of `codes`.
template <int D>
inline void step_codewords(const float* book, const uint8_t* codes, uint64_t bit, int bits, const float* (&cw)[8]) {
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  for (int half = 0; half < 2; ++half, bit += 4 * (uint64_t)bits) {
    const uint64_t w = load_u64(codes + (bit >> 3)) >> (bit & 7);
    for (int j = 0; j < 4; ++j) cw[4 * half + j] = book + ((w >> (j * bits)) & mask) * D;
  }
}

// tail[r] += sum_{v0 <= v < count} <codeword code_v, x[r * x_stride + v * D ...]>, one code at a time.
template <int D, int NR>
inline void gather_tail(const uint8_t* codes, uint64_t bit0, int bits, int64_t v0, int64_t count, const float* book,
                        const float* x, int64_t x_stride, float* tail) {
  for (int64_t v = v0; v < count; ++v) {
    const float* w = book + (size_t)code_at(codes, bit0 + (uint64_t)v * bits, bits) * D;
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < D; ++t) tail[r] += w[t] * x[r * x_stride + v * D + t];
  }
}

// How many of the codes v < count (at bit bit0 + v * bits) start a byte from which 8 bytes can be read
// without passing `avail` bytes.
inline int64_t window_safe_count(uint64_t bit0, int bits, int64_t count, int64_t avail) {
  const int64_t limit = (avail - 7) * 8 - (int64_t)bit0;  // code v is safe iff v * bits < limit
  if (avail < 8 || limit <= 0) return 0;
  return std::min<int64_t>(count, (limit + bits - 1) / bits);
}

template <int D, int NR>
void gather_dot_portable(const uint8_t* codes, const uint8_t* end, uint64_t bit0, int bits, int64_t count,
                         const float* book, const float* x, int64_t x_stride, float* out) {
  (void)end;
  float sum[NR] = {};
  gather_tail<D, NR>(codes, bit0, bits, 0, count, book, x, x_stride, sum);
  std::copy(sum, sum + NR, out);
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

__attribute__((target("avx2,fma,f16c"))) void halves_to_floats_f16c(const uint16_t* src, size_t count, float* dst) {
  size_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
  for (; i < count; ++i) dst[i] = half_to_float(src[i]);
}

__attribute__((target("avx2,fma"))) inline float hsum128(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

// Two codewords of 4 floats side by side.
__attribute__((target("avx2,fma"))) inline __m256 two_quads(const float* a, const float* b) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(a)), _mm_loadu_ps(b), 1);
}

// Four codewords of 2 floats side by side (64-bit loads through __m128i, which may alias floats).
__attribute__((target("avx2,fma"))) inline __m256 four_pairs(const float* const* cw) {
  const __m128i a = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)cw[0]), _mm_loadl_epi64((const __m128i*)cw[1]));
  const __m128i b = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)cw[2]), _mm_loadl_epi64((const __m128i*)cw[3]));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_castsi128_ps(a)), _mm_castsi128_ps(b), 1);
}

// acc[r][i] += (codewords of one step's 8 codes, register i) * (their activations) for D registers.
template <int D, int NR>
__attribute__((target("avx2,fma"))) inline void step_fma_avx2(const float* const* cw, const float* x, int64_t x_stride,
                                                             __m256 (*acc)[D]) {
  __m256 w[D];
  if constexpr (D == 4) {
    for (int i = 0; i < 4; ++i) w[i] = two_quads(cw[2 * i], cw[2 * i + 1]);
  } else {
    w[0] = four_pairs(cw);
    w[1] = four_pairs(cw + 4);
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < D; ++i) acc[r][i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + r * x_stride + 8 * i), acc[r][i]);
}

// gather_dot_portable<D, NR> for D = 2 or 4, 8 codes per step (two 8-byte loads of the code stream).
// B > 0: B-bit codes from a byte (RunGather and RunRegister pass such rows here), else `bits`-bit codes
// anywhere.
template <int D, int B, int NR>
__attribute__((target("avx2,fma"))) void gather_dot_avx2(const uint8_t* codes, const uint8_t* end, uint64_t bit0,
                                                         int bits, int64_t count, const float* book, const float* x,
                                                         int64_t x_stride, float* out) {
  __m256 acc[NR][D];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < D; ++i) acc[r][i] = _mm256_setzero_ps();
  const float* cw[8];
  int64_t v = 0;
  if constexpr (B > 0) {
    const uint8_t* p = codes + (bit0 >> 3);
    const int64_t steps = fixed_steps<B>(p, end, count);
    for (int64_t step = 0; step < steps; ++step, p += B, v += 8) {
      fixed_step_codewords<D, B>(book, p, cw);
      step_fma_avx2<D, NR>(cw, x + v * D, x_stride, acc);
    }
  } else if (bits <= kWindowMaxCodeBits) {
    const int64_t safe = window_safe_count(bit0, bits, count, end - codes);
    for (uint64_t bit = bit0; v + 8 <= count && v + 4 < safe; v += 8, bit += 8 * (uint64_t)bits) {
      step_codewords<D>(book, codes, bit, bits, cw);
      step_fma_avx2<D, NR>(cw, x + v * D, x_stride, acc);
    }
  }
  float tail[NR] = {};
  gather_tail<D, NR>(codes, bit0, bits, v, count, book, x, x_stride, tail);
  for (int r = 0; r < NR; ++r) {
    __m256 s = acc[r][0];
    for (int i = 1; i < D; ++i) s = _mm256_add_ps(s, acc[r][i]);
    out[r] = hsum256(s) + tail[r];
  }
}
#endif

// ------------------------------------------------------------------------------------------------
// Register-codebook path, for groups whose codes have at most 6 bits (d = 2 at 1-3 bits, d = 1 at up
// to 6 bits, d = 4 at 1 bit: every layer the mgvq recipe writes by default). The group's codebook sits
// in vector registers, one set per vector component; each step unpacks 16 codes (8 on AVX2) with one
// byte shuffle, a variable shift and a mask, picks the weights with permutes and multiply-adds them
// with the activations, which are laid out component by component: xs[t * comp_stride + v] is component
// t of vector position v. No table per call, no gather, the weight never leaves the registers.
//
// out[r] = sum_{v < count} sum_{t < D} table[t * 64 + code_v] * xs[r * row_stride + t * comp_stride + v]
// for r < NR, code_v the bd-bit code at bit bit0 + v * bd of `codes`; `end` is one past the last byte
// that may be read.
using RegisterDotFn = void (*)(const uint8_t* codes, const uint8_t* end, uint64_t bit0, int bd, int64_t count,
                               const float* table, const float* xs, int64_t comp_stride, int64_t row_stride,
                               float* out);

// 4-bit codes (16 codewords: d = 2 at 2 bits, the mgvq default; d = 1 at 4 bits; d = 4 at 1 bit) in
// rows that start on a byte: one widening load and one shift give 32 codes, the even vector positions
// from the low nibbles and the odd ones from the high nibbles. The activations are laid out to match:
// per block of 32 vector positions, the 16 even ones, then the 16 odd ones. NO output rows share every
// activation load.
// out[o * NR + r] = sum_{v < count} sum_{t < D} table[t * 64 + code_{o,v}] * x_r(v, t), for o < NO, r < NR.
using NibbleDotFn = void (*)(const uint8_t* const* codes, int64_t count, const float* table, const float* xn,
                             int64_t comp_stride, int64_t row_stride, float* out);

constexpr int kNibbleBlock = 32;  // vector positions per step

// 2- or 4-bit codes in byte-aligned rows, 16 output rows at once, from per-position tables (see
// tile_dot_avx512):
// out[r * 16 + i] = sum_{v < count} lut[r * lut_stride + v * 16 + code_{i,v}]; AVX-512 only.
using TileDotFn = void (*)(const uint8_t* codes, int64_t row_bytes, int64_t count, const float* lut,
                           int64_t lut_stride, float* out);
using BuildTileLutFn = void (*)(const float* x, int d, int K, int64_t count, const float* table, float* lut);
constexpr int kTileRows = 16;             // output rows per tile call (lanes of a register)
constexpr int64_t kTileRowLimit = 4;      // more activation rows: the nibble kernel

constexpr int kRegisterMaxCodeBits = 6;  // tables of at most 64 codewords per component
// Groups of 8-bit codes next to narrower ones where the gather kernels are not vectorised (d = 1; at
// d = 2 and 4 those take them): the register path looks them up in per-position tables of 256 products,
// one byte per code, for at most this many activation rows (beyond, the whole layer takes the LUT or
// decode path).
constexpr int kByteCodeBits = 8;
constexpr int64_t kByteGroupRowLimit = 4;
constexpr int kRegisterTableStride = 64;
constexpr int kRegisterMaxRows = 4;      // activation rows per call
constexpr int64_t kRegisterRowLimit = 16;  // more activation rows: the decode path
constexpr int kRegisterDims[3] = {1, 2, 4};

// GCC 12's AVX-512 intrinsics trip -Wuninitialized on their own _mm*_undefined_* placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#ifdef MGVQ_HAVE_X86
#define MGVQ_AVX512 "avx512f,avx512bw,avx512vl,avx512vbmi,avx512dq,fma,avx2"

// Codeword columns for 16 codes; KC = registers per table (16 codewords each).
template <int KC>
__attribute__((target(MGVQ_AVX512))) inline __m512 pick_avx512(const __m512* T, __m512i c) {
  if constexpr (KC == 1) {
    return _mm512_permutexvar_ps(c, T[0]);
  } else if constexpr (KC == 2) {
    return _mm512_permutex2var_ps(T[0], c, T[1]);
  } else {
    const __m512 lo = _mm512_permutex2var_ps(T[0], c, T[1]);
    const __m512 hi = _mm512_permutex2var_ps(T[2], c, T[3]);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(c, _mm512_set1_epi32(32)), lo, hi);
  }
}

// 16 codes from the bytes at q (only the first `load` bytes are read: masked loads do not fault).
__attribute__((target(MGVQ_AVX512))) inline __m512i unpack16_avx512(const uint8_t* q, __mmask64 load,
                                                                  __m512i byte_index, __m512i shift,
                                                                  __m512i mask) {
  const __m512i raw = _mm512_maskz_loadu_epi8(load, q);
  return _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi8(byte_index, raw), shift), mask);
}

inline __mmask64 byte_mask(int nbytes) { return nbytes >= 64 ? ~0ull : ((1ull << nbytes) - 1ull); }

template <int D, int KC, int NR>
__attribute__((target(MGVQ_AVX512))) void register_dot_avx512(const uint8_t* codes, const uint8_t*, uint64_t bit0,
                                                             int bd, int64_t count, const float* table,
                                                             const float* xs, int64_t comp_stride,
                                                             int64_t row_stride, float* out) {
  constexpr int U = NR * D <= 4 ? 2 : 1;  // independent accumulator sets: FMA latency, not throughput
  __m512 T[D][KC];
  for (int t = 0; t < D; ++t)
    for (int k = 0; k < KC; ++k) T[t][k] = _mm512_loadu_ps(table + t * kRegisterTableStride + k * 16);
  const int s0 = (int)(bit0 & 7);
  const uint8_t* p = codes + (bit0 >> 3);
  const __m512i pos = _mm512_add_epi32(
      _mm512_set1_epi32(s0),
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(bd)));
  const __m512i shift = _mm512_and_si512(pos, _mm512_set1_epi32(7));
  const __m512i byte_index = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(pos, 3), _mm512_set1_epi32(0x01010101)),
                                              _mm512_set1_epi32(0x03020100));
  const __m512i mask = _mm512_set1_epi32((1 << bd) - 1);
  const __mmask64 full = byte_mask((s0 + 16 * bd + 7) >> 3);
  __m512 acc[U][NR][D];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < D; ++t) acc[u][r][t] = _mm512_setzero_ps();
  int64_t v = 0;
  for (; v + 16 * U <= count; v += 16 * U) {
    for (int u = 0; u < U; ++u) {
      const __m512i c = unpack16_avx512(p, full, byte_index, shift, mask);
      p += 2 * bd;
      for (int t = 0; t < D; ++t) {
        const __m512 w = pick_avx512<KC>(T[t], c);
        for (int r = 0; r < NR; ++r)
          acc[u][r][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + r * row_stride + t * comp_stride + v + 16 * u),
                                         acc[u][r][t]);
      }
    }
  }
  for (; v < count; v += 16) {
    const int rem = (int)std::min<int64_t>(16, count - v);
    const __mmask16 lanes = (__mmask16)((1u << rem) - 1u);
    const __m512i c = unpack16_avx512(p, byte_mask((s0 + rem * bd + 7) >> 3), byte_index, shift, mask);
    p += 2 * bd;
    for (int t = 0; t < D; ++t) {
      const __m512 w = pick_avx512<KC>(T[t], c);
      for (int r = 0; r < NR; ++r)
        acc[0][r][t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, xs + r * row_stride + t * comp_stride + v),
                                       acc[0][r][t]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    __m512 s = acc[0][r][0];
    for (int t = 1; t < D; ++t) s = _mm512_add_ps(s, acc[0][r][t]);
    for (int u = 1; u < U; ++u)
      for (int t = 0; t < D; ++t) s = _mm512_add_ps(s, acc[u][r][t]);
    out[r] = hsum256(_mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1)));
  }
}

// Codeword columns for 8 codes; KC = 1: 8 codewords, 2: 16, 0: up to 64 (gathered from the table).
template <int KC>
__attribute__((target("avx2,fma"))) inline __m256 pick_avx2(const __m256* T, const float* table_t, __m256i c) {
  if constexpr (KC == 1) {
    return _mm256_permutevar8x32_ps(T[0], c);
  } else if constexpr (KC == 2) {
    const __m256 lo = _mm256_permutevar8x32_ps(T[0], c);
    const __m256 hi = _mm256_permutevar8x32_ps(T[1], c);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));  // bit 3 -> sign
  } else {
    return _mm256_i32gather_ps(table_t, c, 4);
  }
}

template <int D, int KC, int NR>
__attribute__((target("avx2,fma"))) void register_dot_avx2(const uint8_t* codes, const uint8_t* end, uint64_t bit0,
                                                           int bd, int64_t count, const float* table,
                                                           const float* xs, int64_t comp_stride, int64_t row_stride,
                                                           float* out) {
  constexpr int NT = KC == 0 ? 1 : KC;
  __m256 T[D][NT];
  for (int t = 0; t < D; ++t)
    for (int k = 0; k < NT; ++k) T[t][k] = _mm256_loadu_ps(table + t * kRegisterTableStride + k * 8);
  const int s0 = (int)(bit0 & 7);
  const uint8_t* p = codes + (bit0 >> 3);
  const __m256i pos = _mm256_add_epi32(_mm256_set1_epi32(s0),
                                       _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bd)));
  const __m256i shift = _mm256_and_si256(pos, _mm256_set1_epi32(7));
  const __m256i byte_index = _mm256_add_epi32(
      _mm256_mullo_epi32(_mm256_srli_epi32(pos, 3), _mm256_set1_epi32(0x01010101)), _mm256_set1_epi32(0x03020100));
  const __m256i mask = _mm256_set1_epi32((1 << bd) - 1);
  __m256 acc[NR][D];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < D; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t v = 0; v < count; v += 8, p += bd) {
    __m128i bytes;
    if (end - p >= 16) {
      bytes = _mm_loadu_si128((const __m128i*)p);
    } else {  // the last bytes of the buffer: never read past it
      alignas(16) uint8_t tail[16] = {0};
      std::memcpy(tail, p, (size_t)std::max<std::ptrdiff_t>(0, end - p));
      bytes = _mm_load_si128((const __m128i*)tail);
    }
    const __m256i c = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bytes), byte_index), shift), mask);
    const int rem = (int)std::min<int64_t>(8, count - v);
    if (rem == 8) {
      for (int t = 0; t < D; ++t) {
        const __m256 w = pick_avx2<KC>(T[t], table + t * kRegisterTableStride, c);
        for (int r = 0; r < NR; ++r)
          acc[r][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + r * row_stride + t * comp_stride + v), acc[r][t]);
      }
    } else {
      const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      for (int t = 0; t < D; ++t) {
        const __m256 w = pick_avx2<KC>(T[t], table + t * kRegisterTableStride, c);
        for (int r = 0; r < NR; ++r)
          acc[r][t] = _mm256_fmadd_ps(w, _mm256_maskload_ps(xs + r * row_stride + t * comp_stride + v, lanes),
                                      acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    __m256 s = acc[r][0];
    for (int t = 1; t < D; ++t) s = _mm256_add_ps(s, acc[r][t]);
    out[r] = hsum256(s);
  }
}
template <int D, int NR, int NO>
__attribute__((target(MGVQ_AVX512))) void nibble_dot_avx512(const uint8_t* const* codes, int64_t count,
                                                           const float* table, const float* xn, int64_t comp_stride,
                                                           int64_t row_stride, float* out) {
  __m512 T[D];
  for (int t = 0; t < D; ++t) T[t] = _mm512_loadu_ps(table + t * kRegisterTableStride);
  __m512 acc[NO][NR][D];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < D; ++t) acc[o][r][t] = _mm512_setzero_ps();
  for (int64_t v = 0; v < count; v += kNibbleBlock) {
    const int rem = (int)std::min<int64_t>(kNibbleBlock, count - v);
    const bool full = rem == kNibbleBlock;
    const __mmask16 bytes = full ? 0xffff : (__mmask16)((1u << ((rem + 1) / 2)) - 1u);
    const __mmask16 even = bytes, odd = full ? 0xffff : (__mmask16)((1u << (rem / 2)) - 1u);
    __m512 w_even[NO][D], w_odd[NO][D];
    for (int o = 0; o < NO; ++o) {
      const __m512i lo = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(bytes, codes[o] + v / 2));
      const __m512i hi = _mm512_srli_epi32(lo, 4);  // the permutes read only the low 4 bits
      for (int t = 0; t < D; ++t) {
        w_even[o][t] = _mm512_permutexvar_ps(lo, T[t]);
        w_odd[o][t] = _mm512_permutexvar_ps(hi, T[t]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < D; ++t) {
        const float* x = xn + r * row_stride + t * comp_stride + v;
        const __m512 xe = _mm512_maskz_loadu_ps(even, x), xo = _mm512_maskz_loadu_ps(odd, x + 16);
        for (int o = 0; o < NO; ++o) {
          acc[o][r][t] = _mm512_fmadd_ps(w_even[o][t], xe, acc[o][r][t]);
          acc[o][r][t] = _mm512_fmadd_ps(w_odd[o][t], xo, acc[o][r][t]);
        }
      }
  }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) {
      __m512 s = acc[o][r][0];
      for (int t = 1; t < D; ++t) s = _mm512_add_ps(s, acc[o][r][t]);
      out[o * NR + r] = hsum256(_mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1)));
    }
}

// 16 x 16 transpose of dwords: z[i] holds dwords c = 0..15 of row i before, dword c of rows 0..15 (lane i
// = row i) in z[c] after. Unpacks pair rows within each 128-bit lane, then two 128-bit shuffles.
__attribute__((target(MGVQ_AVX512))) inline void transpose16_epi32(__m512i* z) {
  __m512i s[16];
  for (int i = 0; i < 8; ++i) {
    s[2 * i] = _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]);
    s[2 * i + 1] = _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]);
  }
  __m512i q[4][4];  // q[j][e], 128-bit lane L: rows 4j..4j+3 at dword 4L + e
  for (int j = 0; j < 4; ++j) {
    q[j][0] = _mm512_unpacklo_epi64(s[4 * j], s[4 * j + 2]);
    q[j][1] = _mm512_unpackhi_epi64(s[4 * j], s[4 * j + 2]);
    q[j][2] = _mm512_unpacklo_epi64(s[4 * j + 1], s[4 * j + 3]);
    q[j][3] = _mm512_unpackhi_epi64(s[4 * j + 1], s[4 * j + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i t0 = _mm512_shuffle_i32x4(q[0][e], q[1][e], 0x44), t1 = _mm512_shuffle_i32x4(q[0][e], q[1][e], 0xee);
    const __m512i t2 = _mm512_shuffle_i32x4(q[2][e], q[3][e], 0x44), t3 = _mm512_shuffle_i32x4(q[2][e], q[3][e], 0xee);
    z[e] = _mm512_shuffle_i32x4(t0, t2, 0x88);
    z[4 + e] = _mm512_shuffle_i32x4(t0, t2, 0xdd);
    z[8 + e] = _mm512_shuffle_i32x4(t1, t3, 0x88);
    z[12 + e] = _mm512_shuffle_i32x4(t1, t3, 0xdd);
  }
}

// lut[v * 16 + k] = sum_{t < d} x[v * d + t] * table[t * 64 + k % K] for v < count, k < 16: the products
// of each vector position's activations with the K (4 or 16) codewords, once per activation row and
// call. Smaller codebooks repeat, so a permute may read the next code's bits above the low log2(K).
__attribute__((target(MGVQ_AVX512))) void build_tile_lut_avx512(const float* x, int d, int K, int64_t count,
                                                               const float* table, float* lut) {
  const __m512i wrap = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(K - 1));
  __m512 T[4];
  for (int t = 0; t < d; ++t) T[t] = _mm512_permutexvar_ps(wrap, _mm512_loadu_ps(table + t * kRegisterTableStride));
  for (int64_t v = 0; v < count; ++v) {
    __m512 acc = _mm512_mul_ps(_mm512_set1_ps(x[v * d]), T[0]);
    for (int t = 1; t < d; ++t) acc = _mm512_fmadd_ps(_mm512_set1_ps(x[v * d + t]), T[t], acc);
    _mm512_storeu_ps(lut + v * 16, acc);
  }
}

// Adds the table entries of the 32 / BD codes in each lane of `codes` (BD bits each, LSB first: positions
// v0 .. v0 + nq - 1) to acc: lane i gets sum_q lut_r[v0 + q][code q of lane i].
template <int BD, int NR, int NA>
__attribute__((target(MGVQ_AVX512))) inline void tile_column(__m512i codes, int nq, const float* lut,
                                                             int64_t lut_stride, __m512 (*acc)[NA]) {
  for (int q = 0; q < nq; ++q) {
    const __m512i index = q ? _mm512_srli_epi32(codes, BD * q) : codes;  // permutes read the low 4 bits
    for (int r = 0; r < NR; ++r)
      acc[r][q % NA] = _mm512_add_ps(acc[r][q % NA],
                                     _mm512_permutexvar_ps(index, _mm512_loadu_ps(lut + r * lut_stride + q * 16)));
  }
}

// BD-bit codes (2 or 4) of 16 output rows at once (row i's codes start on the byte codes + i * row_bytes),
// with a table per vector position (lut_r[v * 16 + k], rows lut_stride floats apart): after a 16 x 16
// transpose of the code dwords each lane holds one output row, so one permute looks up 16 rows'
// weights-times-activations at a vector position (T-MAC's tables, applied across rows). Half the
// permutes of the nibble kernel per code and no multiply.
// out[r * 16 + i] = sum_{v < count} lut_r[v * 16 + code_{i,v}], r < NR, i < 16.
template <int BD, int NR>
__attribute__((target(MGVQ_AVX512))) void tile_dot_avx512(const uint8_t* codes, int64_t row_bytes, int64_t count,
                                                         const float* lut, int64_t lut_stride, float* out) {
  constexpr int NA = NR == 1 ? 4 : 2;  // independent sums per activation row: add latency
  constexpr int kPerDword = 32 / BD, kBlock = 16 * kPerDword;  // codes per lane, per row and step
  __m512 acc[NR][NA];
  for (int r = 0; r < NR; ++r)
    for (int a = 0; a < NA; ++a) acc[r][a] = _mm512_setzero_ps();
  __m512i z[16];
  int64_t v = 0;
  for (; v + kBlock <= count; v += kBlock) {
    for (int i = 0; i < 16; ++i) z[i] = _mm512_loadu_si512(codes + i * row_bytes + v * BD / 8);
    transpose16_epi32(z);
    for (int c = 0; c < 16; ++c)
      tile_column<BD, NR, NA>(z[c], kPerDword, lut + (v + kPerDword * c) * 16, lut_stride, acc);
  }
  if (v < count) {
    const int64_t rem = count - v;
    const __mmask64 load = byte_mask((int)((rem * BD + 7) / 8));
    for (int i = 0; i < 16; ++i) z[i] = _mm512_maskz_loadu_epi8(load, codes + i * row_bytes + v * BD / 8);
    transpose16_epi32(z);
    for (int c = 0; kPerDword * c < rem; ++c)
      tile_column<BD, NR, NA>(z[c], (int)std::min<int64_t>(kPerDword, rem - kPerDword * c),
                              lut + (v + kPerDword * c) * 16, lut_stride, acc);
  }
  for (int r = 0; r < NR; ++r) {
    __m512 s = acc[r][0];
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[r][a]);
    _mm512_storeu_ps(out + r * 16, s);
  }
}

// acc[r][i] += (codewords of one step's 8 codes, register i) * (their activations) for D / 2 registers.
template <int D, int NR>
__attribute__((target(MGVQ_AVX512))) inline void step_fma_avx512(const float* const* cw, const float* x,
                                                               int64_t x_stride, __m512 (*acc)[D / 2]) {
  __m512 w[D / 2];
  if constexpr (D == 4) {
    for (int h = 0; h < 2; ++h) {
      __m512 q = _mm512_castps128_ps512(_mm_loadu_ps(cw[4 * h]));
      q = _mm512_insertf32x4(q, _mm_loadu_ps(cw[4 * h + 1]), 1);
      q = _mm512_insertf32x4(q, _mm_loadu_ps(cw[4 * h + 2]), 2);
      w[h] = _mm512_insertf32x4(q, _mm_loadu_ps(cw[4 * h + 3]), 3);
    }
  } else {
    w[0] = _mm512_insertf32x8(_mm512_castps256_ps512(four_pairs(cw)), four_pairs(cw + 4), 1);
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < D / 2; ++i)
      acc[r][i] = _mm512_fmadd_ps(w[i], _mm512_loadu_ps(x + r * x_stride + 16 * i), acc[r][i]);
}

// gather_dot_avx2 with 512-bit registers.
template <int D, int B, int NR>
__attribute__((target(MGVQ_AVX512))) void gather_dot_avx512(const uint8_t* codes, const uint8_t* end, uint64_t bit0,
                                                          int bits, int64_t count, const float* book, const float* x,
                                                          int64_t x_stride, float* out) {
  __m512 acc[NR][D / 2];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < D / 2; ++i) acc[r][i] = _mm512_setzero_ps();
  const float* cw[8];
  int64_t v = 0;
  if constexpr (B > 0) {
    const uint8_t* p = codes + (bit0 >> 3);
    const int64_t steps = fixed_steps<B>(p, end, count);
    for (int64_t step = 0; step < steps; ++step, p += B, v += 8) {
      fixed_step_codewords<D, B>(book, p, cw);
      step_fma_avx512<D, NR>(cw, x + v * D, x_stride, acc);
    }
  } else if (bits <= kWindowMaxCodeBits) {
    const int64_t safe = window_safe_count(bit0, bits, count, end - codes);
    for (uint64_t bit = bit0; v + 8 <= count && v + 4 < safe; v += 8, bit += 8 * (uint64_t)bits) {
      step_codewords<D>(book, codes, bit, bits, cw);
      step_fma_avx512<D, NR>(cw, x + v * D, x_stride, acc);
    }
  }
  float tail[NR] = {};
  gather_tail<D, NR>(codes, bit0, bits, v, count, book, x, x_stride, tail);
  for (int r = 0; r < NR; ++r) {
    __m512 s = acc[r][0];
    for (int i = 1; i < D / 2; ++i) s = _mm512_add_ps(s, acc[r][i]);
    out[r] = _mm512_reduce_add_ps(s) + tail[r];
  }
}
#endif

#pragma GCC diagnostic pop

// fns[dim class][codebook class][rows - 1]; dim class indexes kRegisterDims.
struct RegisterDotTable {
  RegisterDotFn fns[3][3][kRegisterMaxRows] = {};
  int64_t class_limit[2] = {0, 0};  // codebook class 0: K <= class_limit[0], 1: K <= class_limit[1], 2: K <= 64
  NibbleDotFn nibble[3][kRegisterMaxRows][2] = {};  // [dim class][rows - 1][output rows - 1]; AVX-512 only
  TileDotFn tile[2][kRegisterMaxRows] = {};          // [code bits / 2 - 1][rows - 1]; AVX-512 only
  BuildTileLutFn build_tile_lut = nullptr;
};

template <template <int, int, int> class Kernel, int D, int KC>
void fill_rows(RegisterDotFn* row_fns) {
  row_fns[0] = Kernel<D, KC, 1>::fn;
  row_fns[1] = Kernel<D, KC, 2>::fn;
  row_fns[2] = Kernel<D, KC, 3>::fn;
  row_fns[3] = Kernel<D, KC, 4>::fn;
}

#ifdef MGVQ_HAVE_X86
template <int D, int KC, int NR>
struct Avx512Dot {
  static constexpr RegisterDotFn fn = register_dot_avx512<D, KC, NR>;
};
template <int D, int KC, int NR>
struct Avx2Dot {
  static constexpr RegisterDotFn fn = register_dot_avx2<D, KC, NR>;
};

template <int D>
void fill_nibble(NibbleDotFn (*fns)[2]) {
  fns[0][0] = nibble_dot_avx512<D, 1, 1>;
  fns[0][1] = nibble_dot_avx512<D, 1, 2>;
  fns[1][0] = nibble_dot_avx512<D, 2, 1>;
  fns[1][1] = nibble_dot_avx512<D, 2, 2>;
  fns[2][0] = nibble_dot_avx512<D, 3, 1>;
  fns[2][1] = nibble_dot_avx512<D, 3, 2>;
  fns[3][0] = nibble_dot_avx512<D, 4, 1>;
  fns[3][1] = nibble_dot_avx512<D, 4, 2>;
}

template <template <int, int, int> class Kernel, int K0, int K1, int K2>
RegisterDotTable make_register_table(int64_t limit0, int64_t limit1) {
  RegisterDotTable table;
  table.class_limit[0] = limit0;
  table.class_limit[1] = limit1;
  fill_rows<Kernel, 1, K0>(table.fns[0][0]);
  fill_rows<Kernel, 1, K1>(table.fns[0][1]);
  fill_rows<Kernel, 1, K2>(table.fns[0][2]);
  fill_rows<Kernel, 2, K0>(table.fns[1][0]);
  fill_rows<Kernel, 2, K1>(table.fns[1][1]);
  fill_rows<Kernel, 2, K2>(table.fns[1][2]);
  fill_rows<Kernel, 4, K0>(table.fns[2][0]);
  fill_rows<Kernel, 4, K1>(table.fns[2][1]);
  fill_rows<Kernel, 4, K2>(table.fns[2][2]);
  return table;
}

RegisterDotTable with_4bit_kernels(RegisterDotTable table) {
  fill_nibble<1>(table.nibble[0]);
  fill_nibble<2>(table.nibble[1]);
  fill_nibble<4>(table.nibble[2]);
  table.tile[0][0] = tile_dot_avx512<2, 1>;
  table.tile[0][1] = tile_dot_avx512<2, 2>;
  table.tile[0][2] = tile_dot_avx512<2, 3>;
  table.tile[0][3] = tile_dot_avx512<2, 4>;
  table.tile[1][0] = tile_dot_avx512<4, 1>;
  table.tile[1][1] = tile_dot_avx512<4, 2>;
  table.tile[1][2] = tile_dot_avx512<4, 3>;
  table.tile[1][3] = tile_dot_avx512<4, 4>;
  table.build_tile_lut = build_tile_lut_avx512;
  return table;
}
#endif

// fns[dim class][rows - 1]; dim class indexes kGatherDims.
struct GatherDotTable {
  GatherDotFn fns[4][kGatherMaxRows] = {};
  // d = 2 and 4 (index d / 4), B-bit codes in rows from a byte: fixed[d / 4][B][rows - 1] (null where absent)
  GatherDotFn fixed[2][kFixedMaxCodeBits + 1][kGatherMaxRows] = {};
  bool vectorised[4] = {};  // by dim class: the default paths take the gather kernels only where vectorised
};

template <int D>
void fill_gather_portable(GatherDotFn* row_fns) {
  row_fns[0] = gather_dot_portable<D, 1>;
  row_fns[1] = gather_dot_portable<D, 2>;
  row_fns[2] = gather_dot_portable<D, 3>;
  row_fns[3] = gather_dot_portable<D, 4>;
}

GatherDotTable portable_gather_table() {
  GatherDotTable table;
  fill_gather_portable<1>(table.fns[0]);
  fill_gather_portable<2>(table.fns[1]);
  fill_gather_portable<4>(table.fns[2]);
  fill_gather_portable<8>(table.fns[3]);
  return table;
}

#ifdef MGVQ_HAVE_X86
template <int D, int B, int NR>
struct Avx2Gather {
  static constexpr GatherDotFn fn = gather_dot_avx2<D, B, NR>;
};
template <int D, int B, int NR>
struct Avx512Gather {
  static constexpr GatherDotFn fn = gather_dot_avx512<D, B, NR>;
};

// Kernel<D, B, NR> for d = D: fns (any width, B = 0) and fixed[D / 4][kFixedMinCodeBits ... kFixedMaxCodeBits].
template <template <int, int, int> class Kernel, int D, int B = kFixedMinCodeBits>
void fill_gather(GatherDotTable& table) {
  if constexpr (B == kFixedMinCodeBits) {
    constexpr int kDimClass = D == 2 ? 1 : 2;  // in kGatherDims
    GatherDotFn* rows = table.fns[kDimClass];
    rows[0] = Kernel<D, 0, 1>::fn;
    rows[1] = Kernel<D, 0, 2>::fn;
    rows[2] = Kernel<D, 0, 3>::fn;
    rows[3] = Kernel<D, 0, 4>::fn;
    table.vectorised[kDimClass] = true;
  }
  GatherDotFn* fixed = table.fixed[D / 4][B];
  fixed[0] = Kernel<D, B, 1>::fn;
  fixed[1] = Kernel<D, B, 2>::fn;
  fixed[2] = Kernel<D, B, 3>::fn;
  fixed[3] = Kernel<D, B, 4>::fn;
  if constexpr (B < kFixedMaxCodeBits) fill_gather<Kernel, D, B + 1>(table);
}

// d = 2 and 4 run vectorised; d = 1 and 8 keep the portable loops.
template <template <int, int, int> class Kernel>
GatherDotTable vectorised_gather_table() {
  GatherDotTable table = portable_gather_table();
  fill_gather<Kernel, 2>(table);
  fill_gather<Kernel, 4>(table);
  return table;
}
#endif

struct HotLoops {
  void (*build_table)(const float*, const float*, int, int, float*);
  float (*lookup)(const float*, const uint16_t*, int, int);
  void (*dot_rows)(const float*, int, const float*, int64_t, float*);
  float (*lookup_u8)(const float*, const uint8_t*, int);
  void (*gemm_tile)(const float*, int, const float*, int64_t, int64_t, float*, int64_t);
  void (*halves_to_floats)(const uint16_t*, size_t, float*);
  RegisterDotTable register_dot;  // empty (no register path) on the portable level
  GatherDotTable gather;
  const char* name;
};

// The best level this CPU runs, or the one MGVQ_VQGEMM_ISA asks for (avx512 | avx2 | portable; tests
// use it to run every level on one machine). A level the CPU lacks is never chosen.
HotLoops select_hot_loops() {
  const char* force_env = std::getenv("MGVQ_VQGEMM_ISA");
  const std::string force = force_env == nullptr ? "auto" : force_env;
#ifdef MGVQ_HAVE_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vbmi");
  if (avx512 && (force == "auto" || force == "avx512"))
    return {build_table_avx2, lookup_avx2, dot_rows_avx2, lookup_u8_avx2, gemm_tile_avx2, halves_to_floats_f16c,
            with_4bit_kernels(make_register_table<Avx512Dot, 1, 2, 4>(16, 32)), vectorised_gather_table<Avx512Gather>(), "avx512"};
  if (avx2 && force != "portable")
    return {build_table_avx2, lookup_avx2, dot_rows_avx2, lookup_u8_avx2, gemm_tile_avx2, halves_to_floats_f16c,
            make_register_table<Avx2Dot, 1, 2, 0>(8, 16), vectorised_gather_table<Avx2Gather>(), "avx2"};
#endif
  return {build_table_portable, lookup_portable, dot_rows_portable, lookup_u8_portable, gemm_tile_portable,
          halves_to_floats_portable, RegisterDotTable{}, portable_gather_table(), "portable"};
}

// ------------------------------------------------------------------------------------------------
// Code unpacking: `count` codes of `bits` bits, LSB-first, starting at bit `bit0` of `data`, which
// holds `avail` bytes.

void unpack_codes(const uint8_t* data, int64_t avail, uint64_t bit0, int bits, int64_t count, uint16_t* out) {
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
  // General case: one 8-byte load per code where it stays within the buffer, the last few byte by byte.
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  const int64_t safe = window_safe_count(bit0, bits, count, avail);
  uint64_t bit = bit0;
  int64_t i = 0;
  for (; i < safe; ++i, bit += bits) out[i] = (uint16_t)((load_u64(data + (bit >> 3)) >> (bit & 7)) & mask);
  for (; i < count; ++i, bit += bits) out[i] = (uint16_t)code_at(data, bit, bits);
}

// dst[v * D ...] = book[codes[v] * D ...] for v < count.
template <int D>
void gather_rows(const float* book, const uint16_t* codes, int64_t count, float* dst) {
  for (int64_t v = 0; v < count; ++v) std::memcpy(dst + v * D, book + (size_t)codes[v] * D, D * sizeof(float));
}

// ------------------------------------------------------------------------------------------------
// The op's layout (attributes), checked once at kernel creation.

struct Group {
  int64_t start, stop, code_bits, K, nvec;
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

// The kernel's view of the (checked) attributes.
Layout make_layout(const mgvq_op::Attributes& a) {
  Layout L;
  L.n = a.n;
  L.m = a.m;
  L.d = a.d;
  L.scale_group = a.scale_group;
  const int64_t d = a.d, scale_group = a.scale_group;
  int64_t vec = 0, row = 0, byte = 0;
  for (size_t g = 0; g < a.code_bits.size(); ++g) {
    Group G;
    G.start = a.bounds[g];
    G.stop = a.bounds[g + 1];
    G.code_bits = a.code_bits[g];
    G.K = a.codebook_size(g);
    G.nvec = a.width(g) / d;
    G.codebook_row = row;
    G.code_byte = byte;
    G.code_nbytes = a.group_code_nbytes(g);
    G.vec_offset = vec;
    row += G.K;
    byte += G.code_nbytes;
    vec += G.nvec;
    L.max_group_nvec = std::max(L.max_group_nvec, G.nvec);
    L.groups.push_back(G);
  }
  L.nvec = vec;
  L.codebook_rows = a.codebook_rows;
  L.code_nbytes = a.code_nbytes;
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

enum class Path { kAuto, kLut, kDecode, kRegister, kGather };

struct VQGemmKernel {
  VQGemmKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api), loops_(select_hot_loops()) {
    attributes_ = mgvq_op::read_attributes(info);
    layout_ = make_layout(attributes_);
    const char* path = std::getenv("MGVQ_VQGEMM_PATH");  // register | gather | lut | decode | auto (tests force a path)
    if (path != nullptr && std::string(path) == "lut") path_ = Path::kLut;
    if (path != nullptr && std::string(path) == "decode") path_ = Path::kDecode;
    if (path != nullptr && std::string(path) == "register") path_ = Path::kRegister;
    if (path != nullptr && std::string(path) == "gather") path_ = Path::kGather;
    const char* piece = std::getenv("MGVQ_VQGEMM_PIECE");  // vector positions per cached table slice
    if (piece != nullptr && std::atoi(piece) > 0) piece_vectors_ = std::min(std::atoi(piece), 4096);
    const char* tile_rows = std::getenv("MGVQ_VQGEMM_TILE_ROWS");  // most activation rows for the tile kernel
    if (tile_rows != nullptr && *tile_rows != 0) tile_row_limit_ = std::atoi(tile_rows);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return mgvq_op::status_of(api_, kLabel, [&] { Compute(context); });
  }

 private:
  // Groups whose codebooks exceed the register kernels' 64 codewords: inside the register path they take
  // the gather kernels, or, for 8-bit codes where those are not vectorised (d = 1), tables of 256 per
  // vector position. (Side by side on SmolLM2's 3-bit layout, whose d = 2 layers mix 4- to 8-bit codes,
  // the gather kernels took 13-16 ms per decode step where the tables took 16-24 ms.)
  bool wide(const Group& G) const {
    return G.code_bits > kRegisterMaxCodeBits && (G.code_bits != kByteCodeBits || gather_vectorised());
  }

  // Index into kRegisterDims, or -1 when the register path cannot take this layout on this CPU.
  int register_dim_class() const {
    const Layout& L = layout_;
    if (L.segments.empty() || loops_.register_dot.fns[0][0][0] == nullptr) return -1;
    for (const Group& G : L.groups)
      if (wide(G) && !gather_vectorised()) return -1;
    for (int i = 0; i < 3; ++i)
      if (kRegisterDims[i] == L.d) return i;
    return -1;
  }

  bool use_register(int64_t rows) const {
    if (path_ == Path::kLut || path_ == Path::kDecode || register_dim_class() < 0) return false;
    if (path_ == Path::kRegister) return true;
    int64_t byte_groups = 0, wide_groups = 0;
    for (const Group& G : layout_.groups) {
      byte_groups += G.code_bits == kByteCodeBits && !wide(G);
      wide_groups += wide(G);
    }
    // Layers of byte codes only are the LUT path's own case.
    if (byte_groups > 0) return byte_groups < (int64_t)layout_.groups.size() && rows <= kByteGroupRowLimit;
    if (wide_groups > 0) return rows <= kGatherRowLimit;
    // The register path re-unpacks the codes for every 4 activation rows; on the 2-core AMD EPYC
    // (4096 x 4096, d = 2) decoding W once and a register-tiled GEMM wins past ~20 rows at 3 bits and
    // ~48 rows at 2 bits.
    return rows <= kRegisterRowLimit;
  }

  // Index into kGatherDims, or -1 when the gather path cannot take this layout.
  int gather_dim_class() const {
    if (layout_.segments.empty()) return -1;  // scale blocks cut vectors: only the decode path handles it
    for (int i = 0; i < 4; ++i)
      if (kGatherDims[i] == layout_.d) return i;
    return -1;
  }

  bool gather_vectorised() const {
    const int dim_class = gather_dim_class();
    return dim_class >= 0 && loops_.gather.vectorised[dim_class];
  }

  // Before the register path: layers whose every group has more than 64 codewords (d = 4 at mgvq's 2-bit
  // widths). Layers that mix such groups with smaller codebooks take the register path.
  bool use_gather(int64_t rows) const {
    if (gather_dim_class() < 0) return false;
    if (path_ == Path::kGather) return true;
    if (path_ != Path::kAuto || !gather_vectorised() || rows > kGatherRowLimit) return false;
    for (const Group& G : layout_.groups)
      if (G.code_bits <= kRegisterMaxCodeBits) return false;
    return true;
  }

  // The gather kernels (by activation rows - 1) for group G's codes of one output row from bit bit0.
  const GatherDotFn* gather_fns(const Group& G, uint64_t bit0) const {
    const int64_t d = layout_.d, bits = G.code_bits;
    if ((d == 2 || d == 4) && bits >= kFixedMinCodeBits && bits <= kFixedMaxCodeBits && (bit0 & 7) == 0 &&
        loops_.gather.fixed[d / 4][bits][0] != nullptr)
      return loops_.gather.fixed[d / 4][bits];
    return loops_.gather.fns[gather_dim_class()];
  }

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
    const mgvq_op::Inputs in = mgvq_op::read_inputs(ctx, attributes_);
    const ONNXTensorElementDataType x_type = in.x_type;
    const std::vector<int64_t>& x_shape = in.x_shape;
    const int64_t rows = in.rows;
    const Ort::ConstValue &x_val = in.x, &cb_val = in.codebooks, &codes_val = in.codes;
    const int32_t* perm = nullptr;
    if (in.perm) {
      perm = in.perm.GetTensorData<int32_t>();
      for (int64_t j = 0; j < L.n; ++j)
        if (perm[j] < 0 || perm[j] >= L.n) throw std::runtime_error("perm has an entry out of range");
    }
    const uint16_t* scales = in.scales ? reinterpret_cast<const uint16_t*>(in.scales.GetTensorRawData()) : nullptr;
    std::vector<float> bias;
    if (in.bias) {
      bias.resize(L.m);
      if (x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        std::memcpy(bias.data(), in.bias.GetTensorData<float>(), L.m * sizeof(float));
      } else {
        auto b16 = reinterpret_cast<const uint16_t*>(in.bias.GetTensorRawData());
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
    if (use_gather(rows)) {
      RunGather(pc, xp.data(), rows, cb16, codes, scales, y);
    } else if (use_register(rows)) {
      RunRegister(pc, xp.data(), rows, cb16, codes, scales, y);
    } else if (use_lut(rows)) {
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

  // The optional float16 scales [m, n / scale_group] as float32 (empty without scales).
  std::vector<float> ScalesAsFloat(const uint16_t* scales) const {
    if (scales == nullptr) return {};
    std::vector<float> out((size_t)layout_.m * (layout_.n / layout_.scale_group));
    for (size_t i = 0; i < out.size(); ++i) out[i] = half_to_float(scales[i]);
    return out;
  }

  // All groups' codebooks as float32: out[(row * d + t)] = component t of codebook row `row`.
  std::vector<float> CodebooksAsFloat(const uint16_t* cb16) const {
    std::vector<float> out((size_t)layout_.codebook_rows * layout_.d);
    loops_.halves_to_floats(cb16, out.size(), out.data());
    return out;
  }

  void RunGather(const ParallelCtx& pc, const float* xp, int64_t rows, const uint16_t* cb16, const uint8_t* codes,
                 const uint16_t* scales, float* y) const {
    const Layout& L = layout_;
    const std::vector<float> book = CodebooksAsFloat(cb16);
    const std::vector<float> scale_f = ScalesAsFloat(scales);
    const bool scaled = !scale_f.empty();  // scale_group_size without scales: nothing to scale
    const uint8_t* codes_end = codes + L.code_nbytes;  // its size was checked in Compute
    constexpr int64_t kOutBlock = 16;  // output rows per task
    const size_t ntasks = (size_t)((L.m + kOutBlock - 1) / kOutBlock);
    parallel_for(pc, ntasks, [&](size_t i) {
      const int64_t o0 = (int64_t)i * kOutBlock, o_end = std::min<int64_t>(L.m, o0 + kOutBlock);
      float part[kGatherMaxRows], sum[kGatherMaxRows];
      for (int64_t o = o0; o < o_end; ++o)
        for (int64_t r0 = 0; r0 < rows; r0 += kGatherMaxRows) {
          const int nr = (int)std::min<int64_t>(kGatherMaxRows, rows - r0);
          std::fill(sum, sum + nr, 0.f);
          for (const Segment& S : L.segments) {
            const Group& G = L.groups[S.group];
            const int64_t local = S.vec_begin - G.vec_offset;
            const uint64_t bit0 = (uint64_t)G.code_byte * 8 + (uint64_t)(o * G.nvec + local) * G.code_bits;
            gather_fns(G, bit0)[nr - 1](codes, codes_end, bit0, (int)G.code_bits, S.count, book.data() + G.codebook_row * L.d,
                        xp + (size_t)r0 * L.n + G.start + local * L.d, L.n, part);
            const float s = scaled && S.scale_col >= 0 ? scale_f[o * (L.n / L.scale_group) + S.scale_col] : 1.f;
            for (int r = 0; r < nr; ++r) sum[r] += s * part[r];
          }
          for (int r = 0; r < nr; ++r) y[(size_t)(r0 + r) * L.m + o] = sum[r];
        }
    });
  }

  // Unpacks output row o's codes of every group into codes_out[vec_offset ...].
  void UnpackRow(const uint8_t* codes, int64_t o, uint16_t* codes_out) const {
    const Layout& L = layout_;
    for (const Group& G : L.groups) {
      const int bd = (int)G.code_bits;
      uint64_t bit0 = (uint64_t)G.code_byte * 8 + (uint64_t)o * G.nvec * bd;
      unpack_codes(codes, L.code_nbytes, bit0, bd, G.nvec, codes_out + G.vec_offset);
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
      cbT[g] = TransposedCodebook(G, cb16);
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
    const std::vector<float> scale_f = ScalesAsFloat(scales);
    const bool scaled = !scale_f.empty();  // scale_group_size without scales: nothing to scale
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
          const int bd = (int)G.code_bits;
          for (int64_t p0 = S.vec_begin; p0 < S.vec_begin + S.count; p0 += piece_vectors_) {
            const int count = (int)std::min<int64_t>(piece_vectors_, S.vec_begin + S.count - p0);
            const int64_t local = p0 - G.vec_offset;
            for (int64_t k = 0; k < no; ++k) {
              const int64_t o = o0 + k;
              const float s =
                  scaled && S.scale_col >= 0 ? scale_f[(size_t)o * (L.n / L.scale_group) + S.scale_col] : 1.f;
              if (bd == 8) {  // byte codes: looked up straight from the packed stream
                const uint8_t* row = codes + G.code_byte + o * G.nvec + local;
                for (int64_t r = 0; r < nr; ++r) {
                  const float* table = tables.data() + (size_t)r * table_floats + table_off[S.group] + (size_t)local * G.K;
                  acc[(size_t)r * no + k] += s * loops_.lookup_u8(table, row, count);
                }
                continue;
              }
              unpack_codes(codes, L.code_nbytes, (uint64_t)G.code_byte * 8 + ((uint64_t)o * G.nvec + local) * bd, bd, count,
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

  void RunRegister(const ParallelCtx& pc, const float* xp, int64_t rows, const uint16_t* cb16, const uint8_t* codes,
                   const uint16_t* scales, float* y) const {
    const Layout& L = layout_;
    const int64_t d = L.d;
    const int dim_class = register_dim_class();
    const RegisterDotTable& R = loops_.register_dot;
    // Per group: d tables of 64 floats (table[t * 64 + k] = component t of codeword k, zero past K),
    // the kernel, and where its activations go.
    struct GroupPlan {
      const RegisterDotFn* fns = nullptr;  // [rows - 1], bit-packed codes
      bool nibble = false;                 // 4-bit codes in byte-aligned rows: the nibble kernel
      bool tile = false;                   // ... and few activation rows: the tile kernel (16 output rows)
      bool bytes = false;                  // 8-bit codes: per-position tables of 256, at byte_offset
      bool gather = false;                 // wider codes: the gather kernels, on float32 codebooks
      static_assert(kRegisterMaxRows <= kGatherMaxRows, "the gather kernels take the register path's row blocks");
      int64_t comp_stride = 0, x_offset = 0, byte_offset = 0;
    };
    std::vector<float> tables(L.groups.size() * d * kRegisterTableStride, 0.f);
    std::vector<GroupPlan> plan(L.groups.size());
    int64_t row_stride = 0, byte_stride = 0;
    for (size_t g = 0; g < L.groups.size(); ++g) {
      const Group& G = L.groups[g];
      GroupPlan& P = plan[g];
      if (wide(G)) {
        P.gather = true;
        continue;
      }
      if (G.code_bits == kByteCodeBits) {
        P.bytes = true;
        P.byte_offset = byte_stride;
        byte_stride += G.nvec * G.K;
        continue;
      }
      for (int64_t k = 0; k < G.K; ++k)
        for (int64_t t = 0; t < d; ++t)
          tables[(g * d + t) * kRegisterTableStride + k] = half_to_float(cb16[(size_t)(G.codebook_row + k) * d + t]);
      P.fns = R.fns[dim_class][G.K <= R.class_limit[0] ? 0 : G.K <= R.class_limit[1] ? 1 : 2];
      P.nibble = R.nibble[dim_class][0][0] != nullptr && G.code_bits == 4 && G.nvec % 2 == 0;
      for (const Segment& S : L.segments)
        if (S.group == (int)g && (S.vec_begin - G.vec_offset) % kNibbleBlock) P.nibble = false;
      const int64_t bd = G.code_bits;
      P.tile = R.build_tile_lut != nullptr && (bd == 2 || bd == 4) && G.nvec * bd % 8 == 0 && rows <= tile_row_limit_;
      for (const Segment& S : L.segments)
        if (S.group == (int)g && (S.vec_begin - G.vec_offset) * bd % 8) P.tile = false;  // rows start on a byte
      P.comp_stride = P.nibble ? (G.nvec + kNibbleBlock - 1) / kNibbleBlock * kNibbleBlock : G.nvec;
      P.x_offset = row_stride;
      row_stride += d * P.comp_stride;
    }
    // Activations by group and component: x[t * comp_stride + v] = xp[G.start + v * d + t], the nibble
    // groups' positions reordered within blocks of 32 (evens, then odds) and zero-padded to whole blocks.
    std::vector<float> xs((size_t)rows * row_stride, 0.f);
    for (int64_t r = 0; r < rows; ++r)
      for (size_t g = 0; g < L.groups.size(); ++g) {
        const Group& G = L.groups[g];
        const GroupPlan& P = plan[g];
        if (P.bytes || P.gather) continue;
        const float* src = xp + (size_t)r * L.n + G.start;
        float* dst = xs.data() + (size_t)r * row_stride + P.x_offset;
        for (int64_t v = 0; v < G.nvec; ++v) {
          const int64_t at = P.nibble ? v / kNibbleBlock * kNibbleBlock + (v % 2) * 16 + (v % kNibbleBlock) / 2 : v;
          for (int64_t t = 0; t < d; ++t) dst[t * P.comp_stride + at] = src[v * d + t];
        }
      }
    // The tile groups' per-position tables: lut[(r * nvec + v) * 16 + k] = <x_r(v), codeword k>.
    std::vector<float> lut;
    for (size_t g = 0; g < L.groups.size(); ++g) {
      const Group& G = L.groups[g];
      if (!plan[g].tile) continue;
      if (lut.empty()) lut.resize((size_t)rows * L.nvec * 16);
      for (int64_t r = 0; r < rows; ++r)
        R.build_tile_lut(xp + (size_t)r * L.n + G.start, (int)d, (int)G.K, G.nvec,
                         tables.data() + g * d * kRegisterTableStride,
                         lut.data() + ((size_t)r * L.nvec + G.vec_offset) * 16);
    }
    // The byte groups' per-position tables: byte_lut[r * byte_stride + byte_offset + v * 256 + k].
    std::vector<float> byte_lut((size_t)rows * byte_stride);
    for (size_t g = 0; g < L.groups.size(); ++g)
      if (plan[g].bytes)
        BuildGroupTables(L.groups[g], xp, rows, cb16, byte_lut.data() + plan[g].byte_offset, byte_stride);
    bool any_gather = false;
    for (const GroupPlan& P : plan) any_gather |= P.gather;
    const std::vector<float> book = any_gather ? CodebooksAsFloat(cb16) : std::vector<float>();
    const std::vector<float> scale_f = ScalesAsFloat(scales);
    const bool scaled = !scale_f.empty();  // scale_group_size without scales: nothing to scale
    const uint8_t* codes_end = codes + L.code_nbytes;  // its size was checked in Compute
    constexpr int64_t kOutBlock = kTileRows;  // output rows per task (even: the nibble kernel takes them in pairs)
    const size_t ntasks = (size_t)((L.m + kOutBlock - 1) / kOutBlock);
    parallel_for(pc, ntasks, [&](size_t i) {
      const int64_t o0 = (int64_t)i * kOutBlock, o_end = std::min<int64_t>(L.m, o0 + kOutBlock);
      const bool whole_tile = o_end - o0 == kTileRows;
      float part[kTileRows * kRegisterMaxRows], sum[kTileRows * kRegisterMaxRows];  // [output row][activation row]
      for (int64_t r0 = 0; r0 < rows; r0 += kRegisterMaxRows) {
        const int nr = (int)std::min<int64_t>(kRegisterMaxRows, rows - r0);
        std::fill(sum, sum + kTileRows * kRegisterMaxRows, 0.f);
        for (const Segment& S : L.segments) {
          const Group& G = L.groups[S.group];
          const GroupPlan& P = plan[S.group];
          const int64_t bd = G.code_bits, local = S.vec_begin - G.vec_offset;
          const float* table = tables.data() + (size_t)S.group * d * kRegisterTableStride;
          const float* x = xs.data() + (size_t)r0 * row_stride + P.x_offset + local;
          auto bit_of = [&](int64_t out_row) {
            return (uint64_t)G.code_byte * 8 + (uint64_t)(out_row * G.nvec + local) * bd;
          };
          auto add_part = [&](int64_t o, int k, float value, int r) {
            const float s = scaled && S.scale_col >= 0 ? scale_f[(o + k) * (L.n / L.scale_group) + S.scale_col] : 1.f;
            sum[(o + k - o0) * nr + r] += s * value;
          };
          if (P.gather) {
            for (int64_t o = o0; o < o_end; ++o) {
              gather_fns(G, bit_of(o))[nr - 1](codes, codes_end, bit_of(o), (int)bd, S.count,
                                               book.data() + G.codebook_row * d,
                                               xp + (size_t)r0 * L.n + G.start + local * d, L.n, part);
              for (int r = 0; r < nr; ++r) add_part(o, 0, part[r], r);
            }
            continue;
          }
          if (P.bytes) {
            for (int64_t o = o0; o < o_end; ++o)
              for (int r = 0; r < nr; ++r) {
                const float* tables_r = byte_lut.data() + (size_t)(r0 + r) * byte_stride + P.byte_offset + local * G.K;
                add_part(o, 0, loops_.lookup_u8(tables_r, codes + (bit_of(o) >> 3), (int)S.count), r);
              }
            continue;
          }
          if (P.tile && whole_tile) {
            const float* lut_r0 = lut.data() + ((size_t)r0 * L.nvec + S.vec_begin) * 16;
            R.tile[bd / 2 - 1][nr - 1](codes + (bit_of(o0) >> 3), G.nvec * bd / 8, S.count, lut_r0, L.nvec * 16, part);
            for (int k = 0; k < kTileRows; ++k)
              for (int r = 0; r < nr; ++r) add_part(o0, k, part[r * kTileRows + k], r);
            continue;
          }
          for (int64_t o = o0; o < o_end; o += 2) {
            const int no = (int)std::min<int64_t>(2, o_end - o);
            if (P.nibble) {
              const uint8_t* rows_codes[2] = {codes + (bit_of(o) >> 3), codes + (bit_of(o + no - 1) >> 3)};
              R.nibble[dim_class][nr - 1][no - 1](rows_codes, S.count, table, x, P.comp_stride, row_stride, part);
            } else {
              for (int k = 0; k < no; ++k)
                P.fns[nr - 1](codes, codes_end, bit_of(o + k), (int)bd, S.count, table, x, P.comp_stride, row_stride,
                              part + k * nr);
            }
            for (int k = 0; k < no; ++k)
              for (int r = 0; r < nr; ++r) add_part(o, k, part[k * nr + r], r);
          }
        }
        for (int64_t o = o0; o < o_end; ++o)
          for (int r = 0; r < nr; ++r) y[(size_t)(r0 + r) * L.m + o] = sum[(o - o0) * nr + r];
      }
    });
  }

  // The group's codebook as float32, transposed: cbT[t * K + k] = component t of codeword k.
  std::vector<float> TransposedCodebook(const Group& G, const uint16_t* cb16) const {
    const int64_t d = layout_.d;
    std::vector<float> book((size_t)G.K * d), cbT((size_t)G.K * d);
    loops_.halves_to_floats(cb16 + (size_t)G.codebook_row * d, book.size(), book.data());
    for (int64_t k = 0; k < G.K; ++k)
      for (int64_t t = 0; t < d; ++t) cbT[(size_t)t * G.K + k] = book[(size_t)k * d + t];
    return cbT;
  }

  // out[r * row_stride + v * K + k] = <x_r(v), codeword k of G> for the group's vector positions v and
  // activation rows r < rows.
  void BuildGroupTables(const Group& G, const float* xp, int64_t rows, const uint16_t* cb16, float* out,
                        int64_t row_stride) const {
    const int64_t d = layout_.d;
    const std::vector<float> cbT = TransposedCodebook(G, cb16);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t v = 0; v < G.nvec; ++v)
        loops_.build_table(xp + (size_t)r * layout_.n + G.start + v * d, cbT.data(), (int)G.K, (int)d,
                           out + (size_t)r * row_stride + v * G.K);
  }

  void RunDecode(const ParallelCtx& pc, const float* xp, int64_t rows, const uint16_t* cb16, const uint8_t* codes,
                 const uint16_t* scales, float* y) const {
    const Layout& L = layout_;
    const int64_t d = L.d;
    const std::vector<float> cb = CodebooksAsFloat(cb16);
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
  int64_t tile_row_limit_ = kTileRowLimit;
  mgvq_op::Attributes attributes_;
};

using VQGemmOp = mgvq_op::Op<VQGemmKernel>;

VQGemmOp& op_float() {
  static VQGemmOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "CPUExecutionProvider", kLabel);
  return op;
}

VQGemmOp& op_float16() {
  static VQGemmOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, "CPUExecutionProvider", kLabel);
  return op;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) const char* MgvqVQGemmIsa() { return select_hot_loops().name; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return mgvq_op::too_old_runtime(api_base);
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(mgvq_op::kDomain, &domain)) return status;
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
