// MLA decode attention over the latent cache on an AVX2 CPU, one pass per sequence.
//
// In the absorbed form every head's query attends to one shared key per token, [c_kv, k_pe], and the
// value is the latent c_kv itself (model.MLA). A decode step has only T * H query rows per sequence
// (T = 1, or 2 when verifying a draft), so batched GEMMs spend their time on setup and re-reading the
// cache; here each sequence's cache rows are read once for the scores and once more (from L1/L2, a few
// columns at a time) for the weighted sums, all of its query rows sharing every key vector loaded.
//
// Letters: B sequences, T new tokens, M = T * H query rows, S cache slots attended, L = R + P key
// width, R latent width (the value), P = L - R rope width. The op r1lab::latent_attention(query, query_rope,
// keys, positions, scale): each query row in two parts, its latent (R) and rope (P) halves, as MLA makes them
// (no copy into one (B, M, L) query per layer).
// Layouts: query (B, M, R) and query_rope (B, M, P) contiguous; keys[b, s, l] at keys + b * key_stride +
// s * L + l (a slot slice of the cache, read in place); out (B, M, R). What each token sees: positions (B, T)
// int64, token t seeing slots 0..positions[t] (the cache's visibility: slot s holds position s).
// R and P must be multiples of 8.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "op.h"
#include "vmath.h"

namespace {

constexpr int MAX_ROWS = 8;  // query rows per sequence handled in one register block

// scores[m][s] = scale * [q[m], qr[m]] . keys[s] (or -inf where not visible) for the N query rows of a block (their
// latent halves `latent` apart at q, rope halves width - latent apart at qr); every key vector loaded serves
// all N rows. (N is a template argument so the accumulators stay in registers.)
// Key row s of `ahead` (the next sequence's keys, or null) is prefetched into L2 meanwhile: each sequence's
// keys are a separate stream the hardware prefetcher picks up late.
// Visibility: token t sees slots 0..last[t].
template <int N>
void block_scores(const float* q, const float* qr, int64_t first, const float* keys, const int64_t* last, int64_t heads,
                  int64_t slots, int64_t width, int64_t latent, float scale, float* scores, const float* ahead) {
  const int64_t rope = width - latent;
  for (int64_t s = 0; s < slots; ++s) {
    const float* k = keys + s * width;
    if (ahead != nullptr)
      for (int64_t v = 0; v < width; v += 16) _mm_prefetch(reinterpret_cast<const char*>(ahead + s * width + v), _MM_HINT_T1);
    __m256 acc[N];
#pragma GCC unroll 8
    for (int m = 0; m < N; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t v = 0; v < latent; v += 8) {
      const __m256 kv = _mm256_loadu_ps(k + v);
#pragma GCC unroll 8
      for (int m = 0; m < N; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(q + m * latent + v), kv, acc[m]);
    }
    for (int64_t v = 0; v < rope; v += 8) {
      const __m256 kv = _mm256_loadu_ps(k + latent + v);
#pragma GCC unroll 8
      for (int m = 0; m < N; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(qr + m * rope + v), kv, acc[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < N; ++m) {
      scores[m * slots + s] = s <= last[(first + m) / heads] ? scale * r1lab::hsum(acc[m]) : -INFINITY;
    }
  }
}

// block_scores for a block of n rows: SCORES[n - 1].
constexpr decltype(&block_scores<1>) SCORES[MAX_ROWS] = {block_scores<1>, block_scores<2>, block_scores<3>,
                                                         block_scores<4>, block_scores<5>, block_scores<6>,
                                                         block_scores<7>, block_scores<8>};

// In place: row[s] = exp(row[s] - max); returns the sum.
float softmax_numerators(float* row, int64_t slots) {
  float top = -INFINITY;
  for (int64_t s = 0; s < slots; ++s) top = row[s] > top ? row[s] : top;
  return r1lab::exp_shifted(row, slots, top, row);
}

// o[m][r0 : r0 + V*8] = sum_s p[m][s] * keys[s, r0 : r0 + V*8] * inv[m] for the N rows of a block
// (p rows `slots` apart, o rows `latent` apart): every key vector loaded serves all N rows.
template <int N, int V>
void weighted_sum(const float* p, const float* keys, int64_t slots, int64_t width, int64_t r0, const float* inv,
                  float* o, int64_t latent) {
  __m256 acc[N][V];
#pragma GCC unroll 8
  for (int m = 0; m < N; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t s = 0; s < slots; ++s) {
    const float* k = keys + s * width + r0;
    __m256 kv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) kv[v] = _mm256_loadu_ps(k + 8 * v);
#pragma GCC unroll 8
    for (int m = 0; m < N; ++m) {
      const __m256 ps = _mm256_broadcast_ss(p + m * slots + s);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[m][v] = _mm256_fmadd_ps(ps, kv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < N; ++m) {
    const __m256 scale = _mm256_set1_ps(inv[m]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(o + m * latent + r0 + 8 * v, _mm256_mul_ps(acc[m][v], scale));
  }
}

// All latent columns for the N rows of a block, in chunks as wide as the registers allow.
template <int N>
void weighted_rows(const float* p, const float* keys, int64_t slots, int64_t width, int64_t latent, const float* inv,
                   float* o) {
  constexpr int WIDE = N == 1 ? 8 : N == 2 ? 4 : 3;  // N * WIDE + WIDE + 1 <= 16 registers (N <= 4)
  int64_t r0 = 0;
  for (; r0 + 8 * WIDE <= latent; r0 += 8 * WIDE) weighted_sum<N, WIDE>(p, keys, slots, width, r0, inv, o, latent);
  if constexpr (WIDE > 2) {
    if (r0 + 16 <= latent) weighted_sum<N, 2>(p, keys, slots, width, r0, inv, o, latent), r0 += 16;
  }
  if constexpr (WIDE > 1) {
    for (; r0 < latent; r0 += 8) weighted_sum<N, 1>(p, keys, slots, width, r0, inv, o, latent);
  }
}

// Query rows [first, first + rows) of one sequence (rows <= MAX_ROWS); row m is token m / heads. `ahead`:
// keys to prefetch while the scores run (block_scores), or null. Slots past the last one any of these rows
// may see add nothing, so the work stops there (a prompt's early tokens in a prefill, the shorter rows of a
// ragged batch).
void attend(const float* q, const float* qr, int64_t first, int64_t rows, const float* keys, const int64_t* last,
            int64_t heads, int64_t cache_slots, int64_t width, int64_t latent, float scale, float* scores, float* out,
            const float* ahead) {
  int64_t slots = 0;  // visible slots: [0, slots)
  for (int64_t t = first / heads; t <= (first + rows - 1) / heads; ++t)
    slots = std::max(slots, std::min(cache_slots, last[t] + 1));
  SCORES[rows - 1](q, qr, first, keys, last, heads, slots, width, latent, scale, scores, ahead);
  float inv[MAX_ROWS];
  for (int64_t m = 0; m < rows; ++m) inv[m] = 1.0f / softmax_numerators(scores + m * slots, slots);
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {  // weighted sums four rows at a time (register budget)
    const float* p = scores + m0 * slots;
    float* o = out + m0 * latent;
    switch (std::min<int64_t>(4, rows - m0)) {
      case 1: weighted_rows<1>(p, keys, slots, width, latent, inv + m0, o); break;
      case 2: weighted_rows<2>(p, keys, slots, width, latent, inv + m0, o); break;
      case 3: weighted_rows<3>(p, keys, slots, width, latent, inv + m0, o); break;
      default: weighted_rows<4>(p, keys, slots, width, latent, inv + m0, o); break;
    }
  }
}

// last: the positions (B, T), see the top of the file.
void latent_attention(const float* query, const float* query_rope, const float* keys, int64_t key_stride,
                      const int64_t* last, float* out, int64_t batch, int64_t tokens, int64_t rows, int64_t slots,
                      int64_t width, int64_t latent, float scale) {
  const int64_t heads = rows / tokens;
#pragma omp parallel
  {
    std::vector<float> scores(MAX_ROWS * slots);
    // Each thread takes a contiguous run of sequences, so it knows which keys it reads next.
    const int64_t threads = omp_get_num_threads(), chunk = (batch + threads - 1) / threads;
    const int64_t b0 = std::min(batch, omp_get_thread_num() * chunk), b1 = std::min(batch, b0 + chunk);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m0 = 0; m0 < rows; m0 += MAX_ROWS) {
        const int64_t n = std::min<int64_t>(MAX_ROWS, rows - m0);
        const float* ahead = m0 == 0 && b + 1 < b1 ? keys + (b + 1) * key_stride : nullptr;
        attend(query + (b * rows + m0) * latent, query_rope + (b * rows + m0) * (width - latent), m0, n,
               keys + b * key_stride, last + b * tokens, heads, slots, width, latent, scale, scores.data(),
               out + (b * rows + m0) * latent, ahead);
      }
  }
}

// latent_attention(Tensor query, Tensor query_rope, Tensor keys, Tensor positions, float scale) -> Tensor
void boxed(StableIValue* stack, uint64_t, uint64_t) {
  r1lab::Tensor query(stack[0]), query_rope(stack[1]), keys(stack[2]), positions(stack[3]);
  const float scale = static_cast<float>(r1lab::as_double(stack[4]));
  const int32_t f32 = aoti_torch_dtype_float32();
  r1lab::check(query.is(f32) && query_rope.is(f32) && keys.is(f32) && positions.is(aoti_torch_dtype_int64()),
               "the latent attention kernel takes float32 CPU queries and keys and int64 positions");
  r1lab::check(query.dim() == 3 && query_rope.dim() == 3 && keys.dim() == 3 && positions.dim() == 2,
               "queries and keys must be 3-d, the positions 2-d");
  const int64_t batch = query.size(0), rows = query.size(1), latent = query.size(2);
  const int64_t width = latent + query_rope.size(2);
  const int64_t tokens = positions.size(1), slots = keys.size(1);
  r1lab::check(latent % 8 == 0 && query_rope.size(2) % 8 == 0,
               "the latent attention kernel takes latent and rope widths multiples of 8");
  r1lab::check(query_rope.size(0) == batch && query_rope.size(1) == rows && keys.size(0) == batch &&
                   keys.size(2) == width && positions.size(0) == batch && tokens > 0 && rows % tokens == 0,
               "latent attention: query (B, T*H, R), query_rope (B, T*H, P), keys (B, S, R+P), positions (B, T) "
               "disagree");
  r1lab::check(query.contiguous() && query_rope.contiguous() && positions.contiguous() && keys.stride(2) == 1 &&
                   (slots < 2 || keys.stride(1) == width),
               "latent attention: queries and positions contiguous, key rows contiguous");
  r1lab::Tensor out(r1lab::empty({batch, rows, latent}, f32));
  latent_attention(query.data<float>(), query_rope.data<float>(), keys.data<float>(), keys.stride(0),
                   positions.data<int64_t>(), out.data<float>(), batch, tokens, rows, slots, width, latent, scale);
  stack[0] = out.release();
}

}  // namespace

extern "C" int r1lab_register_latent_attention() {
  static const int status = r1lab::register_cpu_kernel("latent_attention", boxed);
  return status;
}
