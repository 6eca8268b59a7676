// CPU kernels of qwen-serve's engine, for what torch does slowly on CPUs: matmuls of a few rows (decode steps)
// against bfloat16 weights. A decode step reads every weight once and is bound by memory bandwidth; these
// kernels stream each weight row once for all the step's rows, with AVX512-BF16 dot products where the CPU
// has them and AVX512F (bf16 widened by a shift) where it does not. Threads come from ATen's pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int NT = 4;  // weight rows per tile
constexpr int MT = 4;  // activation rows per tile

inline bool has_avx512_bf16() { return __builtin_cpu_supports("avx512bf16"); }
inline bool has_avx512f() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen(__m256i v) {  // 16 bf16 -> 16 fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// out[m, n0:n1] for all m: dot products of activation rows with weight rows, both bf16 [*, K]
__attribute__((target("avx512f,avx512bw,avx512bf16,avx512vl")))
void tile_bf16_dp(const uint16_t* x, const uint16_t* w, float* acc_out, int64_t M, int64_t K, int64_t ldo,
                  int64_t n0, int64_t n1) {
  const int64_t kfull = K / 32 * 32;
  const __mmask32 tail = (__mmask32)((1ull << (K - kfull)) - 1);
  for (int64_t n = n0; n < n1; n += NT) {
    const int nt = (int)std::min<int64_t>(NT, n1 - n);
    for (int64_t m = 0; m < M; m += MT) {
      const int mt = (int)std::min<int64_t>(MT, M - m);
      __m512 acc[NT][MT];
      for (int i = 0; i < NT; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
      const uint16_t* wr[NT];
      for (int i = 0; i < NT; i++) wr[i] = w + (n + (i < nt ? i : 0)) * K;
      for (int64_t k = 0; k < K; k += 32) {
        const bool last = k >= kfull;
        __m512bh wv[NT];
        for (int i = 0; i < NT; i++)
          wv[i] = (__m512bh)(last ? _mm512_maskz_loadu_epi16(tail, wr[i] + k) : _mm512_loadu_si512(wr[i] + k));
        for (int j = 0; j < mt; j++) {
          const uint16_t* xr = x + (m + j) * K + k;
          __m512bh xv = (__m512bh)(last ? _mm512_maskz_loadu_epi16(tail, xr) : _mm512_loadu_si512(xr));
          for (int i = 0; i < NT; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], xv);
        }
      }
      for (int i = 0; i < nt; i++)
        for (int j = 0; j < mt; j++) acc_out[(m + j) * ldo + n + i] = _mm512_reduce_add_ps(acc[i][j]);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void tile_bf16_f(const uint16_t* x, const uint16_t* w, float* acc_out, int64_t M, int64_t K, int64_t ldo,
                 int64_t n0, int64_t n1) {
  const int64_t kfull = K / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (K - kfull)) - 1);
  for (int64_t n = n0; n < n1; n += NT) {
    const int nt = (int)std::min<int64_t>(NT, n1 - n);
    for (int64_t m = 0; m < M; m += MT) {
      const int mt = (int)std::min<int64_t>(MT, M - m);
      __m512 acc[NT][MT];
      for (int i = 0; i < NT; i++)
        for (int j = 0; j < MT; j++) acc[i][j] = _mm512_setzero_ps();
      const uint16_t* wr[NT];
      for (int i = 0; i < NT; i++) wr[i] = w + (n + (i < nt ? i : 0)) * K;
      for (int64_t k = 0; k < K; k += 16) {
        const bool last = k >= kfull;
        __m512 wv[NT];
        for (int i = 0; i < NT; i++)
          wv[i] = widen(last ? _mm256_maskz_loadu_epi16(tail, wr[i] + k) : _mm256_loadu_si256((const __m256i*)(wr[i] + k)));
        for (int j = 0; j < mt; j++) {
          const uint16_t* xr = x + (m + j) * K + k;
          __m512 xv = widen(last ? _mm256_maskz_loadu_epi16(tail, xr) : _mm256_loadu_si256((const __m256i*)xr));
          for (int i = 0; i < NT; i++) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
        }
      }
      for (int i = 0; i < nt; i++)
        for (int j = 0; j < mt; j++) acc_out[(m + j) * ldo + n + i] = _mm512_reduce_add_ps(acc[i][j]);
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
  const int64_t tiles = (N + NT - 1) / NT;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * NT, n1 = std::min<int64_t>(N, t1 * NT);
    if (dp) tile_bf16_dp(xp, wp, ap, M, K, N, n0, n1);
    else tile_bf16_f(xp, wp, ap, M, K, N, n0, n1);
  });
  if (bias.has_value() && bias->defined()) acc.add_(bias->to(torch::kFloat32));
  return fp32_out ? acc : acc.to(torch::kBFloat16);
}

// also an operator of torch's (torch.ops.qwen.linear_bf16): profiles show it by name
TORCH_LIBRARY(qwen, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias=None, bool fp32_out=False, str isa=\"\") -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen, CPU, m) { m.impl("linear_bf16", &linear_bf16); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa);
  m.def("linear_bf16", &linear_bf16, "x @ w.T for a few rows of bf16 activations against bf16 weights",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("fp32_out") = false,
        py::arg("isa") = "");
}
