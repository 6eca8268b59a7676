// CPU kernels of qwen-serve's engine, for what torch does slowly on CPUs: matmuls of a few rows (decode steps)
// against bfloat16 weights. A decode step reads every weight once and is bound by memory bandwidth; these
// kernels stream each weight row once for all the step's rows, with AVX512-BF16 dot products where the CPU
// has them and AVX512F (bf16 widened by a shift) where it does not. Threads come from ATen's pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int MR = 4;  // activation rows per pass over a weight row (which stays in L1 between passes)

inline bool has_avx512_bf16() { return __builtin_cpu_supports("avx512bf16"); }
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
void rows_bf16_dp(const uint16_t* x, const uint16_t* w, float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1) {
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
    for (int j = 0; j < R; j++) out[j * ldo + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
  }
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void rows_bf16_f(const uint16_t* x, const uint16_t* w, float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1) {
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
    for (int j = 0; j < R; j++) out[j * ldo + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
  }
}

// All M activation rows against weight rows n0..n1: groups of up to MR rows per pass; a pass over a block of
// weight rows small enough for L1 serves every group before the next block is read.
template <bool DP>
void block_rows(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t ldo, int64_t n0,
                int64_t n1) {
  const int64_t block = std::max<int64_t>(1, 16384 / (2 * K));  // weight rows per L1 block
  for (int64_t b0 = n0; b0 < n1; b0 += block) {
    const int64_t b1 = std::min(n1, b0 + block);
    for (int64_t m = 0; m < M; m += MR) {
      const uint16_t* xr = x + m * K;
      float* o = out + m * ldo;
      switch (std::min<int64_t>(MR, M - m)) {
        case 1: DP ? rows_bf16_dp<1>(xr, w, o, K, ldo, b0, b1) : rows_bf16_f<1>(xr, w, o, K, ldo, b0, b1); break;
        case 2: DP ? rows_bf16_dp<2>(xr, w, o, K, ldo, b0, b1) : rows_bf16_f<2>(xr, w, o, K, ldo, b0, b1); break;
        case 3: DP ? rows_bf16_dp<3>(xr, w, o, K, ldo, b0, b1) : rows_bf16_f<3>(xr, w, o, K, ldo, b0, b1); break;
        default: DP ? rows_bf16_dp<4>(xr, w, o, K, ldo, b0, b1) : rows_bf16_f<4>(xr, w, o, K, ldo, b0, b1);
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
  auto acc = torch::empty({M, N}, torch::dtype(torch::kFloat32));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* ap = acc.data_ptr<float>();
  const bool dp = set == "avx512_bf16";
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    if (dp) block_rows<true>(xp, wp, ap, M, K, N, n0, n1);
    else block_rows<false>(xp, wp, ap, M, K, N, n0, n1);
  });
  if (bias.has_value() && bias->defined()) acc.add_(bias->to(torch::kFloat32));
  return fp32_out ? acc : acc.to(torch::kBFloat16);
}

std::string isa_op() { return isa(); }

// torch operators (torch.ops.qwen.*): a prebuilt library loads with torch.ops.load_library, no compiler needed,
// and profiles show the kernels by name
TORCH_LIBRARY(qwen, m) {
  m.def("isa() -> str", &isa_op);
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias=None, bool fp32_out=False, str isa=\"\") -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen, CPU, m) { m.impl("linear_bf16", &linear_bf16); }
