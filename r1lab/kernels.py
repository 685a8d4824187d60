"""The products the model runs, in the form each execution wants.

Eager code (training, prefill, eager decoding) calls the BLAS (`F.linear`, batched `bmm`s) and the
routed-expert dispatch below. A compiled decode step over a few token rows instead writes its
products as broadcast multiplies summed over the reduced dim, which the compiler turns into loops
that stream the weights once (this CPU class's BLAS reads weights slowly when it multiplies 1-16
rows; benchmarks/bench_generate.py). Beyond that, on an AVX2 CPU, small C++ kernels (csrc/, built on
first use with the C++ compiler `torch.compile` needs anyway, registered as the CPU kernels of r1lab::
ops) take the products (up to KERNEL_ROWS rows: single, in pairs sharing an input, a whole dense
SwiGLU block, and MLA's per-head ones), the routed experts (a grouped GEMM, one opaque op so the
routing's data-dependent shapes do not break the graph) and MLA attention; elsewhere the BLAS and the
eager dispatch do. Eager code gives the same numbers bit for bit whatever the compiled path does. A
compiled engine also draws its samples with one (`sample_op`). This module knows tensors only: no
config, no modules.

Letters: N tokens, D model dim, E routed experts, K experts per token, I expert hidden dim.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# In a compiled graph, products over at most this many token rows run as fused reductions (`linear`).
# Routed experts do too for that many tokens; beyond it they take the grouped GEMM, or where that
# cannot run, the fused reductions while their weights are small enough to be re-read from cache (at
# most STREAMING_EXPERT_BYTES in all) and each expert would be read at most STREAMING_EXPERT_READS
# times on average (measured on the tiny preset: 2.4 MB of experts), else the eager dispatch.
STREAMING_ROWS = 8
# Up to this many rows (beyond STREAMING_ROWS) a compiled CPU step's products call the C++ kernel
# (csrc/linear.cpp: 1.4-1.9x the BLAS at 9-64 rows, 1.0-1.2x at 128-256, slower at 512).
KERNEL_ROWS = 256
STREAMING_EXPERT_READS = 16
STREAMING_EXPERT_BYTES = 4 * 2**20


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T.

    In a compiled graph fed at most `STREAMING_ROWS` tokens (decoding a few sequences, a speculative
    verify step at small batch) the product is bound by reading the weight: written as a broadcast
    product summed over `in`, the compiler emits one streaming reduction that reads the weight 1.4-3.5x
    faster than the BLAS call on this CPU class (1 to 8 rows; slower from 16 rows on). From 9 to
    `KERNEL_ROWS` rows on an AVX2 CPU it is the C++ kernel `linear_op`. The row count is a shape, so the
    compiled graph is specialised on which side of each threshold it is. Everywhere else (eager, more
    rows, GPUs, whose BLAS has no such weakness) it is `F.linear`.
    """
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling() and x.device.type == "cpu" and rows <= STREAMING_ROWS:
        return (x.unsqueeze(-2) * weight).sum(dim=-1)
    if _product_kernel(x, rows, x.shape[-1] % 8 == 0, weight):
        return linear_op(x.reshape(rows, x.shape[-1]).contiguous(), weight.contiguous()).view(
            *x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def linear_pair(x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(x, weight_a), linear(x, weight_b)): two products of one input (MLA's query and latent
    projections). In a compiled CPU step over 9 to `KERNEL_ROWS` rows, one C++ call (`linear_pair_op`)."""
    rows = x.numel() // x.shape[-1]
    if _product_kernel(x, rows, x.shape[-1] % 8 == 0, weight_a, weight_b):
        a, b = linear_pair_op(x.reshape(rows, x.shape[-1]).contiguous(), weight_a.contiguous(), weight_b.contiguous())
        return a.view(*x.shape[:-1], weight_a.shape[0]), b.view(*x.shape[:-1], weight_b.shape[0])
    return linear(x, weight_a), linear(x, weight_b)


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU block, w2(silu(w1 x) * w3 x), weights in nn.Linear's (out, in) layout: x (..., D),
    w1 and w3 (I, D), w2 (D, I).

    Three `linear`s and the gating, except in a compiled CPU step over 9 to `KERNEL_ROWS` token rows on an
    AVX2 CPU, where it is one C++ call (`mlp_op`: both up-projections, the gating and the down-projection
    under one parallel region, the (rows, I) projections never leaving the threads' caches)."""
    rows = x.numel() // x.shape[-1]
    if _product_kernel(x, rows, x.shape[-1] % 8 == 0 and w1.shape[0] % 8 == 0, w1, w2, w3):
        return mlp_op(x.reshape(rows, x.shape[-1]).contiguous(), w1.contiguous(), w2.contiguous(),
                      w3.contiguous()).view(x.shape)
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


def _product_kernel(x: torch.Tensor, rows: int, widths_fit: bool, *weights: torch.Tensor) -> bool:
    """Whether a product of x's `rows` token rows runs in csrc/linear.cpp: a compiled CPU step of 9 to
    `KERNEL_ROWS` rows, float32 throughout, widths the kernel tiles, the kernel built here."""
    return (torch.compiler.is_compiling() and x.device.type == "cpu" and STREAMING_ROWS < rows <= KERNEL_ROWS
            and widths_fit and all(t.dtype == torch.float32 for t in (x, *weights)) and kernel_built("linear"))


def expert_mixture(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """x (N, D), routing indices/weights (N, K), stacked weights w1, w3 (E, D, I), w2 (E, I, D) ->
    (N, D): each token's weighted sum of its K experts, in the form the execution wants."""
    if not torch.compiler.is_compiling():
        return routed_experts(x, indices, weights, w1, w2, w3)
    N, K = indices.shape
    if N <= STREAMING_ROWS:  # static shapes: the compiler fuses it all, reading the chosen weights in place
        return few_token_experts(x, indices, weights, w1, w2, w3)
    if grouped_experts_supported(x, w1):
        return grouped_experts_op(x.contiguous(), indices.long().contiguous(), weights.float().contiguous(),
                                  w1.contiguous(), w2.contiguous(), w3.contiguous())
    expert_bytes = 3 * w1.numel() * w1.element_size()
    if N * K <= STREAMING_EXPERT_READS * w1.shape[0] and expert_bytes <= STREAMING_EXPERT_BYTES:
        return few_token_experts(x, indices, weights, w1, w2, w3)
    return routed_experts_op(x, indices, weights, w1, w2, w3)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """(silu(x @ w1) * (x @ w3)) @ w2 for one expert (x (N, D)) or a batch of them (x (G, N, D), w (G, ...))."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def routed_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """x (N, D), routing indices/weights (N, K), stacked expert weights -> (N, D).

    With no more assignments than experts (decoding a few sequences), each assignment gathers its
    expert's weights and runs as one batched product: only the chosen experts' weights are read.
    Otherwise the assignments are sorted by expert and packed into an (E, C, D) block, C the largest
    expert load, so all experts run as three batched products; when the loads are so uneven that
    padding would more than double the work, each expert runs on its own tokens instead.
    """
    N, K = indices.shape
    E = w1.shape[0]
    if N * K <= E:
        chosen = indices.flatten()  # (N*K,)
        xs = x.repeat_interleave(K, dim=0)[:, None]  # (N*K, 1, D)
        y = swiglu(xs, w1[chosen], w2[chosen], w3[chosen]).view(N, K, -1)  # (N, K, D)
        return (y * weights[..., None]).sum(dim=1)
    flat_expert = indices.flatten()  # (N*K,)
    order = flat_expert.argsort(stable=True)
    token_of = order // K  # which token each sorted assignment belongs to
    weight_of = weights.flatten()[order][:, None]
    counts = torch.bincount(flat_expert, minlength=E)
    C = int(counts.max())
    out = torch.zeros_like(x)
    if E * C <= 2 * N * K:
        sorted_expert = flat_expert[order]
        starts = counts.cumsum(0) - counts
        slot = sorted_expert * C + torch.arange(N * K, device=x.device) - starts[sorted_expert]
        packed = x.new_zeros(E * C, x.shape[1]).index_copy_(0, slot, x[token_of]).view(E, C, -1)
        y = swiglu(packed, w1, w2, w3).flatten(0, 1)[slot]  # (N*K, D) in sorted order
        return out.index_add_(0, token_of, y * weight_of)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            idx = token_of[start:start + count]
            y = swiglu(x[idx], w1[e], w2[e], w3[e])
            out.index_add_(0, idx, y * weight_of[start:start + count])
            start += count
    return out


def few_token_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                      w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """`routed_experts` for a few tokens x (N, D), as broadcast products summed over the reduced dim:
    in a compiled graph each chosen expert's weights are read in place (see `linear`)."""
    xs = x[:, None, :, None]  # (N, 1, D, 1)
    h = F.silu((xs * w1[indices]).sum(dim=2)) * (xs * w3[indices]).sum(dim=2)  # (N, K, I)
    y = (h[..., None] * w2[indices]).sum(dim=2)  # (N, K, D)
    return (y * weights[..., None]).sum(dim=1)


@torch.library.custom_op("r1lab::routed_experts", mutates_args=())
def routed_experts_op(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                      w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """`routed_experts` as one opaque op in a compiled graph (its shapes depend on the routing)."""
    return routed_experts(x, indices, weights, w1, w2, w3)


@routed_experts_op.register_fake
def _(x, indices, weights, w1, w2, w3):
    return torch.empty_like(x)


# -- C++ kernels for compiled CPU decode steps (csrc/*.cpp) --------------------------------------------

_CSRC = Path(__file__).parent / "csrc"
_TORCH = Path(torch.__file__).parent
# Each kernel registers itself as the CPU kernel of its r1lab:: op through torch's stable C shim
# (csrc/op.h): headers only, linked against the libtorch already loaded.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17", f"-I{_TORCH / 'include'}",
          f"-L{_TORCH / 'lib'}", "-ltorch_cpu", f"-Wl,-rpath,{_TORCH / 'lib'}"]


@functools.cache
def _library(name: str) -> ctypes.CDLL | None:
    """Build (once per source and torch version, into the user cache) and load csrc/<name>.cpp, which
    registers the CPU kernel of the op r1lab::<name> (linear.cpp: also head_linear and head_matmul).
    None where it cannot run: a CPU without AVX2, no C++ compiler, or (with a warning) a failed build,
    an unwritable cache, a library that does not load or register."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return None
    source = _CSRC / f"{name}.cpp"
    headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers
                         + " ".join([compiler, torch.__version__, *_FLAGS]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "r1lab" / "kernels"
    target = cache / f"{name}-{key}.so"
    if not target.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        except OSError as e:  # e.g. a read-only home
            warnings.warn(f"r1lab: cannot build {source.name} in {cache} ({e}), the compiled step uses the "
                          f"generic path", stacklevel=2)
            return None
        os.close(fd)
        done = subprocess.run([compiler, str(source), "-o", tmp, *_FLAGS], capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            warnings.warn(f"r1lab: building {source.name} failed, the compiled step uses the generic path: "
                          f"{done.stderr.strip()[:500]}", stacklevel=2)
            return None
        os.replace(tmp, target)  # atomic: a concurrent build never loads a half-written file
    try:
        lib = ctypes.CDLL(str(target))
        status = getattr(lib, f"r1lab_register_{name}")()
    except (OSError, AttributeError) as e:  # e.g. a cache on a noexec mount
        warnings.warn(f"r1lab: cannot load {target} ({e}), the compiled step uses the generic path", stacklevel=2)
        return None
    if status != 0:
        warnings.warn(f"r1lab: {target} did not register r1lab::{name} (status {status}), the compiled step uses "
                      f"the generic path", stacklevel=2)
        return None
    return lib


@torch.compiler.assume_constant_result
def kernel_built(name: str) -> bool:
    """Whether csrc/<name>.cpp is built, loaded and registered as r1lab::<name>'s CPU kernel here (a
    constant to the compiler, which would otherwise break the graph at the build call)."""
    return _library(name) is not None


# The C++ kernels' ops: schema and shape function here, the CPU kernel registered by the library
# (`_library(name)`, which `kernel_built(name)` calls before any graph takes the op). A compiled graph
# calls them through the C++ dispatcher without entering Python.
_OPS = torch.library.Library("r1lab", "FRAGMENT")


def _define(schema: str, fake: Callable):
    name = schema.split("(")[0]
    _OPS.define(schema)
    torch.library.register_fake(f"r1lab::{name}", fake, lib=_OPS)
    return getattr(torch.ops.r1lab, name)


# -- routed experts: the grouped GEMM -----------------------------------------------------------------

def grouped_experts_supported(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether `grouped_experts_op` can run these tensors: float32 on a CPU with the kernel built,
    model and expert dims multiples of 8."""
    return (x.device.type == "cpu" and x.dtype == w1.dtype == torch.float32 and x.shape[-1] % 8 == 0
            and w1.shape[-1] % 8 == 0 and kernel_built("grouped_experts"))


# `routed_experts` by the C++ grouped GEMM (csrc/grouped_experts.cpp: assignments sorted by expert, each
# weight panel read once per call, a register-tiled micro-kernel): 3x the compiled reductions at 64 tokens
# of the tiny preset. Same result up to float rounding; float32, contiguous, D and I multiples of 8.
grouped_experts_op = _define(
    "grouped_experts(Tensor x, Tensor indices, Tensor weights, Tensor w1, Tensor w2, Tensor w3) -> Tensor",
    lambda x, indices, weights, w1, w2, w3: torch.empty_like(x))


# -- MLA decode attention over the latent cache -------------------------------------------------------

def latent_attention(query: torch.Tensor, query_rope: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                     scale: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA attention: query (B, T*H, R) and query_rope (B, T*H, P) (each query row's latent and
    rope halves), keys (B, S, R + P) (the cache's first S slots), mask (B, T, S) bool (True = may attend)
    -> (B, T*H, R): softmax(scale [query, query_rope] k^T) @ keys[..., :R]. `positions` (B, T), when given,
    is the mask's cached form: token t sees slots 0..positions[t].

    Batched GEMMs in eager code; in a compiled CPU step over more than `STREAMING_ROWS` tokens, one
    pass over each sequence's cache rows in C++ (csrc/latent_attention.cpp): at T*H query rows per
    sequence the batched GEMMs spend most of their time on setup (fewer tokens: the compiler's own
    fused loops are cheaper than the call). The kernel reads the two query halves where they are (no
    concatenated query per layer), and `positions`, when given, instead of the mask, which the graph then
    never builds (written per layer as bools, the mask cost ~80 us of a 64-row step).
    """
    B, M, R = query.shape
    T, S = mask.shape[1], mask.shape[2]
    if (torch.compiler.is_compiling() and B * T > STREAMING_ROWS and query.device.type == "cpu"
            and query.dtype == query_rope.dtype == keys.dtype == torch.float32 and R % 8 == 0
            and query_rope.shape[-1] % 8 == 0 and kernel_built("latent_attention")):
        L = keys.shape[-1]
        if keys.stride(2) != 1 or keys.stride(1) != L:
            keys = keys.contiguous()
        visible = mask if positions is None else positions.reshape(B, T)
        return latent_attention_op(query.contiguous(), query_rope.contiguous(), keys, visible.contiguous(), scale)
    query = torch.cat([query, query_rope], dim=-1)
    scores = torch.baddbmm(query.new_empty(()), query, keys.transpose(1, 2), beta=0, alpha=scale)
    scores = torch.where(mask[:, :, None], scores.view(B, T, M // T, S), float("-inf"))  # (B, T, H, S)
    probs = scores.float().softmax(dim=-1).type_as(query)
    return torch.bmm(probs.view(B, M, S), keys[..., :R])


# `latent_attention` by the C++ kernel (csrc/latent_attention.cpp): float32, R and P multiples of 8, queries
# and mask contiguous; keys may be a slot slice of the cache (key rows contiguous, any stride between sequences).
# `mask` is either the bool (B, T, S) mask or int64 positions (B, T) (token t sees slots 0..positions[t]).
latent_attention_op = _define(
    "latent_attention(Tensor query, Tensor query_rope, Tensor keys, Tensor mask, float scale) -> Tensor",
    lambda query, query_rope, keys, mask, scale: query.new_empty(query.shape))


# -- dense products of 9-256 rows ---------------------------------------------------------------------

# x (M, K) @ weight (N, K)^T by the C++ kernel (csrc/linear.cpp): float32, contiguous, K % 8 == 0.
linear_op = _define("linear(Tensor x, Tensor weight) -> Tensor", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]))


# Two products of one x by the C++ kernel, in one call: as linear_op, weights (A, K) and (B, K).
linear_pair_op = _define("linear_pair(Tensor x, Tensor weight_a, Tensor weight_b) -> (Tensor, Tensor)",
                         lambda x, a, b: (x.new_empty(x.shape[0], a.shape[0]), x.new_empty(x.shape[0], b.shape[0])))

# A dense SwiGLU block by the C++ kernel (csrc/linear.cpp): float32, contiguous; x (M, D), w1 and w3 (I, D),
# w2 (D, I); D and I multiples of 8.
mlp_op = _define("mlp(Tensor x, Tensor w1, Tensor w2, Tensor w3) -> Tensor", lambda x, w1, w2, w3: torch.empty_like(x))


# -- per-head products (MLA's absorbed query and value projections) -----------------------------------

def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, K) @ weight (H, K, N) per head -> (B, T, H, N).

    An einsum (batched GEMMs) except in a compiled CPU step over 9 to `KERNEL_ROWS` tokens, where it is
    the C++ kernel `head_matmul_op` (the batched GEMMs run these tiny per-head products at ~10 GFLOP/s)."""
    if _product_kernel(x, x.shape[0] * x.shape[1], weight.shape[2] % 8 == 0, weight):
        B, T, H, K = x.shape
        if weight.stride(2) != 1:
            weight = weight.contiguous()
        x = x.reshape(B * T, H, K)  # a view for MLA's query slice: the kernel reads it in place
        return head_matmul_op(x if x.stride(2) == 1 else x.contiguous(), weight).view(B, T, H, weight.shape[2])
    return torch.einsum("bthc,hcr->bthr", x, weight)


def head_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, K) @ weight (H, N, K)^T per head -> (B, T, H, N); the kernel as in `head_matmul`."""
    if _product_kernel(x, x.shape[0] * x.shape[1], x.shape[-1] % 8 == 0 and weight.shape[1] % 4 == 0, weight):
        B, T, H, K = x.shape
        if weight.stride(2) != 1 or weight.stride(1) != K:
            weight = weight.contiguous()
        return head_linear_op(x.reshape(B * T, H, K).contiguous(), weight).view(B, T, H, weight.shape[1])
    return torch.einsum("bthr,hvr->bthv", x, weight)


# C++ kernels (csrc/linear.cpp), float32, weight with unit-stride rows, any head stride; x (M, H, K): contiguous
# for head_linear, unit-stride rows (any row and head strides) for head_matmul.
head_matmul_op = _define("head_matmul(Tensor x, Tensor weight) -> Tensor",
                         lambda x, weight: x.new_empty(x.shape[0], x.shape[1], weight.shape[2]))
head_linear_op = _define("head_linear(Tensor x, Tensor weight) -> Tensor",
                         lambda x, weight: x.new_empty(x.shape[0], x.shape[1], weight.shape[1]))


# -- sampling ---------------------------------------------------------------------------------------

# One draw per row of logits (B, V) and its log-prob, the engine's `sample_tokens` in one C++ call
# (csrc/sample.cpp), for compiled engines: logits, temperature, top_p float32, top_k int64, ban bool,
# uniforms float64, all contiguous; eos -1 for none. Returns (tokens (B,) int64, logp (B,) float32).
sample_op = _define(
    "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor ban, Tensor uniforms, int eos)"
    " -> (Tensor, Tensor)",
    lambda logits, temperature, top_k, top_p, ban, uniforms, eos: (
        logits.new_empty(logits.shape[0], dtype=torch.long), logits.new_empty(logits.shape[0])))
