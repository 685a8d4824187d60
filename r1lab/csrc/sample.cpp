// One sampling step for a batch of rows in one call: the engine's `sample_tokens` and the log-prob of
// the drawn token, for compiled engines, whose decode step is otherwise short enough that the ~10 small
// tensor ops of the eager draw (each a dispatch and a parallel region) cost a tenth of it.
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

void sample_row(const float* logits, int64_t vocab, float temperature, int64_t top_k, float top_p, bool ban,
                double u, int64_t eos, std::vector<float>& scaled, std::vector<float>& probs,
                std::vector<int64_t>& order, int64_t* token, float* logp) {
  scaled.assign(logits, logits + vocab);
  probs.resize(vocab);
  if (ban && eos >= 0 && eos < vocab) scaled[eos] = -INFINITY;
  float top = -INFINITY;
  int64_t best = 0;
  for (int64_t v = 0; v < vocab; ++v)
    if (scaled[v] > top) top = scaled[v], best = v;
  float sum = r1lab::exp_shifted(scaled.data(), vocab, top, probs.data());  // the softmax at temperature 1
  const float log_norm = top + std::log(sum);                         // log-sum-exp of the (banned) logits
  int64_t drawn = best;
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
      sum = r1lab::exp_shifted(scaled.data(), vocab, *std::max_element(scaled.begin(), scaled.end()), probs.data());
    }
    for (int64_t v = 0; v < vocab; ++v) probs[v] /= sum;
    if (top_p < 1.0f) {
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
    double cdf_total = 0.0;
    for (int64_t v = 0; v < vocab; ++v) cdf_total += probs[v];
    const double target = u * cdf_total;  // in (0, total]: some token reaches it
    double cdf = 0.0;
    drawn = vocab - 1;
    for (int64_t v = 0; v < vocab; ++v) {
      cdf += probs[v];
      if (cdf >= target && probs[v] > 0.0f) {
        drawn = v;
        break;
      }
    }
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
    std::vector<float> scaled, probs;
    std::vector<int64_t> order;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      sample_row(l + r * vocab, vocab, t[r], k[r], p[r], b[r], u[r], eos, scaled, probs, order, out_tokens + r,
                 out_logp + r);
  }
  stack[0] = tokens.release();
  stack[1] = logp.release();
}

}  // namespace

extern "C" int r1lab_register_sample() {
  static const int status = r1lab::register_cpu_kernel("sample", boxed);
  return status;
}
