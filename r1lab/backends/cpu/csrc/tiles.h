// The register-tiled AVX2 micro-kernels the products in this directory are built from.
//
// broadcast tile: rows of a times a (k, 16) panel of b in (in, out) layout: each a[r][k] broadcast
//   against two vectors of b's row k; 6 x 2 accumulators + 2 weight vectors fit the 16 ymm registers.
// dot tile: rows of x times up to 4 rows of w in nn.Linear's (out, in) layout: 3 x 4 vector
//   accumulators over the input dim, reduced by horizontal adds at the end.
// (The unroll pragmas keep the accumulators in registers; without them GCC spills them every k step.)
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "vmath.h"

namespace r1lab {

constexpr int ROWS = 6;   // rows per broadcast tile
constexpr int COLS = 16;  // columns per broadcast tile (two 8-float vectors)

// c[r][0:n] = sum_k a[r][k] * b[k * ldb + 0:n] for r < R, n = 16 or 8.
template <int R>
void broadcast_tile(const float* const* a, int64_t k_dim, const float* b, int64_t ldb, int64_t n, float* const* c) {
  if (n == COLS) {
    __m256 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_dim; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + k * ldb);
      const __m256 b1 = _mm256_loadu_ps(b + k * ldb + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 ar = _mm256_broadcast_ss(a[r] + k);
        acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(c[r], acc[r][0]);
      _mm256_storeu_ps(c[r] + 8, acc[r][1]);
    }
    return;
  }
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(a[r] + k), b0, acc[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(c[r], acc[r]);
}

// broadcast_tile for 1 <= rows <= ROWS.
inline void tile(int rows, const float* const* a, int64_t k_dim, const float* b, int64_t ldb, int64_t n,
                 float* const* c) {
  switch (rows) {
    case 1: broadcast_tile<1>(a, k_dim, b, ldb, n, c); break;
    case 2: broadcast_tile<2>(a, k_dim, b, ldb, n, c); break;
    case 3: broadcast_tile<3>(a, k_dim, b, ldb, n, c); break;
    case 4: broadcast_tile<4>(a, k_dim, b, ldb, n, c); break;
    case 5: broadcast_tile<5>(a, k_dim, b, ldb, n, c); break;
    default: broadcast_tile<6>(a, k_dim, b, ldb, n, c); break;
  }
}

// Rows [first, last) through one (k_dim, n) panel b, ROWS at a time: c_of(s)[0:n] = a_of(s) @ b, where a_of(s) and
// c_of(s) point at row s of a and of c.
template <typename RowA, typename RowC>
void tile_rows(int64_t first, int64_t last, RowA a_of, int64_t k_dim, const float* b, int64_t ldb, int64_t n,
               RowC c_of) {
  for (int64_t s = first; s < last; s += ROWS) {
    const int rows = (int)std::min<int64_t>(ROWS, last - s);
    const float* a[ROWS];
    float* c[ROWS];
    for (int r = 0; r < rows; ++r) {
      a[r] = a_of(s + r);
      c[r] = c_of(s + r);
    }
    tile(rows, a, k_dim, b, ldb, n, c);
  }
}

// [sum(a), sum(b), sum(c), sum(d)]
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// out[r * ldo + j] = x[r * ldx] . w[j * ldw] for R rows of x and J <= 4 rows of w; k_dim % 8 == 0.
template <int R, int J>
void dot_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k_dim, float* out, int64_t ldo) {
  __m256 acc[R][J];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_dim; k += 8) {
    __m256 wv[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    if constexpr (J == 4) {
      _mm_storeu_ps(out + r * ldo, hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) out[r * ldo + j] = hsum(acc[r][j]);
    }
  }
}

// Rows [0, m) of x against J <= 4 rows of w, in dot tiles of 3 rows and a remainder. Meanwhile the
// `ahead_bytes` at `ahead` (the weight rows the caller takes next) are prefetched, spread over the tiles:
// with the weights out of cache, the next rows' first loads otherwise stall every tile of them.
template <int J>
void dot_rows_of(const float* x, int64_t ldx, int64_t m, const float* w, int64_t ldw, int64_t k_dim, float* out,
                 int64_t ldo, const char* ahead, int64_t ahead_bytes) {
  const int64_t lines = ahead == nullptr ? 0 : (ahead_bytes + 63) / 64;
  const int64_t per_tile = m >= 3 ? (lines + m / 3 - 1) / (m / 3) : lines;
  int64_t line = 0, r = 0;
  for (; r + 3 <= m; r += 3) {
    for (const int64_t end = std::min(lines, line + per_tile); line < end; ++line)
      _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
    dot_tile<3, J>(x + r * ldx, ldx, w, ldw, k_dim, out + r * ldo, ldo);
  }
  for (; line < lines; ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
  for (; r < m; ++r) dot_tile<1, J>(x + r * ldx, ldx, w, ldw, k_dim, out + r * ldo, ldo);
}

// dot_rows_of for 1 <= rows_w <= 4 rows of w.
inline void dot_rows(const float* x, int64_t ldx, int64_t m, const float* w, int64_t ldw, int64_t rows_w,
                     int64_t k_dim, float* out, int64_t ldo, const char* ahead = nullptr, int64_t ahead_bytes = 0) {
  switch (rows_w) {
    case 1: dot_rows_of<1>(x, ldx, m, w, ldw, k_dim, out, ldo, ahead, ahead_bytes); break;
    case 2: dot_rows_of<2>(x, ldx, m, w, ldw, k_dim, out, ldo, ahead, ahead_bytes); break;
    case 3: dot_rows_of<3>(x, ldx, m, w, ldw, k_dim, out, ldo, ahead, ahead_bytes); break;
    default: dot_rows_of<4>(x, ldx, m, w, ldw, k_dim, out, ldo, ahead, ahead_bytes); break;
  }
}

}  // namespace r1lab
