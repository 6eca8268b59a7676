// CPU kernels of qwen-serve's engine, for what torch does slowly on CPUs: matmuls of a few rows (decode steps)
// against bfloat16, int8 or int4 weights, decode attention over the paged KV cache, and a decode layer's small
// operators fused. A decode step reads every weight once and is bound by memory bandwidth; these kernels stream
// each weight row once for all the step's rows, with AVX512-BF16 dot products where the CPU has them and AVX512F
// (bf16 widened by a shift) where it does not, and AVX512-VNNI for int8 and int4. The bias and the output's
// rounding happen in the same pass, so a projection is one operator. Threads come from ATen's pool: the library
// is compiled with OpenMP, without which ATen's parallel_for runs on the calling thread alone.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
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

inline bool has_avx512_bf16() { return __builtin_cpu_supports("avx512bf16"); }
inline bool has_avx512_vnni() { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"); }
inline bool has_avx512f() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen(__m256i v) {  // 16 bf16 -> 16 fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
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

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void rows_bf16_f(const uint16_t* x, const uint16_t* w, float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1,
                 int64_t base) {
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* wr = w + n * K;
    __m512 a0[R], a1[R];
    for (int j = 0; j < R; j++) a0[j] = a1[j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512 w0 = widen(_mm256_loadu_si256((const __m256i*)(wr + k)));
      const __m512 w1 = widen(_mm256_loadu_si256((const __m256i*)(wr + k + 16)));
      for (int j = 0; j < R; j++) {
        a0[j] = _mm512_fmadd_ps(w0, widen(_mm256_loadu_si256((const __m256i*)(x + j * K + k))), a0[j]);
        a1[j] = _mm512_fmadd_ps(w1, widen(_mm256_loadu_si256((const __m256i*)(x + j * K + k + 16))), a1[j]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
      const __m512 w0 = widen(_mm256_maskz_loadu_epi16(m, wr + k));
      for (int j = 0; j < R; j++) a0[j] = _mm512_fmadd_ps(w0, widen(_mm256_maskz_loadu_epi16(m, x + j * K + k)), a0[j]);
    }
    for (int j = 0; j < R; j++) out[j * ldo + n - base] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
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
template <bool DP>
void block_rows(const uint16_t* x, const uint16_t* w, const Out& out, int64_t M, int64_t K, int64_t n0, int64_t n1) {
  const int64_t block = std::max<int64_t>(1, 16384 / (2 * K));  // weight rows per L1 block
  float tmp[MR * 64];
  const int64_t rows = std::min<int64_t>(block, 64);
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    const int64_t b1 = std::min(n1, b0 + rows);
    for (int64_t m = 0; m < M; m += MR) {
      const uint16_t* xr = x + m * K;
      const int64_t r = std::min<int64_t>(MR, M - m);
      float* o = tmp;  // o[j * 64 + (n - b0)]
      switch (r) {
        case 1: DP ? rows_bf16_dp<1>(xr, w, o, K, 64, b0, b1, b0) : rows_bf16_f<1>(xr, w, o, K, 64, b0, b1, b0); break;
        case 2: DP ? rows_bf16_dp<2>(xr, w, o, K, 64, b0, b1, b0) : rows_bf16_f<2>(xr, w, o, K, 64, b0, b1, b0); break;
        case 3: DP ? rows_bf16_dp<3>(xr, w, o, K, 64, b0, b1, b0) : rows_bf16_f<3>(xr, w, o, K, 64, b0, b1, b0); break;
        default: DP ? rows_bf16_dp<4>(xr, w, o, K, 64, b0, b1, b0) : rows_bf16_f<4>(xr, w, o, K, 64, b0, b1, b0);
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


// int4: weights in blocks of 16 rows; each 64-byte word holds, for 8 consecutive inputs k..k+7 of the block's 16
// rows, one 32-bit lane per row whose 4 bytes carry q[k+j] in their low nibble and q[k+4+j] in their high one, so
// one load and a mask or a shift give two operands of AVX512-VNNI's unsigned-by-signed dot product (16 rows by 4
// inputs each). Each group of 32 inputs has a scale and a minimum per row (w = q * scale + min): the group's
// integer sums are scaled, and the minimum meets the sum of the group's quantized activations.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
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
          acc[j] = _mm512_dpbusd_epi32(acc[j], lo, _mm512_set1_epi32(x0));
          acc[j] = _mm512_dpbusd_epi32(acc[j], hi, _mm512_set1_epi32(x1));
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

// Which instruction set linear_bf16 uses here: "avx512_bf16", "avx512f", or "" (none: use torch).
std::string isa() {
  if (has_avx512_bf16()) return "avx512_bf16";
  if (has_avx512f()) return "avx512f";
  return "";
}

// x [M, K] bf16 (contiguous), w [N, K] bf16 (contiguous), bias [N] or undefined -> [M, N] in `out_dtype`.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                          bool fp32_out, const std::string& use_isa) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_bf16: shapes");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "linear_bf16: bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "linear_bf16: contiguous tensors only");
  const std::string set = use_isa.empty() ? isa() : use_isa;  // tests pick the AVX512F path on BF16 CPUs
  TORCH_CHECK(!set.empty(), "linear_bf16: this CPU has no AVX512");
  TORCH_CHECK(set == "avx512f" || (set == "avx512_bf16" && has_avx512_bf16()), "linear_bf16: unknown isa ", set);
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
  const bool dp = set == "avx512_bf16";
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    if (dp) block_rows<true>(xp, wp, out, M, K, n0, n1);
    else block_rows<false>(xp, wp, out, M, K, n0, n1);
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
  TORCH_CHECK(has_avx512_vnni(), "linear_int8: this CPU has no AVX512-VNNI");
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
  // the activations, quantized: [M, K] unsigned bytes (value + 128), and each row's scale
  std::vector<uint8_t> xu(M * K);
  std::vector<float> sx(M);
  quantize_rows(x.data_ptr<float>(), M, K, sx.data(),
                [&](int64_t m, int64_t k, int v) { xu[m * K + k] = uint8_t(v + 128); });
  const auto* qp = q.data_ptr<int8_t>();
  const int32_t* rs = rowsum.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
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
  TORCH_CHECK(has_avx512_vnni(), "linear_int4: this CPU has no AVX512-VNNI");
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
  at::parallel_for(0, NB, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t m = 0; m < M; m += MR) {
      const int8_t* xr = xq.data() + m * K;
      const int32_t* xs = xsum.data() + m * G;
      switch (std::min<int64_t>(MR, M - m)) {
        case 1: blocks_int4<1>(xr, K, xs, &sx[m], wp, sp, out, m, K, b0, b1); break;
        case 2: blocks_int4<2>(xr, K, xs, &sx[m], wp, sp, out, m, K, b0, b1); break;
        case 3: blocks_int4<3>(xr, K, xs, &sx[m], wp, sp, out, m, K, b0, b1); break;
        default: blocks_int4<4>(xr, K, xs, &sx[m], wp, sp, out, m, K, b0, b1);
      }
    }
  });
  return result;
}


// The small operators of a decode step's layer, fused, for bfloat16 rows (each a few thousand values: one pass
// instead of four or five operators, whose dispatch costs more than their arithmetic). Each rounds where torch's
// sequence of operators rounds, so the results are torch's up to the order of a float sum.

// s = x + residual (rounded to bf16), h = bf16(bf16(s / rms(s)) * w), rms in float32 -> (h, s)
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& residual,
                                                          const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0) && residual.sizes() == x.sizes(),
              "add_rms_norm_bf16: shapes");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
              residual.scalar_type() == at::kBFloat16, "add_rms_norm_bf16: bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && residual.is_contiguous(),
              "add_rms_norm_bf16: contiguous tensors only");
  const int64_t T = x.size(0), D = x.size(1);
  auto h = torch::empty_like(x);
  auto sum = torch::empty_like(x);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* rp = reinterpret_cast<const uint16_t*>(residual.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* hp = reinterpret_cast<uint16_t*>(h.data_ptr());
  auto* sp = reinterpret_cast<uint16_t*>(sum.data_ptr());
  std::vector<float> row(D);
  for (int64_t t = 0; t < T; t++) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; d++) {
      const uint16_t r = float_to_bf16(bf16_to_float(xp[t * D + d]) + bf16_to_float(rp[t * D + d]));
      sp[t * D + d] = r;
      const float v = bf16_to_float(r);
      row[d] = v;
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / float(D) + float(eps));
    for (int64_t d = 0; d < D; d++)
      hp[t * D + d] = float_to_bf16(bf16_to_float(float_to_bf16(row[d] * inv)) * bf16_to_float(wp[d]));
  }
  return {h, sum};
}

// gu [T, 2I] bf16 (gate, then up) -> bf16(bf16(silu(gate)) * up) [T, I]
torch::Tensor silu_mul_bf16(const torch::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0, "silu_mul_bf16: shapes");
  TORCH_CHECK(gu.scalar_type() == at::kBFloat16 && gu.is_contiguous(), "silu_mul_bf16: contiguous bf16 only");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({T, I}, gu.options());
  const auto* p = reinterpret_cast<const uint16_t*>(gu.data_ptr());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, T * I, 2048, [&](int64_t a, int64_t b) {  // exp per value: worth both cores at one row
    for (int64_t j = a; j < b; j++) {
      const int64_t t = j / I, i = j % I;
      const float g = bf16_to_float(p[t * 2 * I + i]);
      const float s = bf16_to_float(float_to_bf16(g / (1.0f + std::exp(-g))));
      o[j] = float_to_bf16(s * bf16_to_float(p[t * 2 * I + I + i]));
    }
  });
  return out;
}

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

// Decode rows' attention, straight from the paged cache: for each row and KV head, the scores of its G query heads
// against the row's n = lens[b] cached keys (slots gather[b, :n]), a softmax in float32, and the weighted sum of the
// values. One task per (row, KV head), spread over torch's threads.
template <typename TQ, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void decode_attention_tasks(const TQ* q, const T* kc, const T* vc, const int64_t* gather, const int64_t* lens, TQ* out,
                            int64_t H, int64_t KV, int64_t D, int64_t L, float scale, int64_t t0, int64_t t1) {
  const int64_t G = H / KV;
  std::vector<float> qf(G * D), acc(G * D), total(G), s;
  for (int64_t t = t0; t < t1; t++) {
    const int64_t b = t / KV, h = t % KV, n = lens[b];
    const int64_t* slots = gather + b * L;
    for (int64_t g = 0; g < G; g++)
      for (int64_t d = 0; d < D; d++) qf[g * D + d] = load_f(q, ((b * H) + h * G + g) * D + d);
    s.resize(G * n);
    for (int64_t l = 0; l < n; l++) {
      const T* kr = kc + (slots[l] * KV + h) * D;
      if (D % 16 == 0) {
        for (int64_t g = 0; g < G; g++) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[g * D + d]), load16(kr + d), a);
          s[g * n + l] = _mm512_reduce_add_ps(a) * scale;
        }
        continue;
      }
      for (int64_t g = 0; g < G; g++) {
        float dot = 0.f;
        for (int64_t d = 0; d < D; d++) dot += qf[g * D + d] * load_f(kr, d);
        s[g * n + l] = dot * scale;
      }
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < G; g++) {
      float mx = -INFINITY;
      for (int64_t l = 0; l < n; l++) mx = std::max(mx, s[g * n + l]);
      float sum = 0.f;
      for (int64_t l = 0; l < n; l++) sum += (s[g * n + l] = std::exp(s[g * n + l] - mx));
      total[g] = sum;
    }
    for (int64_t l = 0; l < n; l++) {
      const T* vr = vc + (slots[l] * KV + h) * D;
      for (int64_t g = 0; g < G; g++) {
        const float p = s[g * n + l];
        if (D % 16 == 0) {
          const __m512 pv = _mm512_set1_ps(p);
          for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(&acc[g * D + d], _mm512_fmadd_ps(pv, load16(vr + d), _mm512_loadu_ps(&acc[g * D + d])));
          continue;
        }
        for (int64_t d = 0; d < D; d++) acc[g * D + d] += p * load_f(vr, d);
      }
    }
    for (int64_t g = 0; g < G; g++)
      for (int64_t d = 0; d < D; d++) store_f(out, ((b * H) + h * G + g) * D + d, acc[g * D + d] / total[g]);
  }
}
}  // namespace

// q [B, H, D], k_cache and v_cache [S, KV, D] (bf16 or float32 caches; q in the caches' dtype, or float32 over a bf16
// cache, as int8 models run), gather [B, L] int64 cache slots of each row's positions, lens [B] int64 (each row
// attends to gather[b, :lens[b]]) -> [B, H * D] in q's dtype; scale 1/sqrt(D), as SDPA's default.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& gather, const torch::Tensor& lens) {
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
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    const auto* kb = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
    const auto* vb = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
    if (ct == at::kFloat)
      decode_attention_tasks<float, float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                           gp, lp, out.data_ptr<float>(), H, KV, D, L, scale, t0, t1);
    else if (qt == at::kFloat)
      decode_attention_tasks<float, uint16_t>(q.data_ptr<float>(), kb, vb, gp, lp, out.data_ptr<float>(), H, KV, D, L,
                                              scale, t0, t1);
    else
      decode_attention_tasks<uint16_t, uint16_t>(reinterpret_cast<const uint16_t*>(q.data_ptr()), kb, vb, gp, lp,
                                                 reinterpret_cast<uint16_t*>(out.data_ptr()), H, KV, D, L, scale, t0,
                                                 t1);
  });
  return out;
}

std::string isa_op() { return isa(); }

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
  m.def("parallel_threads(int n) -> int", &parallel_threads);
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias=None, bool fp32_out=False, str isa=\"\") -> Tensor");
  m.def("has_vnni() -> bool", &has_vnni_op);
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale, Tensor rowsum, Tensor? bias=None) -> Tensor");
  m.def("add_rms_norm_bf16(Tensor x, Tensor residual, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul_bf16(Tensor gu) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scale_min, Tensor? bias=None) -> Tensor");
  m.def("int4_to_bf16(Tensor packed, Tensor scale_min) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor gather, Tensor lens) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("add_rms_norm_bf16", &add_rms_norm_bf16);
  m.impl("silu_mul_bf16", &silu_mul_bf16);
  m.impl("linear_int4", &linear_int4);
  m.impl("int4_to_bf16", &int4_to_bf16);
  m.impl("decode_attention", &decode_attention);
}
