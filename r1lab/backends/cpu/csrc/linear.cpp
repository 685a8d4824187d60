// Products for a compiled CPU decode step of a few to a few hundred token rows, where the BLAS handles the
// shapes badly (the backend's table in ../__init__.py says which rows).
//
// linear: x @ w^T, weights in nn.Linear's (out, in) layout. At these row counts the BLAS spends much of
// its time packing the weight for a product too short to amortise it. Here each task takes 4 weight rows,
// reads them once, and runs every token row through them with the dot tile (tiles.h).
//
// mlp: a dense SwiGLU block, w2(silu(w1 x) * w3 x), in one call: each thread runs a contiguous range of
// the hidden columns through both up-projections (w1's 4 rows, then w3's same 4, each prefetching the
// next) and gates them while they are in its cache; after one barrier the down-projection runs in tasks of
// 4 rows of w2. As three products and a gating kernel it was four calls, three parallel regions more,
// and the two (M, I) projections written out and read back.
//
// head_linear, head_matmul: one small product per attention head (MLA's absorbed query and value
// projections), which the compiled graph otherwise runs as batched GEMMs far below the machine's peak.
// Tasks are (head, 4 weight rows) with the dot tile, or (head, 16-column panel) with the broadcast tile
// for weights in (in, out) layout.
//
// The ops (float32, CPU):
//   r1lab::linear(x (M, K), weight (N, K)) -> (M, N); x and weight contiguous; K % 8 == 0.
//   r1lab::mlp(x (M, D), w1 (I, D), w2 (D, I), w3 (I, D)) -> (M, D); all contiguous; D % 8 == 0, I % 8 == 0.
//   r1lab::head_linear(x (M, H, K), weight (H, N, K)) -> (M, H, N): out[m, h] = weight[h] @ x[m, h];
//     x contiguous, weight rows contiguous (any head stride); K % 8 == 0, N % 4 == 0.
//   r1lab::head_matmul(x (M, H, K), weight (H, K, N)) -> (M, H, N): out[m, h] = x[m, h] @ weight[h];
//     x and weight rows unit-stride (any row and head strides: the query slice is read in place); N % 8 == 0.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "op.h"
#include "tiles.h"
#include "vmath.h"

namespace {

// out (m, n) = x (m, k) @ w (n, k)^T in tasks of 4 weight rows (the last may have fewer); each task prefetches
// the next task's rows while it runs.
void linear(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; j += 4) {
    const int64_t next = std::max<int64_t>(0, std::min<int64_t>(4, n - j - 4));
    r1lab::dot_rows(x, k, m, w + j * k, k, std::min<int64_t>(4, n - j), k, out + j, n,
                    next ? reinterpret_cast<const char*>(w + (j + 4) * k) : nullptr, next * k * 4);
  }
}

// h, u: (m, hidden) scratch. Up-projection blocks of 4 hidden columns are split between the threads in
// runs of 2 (so each thread's columns start and end on 8-float vectors for the gating).
void mlp(const float* x, const float* w1, const float* w2, const float* w3, float* h, float* u, float* out, int64_t m,
         int64_t d, int64_t hidden) {
  const int64_t up_blocks = hidden / 4, down_blocks = (d + 3) / 4;
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t chunk = 2 * ((up_blocks / 2 + threads - 1) / threads);
    const int64_t b0 = std::min(up_blocks, thread * chunk), b1 = std::min(up_blocks, b0 + chunk);
    // The first down-projection rows this thread takes under the static schedule below, prefetched last.
    const int64_t first_down = std::min(down_blocks - 1, thread * ((down_blocks + threads - 1) / threads));
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t j = block * 4;
      r1lab::dot_rows(x, d, m, w1 + j * d, d, 4, d, h + j, hidden, reinterpret_cast<const char*>(w3 + j * d), 16 * d);
      const bool last = block + 1 == b1;
      r1lab::dot_rows(x, d, m, w3 + j * d, d, 4, d, u + j, hidden,
                      reinterpret_cast<const char*>(last ? w2 + first_down * 4 * hidden : w1 + (j + 4) * d),
                      last ? std::min<int64_t>(4, d - first_down * 4) * hidden * 4 : 16 * d);
    }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 4 * b0; c < 4 * b1; c += 8) {
        float* hr = h + r * hidden + c;
        _mm256_storeu_ps(hr, r1lab::silu_mul8(_mm256_loadu_ps(hr), _mm256_loadu_ps(u + r * hidden + c)));
      }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t block = 0; block < down_blocks; ++block) {
      const int64_t j = block * 4, next = std::min<int64_t>(4, d - j - 4);
      r1lab::dot_rows(h, hidden, m, w2 + j * hidden, hidden, std::min<int64_t>(4, d - j), hidden, out + j, d,
                      next > 0 ? reinterpret_cast<const char*>(w2 + (j + 4) * hidden) : nullptr, next * hidden * 4);
    }
  }
}

void head_linear(const float* x, const float* w, int64_t head_stride, float* out, int64_t m, int64_t heads, int64_t n,
                 int64_t k) {
  const int64_t blocks = n / 4;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < heads * blocks; ++task) {
    const int64_t h = task / blocks, block = task % blocks;
    r1lab::dot_rows(x + h * k, heads * k, m, w + h * head_stride + block * 4 * k, k, 4, k, out + h * n + block * 4,
                    heads * n);
  }
}

// x[r, h] at x + r * x_row + h * x_head (k contiguous floats): MLA's query slice is read in place.
void head_matmul(const float* x, int64_t x_row, int64_t x_head, const float* w, int64_t head_stride, int64_t row_stride,
                 float* out, int64_t m, int64_t heads, int64_t n, int64_t k) {
  const int64_t panels = (n + r1lab::COLS - 1) / r1lab::COLS;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < heads * panels; ++task) {
    const int64_t h = task / panels, j = (task % panels) * r1lab::COLS, width = std::min<int64_t>(r1lab::COLS, n - j);
    r1lab::tile_rows(0, m, [&](int64_t s) { return x + s * x_row + h * x_head; }, k, w + h * head_stride + j,
                     row_stride, width, [&](int64_t s) { return out + (s * heads + h) * n + j; });
  }
}

const char* const LINEAR = "the linear kernel takes contiguous float32 CPU x (M, K) and weights (N, K) with K % 8 == 0";
const char* const MLP = "the mlp kernel takes contiguous float32 CPU x (M, D), w1 and w3 (I, D), w2 (D, I) with D % 8 == 0, "
                        "I % 8 == 0";
const char* const HEADS_MATMUL = "head_matmul takes float32 CPU x (M, H, K) with unit-stride rows (any row and head "
                                 "strides) and weight (H, K, N) with unit-stride rows, N % 8 == 0";
const char* const HEADS = "head_linear takes float32 CPU x (M, H, K) contiguous and weight (H, N, K) with unit-stride rows, "
                          "K % 8 == 0, N % 4 == 0";

// linear(Tensor x, Tensor weight) -> Tensor
void boxed_linear(StableIValue* stack, uint64_t, uint64_t) {
  r1lab::Tensor x(stack[0]), weight(stack[1]);
  const int32_t f32 = aoti_torch_dtype_float32();
  r1lab::check(x.is(f32) && weight.is(f32) && x.dim() == 2 && weight.dim() == 2 && x.contiguous() &&
                   weight.contiguous() && weight.size(1) == x.size(1) && x.size(1) % 8 == 0,
               LINEAR);
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  r1lab::Tensor out(r1lab::empty({m, n}, f32));
  linear(x.data<float>(), m, k, weight.data<float>(), n, out.data<float>());
  stack[0] = out.release();
}

// mlp(Tensor x, Tensor w1, Tensor w2, Tensor w3) -> Tensor
void boxed_mlp(StableIValue* stack, uint64_t, uint64_t) {
  r1lab::Tensor x(stack[0]), w1(stack[1]), w2(stack[2]), w3(stack[3]);
  const int32_t f32 = aoti_torch_dtype_float32();
  r1lab::check(x.is(f32) && w1.is(f32) && w2.is(f32) && w3.is(f32) && x.dim() == 2 && w1.dim() == 2 && w2.dim() == 2 &&
                   w3.dim() == 2 && x.contiguous() && w1.contiguous() && w2.contiguous() && w3.contiguous(),
               MLP);
  const int64_t m = x.size(0), d = x.size(1), hidden = w1.size(0);
  r1lab::check(w1.size(1) == d && w3.size(0) == hidden && w3.size(1) == d && w2.size(0) == d && w2.size(1) == hidden &&
                   d % 8 == 0 && hidden % 8 == 0,
               MLP);
  // Scratch for the two up-projections, kept by the calling thread between calls (no page faults per step).
  static thread_local std::vector<float> scratch;
  if (scratch.size() < (size_t)(2 * m * hidden)) scratch.resize(2 * m * hidden);
  r1lab::Tensor out(r1lab::empty({m, d}, f32));
  mlp(x.data<float>(), w1.data<float>(), w2.data<float>(), w3.data<float>(), scratch.data(), scratch.data() + m * hidden,
      out.data<float>(), m, d, hidden);
  stack[0] = out.release();
}

// head_linear(Tensor x, Tensor weight) -> Tensor
void boxed_head_linear(StableIValue* stack, uint64_t, uint64_t) {
  r1lab::Tensor x(stack[0]), weight(stack[1]);
  const int32_t f32 = aoti_torch_dtype_float32();
  r1lab::check(x.is(f32) && weight.is(f32) && x.dim() == 3 && weight.dim() == 3 && x.contiguous(), HEADS);
  const int64_t m = x.size(0), heads = x.size(1), k = x.size(2), n = weight.size(1);
  r1lab::check(weight.size(0) == heads && weight.size(2) == k && k % 8 == 0 && n % 4 == 0 && weight.stride(2) == 1 &&
                   (n < 2 || weight.stride(1) == k),
               HEADS);
  r1lab::Tensor out(r1lab::empty({m, heads, n}, f32));
  head_linear(x.data<float>(), weight.data<float>(), weight.stride(0), out.data<float>(), m, heads, n, k);
  stack[0] = out.release();
}

// head_matmul(Tensor x, Tensor weight) -> Tensor
void boxed_head_matmul(StableIValue* stack, uint64_t, uint64_t) {
  r1lab::Tensor x(stack[0]), weight(stack[1]);
  const int32_t f32 = aoti_torch_dtype_float32();
  r1lab::check(x.is(f32) && weight.is(f32) && x.dim() == 3 && weight.dim() == 3 && x.stride(2) == 1, HEADS_MATMUL);
  const int64_t m = x.size(0), heads = x.size(1), k = x.size(2), n = weight.size(2);
  r1lab::check(weight.size(0) == heads && weight.size(1) == k && n % 8 == 0 && weight.stride(2) == 1, HEADS_MATMUL);
  r1lab::Tensor out(r1lab::empty({m, heads, n}, f32));
  head_matmul(x.data<float>(), x.stride(0), x.stride(1), weight.data<float>(), weight.stride(0), weight.stride(1),
              out.data<float>(), m, heads, n, k);
  stack[0] = out.release();
}

}  // namespace

extern "C" int r1lab_register_linear() {
  static const int status = r1lab::register_cpu_kernel("linear", boxed_linear) |
                            r1lab::register_cpu_kernel("mlp", boxed_mlp) |
                            r1lab::register_cpu_kernel("head_linear", boxed_head_linear) |
                            r1lab::register_cpu_kernel("head_matmul", boxed_head_matmul);
  return status;
}
