"""The C++ kernels as torch ops (r1lab::*): each op's schema and shape function, defined here; its CPU
kernel is registered by the library `build.load` builds (call `load()` before running one).

A compiled graph calls them through the C++ dispatcher without entering Python. All take float32 CPU
tensors and check their arguments (a ValueError naming what they take). Each kernel's source
(csrc/<file>.cpp) says how it computes. Letters: M token rows, K input width, N output width, H heads,
B sequences, T tokens per sequence, S cache slots, R latent width, P rope width, E experts, I expert width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from r1lab.backends.cpu.build import load  # noqa: F401  (call it before running an op)

_LIBRARY = torch.library.Library("r1lab", "FRAGMENT")


def _define(schema: str, fake: Callable):
    name = schema.split("(")[0]
    _LIBRARY.define(schema)
    torch.library.register_fake(f"r1lab::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.r1lab, name)


# csrc/linear.cpp. x (M, K) @ weight (N, K)^T -> (M, N); contiguous, K % 8 == 0.
linear = _define("linear(Tensor x, Tensor weight) -> Tensor",
                 lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]))

# A dense SwiGLU block w2(silu(w1 x) * w3 x): x (M, D), w1 and w3 (I, D), w2 (D, I); contiguous; D, I % 8 == 0.
mlp = _define("mlp(Tensor x, Tensor w1, Tensor w2, Tensor w3) -> Tensor", lambda x, w1, w2, w3: torch.empty_like(x))

# Per-head products (MLA's absorbed query and value projections). head_matmul: x (M, H, K) @ weight (H, K, N)
# -> (M, H, N), unit-stride rows (any row and head strides), N % 8 == 0. head_linear: x (M, H, K) @
# weight (H, N, K)^T -> (M, H, N), x contiguous, weight rows contiguous, K % 8 == 0, N % 4 == 0.
head_matmul = _define("head_matmul(Tensor x, Tensor weight) -> Tensor",
                      lambda x, weight: x.new_empty(x.shape[0], x.shape[1], weight.shape[2]))
head_linear = _define("head_linear(Tensor x, Tensor weight) -> Tensor",
                      lambda x, weight: x.new_empty(x.shape[0], x.shape[1], weight.shape[1]))

# csrc/latent_attention.cpp. Absorbed MLA attention over the latent cache: query (B, T*H, R) and query_rope
# (B, T*H, P) contiguous, keys (B, S, R+P) (key rows contiguous: a slot slice of the cache), positions (B, T)
# int64 (token t sees slots 0..positions[t]) -> (B, T*H, R): softmax(scale [query, query_rope] keys^T) @ keys[..., :R].
latent_attention = _define(
    "latent_attention(Tensor query, Tensor query_rope, Tensor keys, Tensor positions, float scale) -> Tensor",
    lambda query, query_rope, keys, positions, scale: query.new_empty(query.shape))

# csrc/grouped_experts.cpp. Routed experts as one grouped GEMM: x (N, D), indices (N, K) int64, weights (N, K),
# stacked w1, w3 (E, D, I), w2 (E, I, D) -> (N, D); contiguous; D, I % 8 == 0.
grouped_experts = _define(
    "grouped_experts(Tensor x, Tensor indices, Tensor weights, Tensor w1, Tensor w2, Tensor w3) -> Tensor",
    lambda x, indices, weights, w1, w2, w3: torch.empty_like(x))

# csrc/sample.cpp. One draw per row of logits (B, V) and its log-prob, the engine's `sample_tokens`: logits,
# temperature, top_p float32, top_k int64, ban bool, uniforms float64, all contiguous; eos -1 for none.
sample = _define(
    "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor ban, Tensor uniforms, int eos)"
    " -> (Tensor, Tensor)",
    lambda logits, temperature, top_k, top_p, ban, uniforms, eos: (
        logits.new_empty(logits.shape[0], dtype=torch.long), logits.new_empty(logits.shape[0])))
