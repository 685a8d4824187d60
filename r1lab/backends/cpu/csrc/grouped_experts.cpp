// Routed experts for a decode step on an AVX2 CPU: one grouped GEMM over the tokens' expert choices.
//
// A compiled step calls this (r1lab::grouped_experts, ops.py) for its routed experts. Assignments are
// sorted by expert, each expert's rows are cut
// into tiles of up to ROWS rows, and the work is split into (expert, 16-column block) tasks: a task
// keeps that panel of its expert's weights in L1 while a register-tiled micro-kernel runs every tile
// of the expert's rows through it, so each weight is read once per step (the compiled reductions
// reload it per token).
//
// Letters: N tokens, K experts per token, E routed experts, D model dim, I expert hidden dim.
// The op r1lab::grouped_experts(x, indices, weights, w1, w2, w3). Layouts (row-major, contiguous):
// x (N, D); indices (N, K) int64; weights (N, K); w1, w3 (E, D, I); w2 (E, I, D); out (N, D).
// D and I must be multiples of 8.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "op.h"
#include "tiles.h"
#include "vmath.h"

namespace {

using r1lab::COLS;
constexpr int64_t PACK_BYTES = 128 * 1024;  // packed weight panels per task: well inside L2

// Columns [j0, j1) of one expert's rows: b (k_dim, ldb) is packed into COLS-wide panels in one pass over
// its rows (sequential reads: the panels' strided column slices read directly are latency-bound when the
// weights come from memory), then each panel runs through every row tile.
template <typename RowA, typename RowC>
void expert_block(int64_t first, int64_t last, RowA a_of, int64_t k_dim, const float* b, int64_t ldb, int64_t j0,
                  int64_t j1, RowC c_of, std::vector<float>& packed) {
  const int64_t panels = (j1 - j0 + COLS - 1) / COLS;
  if (packed.size() < (size_t)(panels * k_dim * COLS)) packed.resize(panels * k_dim * COLS);
  for (int64_t k = 0; k < k_dim; ++k) {
    const float* row = b + k * ldb;
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t j = j0 + p * COLS, n = std::min<int64_t>(COLS, j1 - j);
      float* dst = packed.data() + (p * k_dim + k) * COLS;
      if (n == COLS) {
        _mm256_storeu_ps(dst, _mm256_loadu_ps(row + j));
        _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(row + j + 8));
      } else {  // n == 8: dims are multiples of 8
        _mm256_storeu_ps(dst, _mm256_loadu_ps(row + j));
      }
    }
  }
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j = j0 + p * COLS, n = std::min<int64_t>(COLS, j1 - j);
    r1lab::tile_rows(first, last, a_of, k_dim, packed.data() + p * k_dim * COLS, COLS, n,
                     [&](int64_t s) { return c_of(s) + j; });
  }
}

// Columns per task for a product over k_dim: as many COLS panels as fit PACK_BYTES.
int64_t task_columns(int64_t k_dim, int64_t width) {
  const int64_t panels = std::max<int64_t>(1, PACK_BYTES / (k_dim * COLS * (int64_t)sizeof(float)));
  return std::min<int64_t>(panels * COLS, width);
}

// Returns 0, or -1 (touching nothing) if an expert index is outside [0, E).
int grouped_experts(const float* x, const int64_t* indices, const float* weights, const float* w1,
                    const float* w2, const float* w3, float* out, int64_t n_tokens, int64_t k_top,
                    int64_t n_experts, int64_t dim, int64_t hidden) {
  const int64_t n_assign = n_tokens * k_top;
  for (int64_t a = 0; a < n_assign; ++a)
    if (indices[a] < 0 || indices[a] >= n_experts) return -1;
  // Counting sort of the assignments by expert (stable: token order within an expert).
  std::vector<int64_t> start(n_experts + 1, 0), token_of(n_assign), slot_of(n_assign);
  for (int64_t a = 0; a < n_assign; ++a) ++start[indices[a] + 1];
  for (int64_t e = 0; e < n_experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t a = 0; a < n_assign; ++a) {
    const int64_t s = fill[indices[a]]++;
    token_of[s] = a / k_top;
    slot_of[a] = s;
  }
  // Tasks are (expert, column block): each reads its block of the expert's weights once.
  const int64_t h_cols = task_columns(dim, hidden), d_cols = task_columns(hidden, dim);
  const int64_t h_blocks = (hidden + h_cols - 1) / h_cols, d_blocks = (dim + d_cols - 1) / d_cols;
  // Scratch in sorted order, kept by the calling thread between calls (no page faults per step).
  static thread_local std::vector<float> scratch;
  if (scratch.size() < (size_t)(n_assign * (2 * hidden + dim))) scratch.resize(n_assign * (2 * hidden + dim));
  float* const h1 = scratch.data();
  float* const h3 = h1 + n_assign * hidden;
  float* const y = h3 + n_assign * hidden;
  const auto x_row = [&](int64_t s) { return x + token_of[s] * dim; };
  const auto h1_row = [&](int64_t s) { return h1 + s * hidden; };
  const auto h3_row = [&](int64_t s) { return h3 + s * hidden; };
  const auto y_row = [&](int64_t s) { return y + s * dim; };
#pragma omp parallel
  {
    static thread_local std::vector<float> packed;  // each thread's panels, kept between calls
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_experts * h_blocks; ++task) {
      const int64_t e = task / h_blocks, j = (task % h_blocks) * h_cols, j1 = std::min(j + h_cols, hidden);
      if (start[e] == start[e + 1]) continue;
      expert_block(start[e], start[e + 1], x_row, dim, w1 + e * dim * hidden, hidden, j, j1, h1_row, packed);
      expert_block(start[e], start[e + 1], x_row, dim, w3 + e * dim * hidden, hidden, j, j1, h3_row, packed);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_assign * hidden; i += 8)  // silu(x w1) * (x w3); hidden % 8 == 0
      _mm256_storeu_ps(h1 + i, r1lab::silu_mul8(_mm256_loadu_ps(h1 + i), _mm256_loadu_ps(h3 + i)));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_experts * d_blocks; ++task) {
      const int64_t e = task / d_blocks, j = (task % d_blocks) * d_cols, j1 = std::min(j + d_cols, dim);
      if (start[e] == start[e + 1]) continue;
      expert_block(start[e], start[e + 1], h1_row, hidden, w2 + e * hidden * dim, dim, j, j1, y_row, packed);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tokens; ++t) {  // out[t] = sum_k weights[t, k] * y[slot of (t, k)]
      float* o = out + t * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = 0.0f;
      for (int64_t k = 0; k < k_top; ++k) {
        const float w = weights[t * k_top + k];
        const float* yk = y + slot_of[t * k_top + k] * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * yk[d];
      }
    }
  }
  return 0;
}

// grouped_experts(Tensor x, Tensor indices, Tensor weights, Tensor w1, Tensor w2, Tensor w3) -> Tensor
void boxed(StableIValue* stack, uint64_t, uint64_t) {
  r1lab::Tensor x(stack[0]), indices(stack[1]), weights(stack[2]), w1(stack[3]), w2(stack[4]), w3(stack[5]);
  const int32_t f32 = aoti_torch_dtype_float32();
  r1lab::check(x.is(f32) && weights.is(f32) && w1.is(f32) && w2.is(f32) && w3.is(f32) &&
                   indices.is(aoti_torch_dtype_int64()),
               "the grouped expert kernel takes float32 CPU tensors and int64 indices");
  r1lab::check(x.dim() == 2 && indices.dim() == 2 && weights.dim() == 2 && w1.dim() == 3 && w2.dim() == 3 &&
                   w3.dim() == 3,
               "grouped experts: x (N, D), indices and weights (N, K), w1, w3 (E, D, I), w2 (E, I, D)");
  const int64_t n = x.size(0), dim = x.size(1), k = indices.size(1), e = w1.size(0), hidden = w1.size(2);
  r1lab::check(indices.size(0) == n && weights.size(0) == n && weights.size(1) == k && w1.size(1) == dim &&
                   w3.size(0) == e && w3.size(1) == dim && w3.size(2) == hidden && w2.size(0) == e &&
                   w2.size(1) == hidden && w2.size(2) == dim,
               "grouped experts: x (N, D), indices and weights (N, K), w1, w3 (E, D, I), w2 (E, I, D) disagree");
  r1lab::check(dim % 8 == 0 && hidden % 8 == 0, "the grouped expert kernel takes model and expert dims multiples of 8");
  r1lab::check(x.contiguous() && indices.contiguous() && weights.contiguous() && w1.contiguous() &&
                   w2.contiguous() && w3.contiguous(),
               "the grouped expert kernel takes contiguous tensors");
  r1lab::Tensor out(r1lab::empty({n, dim}, f32));
  if (grouped_experts(x.data<float>(), indices.data<int64_t>(), weights.data<float>(), w1.data<float>(),
                      w2.data<float>(), w3.data<float>(), out.data<float>(), n, k, e, dim, hidden) != 0)
    throw std::invalid_argument("routed expert indices must lie in [0, " + std::to_string(e) + ")");
  stack[0] = out.release();
}

}  // namespace

extern "C" int r1lab_register_grouped_experts() {
  static const int status = r1lab::register_cpu_kernel("grouped_experts", boxed);
  return status;
}
