// One token through a large output projection (an LM head) with int8 weights: weight-only
// quantisation, one scale per row (q_j = round(w_j / s_j), s_j = max|w_j| / 127), dequantised on
// the fly and multiplied by the float32 input, so a row costs 1 byte per weight to read instead
// of 4 (decoding is bound by reading the weights).
//
// Optionally the result is made exact where it matters for the argmax: rounding moves each weight
// by at most s_j / 2, so the int8 logit is within e_j = s_j / 2 * |x|_1 of the float32 one (plus
// float32 summation error, covered by the margin below). Every row whose interval can reach the
// best lower bound max_i (approx_i - e_i) is recomputed from the float32 weights; all others
// provably lose to it. The argmax is then the float32 argmax, and so are those rows' logits.
//
// Hand-written because nothing maintained does this for PyTorch on CPU: torch.ao's dynamic int8
// quantises the activations too (one scale per token: Gemma's outlier features cost it 4.6 F1
// points), and torch._weight_int8pack_mm was slower than float32 on the CPUs measured.
#include <torch/extension.h>

#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// Slack on the rounding bound: float32 summation of d products of int8 * float differs from the
// exact sum by well under 1 % of the bound for d <= 2^16 (d * 2^-24 * 127 relative to 0.5).
constexpr float kBoundSlack = 1.02f;

inline float dot_int8(const int8_t* __restrict q, const float* __restrict x, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) s += static_cast<float>(q[c]) * x[c];
  return s;
}

// Four rows at once: each 8-wide slice of x is loaded once for four rows (the auto-vectorised
// single-row loop above was ~10 % slower on the Gemma head's shape).
inline void dot_int8_x4(const int8_t* __restrict q, const float* __restrict x, int64_t d, float* out) {
#ifdef __AVX2__
  const int8_t *r0 = q, *r1 = q + d, *r2 = q + 2 * d, *r3 = q + 3 * d;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    const __m256 xv = _mm256_loadu_ps(x + c);
#define DEFT_ROW(r, a) \
  a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(r + c)))), xv, a)
    DEFT_ROW(r0, a0);
    DEFT_ROW(r1, a1);
    DEFT_ROW(r2, a2);
    DEFT_ROW(r3, a3);
#undef DEFT_ROW
  }
  alignas(32) float t[4][8];
  _mm256_store_ps(t[0], a0);
  _mm256_store_ps(t[1], a1);
  _mm256_store_ps(t[2], a2);
  _mm256_store_ps(t[3], a3);
  const int8_t* rows[4] = {r0, r1, r2, r3};
  for (int r = 0; r < 4; ++r) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += t[r][l];
    for (int64_t e = c; e < d; ++e) s += static_cast<float>(rows[r][e]) * x[e];
    out[r] = s;
  }
#else
  for (int r = 0; r < 4; ++r) out[r] = dot_int8(q + r * d, x, d);
#endif
}

inline float dot_f32(const float* __restrict w, const float* __restrict x, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) s += w[c] * x[c];
  return s;
}

}  // namespace

// Returns (logits (V,), rows recomputed in float32).
std::tuple<torch::Tensor, int64_t> int8_head_forward(const torch::Tensor& x, const torch::Tensor& q,
                                                      const torch::Tensor& scale,
                                                      const std::optional<torch::Tensor>& weight,
                                                      const std::optional<torch::Tensor>& bias, int64_t threads) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 1-D float32 CPU tensor");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous(), "q must be contiguous int8 (V, d)");
  const int64_t V = q.size(0), d = q.size(1);
  TORCH_CHECK(x.size(0) == d, "x has ", x.size(0), " features, q rows have ", d);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == V && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(),
              "scale must be contiguous float32 (V,)");
  if (weight) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == V && weight->size(1) == d &&
                    weight->scalar_type() == torch::kFloat32 && weight->is_contiguous(),
                "weight must be contiguous float32 (V, d)");
  }
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V && bias->scalar_type() == torch::kFloat32 && bias->is_contiguous(),
                "bias must be contiguous float32 (V,)");
  }
  auto y = torch::empty({V}, x.options());
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* wp = weight ? weight->data_ptr<float>() : nullptr;
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;

  float l1 = 0.f;
  for (int64_t c = 0; c < d; ++c) l1 += std::abs(xp[c]);
  const float half_l1 = 0.5f * l1 * kBoundSlack;

  const int nt = static_cast<int>(std::max<int64_t>(1, threads > 0 ? threads : at::get_num_threads()));
  std::vector<float> floors(nt, -std::numeric_limits<float>::infinity());
  int64_t recomputed = 0;
#pragma omp parallel num_threads(nt)
  {
    float floor = -std::numeric_limits<float>::infinity();
    const int64_t groups = (V + 3) / 4;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t j0 = g * 4, n = std::min<int64_t>(4, V - j0);
      float dots[4];
      if (n == 4) {
        dot_int8_x4(qp + j0 * d, xp, d, dots);
      } else {
        for (int64_t r = 0; r < n; ++r) dots[r] = dot_int8(qp + (j0 + r) * d, xp, d);
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t j = j0 + r;
        float v = sp[j] * dots[r];
        if (bp) v += bp[j];
        yp[j] = v;
        floor = std::max(floor, v - sp[j] * half_l1);
      }
    }
    floors[omp_get_thread_num()] = floor;
#pragma omp barrier
    if (wp) {
      const float best_low = *std::max_element(floors.begin(), floors.end());
      int64_t mine = 0;
#pragma omp for schedule(static)
      for (int64_t j = 0; j < V; ++j) {
        if (yp[j] + sp[j] * half_l1 >= best_low) {
          float v = dot_f32(wp + j * d, xp, d);
          if (bp) v += bp[j];
          yp[j] = v;
          ++mine;
        }
      }
#pragma omp atomic
      recomputed += mine;
    }
  }
  return {y, recomputed};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deft: one token through an int8 weight-only output projection, argmax made exact, fp32 CPU";
  m.def("forward", &int8_head_forward, "logits of x under int8 rows (rows that can win recomputed in float32)",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("weight"), py::arg("bias"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
}
