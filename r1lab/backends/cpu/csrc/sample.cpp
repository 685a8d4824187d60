// One sampling step for a batch of rows in one call: the engine's `sample_tokens` and the log-prob of
// the drawn token, for compiled engines, whose decode step is short enough that the eager draw's small
// tensor ops (each a dispatch and a parallel region) are a noticeable part of it.
//
// The same draw as engine.sample_tokens: temperature 0 takes the argmax; otherwise the logits are
// divided by the temperature, cut to the top-k (ties with the k-th kept), softmaxed, cut to the top-p
// nucleus (a token is dropped when the mass strictly above it reaches top_p; the first never is), and
// the row's uniform u in (0, 1] picks the first token whose cumulative mass (in double) reaches u times
// the total. Sums are taken in another order than torch's, so a draw can differ from the eager one when
// u lands within rounding of a boundary. The log-prob is log_softmax of the logits (EOS banned where
// asked) at the drawn token.
//
// The op r1lab::sample(logits (B, V) float32, temperature (B,) float32, top_k (B,) int64, top_p (B,)
// float32, ban (B,) bool, uniforms (B,) float64, eos int (-1: none)) -> (tokens (B,) int64, logp (B,)).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "op.h"
#include "vmath.h"

namespace {

constexpr int64_t BLOCK = 8;  // the CDF is searched block by block (see draw)

// max(x[0:n]) (vectorised; n >= 1).
float max_of(const float* x, int64_t n) {
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(x + v));
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  float top = _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
  for (; v < n; ++v) top = x[v] > top ? x[v] : top;
  return top;
}

// The first index of the largest x (as torch's argmax).
int64_t argmax_of(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t v = 1; v < n; ++v)
    if (x[v] > x[best]) best = v;
  return best;
}

// The token whose cumulative weight first reaches u times the total (w >= 0, not all 0; u in (0, 1]),
// never one of weight 0. Sums in double: each block of 8 weights is summed in one vector pass (block[b]),
// the blocks in order; the total is the last block's running sum, so the target is always reached.
int64_t draw(const float* w, int64_t n, double u, std::vector<double>& block) {
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  block.resize(blocks);
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t v = b * BLOCK;
    double sum;
    if (v + BLOCK <= n) {
      const __m256 x = _mm256_loadu_ps(w + v);
      const __m256d s4 = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
      const __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
      sum = _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
    } else {
      sum = 0.0;
      for (int64_t i = v; i < n; ++i) sum += w[i];
    }
    block[b] = sum;
    total += sum;
  }
  const double target = u * total;  // in (0, total]
  double cdf = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (cdf + block[b] >= target) {  // the target is in this block (or, by rounding, just past it)
      double c = cdf;
      for (int64_t v = b * BLOCK; v < std::min(n, (b + 1) * BLOCK); ++v) {
        c += w[v];
        if (c >= target && w[v] > 0.0f) return v;
      }
    }
    cdf += block[b];
  }
  for (int64_t v = n - 1; v > 0; --v)  // rounding left the target past every partial sum: the last live token
    if (w[v] > 0.0f) return v;
  return 0;
}

void sample_row(const float* logits, int64_t vocab, float temperature, int64_t top_k, float top_p, bool ban,
                double u, int64_t eos, std::vector<float>& scaled, std::vector<float>& probs,
                std::vector<int64_t>& order, std::vector<double>& block, int64_t* token, float* logp) {
  scaled.assign(logits, logits + vocab);
  probs.resize(vocab);
  if (ban && eos >= 0 && eos < vocab) scaled[eos] = -INFINITY;
  const float top = max_of(scaled.data(), vocab);
  float sum = r1lab::exp_shifted(scaled.data(), vocab, top, probs.data());  // the softmax at temperature 1
  const float log_norm = top + std::log(sum);                         // log-sum-exp of the (banned) logits
  int64_t drawn;
  if (temperature > 0.0f) {
    const bool reshape = temperature != 1.0f || (top_k > 0 && top_k < vocab);
    if (reshape) {
      if (temperature != 1.0f)
        for (int64_t v = 0; v < vocab; ++v) scaled[v] /= std::max(temperature, 1e-6f);
      if (top_k > 0 && top_k < vocab) {  // keep scores >= the k-th largest (probs as scratch)
        probs.assign(scaled.begin(), scaled.end());
        std::nth_element(probs.begin(), probs.begin() + (top_k - 1), probs.end(), std::greater<float>());
        const float kth = probs[top_k - 1];
        for (int64_t v = 0; v < vocab; ++v)
          if (scaled[v] < kth) scaled[v] = -INFINITY;
      }
      sum = r1lab::exp_shifted(scaled.data(), vocab, max_of(scaled.data(), vocab), probs.data());
    }
    if (top_p < 1.0f) {  // the nucleus needs the normalised probabilities
      for (int64_t v = 0; v < vocab; ++v) probs[v] /= sum;
      order.resize(vocab);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return probs[a] > probs[b]; });
      float above = 0.0f;
      for (int64_t i = 0; i < vocab; ++i) {
        const float p = probs[order[i]];
        if (i > 0 && above >= top_p) probs[order[i]] = 0.0f;
        above += p;
      }
    }
    drawn = draw(probs.data(), vocab, u, block);  // unnormalised weights draw the same token
  } else {
    drawn = argmax_of(scaled.data(), vocab);
  }
  *token = drawn;
  const float chosen = (ban && drawn == eos) ? -INFINITY : logits[drawn];
  *logp = chosen - log_norm;
}

// sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor ban, Tensor uniforms, int eos)
//   -> (Tensor, Tensor)
void boxed(StableIValue* stack, uint64_t, uint64_t) {
  r1lab::Tensor logits(stack[0]), temperature(stack[1]), top_k(stack[2]), top_p(stack[3]), ban(stack[4]),
      uniforms(stack[5]);
  const int64_t eos = r1lab::as_int(stack[6]);
  const int32_t f32 = aoti_torch_dtype_float32();
  r1lab::check(logits.is(f32) && temperature.is(f32) && top_k.is(aoti_torch_dtype_int64()) && top_p.is(f32) &&
                   ban.is(aoti_torch_dtype_bool()) && uniforms.is(aoti_torch_dtype_float64()),
               "the sampling kernel takes float32 CPU logits, temperature and top_p, int64 top_k, bool ban, "
               "float64 uniforms");
  r1lab::check(logits.dim() == 2 && logits.contiguous() && temperature.dim() == 1 && top_k.dim() == 1 &&
                   top_p.dim() == 1 && ban.dim() == 1 && uniforms.dim() == 1,
               "the sampling kernel takes contiguous logits (B, V) and per-row settings (B,)");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  r1lab::check(vocab > 0 && temperature.size(0) == rows && top_k.size(0) == rows && top_p.size(0) == rows &&
                   ban.size(0) == rows && uniforms.size(0) == rows && temperature.contiguous() && top_k.contiguous() &&
                   top_p.contiguous() && ban.contiguous() && uniforms.contiguous(),
               "the sampling kernel takes contiguous logits (B, V) and per-row settings (B,)");
  r1lab::Tensor tokens(r1lab::empty({rows}, aoti_torch_dtype_int64())), logp(r1lab::empty({rows}, f32));
  const float* l = logits.data<float>();
  const float* t = temperature.data<float>();
  const int64_t* k = top_k.data<int64_t>();
  const float* p = top_p.data<float>();
  const bool* b = ban.data<bool>();
  const double* u = uniforms.data<double>();
  int64_t* out_tokens = tokens.data<int64_t>();
  float* out_logp = logp.data<float>();
#pragma omp parallel if (rows * vocab >= 16384)
  {
    static thread_local std::vector<float> scaled, probs;  // each thread's scratch, kept between calls
    static thread_local std::vector<int64_t> order;
    static thread_local std::vector<double> block;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      sample_row(l + r * vocab, vocab, t[r], k[r], p[r], b[r], u[r], eos, scaled, probs, order, block,
                 out_tokens + r, out_logp + r);
  }
  stack[0] = tokens.release();
  stack[1] = logp.release();
}

}  // namespace

extern "C" int r1lab_register_sample() {
  static const int status = r1lab::register_cpu_kernel("sample", boxed);
  return status;
}
