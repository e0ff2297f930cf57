// One token through an MLP block whose activation vector `a` is mostly zero (batch-1 decoding).
//
// Fuses what the dense path does in several full passes over the weights: the threshold
// (|a_i| > tau, i.e. not |a_i| <= tau, the exact rule of ThresholdedActivation, NaN kept),
// compaction into the active indices, the up projection on the active rows only (gated MLPs:
// v_i = a_i * (W_up[i] . x + b_up[i])) and the down projection as an axpy over the active rows of
// W_down^T (h, d_out), so only k of h rows of each matrix are read from memory.
//
// Hand-written because nothing maintained does this for PyTorch on CPU: torch.sparse wants a
// fixed sparse weight, not a per-token activation mask, and MKL/oneDNN have no masked GEMV.
//
// Threads: the dot products are split over active rows, the axpy over the output dimension
// (each thread owns a cache-line-aligned slice of y, so no reduction and no false sharing).
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kLine = 16;  // floats per 64-byte cache line
constexpr int64_t kLead = 4;   // rows of W_up asked for ahead of the one being summed

void check_vector(const torch::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, name, " must have shape (", size, "), got ", t.sizes());
}

void check_matrix(const torch::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && (cols < 0 || t.size(1) == cols),
              name, " must have shape (", rows, ", ", cols, "), got ", t.sizes());
}

// Rows are visited in increasing but gapped order, which the hardware prefetcher follows poorly
// for short rows: ask for the next group's slices while this group is being summed.
inline void prefetch(const float* p, int64_t len) {
  for (int64_t c = 0; c < len; c += kLine) __builtin_prefetch(p + c, 0, 0);
}

}  // namespace

torch::Tensor sparse_mlp_forward(const torch::Tensor& x, const torch::Tensor& a, double tau,
                                 const torch::Tensor& down_weight_t,
                                 const std::optional<torch::Tensor>& down_bias,
                                 const std::optional<torch::Tensor>& up_weight,
                                 const std::optional<torch::Tensor>& up_bias, int64_t threads) {
  TORCH_CHECK(x.dim() == 1 && a.dim() == 1, "x and a must be 1-D (one token)");
  const int64_t d = x.size(0), h = a.size(0);
  check_vector(x, "x", d);
  check_vector(a, "a", h);
  check_matrix(down_weight_t, "down_weight_t", h, -1);
  const int64_t d_out = down_weight_t.size(1);
  if (down_bias) check_vector(*down_bias, "down_bias", d_out);
  if (up_weight) check_matrix(*up_weight, "up_weight", h, d);
  if (up_bias) {
    TORCH_CHECK(up_weight.has_value(), "up_bias given without up_weight");
    check_vector(*up_bias, "up_bias", h);
  }

  // Threshold + compaction (serial: h compares, negligible next to k * (d + d_out) weights).
  const float t = static_cast<float>(tau);  // the dense path compares in float32 too
  const float* ap = a.data_ptr<float>();
  std::vector<int64_t> idx;
  std::vector<float> val;
  idx.reserve(h);
  val.reserve(h);
  for (int64_t i = 0; i < h; ++i) {
    const float ai = ap[i];
    if (!(std::abs(ai) <= t)) {
      idx.push_back(i);
      val.push_back(ai);
    }
  }
  const int64_t k = static_cast<int64_t>(idx.size());

  auto y = torch::empty({d_out}, x.options());
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wt = down_weight_t.data_ptr<float>();
  const float* bd = down_bias ? down_bias->data_ptr<float>() : nullptr;
  const float* wu = up_weight ? up_weight->data_ptr<float>() : nullptr;
  const float* bu = up_bias ? up_bias->data_ptr<float>() : nullptr;
  const int64_t* ip = idx.data();
  float* vp = val.data();

  // threads <= 0: torch's intra-op count, but a tiny problem (< 128 KiB of weights to read)
  // stays on one thread, where waking others costs more than it saves. Never more threads than
  // cache-line slices of y.
  int64_t nt = threads;
  if (nt <= 0) nt = k * (d_out + (wu ? d : 0)) < 32768 ? 1 : at::get_num_threads();
  nt = std::max<int64_t>(1, std::min<int64_t>(nt, (d_out + kLine - 1) / kLine));

#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    if (wu) {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < k; ++j) {
        // The rows are gapped: without asking ahead, each one waits for memory.
        if (j + kLead < k) prefetch(wu + ip[j + kLead] * d, d);
        const float* row = wu + ip[j] * d;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < d; ++c) s += row[c] * xp[c];
        if (bu) s += bu[ip[j]];
        vp[j] *= s;
      }  // implicit barrier: every v_j is final before the axpy reads it
    }

    const int64_t n = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t chunk = ((d_out + n - 1) / n + kLine - 1) / kLine * kLine;
    const int64_t lo = std::min(d_out, tid * chunk), hi = std::min(d_out, lo + chunk), len = hi - lo;
    if (len > 0) {
      float* __restrict out = yp + lo;
      if (bd) {
        std::copy(bd + lo, bd + hi, out);
      } else {
        std::fill(out, out + len, 0.f);
      }
      int64_t j = 0;
      // Four rows per sweep: one load/store of the output slice per four rows read.
      for (; j + 4 <= k; j += 4) {
        const float* __restrict r0 = wt + ip[j] * d_out + lo;
        const float* __restrict r1 = wt + ip[j + 1] * d_out + lo;
        const float* __restrict r2 = wt + ip[j + 2] * d_out + lo;
        const float* __restrict r3 = wt + ip[j + 3] * d_out + lo;
        for (int64_t p = j + 4; p < std::min(k, j + 8); ++p) prefetch(wt + ip[p] * d_out + lo, len);
        const float v0 = vp[j], v1 = vp[j + 1], v2 = vp[j + 2], v3 = vp[j + 3];
#pragma omp simd
        for (int64_t c = 0; c < len; ++c) out[c] += v0 * r0[c] + v1 * r1[c] + v2 * r2[c] + v3 * r3[c];
      }
      for (; j < k; ++j) {
        const float* __restrict r = wt + ip[j] * d_out + lo;
        const float v = vp[j];
#pragma omp simd
        for (int64_t c = 0; c < len; ++c) out[c] += v * r[c];
      }
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deft: fused threshold + compaction + sparse GEMV of one MLP block, one token, fp32 CPU";
  m.def("forward", &sparse_mlp_forward, "y = down(v) with v_i = a_i [* up_i(x)] over |a_i| > tau",
        py::arg("x"), py::arg("a"), py::arg("tau"), py::arg("down_weight_t"), py::arg("down_bias"),
        py::arg("up_weight"), py::arg("up_bias"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
}
