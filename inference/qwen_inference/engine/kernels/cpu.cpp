// CPU kernels of qwen-serve's engine, for what torch does slowly on CPUs: matmuls of a few rows (decode steps)
// against bfloat16, int8 or int4 weights, decode attention over the paged KV cache, and a decode layer's small
// operators fused. A decode step reads every weight once and is bound by memory bandwidth; these kernels stream
// each weight row once for all the step's rows, with AVX512-BF16 dot products where the CPU has them and AVX512F
// (bf16 widened by a shift) where it does not, and AVX512-VNNI for int8 and int4. Without AVX512-BF16 the bf16
// matmul also takes every larger step (prompt chunks), in register tiles, as torch has no fast bf16 GEMM there.
// The bias and the output's rounding happen in the same pass, so a projection is one operator. Threads come from
// ATen's pool: the library is compiled with OpenMP, without which ATen's parallel_for runs on the calling thread
// alone.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float v) {  // round to nearest even, as torch rounds
  uint32_t u;
  memcpy(&u, &v, 4);
  return (u & 0x7fffffff) > 0x7f800000 ? 0x7fc0 : uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

constexpr int MR = 4;  // activation rows per pass over a weight row (which stays in L1 between passes)
// the fewest weight rows a thread takes of a matmul: a 896-row projection is 14 slices, so that every core of a
// many-core CPU streams (or multiplies) part of it, where slices of 256 rows left all but four idle
constexpr int64_t GRAIN_ROWS = 64;

// The most the kernels use, as ONEDNN_MAX_CPU_ISA caps oneDNN (set_max_isa, from QWEN_MAX_CPU_ISA): 2 all the CPU
// has, 1 AVX512-VNNI without AVX512-BF16 (Cascade Lake, Ice Lake), 0 AVX512F, BW and VL alone (Skylake-SP), -1 AVX2
// and FMA (Zen 2 and 3, Haswell), where the matmuls alone run (linear_bf16, linear_int8, linear_int4)
std::atomic<int> max_isa{2};
inline bool has_avx512_bf16() { return max_isa.load() >= 2 && __builtin_cpu_supports("avx512bf16"); }
inline bool has_avx512_vnni() {
  return max_isa.load() >= 1 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
}
inline bool has_avx512f() {
  return max_isa.load() >= 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
inline bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen(__m256i v) {  // 16 bf16 -> 16 fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// the lane sums of a[0..15], in order, as one vector
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 sums16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; i++)  // per 128-bit lane: x0+x2, y0+y2, x1+x3, y1+y3
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++)  // per 128-bit lane: the lane's sums of a[4i..4i+3]
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// exp of 16 floats (Cephes' expf: a degree-7 polynomial after reduction by ln 2; within 1 ulp of the true value, as
// torch's vectorized exp is), so that SiLU over thousands of channels does not cost a scalar call each
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.72283935546875f)), _mm512_set1_ps(-103.972084045410f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// p[i] = silu(p[i]) = p[i] / (1 + exp(-p[i])), i < n
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void silu_inplace(float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(m, p + i);
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    _mm512_mask_storeu_ps(p + i, m, _mm512_div_ps(x, d));
  }
}

// Weight rows n0..n1 one after another, each read from memory once: a sequential stream, as a decode step's
// matmul is bound by memory bandwidth. Two accumulators per activation row hide the dot products' latency.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16,avx512vl")))
void rows_bf16_dp(const uint16_t* x, const uint16_t* w, float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1,
                  int64_t base) {
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* wr = w + n * K;
    __m512 a0[R], a1[R];
    for (int j = 0; j < R; j++) a0[j] = a1[j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
      for (int j = 0; j < R; j++) {
        a0[j] = _mm512_dpbf16_ps(a0[j], w0, (__m512bh)_mm512_loadu_si512(x + j * K + k));
        a1[j] = _mm512_dpbf16_ps(a1[j], w1, (__m512bh)_mm512_loadu_si512(x + j * K + k + 32));
      }
    }
    for (; k < K; k += 32) {
      const __mmask32 m = K - k >= 32 ? 0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
      const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, wr + k);
      for (int j = 0; j < R; j++)
        a0[j] = _mm512_dpbf16_ps(a0[j], w0, (__m512bh)_mm512_maskz_loadu_epi16(m, x + j * K + k));
    }
    for (int j = 0; j < R; j++) out[j * ldo + n - base] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
  }
}

// Without AVX512-BF16 the weights are widened in registers: a load of B bf16 values (B = 32 with AVX512F, 16 with
// AVX2) is B / 2 32-bit words, each two bf16 values of which the upper is already its float32 (the lower half
// masked off) and the lower becomes one by a shift; so one load, a shift and an and give two vectors of floats, the
// block's even values and its odd ones, with no shuffle (Intel's 512-bit shuffles share a port with FMAs). The
// activations were widened once per call into that order (`permuted`: each block of B values as its even values,
// then its odd ones; a tail shorter than B left in order), so each weight vector costs a load and two integer ops.
inline void permuted(const uint16_t* x, float* out, int64_t K, int64_t B) {
  const int64_t full = K / B * B;
  for (int64_t k = 0; k < full; k += B)
    for (int64_t i = 0; i < B / 2; i++) {
      out[k + i] = bf16_to_float(x[k + 2 * i]);
      out[k + B / 2 + i] = bf16_to_float(x[k + 2 * i + 1]);
    }
  for (int64_t k = full; k < K; k++) out[k] = bf16_to_float(x[k]);
}

constexpr uint32_t ODD = 0xFFFF0000u;  // the upper bf16 value of a 32-bit word, in place: a float32

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void rows_bf16_f(const float* x, const uint16_t* w, float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1,
                 int64_t base) {
  const __m512i odd = _mm512_set1_epi32(ODD);
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* wr = w + n * K;
    __m512 a0[R], a1[R];
    for (int j = 0; j < R; j++) a0[j] = a1[j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512i wv = _mm512_loadu_si512(wr + k);
      const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
      const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(wv, odd));
      for (int j = 0; j < R; j++) {
        a0[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j * K + k), a0[j]);
        a1[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j * K + k + 16), a1[j]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
      const __m512 w0 = widen(_mm256_maskz_loadu_epi16(m, wr + k));
      for (int j = 0; j < R; j++) a0[j] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + j * K + k), a0[j]);
    }
    for (int j = 0; j < R; j++) out[j * ldo + n - base] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
  }
}

__attribute__((target("avx2,fma")))
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R>
__attribute__((target("avx2,fma")))
void rows_bf16_avx2(const float* x, const uint16_t* w, float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1,
                    int64_t base) {
  const __m256i odd = _mm256_set1_epi32(ODD);
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* wr = w + n * K;
    __m256 a0[R], a1[R];
    for (int j = 0; j < R; j++) a0[j] = a1[j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + k));
      const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(wv, odd));
      for (int j = 0; j < R; j++) {
        a0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * K + k), a0[j]);
        a1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j * K + k + 8), a1[j]);
      }
    }
    float tail[R] = {};
    for (; k < K; k++)
      for (int j = 0; j < R; j++) tail[j] += bf16_to_float(wr[k]) * x[j * K + k];
    for (int j = 0; j < R; j++) out[j * ldo + n - base] = hsum8(_mm256_add_ps(a0[j], a1[j])) + tail[j];
  }
}

// Where a kernel's float sums go: the bias added and rounded to bfloat16 (round to nearest even, as torch rounds),
// or kept in float32.
struct Out {
  float* f32;          // [M, N] or null
  uint16_t* bf16;      // [M, N] or null
  const uint16_t* bias_bf16;  // [N] or null
  const float* bias_f32;      // [N] or null
  int64_t N;
  inline void store(int64_t m, int64_t n, float v) const {
    if (bias_bf16) v += bf16_to_float(bias_bf16[n]);
    else if (bias_f32) v += bias_f32[n];
    if (f32) f32[m * N + n] = v;
    else bf16[m * N + n] = float_to_bf16(v);
  }
};

// All M activation rows against weight rows n0..n1: groups of up to MR rows per pass; a pass over a block of
// weight rows small enough for L1 serves every group before the next block is read.
enum class Isa { avx2, avx512f, avx512_bf16 };

// the activations as each instruction set reads them: bf16 for AVX512-BF16's dot products, float32 otherwise
template <Isa I>
using Act = std::conditional_t<I == Isa::avx512_bf16, uint16_t, float>;

template <Isa I, int R>
inline void rows_bf16(const Act<I>* x, const uint16_t* w, float* out, int64_t K, int64_t ldo, int64_t n0,
                      int64_t n1, int64_t base) {
  if constexpr (I == Isa::avx512_bf16) rows_bf16_dp<R>(x, w, out, K, ldo, n0, n1, base);
  else if constexpr (I == Isa::avx512f) rows_bf16_f<R>(x, w, out, K, ldo, n0, n1, base);
  else rows_bf16_avx2<R>(x, w, out, K, ldo, n0, n1, base);
}

template <Isa I>
void block_rows(const Act<I>* x, const uint16_t* w, const Out& out, int64_t M, int64_t K, int64_t n0, int64_t n1) {
  const int64_t block = std::max<int64_t>(1, 16384 / (2 * K));  // weight rows per L1 block
  float tmp[MR * 64];
  const int64_t rows = std::min<int64_t>(block, 64);
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    const int64_t b1 = std::min(n1, b0 + rows);
    for (int64_t m = 0; m < M; m += MR) {
      const Act<I>* xr = x + m * K;
      const int64_t r = std::min<int64_t>(MR, M - m);
      float* o = tmp;  // o[j * 64 + (n - b0)]
      switch (r) {
        case 1: rows_bf16<I, 1>(xr, w, o, K, 64, b0, b1, b0); break;
        case 2: rows_bf16<I, 2>(xr, w, o, K, 64, b0, b1, b0); break;
        case 3: rows_bf16<I, 3>(xr, w, o, K, 64, b0, b1, b0); break;
        default: rows_bf16<I, 4>(xr, w, o, K, 64, b0, b1, b0);
      }
      for (int64_t j = 0; j < r; j++)
        for (int64_t n = b0; n < b1; n++) out.store(m + j, n, tmp[j * 64 + (n - b0)]);
    }
  }
}

// int8: activation rows quantized per row to int8 (scale max|x| / 127) and stored offset by 128 as unsigned bytes,
// so that AVX512-VNNI's unsigned-by-signed dot products apply; the weight row's sum, times 128, takes the offset
// back out. The integer sums are exact, so the result is what int8 products of the same quantized values give.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void rows_int8(const uint8_t* xu, int64_t ldx, const int8_t* w, const int32_t* rowsum, const float* sx,
               const float* scale, const Out& out, int64_t m0, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* wr = w + n * K;
    __m512i a0[R], a1[R];
    for (int j = 0; j < R; j++) a0[j] = a1[j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
      const __m512i w0 = _mm512_loadu_si512(wr + k);
      const __m512i w1 = _mm512_loadu_si512(wr + k + 64);
      for (int j = 0; j < R; j++) {
        a0[j] = _mm512_dpbusd_epi32(a0[j], _mm512_loadu_si512(xu + j * ldx + k), w0);
        a1[j] = _mm512_dpbusd_epi32(a1[j], _mm512_loadu_si512(xu + j * ldx + k + 64), w1);
      }
    }
    for (; k < K; k += 64) {
      const __mmask64 m = K - k >= 64 ? ~0ull : ((1ull << (K - k)) - 1);
      const __m512i w0 = _mm512_maskz_loadu_epi8(m, wr + k);  // zero weights past K: the products vanish
      for (int j = 0; j < R; j++) a0[j] = _mm512_dpbusd_epi32(a0[j], _mm512_maskz_loadu_epi8(m, xu + j * ldx + k), w0);
    }
    for (int j = 0; j < R; j++) {
      const int32_t acc = _mm512_reduce_add_epi32(_mm512_add_epi32(a0[j], a1[j])) - 128 * rowsum[n];
      out.store(m0 + j, n, float(acc) * sx[j] * scale[n]);
    }
  }
}

// The same on AVX2, where there is no unsigned-by-signed dot product into 32 bits: vpmaddubsw multiplies unsigned by
// signed bytes into 16-bit pair sums, which saturate unless both factors stay within 127 in size, so the activations
// are signed (no offset) and each weight's sign moves onto its activation (|w| by x·sign(w), as llama.cpp does): a
// pair sums to at most 2 · 128 · 127, the sums stay exact, and so does the result.
__attribute__((target("avx2,fma")))
inline int32_t hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int R>
__attribute__((target("avx2,fma")))
void rows_int8_avx2(const int8_t* xs, int64_t ldx, const int8_t* w, const float* sx, const float* scale,
                    const Out& out, int64_t m0, int64_t K, int64_t n0, int64_t n1) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* wr = w + n * K;
    __m256i a[R];
    for (int j = 0; j < R; j++) a[j] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + k));
      const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| (as unsigned bytes)
      for (int j = 0; j < R; j++) {
        const __m256i xw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(xs + j * ldx + k)), wv);
        a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xw), ones));
      }
    }
    int32_t tail[R] = {};
    for (; k < K; k++)
      for (int j = 0; j < R; j++) tail[j] += int32_t(wr[k]) * int32_t(xs[j * ldx + k]);
    for (int j = 0; j < R; j++) {
      const int32_t acc = hsum8_epi32(a[j]) + tail[j];
      out.store(m0 + j, n, float(acc) * sx[j] * scale[n]);
    }
  }
}

// Each 32-bit lane's four unsigned-by-signed byte products added to it: AVX512-VNNI's vpdpbusd or, without VNNI
// (Skylake-SP), vpmaddubsw and vpmaddwd, the same sums while no pair of products passes 32767 in size (int4's
// nibbles against int8 activations: at most 2 · 15 · 127). vpdpbusd is written as assembly so that one function
// serves both: its intrinsic would need the VNNI target for the whole function, which lets the compiler use VNNI
// instructions anywhere in it.
template <bool VNNI>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512i dot4(__m512i acc, __m512i u, __m512i s) {
  if constexpr (VNNI) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
    return acc;
  } else {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
  }
}

// int4: weights in blocks of 16 rows; each 64-byte word holds, for 8 consecutive inputs k..k+7 of the block's 16
// rows, one 32-bit lane per row whose 4 bytes carry q[k+j] in their low nibble and q[k+4+j] in their high one, so
// one load and a mask or a shift give two operands of an unsigned-by-signed dot product (16 rows by 4 inputs each,
// `dot4`). Each group of 32 inputs has a scale and a minimum per row (w = q * scale + min): the group's integer sums
// are scaled, and the minimum meets the sum of the group's quantized activations.
template <int R, bool VNNI>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void blocks_int4(const int8_t* xq, int64_t ldx, const int32_t* xsum, const float* sx, const uint8_t* w,
                 const uint16_t* sm, const Out& out, int64_t m0, int64_t K, int64_t b0, int64_t b1) {
  const int64_t G = K / 32;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  for (int64_t b = b0; b < b1; b++) {
    const uint8_t* wb = w + b * (K / 8) * 64;
    const uint16_t* sb = sm + b * G * 32;
    __m512 y[R];
    for (int j = 0; j < R; j++) y[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
      __m512i acc[R];
      for (int j = 0; j < R; j++) acc[j] = _mm512_setzero_si512();
      for (int o = 0; o < 4; o++) {
        const __m512i v = _mm512_loadu_si512(wb + (g * 4 + o) * 64);
        const __m512i lo = _mm512_and_si512(v, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        const int64_t k = g * 32 + o * 8;
        for (int j = 0; j < R; j++) {
          int32_t x0, x1;
          memcpy(&x0, xq + j * ldx + k, 4);
          memcpy(&x1, xq + j * ldx + k + 4, 4);
          acc[j] = dot4<VNNI>(acc[j], lo, _mm512_set1_epi32(x0));
          acc[j] = dot4<VNNI>(acc[j], hi, _mm512_set1_epi32(x1));
        }
      }
      const __m512i smv = _mm512_loadu_si512(sb + g * 32);  // 16 scales, then 16 minimums, bf16
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm512_castsi512_si256(smv)), 16));
      const __m512 mn = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(smv, 1)), 16));
      for (int j = 0; j < R; j++) {
        y[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), scale, y[j]);
        y[j] = _mm512_fmadd_ps(_mm512_set1_ps(float(xsum[j * G + g])), mn, y[j]);
      }
    }
    for (int j = 0; j < R; j++) {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, _mm512_mul_ps(y[j], _mm512_set1_ps(sx[j])));
      for (int r = 0; r < 16; r++) out.store(m0 + j, b * 16 + r, tmp[r]);
    }
  }
}

// The same on AVX2 (Zen 2 and 3), a 64-byte word as two halves of 8 rows each: vpmaddubsw and vpmaddwd give VNNI's
// sums, and the float steps are the same operations in the same order per row, so the results are AVX512's, bit for
// bit. Two activation rows per pass, as 16 vector registers hold them.
__attribute__((target("avx2,fma")))
inline __m256 widen8(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

template <int R>
__attribute__((target("avx2,fma")))
void blocks_int4_avx2(const int8_t* xq, int64_t ldx, const int32_t* xsum, const float* sx, const uint8_t* w,
                      const uint16_t* sm, const Out& out, int64_t m0, int64_t K, int64_t b0, int64_t b1) {
  const int64_t G = K / 32;
  const __m256i nib = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int64_t b = b0; b < b1; b++) {
    const uint8_t* wb = w + b * (K / 8) * 64;
    const uint16_t* sb = sm + b * G * 32;
    __m256 y[R][2];
    for (int j = 0; j < R; j++) y[j][0] = y[j][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
      __m256i acc[R][2];
      for (int j = 0; j < R; j++) acc[j][0] = acc[j][1] = _mm256_setzero_si256();
      for (int o = 0; o < 4; o++) {
        const int64_t k = g * 32 + o * 8;
        for (int h = 0; h < 2; h++) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + (g * 4 + o) * 64 + h * 32));
          const __m256i lo = _mm256_and_si256(v, nib);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
          for (int j = 0; j < R; j++) {
            int32_t x0, x1;
            memcpy(&x0, xq + j * ldx + k, 4);
            memcpy(&x1, xq + j * ldx + k + 4, 4);
            acc[j][h] = _mm256_add_epi32(acc[j][h], _mm256_madd_epi16(
                _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)), ones));
            acc[j][h] = _mm256_add_epi32(acc[j][h], _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)), ones));
          }
        }
      }
      for (int h = 0; h < 2; h++) {
        const __m256 scale = widen8(sb + g * 32 + h * 8), mn = widen8(sb + g * 32 + 16 + h * 8);
        for (int j = 0; j < R; j++) {
          y[j][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j][h]), scale, y[j][h]);
          y[j][h] = _mm256_fmadd_ps(_mm256_set1_ps(float(xsum[j * G + g])), mn, y[j][h]);
        }
      }
    }
    for (int j = 0; j < R; j++)
      for (int h = 0; h < 2; h++) {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, _mm256_mul_ps(y[j][h], _mm256_set1_ps(sx[j])));
        for (int r = 0; r < 8; r++) out.store(m0 + j, b * 16 + h * 8 + r, tmp[r]);
      }
  }
}

// The int4 block layout back to bfloat16 weights [N, K]: a prompt chunk's rows then run one bf16 GEMM (oneDNN)
// instead of reusing the GEMV once per four rows. Per block of 16 rows and group of 32 inputs, the group's four
// words are transposed so that each row's four 32-bit lanes sit together, unpacked in input order, scaled and
// offset, and stored as 32 bf16 values of that row.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void dequant_int4_blocks(const uint8_t* w, const uint16_t* sm, uint16_t* out, int64_t K, int64_t b0, int64_t b1) {
  const int64_t G = K / 32;
  const __m128i nib = _mm_set1_epi8(0x0f);
  for (int64_t b = b0; b < b1; b++) {
    for (int64_t g = 0; g < G; g++) {
      const uint8_t* wg = w + (b * (K / 8) + g * 4) * 64;
      const __m512i w0 = _mm512_loadu_si512(wg), w1 = _mm512_loadu_si512(wg + 64);
      const __m512i w2 = _mm512_loadu_si512(wg + 128), w3 = _mm512_loadu_si512(wg + 192);
      // 4 x 4 transposes of 32-bit lanes inside each 128-bit lane: t[c] lane l holds rows 4l + c's four words
      const __m512i a0 = _mm512_unpacklo_epi32(w0, w1), a1 = _mm512_unpackhi_epi32(w0, w1);
      const __m512i a2 = _mm512_unpacklo_epi32(w2, w3), a3 = _mm512_unpackhi_epi32(w2, w3);
      __m512i t[4] = {_mm512_unpacklo_epi64(a0, a2), _mm512_unpackhi_epi64(a0, a2), _mm512_unpacklo_epi64(a1, a3),
                      _mm512_unpackhi_epi64(a1, a3)};
      const uint16_t* sg = sm + (b * G + g) * 32;
      for (int l = 0; l < 4; l++) {
        for (int c = 0; c < 4; c++) {
          const int r = 4 * l + c;
          __m128i v;
          switch (l) {
            case 0: v = _mm512_extracti32x4_epi32(t[c], 0); break;
            case 1: v = _mm512_extracti32x4_epi32(t[c], 1); break;
            case 2: v = _mm512_extracti32x4_epi32(t[c], 2); break;
            default: v = _mm512_extracti32x4_epi32(t[c], 3);
          }
          const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
          // word o's low nibbles are inputs 8o..8o+3, its high ones 8o+4..8o+7
          const __m128i q0 = _mm_unpacklo_epi32(lo, hi), q1 = _mm_unpackhi_epi32(lo, hi);
          const __m512 scale = _mm512_set1_ps(bf16_to_float(sg[r])), mn = _mm512_set1_ps(bf16_to_float(sg[16 + r]));
          const __m512 f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q0)), scale, mn);
          const __m512 f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q1)), scale, mn);
          _mm512_storeu_si512(out + (b * 16 + r) * K + g * 32, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
        }
      }
    }
  }
}

}  // namespace

// Steps of many rows without AVX512-BF16 (prompt chunks, many sequences' decode rows) are bound by arithmetic, not
// by the weights' bytes: a tile of RM activation rows by RN weight rows keeps its RM·RN dot products in registers
// (as llama.cpp's tinyBLAS does), so each block of k's loads (RM activation vectors, RN weight vectors widened as
// above) feed 2·RM·RN FMAs, where a pass of block_rows loads an activation vector for every FMA. A block of weight
// rows sized for L2 serves every tile of activation rows before the next block is read. c[i * RN + j] gets the
// dot product of activation row i with weight row j.
template <int RM, int RN>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void tile_bf16_f(const float* x, const uint16_t* w, float* c, int64_t K) {
  __m512 acc[RM][RN];
  for (int i = 0; i < RM; i++)
    for (int j = 0; j < RN; j++) acc[i][j] = _mm512_setzero_ps();
  const __m512i odd = _mm512_set1_epi32(ODD);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512 xe[RM], xo[RM];
    for (int i = 0; i < RM; i++) {
      xe[i] = _mm512_loadu_ps(x + i * K + k);
      xo[i] = _mm512_loadu_ps(x + i * K + k + 16);
    }
    for (int j = 0; j < RN; j++) {
      const __m512i wv = _mm512_loadu_si512(w + j * K + k);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, odd));
      for (int i = 0; i < RM; i++) acc[i][j] = _mm512_fmadd_ps(wo, xo[i], _mm512_fmadd_ps(we, xe[i], acc[i][j]));
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
    for (int j = 0; j < RN; j++) {
      const __m512 wv = widen(_mm256_maskz_loadu_epi16(m, w + j * K + k));
      for (int i = 0; i < RM; i++) acc[i][j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + i * K + k), acc[i][j]);
    }
  }
  if constexpr (RM * RN == 16) {
    _mm512_storeu_ps(c, sums16(&acc[0][0]));
  } else {
    for (int i = 0; i < RM; i++)
      for (int j = 0; j < RN; j++) c[i * RN + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

template <int RM, int RN>
__attribute__((target("avx2,fma")))
void tile_bf16_avx2(const float* x, const uint16_t* w, float* c, int64_t K) {
  __m256 acc[RM][RN];
  for (int i = 0; i < RM; i++)
    for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
  const __m256i odd = _mm256_set1_epi32(ODD);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 xe[RM], xo[RM];
    for (int i = 0; i < RM; i++) {
      xe[i] = _mm256_loadu_ps(x + i * K + k);
      xo[i] = _mm256_loadu_ps(x + i * K + k + 8);
    }
    for (int j = 0; j < RN; j++) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + j * K + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, odd));
      for (int i = 0; i < RM; i++) acc[i][j] = _mm256_fmadd_ps(wo, xo[i], _mm256_fmadd_ps(we, xe[i], acc[i][j]));
    }
  }
  float tail[RM][RN] = {};
  for (; k < K; k++)
    for (int i = 0; i < RM; i++)
      for (int j = 0; j < RN; j++) tail[i][j] += bf16_to_float(w[j * K + k]) * x[i * K + k];
  for (int i = 0; i < RM; i++)
    for (int j = 0; j < RN; j++) c[i * RN + j] = hsum8(acc[i][j]) + tail[i][j];
}

// The tile shape per instruction set: AVX512F's 32 vector registers hold 4 x 4 (16 sums, 8 activation vectors, a
// weight vector's two halves), AVX2's 16 hold 3 x 3 (some activation vectors read from L1 as operands)
template <Isa I>
struct TileShape {
  static constexpr int RM = I == Isa::avx2 ? 3 : 4, RN = I == Isa::avx2 ? 3 : 4;
};

// a tile of rm <= RM rows by rn <= RN: the instance of that size
template <Isa I, int RM, int RN>
inline void tile_bf16(int rm, int rn, const float* x, const uint16_t* w, float* c, int64_t K) {
  if constexpr (RM > 0 && RN > 0) {
    if (rm < RM) return tile_bf16<I, RM - 1, RN>(rm, rn, x, w, c, K);
    if (rn < RN) return tile_bf16<I, RM, RN - 1>(rm, rn, x, w, c, K);
    if constexpr (I == Isa::avx512f) tile_bf16_f<RM, RN>(x, w, c, K);
    else tile_bf16_avx2<RM, RN>(x, w, c, K);
  }
}

// steps of fewer rows stream each weight row once for all of them (block_rows): at one row a tile's four weight
// streams gain nothing, from three rows on the tiles win (24 layers of Qwen2.5-0.5B's shapes, 2 threads of a Zen 4:
// 38 against 42 ms at three rows, 83 against 109 at sixteen, 0.96 against 1.60 s at 256)
constexpr int64_t GEMM_MIN_ROWS = 3;
constexpr int64_t GEMM_BLOCK_BYTES = 256 * 1024;  // weight rows per block: a quarter of a Zen 4 core's L2

template <Isa I>
void gemm_rows(const float* x, const uint16_t* w, const Out& out, int64_t M, int64_t K, int64_t n0, int64_t n1) {
  constexpr int RM = TileShape<I>::RM, RN = TileShape<I>::RN;
  const int64_t block = std::max<int64_t>(RN, GEMM_BLOCK_BYTES / (2 * K) / RN * RN);
  float c[RM * RN];
  for (int64_t b0 = n0; b0 < n1; b0 += block) {
    const int64_t b1 = std::min(n1, b0 + block);
    // the next block's weights fetched into L2 a slice per tile, so that memory is read while the FMAs run instead
    // of before them (a first pass over a block from memory would wait on it)
    const char* next = reinterpret_cast<const char*>(w + b1 * K);
    const int64_t lines = (std::min(n1, b1 + block) - b1) * K * 2 / 64;
    const int64_t tiles = (M + RM - 1) / RM * ((b1 - b0 + RN - 1) / RN), per = (lines + tiles - 1) / tiles;
    int64_t line = 0;
    for (int64_t m = 0; m < M; m += RM) {
      const int rm = int(std::min<int64_t>(RM, M - m));
      for (int64_t n = b0; n < b1; n += RN) {
        const int rn = int(std::min<int64_t>(RN, b1 - n));
        for (const int64_t end = std::min(lines, line + per); line < end; line++)
          _mm_prefetch(next + line * 64, _MM_HINT_T1);
        tile_bf16<I, RM, RN>(rm, rn, x + m * K, w + n * K, c, K);
        for (int i = 0; i < rm; i++)
          for (int j = 0; j < rn; j++) out.store(m + i, n + j, c[i * rn + j]);
      }
    }
  }
}

// Which instruction set linear_bf16 uses here: "avx512_bf16", "avx512f", "avx2" (the matmuls alone run there), or
// "" (none: use torch).
std::string isa() {
  if (has_avx512_bf16()) return "avx512_bf16";
  if (has_avx512f()) return "avx512f";
  if (has_avx2()) return "avx2";
  return "";
}

// x [M, K] bf16 (contiguous), w [N, K] bf16 (contiguous), bias [N] or undefined -> [M, N] in `out_dtype`.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                          bool fp32_out, const std::string& use_isa) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_bf16: shapes");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "linear_bf16: bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "linear_bf16: contiguous tensors only");
  const std::string set = use_isa.empty() ? isa() : use_isa;  // tests pick the AVX512F path on BF16 CPUs
  TORCH_CHECK(!set.empty(), "linear_bf16: this CPU has neither AVX512 nor AVX2");
  TORCH_CHECK((set == "avx512f" && has_avx512f()) || (set == "avx512_bf16" && has_avx512_bf16()) ||
                  (set == "avx2" && has_avx2()), "linear_bf16: unknown isa ", set);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto result = torch::empty({M, N}, torch::dtype(fp32_out ? torch::kFloat32 : torch::kBFloat16));
  Out out{fp32_out ? result.data_ptr<float>() : nullptr,
          fp32_out ? nullptr : reinterpret_cast<uint16_t*>(result.data_ptr()), nullptr, nullptr, N};
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "linear_bf16: bias shape");
    b = bias->scalar_type() == at::kBFloat16 ? bias->contiguous() : bias->to(torch::kFloat32).contiguous();
    if (b.scalar_type() == at::kBFloat16) out.bias_bf16 = reinterpret_cast<const uint16_t*>(b.data_ptr());
    else out.bias_f32 = b.data_ptr<float>();
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  if (set == "avx512_bf16") {
    at::parallel_for(0, N, GRAIN_ROWS, [&](int64_t n0, int64_t n1) {
      block_rows<Isa::avx512_bf16>(xp, wp, out, M, K, n0, n1);
    });
    return result;
  }
  // widened once, not once per weight row, in the order the weight vectors widen to
  auto xf32 = torch::empty({M, K}, torch::dtype(torch::kFloat32));
  float* xf = xf32.data_ptr<float>();
  const bool f = set == "avx512f";
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) permuted(xp + m * K, xf + m * K, K, f ? 32 : 16);
  });
  at::parallel_for(0, N, GRAIN_ROWS, [&](int64_t n0, int64_t n1) {
    if (M >= GEMM_MIN_ROWS) {
      if (f) gemm_rows<Isa::avx512f>(xf, wp, out, M, K, n0, n1);
      else gemm_rows<Isa::avx2>(xf, wp, out, M, K, n0, n1);
    } else if (f) block_rows<Isa::avx512f>(xf, wp, out, M, K, n0, n1);
    else block_rows<Isa::avx2>(xf, wp, out, M, K, n0, n1);
  });
  return result;
}

bool has_vnni_op() { return has_avx512_vnni(); }

namespace {
// A float32 bias for the int kernels' outputs: kept alive by the returned tensor, named in `out`.
torch::Tensor float_bias(const c10::optional<torch::Tensor>& bias, Out& out, const char* op) {
  if (!bias.has_value() || !bias->defined()) return {};
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out.N, op, ": bias shape");
  torch::Tensor b = bias->to(torch::kFloat32).contiguous();
  out.bias_f32 = b.data_ptr<float>();
  return b;
}

// Each activation row quantized to int8 with scale max|x| / 127, rounded half to even (as torch rounds): `sx[m]`
// gets the row's scale, and `put(m, k, v)` each quantized value.
template <typename Put>
void quantize_rows(const float* xp, int64_t M, int64_t K, float* sx, Put put) {
  for (int64_t m = 0; m < M; m++) {
    const float* r = xp + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; k++) amax = std::max(amax, std::fabs(r[k]));
    const float s = std::max(amax, 1e-12f) / 127.0f;
    sx[m] = s;
    for (int64_t k = 0; k < K; k++) put(m, k, int(std::nearbyint(r[k] / s)));
  }
}
}  // namespace

// x [M, K] float32 (contiguous), q [N, K] int8, scale [N] float32, rowsum [N] int32 (each q row's sum), bias [N]
// or undefined -> x @ (q * scale).T + bias in float32, x quantized per row to int8 on the way (as the engine's
// int8 path does with torch's integer matmul, with the same rounding and the same order of the float products).
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& rowsum, const c10::optional<torch::Tensor>& bias) {
  const bool vnni = has_avx512_vnni();
  TORCH_CHECK(vnni || has_avx2(), "linear_int8: this CPU has neither AVX512-VNNI nor AVX2");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "linear_int8: shapes");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat &&
              rowsum.scalar_type() == at::kInt, "linear_int8: float32 x, int8 q, float32 scale, int32 rowsum");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous() && rowsum.is_contiguous(),
              "linear_int8: contiguous tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(scale.numel() == N && rowsum.numel() == N, "linear_int8: one scale and one row sum per output");
  auto result = torch::empty({M, N}, torch::dtype(torch::kFloat32));
  Out out{result.data_ptr<float>(), nullptr, nullptr, nullptr, N};
  const torch::Tensor b = float_bias(bias, out, "linear_int8");
  // the activations, quantized: [M, K] unsigned bytes (value + 128) for VNNI, signed ones for AVX2, and each row's
  // scale
  std::vector<uint8_t> xu(M * K);
  std::vector<float> sx(M);
  quantize_rows(x.data_ptr<float>(), M, K, sx.data(),
                [&](int64_t m, int64_t k, int v) { xu[m * K + k] = vnni ? uint8_t(v + 128) : uint8_t(int8_t(v)); });
  const auto* qp = q.data_ptr<int8_t>();
  const int32_t* rs = rowsum.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  if (!vnni) {
    const auto* xs = reinterpret_cast<const int8_t*>(xu.data());
    at::parallel_for(0, N, GRAIN_ROWS, [&](int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; m += MR) {
        const int8_t* xr = xs + m * K;
        switch (std::min<int64_t>(MR, M - m)) {
          case 1: rows_int8_avx2<1>(xr, K, qp, &sx[m], sp, out, m, K, n0, n1); break;
          case 2: rows_int8_avx2<2>(xr, K, qp, &sx[m], sp, out, m, K, n0, n1); break;
          case 3: rows_int8_avx2<3>(xr, K, qp, &sx[m], sp, out, m, K, n0, n1); break;
          default: rows_int8_avx2<4>(xr, K, qp, &sx[m], sp, out, m, K, n0, n1);
        }
      }
    });
    return result;
  }
  at::parallel_for(0, N, GRAIN_ROWS, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += MR) {
      const uint8_t* xr = xu.data() + m * K;
      switch (std::min<int64_t>(MR, M - m)) {
        case 1: rows_int8<1>(xr, K, qp, rs, &sx[m], sp, out, m, K, n0, n1); break;
        case 2: rows_int8<2>(xr, K, qp, rs, &sx[m], sp, out, m, K, n0, n1); break;
        case 3: rows_int8<3>(xr, K, qp, rs, &sx[m], sp, out, m, K, n0, n1); break;
        default: rows_int8<4>(xr, K, qp, rs, &sx[m], sp, out, m, K, n0, n1);
      }
    }
  });
  return result;
}


// packed [N / 16, K / 8, 64] uint8, scale_min [N / 16, K / 32, 32] bf16 (linear_int4's layout) -> [N, K] bf16
torch::Tensor int4_to_bf16(const torch::Tensor& packed, const torch::Tensor& scale_min) {
  TORCH_CHECK(has_avx512_bf16(), "int4_to_bf16: this CPU has no AVX512-BF16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.size(1) % 4 == 0 && packed.scalar_type() == at::kByte
              && scale_min.scalar_type() == at::kBFloat16 && packed.is_contiguous() && scale_min.is_contiguous() &&
              scale_min.numel() == packed.size(0) * (packed.size(1) / 4) * 32, "int4_to_bf16: layout");
  const int64_t NB = packed.size(0), K = packed.size(1) * 8;
  auto out = torch::empty({NB * 16, K}, torch::dtype(torch::kBFloat16));
  const auto* wp = packed.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scale_min.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) { dequant_int4_blocks(wp, sp, op, K, b0, b1); });
  return out;
}

// x [M, K] bf16 or float32, packed [N / 16, K / 8, 64] uint8 and scale_min [N / 16, K / 32, 32] bf16 (the layout
// blocks_int4 reads, made by Int4BlockWeight.of), bias [N] or undefined -> [M, N] in x's dtype. x is quantized per
// row to int8 (scale max|x| / 127) as llama.cpp quantizes activations for its 4-bit dot products.
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale_min,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(has_avx512f() || has_avx2(), "linear_int4: this CPU has neither AVX512 nor AVX2");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == 64 && packed.size(1) * 8 == x.size(1) &&
              x.size(1) % 32 == 0, "linear_int4: shapes");
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
              packed.scalar_type() == at::kByte && scale_min.scalar_type() == at::kBFloat16,
              "linear_int4: bf16 or float32 x, uint8 packed, bf16 scale_min");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && scale_min.is_contiguous(),
              "linear_int4: contiguous tensors only");
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), N = NB * 16, G = K / 32;
  TORCH_CHECK(scale_min.numel() == NB * G * 32, "linear_int4: one scale and one minimum per row and group");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto result = torch::empty({M, N}, x.options());
  Out out{bf16 ? nullptr : result.data_ptr<float>(), bf16 ? reinterpret_cast<uint16_t*>(result.data_ptr()) : nullptr,
          nullptr, nullptr, N};
  const torch::Tensor b = float_bias(bias, out, "linear_int4");
  // the activations: int8 per row, each group's sum, each row's scale
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  std::vector<int8_t> xq(M * K);
  std::vector<int32_t> xsum(M * G, 0);
  std::vector<float> sx(M);
  quantize_rows(xf.data_ptr<float>(), M, K, sx.data(), [&](int64_t m, int64_t k, int v) {
    xq[m * K + k] = int8_t(v);
    xsum[m * G + k / 32] += v;
  });
  const auto* wp = packed.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scale_min.data_ptr());
  const auto rows = [&](auto vnni, int64_t b0, int64_t b1) {
    constexpr bool V = decltype(vnni)::value;
    for (int64_t m = 0; m < M; m += MR) {
      const int8_t* xr = xq.data() + m * K;
      const int32_t* xs = xsum.data() + m * G;
      switch (std::min<int64_t>(MR, M - m)) {
        case 1: blocks_int4<1, V>(xr, K, xs, &sx[m], wp, sp, out, m, K, b0, b1); break;
        case 2: blocks_int4<2, V>(xr, K, xs, &sx[m], wp, sp, out, m, K, b0, b1); break;
        case 3: blocks_int4<3, V>(xr, K, xs, &sx[m], wp, sp, out, m, K, b0, b1); break;
        default: blocks_int4<4, V>(xr, K, xs, &sx[m], wp, sp, out, m, K, b0, b1);
      }
    }
  };
  const bool vnni = has_avx512_vnni(), avx512 = has_avx512f();
  at::parallel_for(0, NB, GRAIN_ROWS / 16, [&](int64_t b0, int64_t b1) {
    if (vnni) rows(std::true_type{}, b0, b1);
    else if (avx512) rows(std::false_type{}, b0, b1);
    else
      for (int64_t m = 0; m < M; m += 2) {
        if (M - m == 1) blocks_int4_avx2<1>(&xq[m * K], K, &xsum[m * G], &sx[m], wp, sp, out, m, K, b0, b1);
        else blocks_int4_avx2<2>(&xq[m * K], K, &xsum[m * G], &sx[m], wp, sp, out, m, K, b0, b1);
      }
  });
  return result;
}

// Values of float32 or bf16 tensors, read and written as float
namespace {
template <typename T>
inline float load_f(const T* p, int64_t i);
template <>
inline float load_f<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float load_f<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const uint16_t* p) {
  return widen(_mm256_loadu_si256((const __m256i*)p));
}
inline void store_f(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
inline float round_as(float v, const float*) { return v; }  // v rounded to the dtype p points to
inline float round_as(float v, const uint16_t*) { return bf16_to_float(float_to_bf16(v)); }

// Decode rows' attention, straight from the paged cache. A row's positions are cut into parts of ATT_PART (flash
// decoding: a long row spreads over threads), one task per (row, KV head, part). A task walks its part in blocks of
// 16 positions, the next block's rows prefetched meanwhile (the block table scatters them, which the hardware
// prefetcher does not follow): the 16 scores of each of the G query heads as one vector (their dot products reduced
// together), an online softmax in float32 (the running maximum, the sum, the weighted values rescaled when the
// maximum grows), and the values weighed by the probabilities. attention_part widens the block's keys and values to
// float32 once (head sizes that are not a multiple of 16 padded with zeros); attention_part_bf16 reads a bf16 cache
// as it is. A row of one part writes its output; the parts of a longer row are merged afterwards (each part's sums
// rescaled to the row's maximum).
constexpr int64_t ATT_BLOCK = 16;
constexpr int64_t ATT_PART = 512;

// One query head's online-softmax step over a block: the block's 16 dot products `dots` (lanes past the block's
// end masked off by `valid`) scaled into scores, the running maximum m and sum l updated, the weighted values acc
// (n floats) rescaled when the maximum grows; returns the block's probabilities exp(score - m), 0 in masked lanes.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 softmax_block(__m512 dots, float scale, __mmask16 valid, float& m, float& l, float* acc, int64_t n) {
  const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(dots, _mm512_set1_ps(scale)));
  const float bm = _mm512_reduce_max_ps(s);
  if (bm > m) {
    const float corr = std::exp(m - bm);  // 0 for the first block
    l *= corr;
    const __m512 cv = _mm512_set1_ps(corr);
    for (int64_t c = 0; c < n; c += 16) _mm512_storeu_ps(acc + c, _mm512_mul_ps(cv, _mm512_loadu_ps(acc + c)));
    m = bm;
  }
  const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(m))));
  l += _mm512_reduce_add_ps(p);
  return p;
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void widen_row(const T* src, float* dst, int64_t D, int64_t Dp) {
  if (D % 16 == 0) {
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, load16(src + d));
    return;
  }
  for (int64_t d = 0; d < D; d++) dst[d] = load_f(src, d);
  for (int64_t d = D; d < Dp; d++) dst[d] = 0.f;
}

// into L1: the key and value rows (KV head h) of positions j0..j1 (clipped to p1) of `slots`
template <typename T>
inline void prefetch_rows(const T* kc, const T* vc, const int64_t* slots, int64_t j0, int64_t j1, int64_t p1,
                          int64_t KV, int64_t h, int64_t D) {
  const int64_t bytes = D * int64_t(sizeof(T));
  for (int64_t j = j0; j < std::min(j1, p1); j++)
    for (int64_t o = 0; o < bytes; o += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(kc + (slots[j] * KV + h) * D) + o, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(vc + (slots[j] * KV + h) * D) + o, _MM_HINT_T0);
    }
}

// a part's state, empty: maxima -inf, sums and weighted values 0 ([2 * G + G * n] floats)
inline void clear_state(float* st, int64_t G, int64_t n) {
  std::fill(st, st + G, -INFINITY);
  std::fill(st + G, st + 2 * G + G * n, 0.f);
}

// One part of one row's attention for KV head h: positions p0..p1 of `slots`. Leaves, per query head g, the
// running maximum m[g], the sum of exp(score - m[g]) l[g] and the weighted values acc[g * Dp ..] in `st`
// ([2 * G + G * Dp] floats). q32 holds the G query rows in float32, zero-padded to Dp.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void attention_part(const float* q32, const T* kc, const T* vc, const int64_t* slots, int64_t p0, int64_t p1,
                    int64_t KV, int64_t h, int64_t G, int64_t D, int64_t Dp, float scale, float* kb, float* vb,
                    float* pb, float* st) {
  clear_state(st, G, Dp);
  float *m = st, *l = st + G, *acc = st + 2 * G;
  const int64_t C = Dp / 16, P = G * C;  // value accumulators: (query head, 16 channels) pairs
  prefetch_rows(kc, vc, slots, p0, p0 + ATT_BLOCK, p1, KV, h, D);
  for (int64_t l0 = p0; l0 < p1; l0 += ATT_BLOCK) {
    const int64_t nb = std::min(ATT_BLOCK, p1 - l0);
    for (int64_t j = 0; j < nb; j++) {
      widen_row(kc + (slots[l0 + j] * KV + h) * D, kb + j * Dp, D, Dp);
      widen_row(vc + (slots[l0 + j] * KV + h) * D, vb + j * Dp, D, Dp);
    }
    if (nb < ATT_BLOCK) std::fill(kb + nb * Dp, kb + ATT_BLOCK * Dp, 0.f);  // scores of no position: masked below
    prefetch_rows(kc, vc, slots, l0 + ATT_BLOCK, l0 + 2 * ATT_BLOCK, p1, KV, h, D);
    const __mmask16 valid = nb == ATT_BLOCK ? __mmask16(0xffff) : __mmask16((1u << nb) - 1);
    for (int64_t g = 0; g < G; g++) {
      __m512 a[16];
      for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < Dp; c += 16) {
        const __m512 qv = _mm512_loadu_ps(q32 + g * Dp + c);
        for (int j = 0; j < 16; j++) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kb + j * Dp + c), a[j]);
      }
      _mm512_storeu_ps(pb + g * 16, softmax_block(sums16(a), scale, valid, m[g], l[g], acc + g * Dp, Dp));
    }
    // acc[g, c] += sum_j p[g, j] v[j, c], eight (query head, channel block) pairs at a time
    for (int64_t i0 = 0; i0 < P; i0 += 8) {
      __m512 r[8];
      const float* pp[8];
      int64_t off[8];
      for (int i = 0; i < 8; i++) {
        const int64_t pair = std::min(i0 + i, P - 1);  // a repeated pair past the end: computed, not stored
        pp[i] = pb + (pair / C) * 16;
        off[i] = (pair % C) * 16;
        r[i] = _mm512_loadu_ps(acc + (pair / C) * Dp + off[i]);
      }
      for (int64_t j = 0; j < nb; j++)
        for (int i = 0; i < 8; i++)
          r[i] = _mm512_fmadd_ps(_mm512_set1_ps(pp[i][j]), _mm512_loadu_ps(vb + j * Dp + off[i]), r[i]);
      for (int i = 0; i < 8 && i0 + i < P; i++) _mm512_storeu_ps(acc + ((i0 + i) / C) * Dp + off[i], r[i]);
    }
  }
}

// attention_part on AVX512-BF16, for a bf16 cache (head size a multiple of 32; float32 query rows are rounded to
// bf16 first): the scores as bf16 dot products straight from the cache rows, and the values weighed with the
// probabilities rounded to bf16 (as torch's CPU flash attention does for bf16), two positions per dot product (the
// block's value rows interleaved in pairs). Same state as attention_part.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void attention_part_bf16(const uint16_t* q16, const uint16_t* kc, const uint16_t* vc, const int64_t* slots,
                         int64_t p0, int64_t p1, int64_t KV, int64_t h, int64_t G, int64_t D, float scale,
                         const uint16_t* zero, uint16_t* vi, uint32_t* pb, float* st) {
  clear_state(st, G, D);
  float *m = st, *l = st + G, *acc = st + 2 * G;
  const int64_t C = D / 16, P = G * C;
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const uint16_t* kr[ATT_BLOCK];
  const uint16_t* vr[ATT_BLOCK];
  prefetch_rows(kc, vc, slots, p0, p0 + ATT_BLOCK, p1, KV, h, D);
  for (int64_t l0 = p0; l0 < p1; l0 += ATT_BLOCK) {
    const int64_t nb = std::min(ATT_BLOCK, p1 - l0);
    for (int64_t j = 0; j < ATT_BLOCK; j++) {
      kr[j] = j < nb ? kc + (slots[l0 + j] * KV + h) * D : zero;
      vr[j] = j < nb ? vc + (slots[l0 + j] * KV + h) * D : zero;
    }
    prefetch_rows(kc, vc, slots, l0 + ATT_BLOCK, l0 + 2 * ATT_BLOCK, p1, KV, h, D);
    const int64_t np = (nb + 1) / 2;  // value row pairs (an odd last row paired with zeros)
    for (int64_t jp = 0; jp < np; jp++)
      for (int64_t c = 0; c < C; c++) {
        const __m512i two = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(vr[2 * jp] + c * 16))),
            _mm256_loadu_si256((const __m256i*)(vr[2 * jp + 1] + c * 16)), 1);
        _mm512_storeu_si512(vi + (jp * C + c) * 32, _mm512_permutexvar_epi16(pairs, two));
      }
    const __mmask16 valid = nb == ATT_BLOCK ? __mmask16(0xffff) : __mmask16((1u << nb) - 1);
    for (int64_t g = 0; g < G; g++) {
      __m512 a[16];
      for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 32) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q16 + g * D + c);
        for (int j = 0; j < 16; j++) a[j] = _mm512_dpbf16_ps(a[j], qv, (__m512bh)_mm512_loadu_si512(kr[j] + c));
      }
      const __m512 p = softmax_block(sums16(a), scale, valid, m[g], l[g], acc + g * D, D);
      _mm256_storeu_si256((__m256i*)(pb + g * 8), (__m256i)_mm512_cvtneps_pbh(p));
    }
    for (int64_t i0 = 0; i0 < P; i0 += 8) {
      __m512 r[8];
      const uint32_t* pp[8];
      const uint16_t* vp[8];
      for (int i = 0; i < 8; i++) {
        const int64_t pair = std::min(i0 + i, P - 1);  // a repeated pair past the end: computed, not stored
        pp[i] = pb + (pair / C) * 8;
        vp[i] = vi + (pair % C) * 32;
        r[i] = _mm512_loadu_ps(acc + (pair / C) * D + (pair % C) * 16);
      }
      for (int64_t jp = 0; jp < np; jp++)
        for (int i = 0; i < 8; i++)
          r[i] = _mm512_dpbf16_ps(r[i], (__m512bh)_mm512_set1_epi32(int(pp[i][jp])),
                                  (__m512bh)_mm512_loadu_si512(vp[i] + jp * C * 32));
      for (int i = 0; i < 8 && i0 + i < P; i++)
        _mm512_storeu_ps(acc + ((i0 + i) / C) * D + ((i0 + i) % C) * 16, r[i]);
    }
  }
}

template <typename TQ, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void decode_attention_impl(const TQ* q, const T* kc, const T* vc, const int64_t* gather, const int64_t* lens, TQ* out,
                           int64_t B, int64_t H, int64_t KV, int64_t D, int64_t L, float scale, bool use_bf16) {
  const int64_t G = H / KV, Dp = (D + 15) / 16 * 16, SZ = 2 * G + G * Dp;
  // float32 rows over a bf16 cache (int8 models) take the bf16 path too, their queries rounded to bf16 as the
  // cache's keys and values already are
  const bool bf16_dp = std::is_same_v<T, uint16_t> && D % 32 == 0 && use_bf16;
  // tasks: (row, KV head, part), rows in order; first[b] is row b's first task
  std::vector<int64_t> first(B + 1, 0);
  for (int64_t b = 0; b < B; b++) first[b + 1] = first[b] + KV * ((lens[b] + ATT_PART - 1) / ATT_PART);
  const int64_t tasks = first[B];
  std::vector<float> parts(tasks * SZ);
  auto write = [&](int64_t b, int64_t h, const float* const* st, int64_t n) {  // merge n parts' states into out
    std::vector<float> w(n);
    for (int64_t g = 0; g < G; g++) {
      float mx = -INFINITY;
      for (int64_t i = 0; i < n; i++) mx = std::max(mx, st[i][g]);
      float total = 0.f;
      for (int64_t i = 0; i < n; i++) total += (w[i] = std::exp(st[i][g] - mx)) * st[i][G + g];
      TQ* o = out + ((b * H) + h * G + g) * D;
      for (int64_t d = 0; d < D; d++) {
        float v = 0.f;
        for (int64_t i = 0; i < n; i++) v += w[i] * st[i][2 * G + g * Dp + d];
        store_f(o, d, v / total);
      }
    }
  };
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q32(G * Dp), kb(ATT_BLOCK * Dp), vb(ATT_BLOCK * Dp), pb(G * 16);
    std::vector<uint16_t> zero(bf16_dp ? D : 0), vi(bf16_dp ? ATT_BLOCK * D : 0), qr16(bf16_dp ? G * D : 0);
    std::vector<uint32_t> pb16(bf16_dp ? G * 8 : 0);
    int64_t b = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; t++) {
      while (t >= first[b + 1]) b++;
      const int64_t np = (first[b + 1] - first[b]) / KV, h = (t - first[b]) / np, part = (t - first[b]) % np;
      float* st = parts.data() + t * SZ;
      const int64_t p0 = part * ATT_PART, p1 = std::min(lens[b], (part + 1) * ATT_PART);
      bool done = false;
      if constexpr (std::is_same_v<T, uint16_t>) {
        if (bf16_dp) {  // its state has the same layout: Dp == D there
          const uint16_t* q16 = nullptr;
          if constexpr (std::is_same_v<TQ, uint16_t>) {
            q16 = q + ((b * H) + h * G) * D;
          } else {
            for (int64_t i = 0; i < G * D; i++) qr16[i] = float_to_bf16(q[((b * H) + h * G) * D + i]);
            q16 = qr16.data();
          }
          attention_part_bf16(q16, kc, vc, gather + b * L, p0, p1, KV, h, G, D, scale, zero.data(), vi.data(),
                              pb16.data(), st);
          done = true;
        }
      }
      if (!done) {
        for (int64_t g = 0; g < G; g++) {
          const TQ* qr = q + ((b * H) + h * G + g) * D;
          for (int64_t d = 0; d < Dp; d++) q32[g * Dp + d] = d < D ? load_f(qr, d) : 0.f;
        }
        attention_part(q32.data(), kc, vc, gather + b * L, p0, p1, KV, h, G, D, Dp, scale, kb.data(), vb.data(),
                       pb.data(), st);
      }
      if (np == 1) write(b, h, &st, 1);
    }
  });
  if (tasks == B * KV) return;  // every row in one part, written above
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const float*> st;
    for (int64_t t = t0; t < t1; t++) {
      const int64_t b = t / KV, h = t % KV, np = (first[b + 1] - first[b]) / KV;
      if (np == 1) continue;
      st.clear();
      for (int64_t i = 0; i < np; i++) st.push_back(parts.data() + (first[b] + h * np + i) * SZ);
      write(b, h, st.data(), np);
    }
  });
}
}  // namespace

// q [B, H, D], k_cache and v_cache [S, KV, D] (bf16 or float32 caches; q in the caches' dtype, or float32 over a bf16
// cache, as int8 models run), gather [B, L] int64 cache slots of each row's positions, lens [B] int64 (each row
// attends to gather[b, :lens[b]]) -> [B, H * D] in q's dtype; scale 1/sqrt(D), as SDPA's default.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& gather, const torch::Tensor& lens, const std::string& use_isa) {
  const std::string set = use_isa.empty() ? isa() : use_isa;  // tests pick the AVX512F path on BF16 CPUs
  TORCH_CHECK((set == "avx512f" && has_avx512f()) || (set == "avx512_bf16" && has_avx512_bf16()),
              "decode_attention: unknown isa ", set);
  const bool use_bf16 = set == "avx512_bf16";
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && gather.dim() == 2 &&
              lens.dim() == 1 && gather.size(0) == q.size(0) && lens.size(0) == q.size(0) &&
              k_cache.size(2) == q.size(2) && q.size(1) % k_cache.size(1) == 0, "decode_attention: shapes");
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK(ct == v_cache.scalar_type() && (ct == at::kBFloat16 || ct == at::kFloat) &&
              (qt == ct || (qt == at::kFloat && ct == at::kBFloat16)) &&
              gather.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "decode_attention: bf16 or float32 caches, q in their dtype or float32, int64 gather and lens");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && gather.is_contiguous() &&
              lens.is_contiguous(), "decode_attention: contiguous tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k_cache.size(1), L = gather.size(1);
  const int64_t S = k_cache.size(0);
  const auto* lp = lens.data_ptr<int64_t>();
  const auto* gp = gather.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "decode_attention: each row attends to 1 to L positions");
    for (int64_t l = 0; l < lp[b]; l++) TORCH_CHECK(gp[b * L + l] >= 0 && gp[b * L + l] < S, "decode_attention: slot out of range");
  }
  auto out = torch::empty({B, H * D}, q.options());
  const float scale = 1.0f / std::sqrt(float(D));
  const auto* kb = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
  const auto* vb = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  if (ct == at::kFloat)
    decode_attention_impl<float, float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), gp,
                                        lp, out.data_ptr<float>(), B, H, KV, D, L, scale, false);
  else if (qt == at::kFloat)
    decode_attention_impl<float, uint16_t>(q.data_ptr<float>(), kb, vb, gp, lp, out.data_ptr<float>(), B, H, KV, D, L,
                                           scale, use_bf16);
  else
    decode_attention_impl<uint16_t, uint16_t>(reinterpret_cast<const uint16_t*>(q.data_ptr()), kb, vb, gp, lp,
                                              reinterpret_cast<uint16_t*>(out.data_ptr()), B, H, KV, D, L, scale,
                                              use_bf16);
  return out;
}

// A Gated DeltaNet layer's decode rows (Qwen3.5), after its input projection: per row, the causal depthwise
// convolution over the q|k|v channels (its window updated in the state pool), SiLU, l2-normed queries and keys, the
// decay and beta gates, the delta rule's state update, the read with the query and the gated RMSNorm, all in one
// operator and in place in the pool's slots (the state matrix is read twice and written once; no gather and no
// scatter). Each rounds where the model's torch code rounds, so results equal it up to the order of float sums.
namespace {
inline float softplus1(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // torch's threshold

// channels t0..t1 of the flattened [B, C] rows: the window's K-1 older inputs and this one, weighted; the window
// shifted by one; SiLU of the sums into out
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void delta_conv_tasks(const T* proj, int64_t ldp, float* conv_state, const float* w, const int64_t* slots,
                      float* out, int64_t C, int64_t K, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1;) {
    const int64_t b = t / C, c0 = t % C, c1 = std::min(C, c0 + (t1 - t));
    float* st = conv_state + slots[b] * C * (K - 1);
    const T* x = proj + b * ldp;
    float* o = out + b * C;
    if (K == 4) {  // Qwen3.5's
      for (int64_t c = c0; c < c1; c++) {
        float* s = st + c * 3;
        const float* wc = w + c * 4;
        const float xv = load_f(x, c), s0 = s[0], s1 = s[1], s2 = s[2];
        o[c] = s0 * wc[0] + s1 * wc[1] + s2 * wc[2] + xv * wc[3];
        s[0] = s1;
        s[1] = s2;
        s[2] = xv;
      }
    } else {
      for (int64_t c = c0; c < c1; c++) {
        float* s = st + c * (K - 1);
        const float* wc = w + c * K;
        const float xv = load_f(x, c);
        float acc = 0.f;
        for (int64_t k = 0; k < K - 1; k++) acc += s[k] * wc[k];
        o[c] = acc + xv * wc[K - 1];
        for (int64_t k = 0; k + 1 < K - 1; k++) s[k] = s[k + 1];
        s[K - 2] = xv;
      }
    }
    silu_inplace(o + c0, c1 - c0);
    t += c1 - c0;
  }
}

// Columns j0..j0+16*NV of one head's state S [Dk, Dv] (decayed by eg, written by the delta rule) in two passes with
// the columns' sums in registers: the first reads S for S^T k and S^T q, the second writes eg S + k delta^T. The
// read comes out of the old state: o = (eg S + k delta^T)^T q = eg S^T q + delta (k . q).
template <int NV>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void delta_columns(float* S, int64_t Dk, int64_t Dv, int64_t j0, const float* k, const float* q,
                          const float* cv, float eg, float beta, float kq, float* o) {
  __m512 sk[NV], sq[NV], d[NV];
  for (int v = 0; v < NV; v++) sk[v] = sq[v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < Dk; i++) {
    const float* si = S + i * Dv + j0;
    const __m512 ki = _mm512_set1_ps(k[i]), qi = _mm512_set1_ps(q[i]);
    for (int v = 0; v < NV; v++) {
      const __m512 x = _mm512_loadu_ps(si + 16 * v);
      sk[v] = _mm512_fmadd_ps(x, ki, sk[v]);
      sq[v] = _mm512_fmadd_ps(x, qi, sq[v]);
    }
  }
  const __m512 egv = _mm512_set1_ps(eg), bv = _mm512_set1_ps(beta), kqv = _mm512_set1_ps(kq);
  for (int v = 0; v < NV; v++) {
    d[v] = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(cv + j0 + 16 * v), _mm512_mul_ps(egv, sk[v])), bv);
    _mm512_storeu_ps(o + j0 + 16 * v, _mm512_fmadd_ps(d[v], kqv, _mm512_mul_ps(egv, sq[v])));
  }
  for (int64_t i = 0; i < Dk; i++) {
    float* si = S + i * Dv + j0;
    const __m512 ki = _mm512_set1_ps(k[i]);
    for (int v = 0; v < NV; v++)
      _mm512_storeu_ps(si + 16 * v, _mm512_fmadd_ps(ki, d[v], _mm512_mul_ps(_mm512_loadu_ps(si + 16 * v), egv)));
  }
}

template <typename T, typename TW>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void delta_head_tasks(const T* proj, int64_t ldp, const float* conv, float* ssm, const int64_t* slots,
                      const float* neg_a, const float* dt_bias, const TW* norm_w, T* out, int64_t C, int64_t Hk,
                      int64_t Hv, int64_t Dk, int64_t Dv, float eps, int64_t t0, int64_t t1) {
  const int64_t r = Hv / Hk, kd = Hk * Dk, vd = Hv * Dv;
  const float scale = 1.0f / std::sqrt(float(Dk));
  std::vector<float> q(Dk), k(Dk), kv(Dv), qs(Dv), delta(Dv), o(Dv), zs(Dv);
  for (int64_t t = t0; t < t1; t++) {
    const int64_t b = t / Hv, h = t % Hv, hk = h / r;
    const float* row = conv + b * C;
    const float* cq = row + hk * Dk;
    const float* ck = row + kd + hk * Dk;
    const float* cv = row + 2 * kd + h * Dv;
    float sq = 0.f, sk = 0.f;
    for (int64_t i = 0; i < Dk; i++) {
      sq += cq[i] * cq[i];
      sk += ck[i] * ck[i];
    }
    const float iq = 1.0f / std::sqrt(sq + 1e-6f), ik = 1.0f / std::sqrt(sk + 1e-6f);
    for (int64_t i = 0; i < Dk; i++) {
      q[i] = (cq[i] * iq) * scale;
      k[i] = ck[i] * ik;
    }
    const T* prow = proj + b * ldp;
    const float eg = std::exp(neg_a[h] * softplus1(load_f(prow, C + vd + Hv + h) + dt_bias[h]));
    const float beta = 1.0f / (1.0f + std::exp(-load_f(prow, C + vd + h)));
    float* S = ssm + (slots[b] * Hv + h) * Dk * Dv;
    float kq = 0.f;
    for (int64_t i = 0; i < Dk; i++) kq += k[i] * q[i];
    int64_t j0 = 0;
    for (; j0 + 128 <= Dv; j0 += 128) delta_columns<8>(S, Dk, Dv, j0, k.data(), q.data(), cv, eg, beta, kq, o.data());
    for (; j0 + 16 <= Dv; j0 += 16) delta_columns<1>(S, Dk, Dv, j0, k.data(), q.data(), cv, eg, beta, kq, o.data());
    if (j0 < Dv) {  // head sizes that are not a multiple of 16
      std::fill(kv.begin(), kv.end(), 0.f);
      std::fill(qs.begin(), qs.end(), 0.f);
      for (int64_t i = 0; i < Dk; i++)
        for (int64_t j = j0; j < Dv; j++) {
          kv[j] += S[i * Dv + j] * k[i];
          qs[j] += S[i * Dv + j] * q[i];
        }
      for (int64_t j = j0; j < Dv; j++) {
        delta[j] = (cv[j] - eg * kv[j]) * beta;
        o[j] = eg * qs[j] + delta[j] * kq;
      }
      for (int64_t i = 0; i < Dk; i++)
        for (int64_t j = j0; j < Dv; j++) S[i * Dv + j] = S[i * Dv + j] * eg + k[i] * delta[j];
    }
    // gated RMSNorm over the head: norm(o) * w * silu(z), rounded as the activations' dtype rounds
    float ss = 0.f;
    for (int64_t j = 0; j < Dv; j++) {
      ss += o[j] * o[j];
      zs[j] = load_f(prow, C + h * Dv + j);
    }
    silu_inplace(zs.data(), Dv);
    const float inv = 1.0f / std::sqrt(ss / float(Dv) + eps);
    for (int64_t j = 0; j < Dv; j++) {
      const float n = round_as(round_as(o[j] * inv, proj) * load_f(norm_w, j), proj);
      store_f(out, b * vd + h * Dv + j, n * zs[j]);
    }
  }
}
}  // namespace

// proj [B, C + Hv*Dv + 2*Hv] (float32 or bf16): the layer's input projection of B decode rows (q|k|v channels, the
// output gate z, beta's and the decay's logits); conv_state [S, C, K-1] and ssm [S, Hv, Dk, Dv] float32 (the state
// pool, updated in place at slots [B] int64), conv_w [C, K], neg_a and dt_bias [Hv] float32, norm_w [Dv];
// key_heads = Hk (Hv a multiple of it) -> [B, Hv*Dv] in proj's dtype, ready for the output projection.
torch::Tensor delta_net_decode(const torch::Tensor& proj, const torch::Tensor& conv_state, const torch::Tensor& conv_w,
                               const torch::Tensor& ssm, const torch::Tensor& slots, const torch::Tensor& neg_a,
                               const torch::Tensor& dt_bias, const torch::Tensor& norm_w, int64_t key_heads,
                               double eps) {
  TORCH_CHECK(has_avx512f(), "delta_net_decode: this CPU has no AVX512");
  TORCH_CHECK(proj.dim() == 2 && conv_state.dim() == 3 && conv_w.dim() == 2 && ssm.dim() == 4 && slots.dim() == 1 &&
              neg_a.dim() == 1 && dt_bias.dim() == 1 && norm_w.dim() == 1, "delta_net_decode: shapes");
  const int64_t B = proj.size(0), S = ssm.size(0), Hv = ssm.size(1), Dk = ssm.size(2), Dv = ssm.size(3);
  const int64_t C = conv_state.size(1), K = conv_w.size(1);
  TORCH_CHECK(key_heads >= 1 && Hv % key_heads == 0, "delta_net_decode: value heads must be a multiple of key heads");
  TORCH_CHECK(conv_state.size(0) == S && conv_w.size(0) == C && conv_state.size(2) == K - 1 && K >= 2 &&
              C == 2 * key_heads * Dk + Hv * Dv && proj.size(1) == C + Hv * Dv + 2 * Hv && slots.size(0) == B &&
              neg_a.size(0) == Hv && dt_bias.size(0) == Hv && norm_w.size(0) == Dv, "delta_net_decode: shapes");
  const auto pt = proj.scalar_type(), wt = norm_w.scalar_type();
  TORCH_CHECK((pt == at::kFloat || pt == at::kBFloat16) && (wt == at::kFloat || wt == at::kBFloat16) &&
              conv_state.scalar_type() == at::kFloat && conv_w.scalar_type() == at::kFloat &&
              ssm.scalar_type() == at::kFloat && neg_a.scalar_type() == at::kFloat &&
              dt_bias.scalar_type() == at::kFloat && slots.scalar_type() == at::kLong,
              "delta_net_decode: float32 or bf16 rows and norm, float32 states and parameters, int64 slots");
  for (const auto* t : {&proj, &conv_state, &conv_w, &ssm, &slots, &neg_a, &dt_bias, &norm_w})
    TORCH_CHECK(t->is_contiguous(), "delta_net_decode: contiguous tensors only");
  const auto* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < S, "delta_net_decode: slot out of range");
    for (int64_t c = 0; c < b; c++) TORCH_CHECK(sp[c] != sp[b], "delta_net_decode: each row needs its own slot");
  }
  auto out = torch::empty({B, Hv * Dv}, proj.options());
  std::vector<float> conv(B * C);
  const int64_t ldp = proj.size(1);
  const bool bf16 = pt == at::kBFloat16;
  const auto* pb = reinterpret_cast<const uint16_t*>(proj.data_ptr());
  float* cs = conv_state.data_ptr<float>();
  const float* cw = conv_w.data_ptr<float>();
  at::parallel_for(0, B * C, 1024, [&](int64_t t0, int64_t t1) {
    if (bf16) delta_conv_tasks(pb, ldp, cs, cw, sp, conv.data(), C, K, t0, t1);
    else delta_conv_tasks(proj.data_ptr<float>(), ldp, cs, cw, sp, conv.data(), C, K, t0, t1);
  });
  float* st = ssm.data_ptr<float>();
  const float* na = neg_a.data_ptr<float>();
  const float* db = dt_bias.data_ptr<float>();
  const float e = float(eps);
  at::parallel_for(0, B * Hv, 1, [&](int64_t t0, int64_t t1) {
    auto* ob = reinterpret_cast<uint16_t*>(out.data_ptr());
    const auto* wb = reinterpret_cast<const uint16_t*>(norm_w.data_ptr());
    if (bf16 && wt == at::kBFloat16)
      delta_head_tasks(pb, ldp, conv.data(), st, sp, na, db, wb, ob, C, key_heads, Hv, Dk, Dv, e, t0, t1);
    else if (bf16)
      delta_head_tasks(pb, ldp, conv.data(), st, sp, na, db, norm_w.data_ptr<float>(), ob, C, key_heads, Hv, Dk, Dv,
                       e, t0, t1);
    else if (wt == at::kBFloat16)
      delta_head_tasks(proj.data_ptr<float>(), ldp, conv.data(), st, sp, na, db, wb, out.data_ptr<float>(), C,
                       key_heads, Hv, Dk, Dv, e, t0, t1);
    else
      delta_head_tasks(proj.data_ptr<float>(), ldp, conv.data(), st, sp, na, db, norm_w.data_ptr<float>(),
                       out.data_ptr<float>(), C, key_heads, Hv, Dk, Dv, e, t0, t1);
  });
  return out;
}

// The small operators of a decode step's layer, fused (each a few thousand values: one pass instead of four or five
// operators, whose dispatch costs more than their arithmetic). Each rounds where torch's sequence of operators
// rounds, so the results are torch's up to the order of a float sum.

// Residual add and RMSNorm: s = x + residual (rounded to x's dtype; x itself without a residual), rms in float32, and
// h = round(round(s / rms(s)) * w) where the normed value is rounded before the weight multiplies (Qwen2/Qwen3's
// norm in bf16: add_rms_norm_bf16), h = round(float32(s / rms(s)) * w) where a float32 weight multiplies before the
// one rounding (Qwen3.5's zero-centred norm, its weight stored as 1 + w, and F.rms_norm on float32 rows:
// add_rms_norm_f32w) -> (h, s).
namespace {
template <bool RoundFirst, typename T, typename TW>
void add_rms_rows(const T* x, const T* r, const TW* w, T* h, T* s, int64_t rows, int64_t D, float eps) {
  std::vector<float> row(D);
  for (int64_t t = 0; t < rows; t++) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; d++) {
      float v = load_f(x, t * D + d);
      if (r) {
        v = round_as(v + load_f(r, t * D + d), x);
        store_f(s, t * D + d, v);
      }
      row[d] = v;
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
    for (int64_t d = 0; d < D; d++) {
      const float n = row[d] * inv;
      store_f(h, t * D + d, (RoundFirst ? round_as(n, x) : n) * load_f(w, d));
    }
  }
}

// out[t, i] = round(round(silu(gate)) * up) over gu [T, 2I] (gate, then up), in gu's dtype
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void silu_mul_rows(const T* gu, T* out, int64_t I, int64_t j0, int64_t j1) {
  float g[16];
  for (int64_t j = j0; j < j1;) {
    const int64_t t = j / I, i0 = j % I, n = std::min<int64_t>({16, I - i0, j1 - j});
    for (int64_t e = 0; e < n; e++) g[e] = load_f(gu, t * 2 * I + i0 + e);
    silu_inplace(g, n);
    for (int64_t e = 0; e < n; e++)
      store_f(out, t * I + i0 + e, round_as(g[e], gu) * load_f(gu, t * 2 * I + I + i0 + e));
    j += n;
  }
}
}  // namespace

// s = x + residual (rounded to bf16), h = bf16(bf16(s / rms(s)) * w), rms in float32 -> (h, s)
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& residual,
                                                          const torch::Tensor& w, double eps) {
  TORCH_CHECK(has_avx512f(), "add_rms_norm_bf16: this CPU has no AVX512");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0) && residual.sizes() == x.sizes(),
              "add_rms_norm_bf16: shapes");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
              residual.scalar_type() == at::kBFloat16, "add_rms_norm_bf16: bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && residual.is_contiguous(),
              "add_rms_norm_bf16: contiguous tensors only");
  auto h = torch::empty_like(x);
  auto sum = torch::empty_like(x);
  const auto bf = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  add_rms_rows<true>(bf(x), bf(residual), bf(w), bf(h), bf(sum), x.size(0), x.size(1), float(eps));
  return {h, sum};
}

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_f32w(const torch::Tensor& x,
                                                           const c10::optional<torch::Tensor>& residual,
                                                           const torch::Tensor& w, double eps) {
  TORCH_CHECK(has_avx512f(), "add_rms_norm_f32w: this CPU has no AVX512");
  const bool res = residual.has_value() && residual->defined();
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0) && (!res || residual->sizes() == x.sizes()),
              "add_rms_norm_f32w: shapes");
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
              (!res || residual->scalar_type() == x.scalar_type()) && w.scalar_type() == at::kFloat,
              "add_rms_norm_f32w: float32 or bf16 rows (the residual alike), float32 weight");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && (!res || residual->is_contiguous()),
              "add_rms_norm_f32w: contiguous tensors only");
  auto h = torch::empty_like(x);
  auto sum = res ? torch::empty_like(x) : x;
  const int64_t rows = x.size(0), D = x.size(1);
  if (x.scalar_type() == at::kFloat)
    add_rms_rows<false>(x.data_ptr<float>(), res ? residual->data_ptr<float>() : nullptr, w.data_ptr<float>(),
                 h.data_ptr<float>(), sum.data_ptr<float>(), rows, D, float(eps));
  else
    add_rms_rows<false>(reinterpret_cast<const uint16_t*>(x.data_ptr()),
                 res ? reinterpret_cast<const uint16_t*>(residual->data_ptr()) : nullptr, w.data_ptr<float>(),
                 reinterpret_cast<uint16_t*>(h.data_ptr()), reinterpret_cast<uint16_t*>(sum.data_ptr()), rows, D,
                 float(eps));
  return {h, sum};
}

// gu [T, 2I] (gate, then up; float32 or bf16) -> round(round(silu(gate)) * up) [T, I], as F.silu(gate) * up rounds
torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(has_avx512f(), "silu_mul: this CPU has no AVX512");
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0, "silu_mul: shapes");
  TORCH_CHECK((gu.scalar_type() == at::kBFloat16 || gu.scalar_type() == at::kFloat) && gu.is_contiguous(),
              "silu_mul: contiguous float32 or bf16 only");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({T, I}, gu.options());
  at::parallel_for(0, T * I, 2048, [&](int64_t a, int64_t b) {  // exp per value: worth both cores at one row
    if (gu.scalar_type() == at::kFloat)
      silu_mul_rows(gu.data_ptr<float>(), out.data_ptr<float>(), I, a, b);
    else
      silu_mul_rows(reinterpret_cast<const uint16_t*>(gu.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                    I, a, b);
  });
  return out;
}

std::string isa_op() { return isa(); }

void set_max_isa(const std::string& cap) {
  if (cap == "avx512_bf16" || cap.empty()) max_isa = 2;
  else if (cap == "avx512_vnni") max_isa = 1;
  else if (cap == "avx512") max_isa = 0;
  else if (cap == "avx2") max_isa = -1;
  else TORCH_CHECK(false, "set_max_isa: unknown instruction set ", cap, " (avx512_bf16, avx512_vnni, avx512 or avx2)");
}

// How many of torch's threads an at::parallel_for over n items runs on (tests check that the kernels are parallel)
int64_t parallel_threads(int64_t n) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen |= uint64_t(1) << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

// torch operators (torch.ops.qwen.*): a prebuilt library loads with torch.ops.load_library, no compiler needed,
// and profiles show the kernels by name
TORCH_LIBRARY(qwen, m) {
  m.def("isa() -> str", &isa_op);
  m.def("set_max_isa(str isa) -> ()", &set_max_isa);
  m.def("parallel_threads(int n) -> int", &parallel_threads);
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias=None, bool fp32_out=False, str isa=\"\") -> Tensor");
  m.def("has_vnni() -> bool", &has_vnni_op);
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale, Tensor rowsum, Tensor? bias=None) -> Tensor");
  m.def("add_rms_norm_bf16(Tensor x, Tensor residual, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("add_rms_norm_f32w(Tensor x, Tensor? residual, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scale_min, Tensor? bias=None) -> Tensor");
  m.def("int4_to_bf16(Tensor packed, Tensor scale_min) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor gather, Tensor lens, str isa=\"\") -> "
        "Tensor");
  m.def("delta_net_decode(Tensor proj, Tensor(a!) conv_state, Tensor conv_w, Tensor(b!) ssm, Tensor slots, "
        "Tensor neg_a, Tensor dt_bias, Tensor norm_w, int key_heads, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("add_rms_norm_bf16", &add_rms_norm_bf16);
  m.impl("silu_mul", &silu_mul);
  m.impl("add_rms_norm_f32w", &add_rms_norm_f32w);
  m.impl("linear_int4", &linear_int4);
  m.impl("int4_to_bf16", &int4_to_bf16);
  m.impl("decode_attention", &decode_attention);
  m.impl("delta_net_decode", &delta_net_decode);
}
