"""The CPU backend's C++ kernels (r1lab.backends.cpu.ops) against the torch computations they replace."""

import pytest
import torch
import torch.nn.functional as F

from r1lab.backends.cpu import build, ops
from r1lab.engine import sample_tokens

needs_kernels = pytest.mark.skipif(ops.load() is not None, reason="the kernels need an AVX2 CPU and a C++ compiler")


def expert_args(n_tokens, k, n_experts, dim, hidden, unused=()):
    """Random tokens routed to k distinct experts each (never those in `unused`), stacked weights."""
    allowed = torch.tensor([e for e in range(n_experts) if e not in unused])
    indices = torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(n_tokens)])
    w1, w3 = torch.randn(n_experts, dim, hidden) * 0.1, torch.randn(n_experts, dim, hidden) * 0.1
    w2 = torch.randn(n_experts, hidden, dim) * 0.1
    return torch.randn(n_tokens, dim), indices, torch.rand(n_tokens, k), w1, w2, w3


def experts_loop(x, indices, weights, w1, w2, w3):
    """Each token's weighted sum over its experts, one token and expert at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k, e in enumerate(indices[n].tolist()):
            out[n] += weights[n, k] * ((F.silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e])
    return out


@needs_kernels
@pytest.mark.parametrize("n_tokens, k, n_experts, dim, hidden", [
    (1, 1, 4, 16, 8),      # one token, one expert, an 8-column block only
    (5, 2, 8, 24, 24),     # 16 + 8 column blocks, partial row tiles
    (37, 3, 6, 64, 40),    # several 6-row tiles per expert, uneven loads
    (64, 2, 8, 192, 128),  # the tiny preset's decode step at batch 64
])
def test_grouped_experts_equal_a_loop_over_tokens(n_tokens, k, n_experts, dim, hidden):
    args = expert_args(n_tokens, k, n_experts, dim, hidden, unused=(0,))  # expert 0 gets no token
    torch.testing.assert_close(ops.grouped_experts(*args), experts_loop(*args), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_grouped_experts_reject_an_out_of_range_expert():
    x, indices, weights, w1, w2, w3 = expert_args(3, 2, 4, 16, 8)
    indices[1, 0] = 4
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ops.grouped_experts(x, indices, weights, w1, w2, w3)


def test_a_failed_build_warns_and_leaves_decoding_eager(tmp_path, monkeypatch):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2: the kernels are never built here")
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="building the CPU kernels failed .*; decoding runs eager"):
        assert build.load.__wrapped__().startswith("building the CPU kernels failed")
    assert not list((tmp_path / "r1lab" / "kernels").glob("*.so"))  # nothing half-written left behind


def test_an_unwritable_cache_warns_and_leaves_decoding_eager(tmp_path, monkeypatch):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or build.shutil.which("c++") is None:
        pytest.skip("the kernels are never built here")
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="cannot build the CPU kernels"):
        assert build.load.__wrapped__() is not None


@needs_kernels
@pytest.mark.parametrize("op", ["linear", "mlp", "head_linear", "head_matmul", "grouped_experts",
                                "latent_attention", "sample"])
def test_each_op_has_its_cpu_kernel_in_cpp(op):
    # Registered from C++ (csrc/op.h), a compiled graph calls the op without entering Python.
    cpu = [line for line in torch._C._dispatch_dump(f"r1lab::{op}").splitlines() if line.startswith("CPU:")]
    assert len(cpu) == 1 and "csrc/op.h" in cpu[0], cpu


def attention_reference(query, query_rope, keys, positions, scale):
    """Absorbed attention as the model computes it, each token t seeing slots 0..positions[t]."""
    B, M, R = query.shape
    T, S = positions.shape[1], keys.shape[1]
    scores = torch.cat([query, query_rope], dim=-1) @ keys.transpose(1, 2) * scale  # (B, M, S)
    visible = torch.arange(S)[None, None, :] <= positions[:, :, None]  # (B, T, S)
    scores = scores.view(B, T, M // T, S).masked_fill(~visible[:, :, None], float("-inf"))
    return scores.softmax(dim=-1).view(B, M, S) @ keys[..., :R]


@needs_kernels
@pytest.mark.parametrize("tokens, heads, slots, latent, rope", [
    (1, 4, 13, 32, 8),    # a decode step: 13 slots (an 8-wide block and a tail)
    (2, 4, 37, 64, 16),   # a speculative verify step: two tokens, each seeing one more slot than the last
    (1, 16, 5, 96, 16),   # more query rows than one register block (8)
    (1, 6, 9, 40, 8),     # weighted sums in groups of 4 and 2 rows, latent chunks of 24, 16 / 32, 8
    (1, 1, 4, 72, 8),     # one row: a 64-wide chunk and an 8-wide tail
])
def test_latent_attention_kernel_equals_the_batched_products(tokens, heads, slots, latent, rope):
    batch, width = 3, latent + rope
    cache = torch.randn(batch, slots + 7, width)  # a longer preallocated cache: keys are a strided slice
    keys = cache[:, :slots]
    query = torch.randn(batch, tokens * heads, width)
    lengths = torch.tensor([slots, 2, slots - 3])  # ragged: each row sees its own first slots
    positions = lengths[:, None] - tokens + torch.arange(tokens)[None, :]  # (batch, tokens)
    halves = query[..., :latent].contiguous(), query[..., latent:].contiguous()  # each row's latent and rope halves
    got = ops.latent_attention(*halves, keys, positions, 0.3)
    torch.testing.assert_close(got, attention_reference(*halves, keys, positions, 0.3), atol=1e-5, rtol=1e-5)
    hidden = keys.clone()
    hidden[1, 2:] = 1e4  # slots row 1 may not see must not leak into its output
    assert torch.equal(ops.latent_attention(*halves, hidden, positions, 0.3)[1], got[1])


@needs_kernels
def test_the_kernels_refuse_tensors_they_cannot_read():
    x, indices, weights, w1, w2, w3 = expert_args(3, 2, 4, 16, 8)
    with pytest.raises(ValueError, match="float32"):
        ops.grouped_experts(x.double(), indices, weights, w1.double(), w2.double(), w3.double())
    query, query_rope, keys = torch.randn(2, 4, 32), torch.randn(2, 4, 8), torch.randn(2, 9, 40)
    positions = torch.full((2, 1), 8)
    with pytest.raises(ValueError, match="int64 positions"):
        ops.latent_attention(query, query_rope, keys, positions.float(), 0.5)
    with pytest.raises(ValueError, match="positions 2-d"):
        ops.latent_attention(query, query_rope, keys, positions[:, :, None], 0.5)
    with pytest.raises(ValueError, match="disagree"):
        ops.latent_attention(query, query_rope, keys[..., :32], positions, 0.5)


@needs_kernels
@pytest.mark.parametrize("rows, k, n", [(2, 8, 4), (1, 16, 12), (9, 8, 4), (10, 40, 12), (64, 192, 512),
                                        (256, 256, 384), (9, 8, 1), (11, 16, 6), (64, 256, 382)])
def test_linear_kernel_equals_the_blas(rows, k, n):
    # 1 and 2 rows: no 3-row tile; 9 and 10 rows: the 3-row tiles plus a 1-row remainder of 0 and 1; 1, 6 and
    # 382 outputs: a last task of fewer than 4 weight rows (an LM head over a vocabulary not a multiple of 4).
    x, weight = torch.randn(rows, k), torch.randn(n, k)
    torch.testing.assert_close(ops.linear(x, weight), torch.nn.functional.linear(x, weight),
                               atol=1e-4, rtol=1e-5)


@needs_kernels
def test_linear_kernel_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="K % 8"):
        ops.linear(torch.randn(9, 12), torch.randn(8, 12))


@needs_kernels
@pytest.mark.parametrize("rows, dim, hidden", [
    (2, 16, 24),      # two rows: no 3-row tile
    (9, 8, 8),        # hidden 8: one thread gets both up-projection blocks, the other none
    (10, 16, 24),     # hidden 24: runs of 8 columns split 16 / 8, a 1-row remainder
    (37, 40, 72),     # model dim 40: a last down-projection task of 4 rows and partial tiles
    (64, 256, 1024),  # the benchmark's dense layer at batch 64
])
def test_mlp_kernel_equals_the_swiglu_block(rows, dim, hidden):
    x = torch.randn(rows, dim)
    w1, w3 = torch.randn(hidden, dim) / dim ** 0.5, torch.randn(hidden, dim) / dim ** 0.5
    w2 = torch.randn(dim, hidden) / hidden ** 0.5
    expected = torch.nn.functional.linear(torch.nn.functional.silu(x @ w1.T) * (x @ w3.T), w2)
    torch.testing.assert_close(ops.mlp(x, w1, w2, w3), expected, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_mlp_kernel_refuses_widths_it_cannot_tile():
    with pytest.raises(ValueError, match="I % 8"):
        ops.mlp(torch.randn(9, 8), torch.randn(12, 8), torch.randn(8, 12), torch.randn(12, 8))


@needs_kernels
@pytest.mark.parametrize("rows, heads, k, n", [(2, 4, 16, 8), (9, 1, 8, 8), (10, 4, 32, 24), (64, 4, 64, 32),
                                                (37, 16, 40, 72)])
def test_per_head_kernels_equal_the_einsums(rows, heads, k, n):
    # Weights as MLA slices them: wkv_b viewed (H, C + V, R), the query part [:, :C] (in, out) per head and the
    # value part [:, C:] (out, in); 24 and 72 columns end in an 8-column panel, 9 and 10 rows in partial tiles.
    wkv_b = torch.randn(heads, k + n, k + 8)  # rows of width k + 8: a row stride beyond the (in, out) panel's width
    x = torch.randn(rows, heads, k)
    query_part = wkv_b[:, :k, :n]  # (H, K, N), row stride k + 8, head stride (k + n)(k + 8)
    torch.testing.assert_close(ops.head_matmul(x, query_part), torch.einsum("mhc,hcr->mhr", x, query_part),
                               atol=1e-4, rtol=1e-5)
    q = torch.randn(rows, heads, k + 16)  # MLA's query: the nope slice of each head read in place (strided x)
    torch.testing.assert_close(ops.head_matmul(q[..., :k], query_part),
                               torch.einsum("mhc,hcr->mhr", q[..., :k], query_part), atol=1e-4, rtol=1e-5)
    value_part = wkv_b[:, k:, :k]  # (H, N, K): rows of k of a (k + 8)-wide row, so not unit-stride between rows
    with pytest.raises(ValueError, match="unit-stride rows"):
        ops.head_linear(x, value_part)
    value_part = torch.randn(heads, k + n, k)[:, k:]  # (H, N, K) rows contiguous, head stride (k + n) k
    torch.testing.assert_close(ops.head_linear(x, value_part), torch.einsum("mhr,hvr->mhv", x, value_part),
                               atol=1e-4, rtol=1e-5)


def eager_draw(logits, temperature, top_k, top_p, ban, uniforms, eos):
    logits = logits.clone()
    if eos >= 0:
        logits[:, eos] = torch.where(ban, float("-inf"), logits[:, eos])
    tokens = sample_tokens(logits, temperature, top_k, top_p, uniforms)
    return tokens, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]


@needs_kernels
def test_sampling_kernel_draws_what_the_engine_draws():
    # 3000 rows of every mix of settings; the draws agree except where u lands within float rounding of
    # a boundary between tokens (the sums run in another order), which these draws never do.
    g = torch.Generator().manual_seed(0)
    rows = 3000
    logits = torch.randn(rows, 97, generator=g) * 3
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.randint(0, 4, (rows,), generator=g)]
    top_k = torch.tensor([0, 0, 1, 5, 40])[torch.randint(0, 5, (rows,), generator=g)]
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5])[torch.randint(0, 4, (rows,), generator=g)]
    ban = torch.rand(rows, generator=g) < 0.5
    uniforms = 1 - torch.rand(rows, dtype=torch.float64, generator=g)
    tokens, logp = ops.sample(logits, temperature, top_k, top_p, ban, uniforms, 3)
    ref_tokens, ref_logp = eager_draw(logits, temperature, top_k, top_p, ban, uniforms, 3)
    assert tokens.equal(ref_tokens)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    assert not (tokens[ban] == 3).any()


@needs_kernels
def test_sampling_kernel_never_draws_a_token_of_probability_zero():
    logits = torch.tensor([[-float("inf"), 2.0, 1.0, 0.5, 0.1, -1.0]]).expand(6, 6).contiguous()
    u = torch.tensor([1.0, 1e-300, 0.5, 1.0, 1.0, 1e-300], dtype=torch.float64)
    top_k = torch.tensor([2, 2, 0, 0, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.6, 1.0, 1.0])
    ban = torch.zeros(6, dtype=torch.bool)
    tokens, _ = ops.sample(logits, torch.ones(6), top_k, top_p, ban, u, -1)
    ref, _ = eager_draw(logits, torch.ones(6), top_k, top_p, ban, u, -1)
    assert tokens.tolist() == ref.tolist()


@needs_kernels
def test_sampling_kernel_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="float32 CPU logits"):
        ops.sample(torch.randn(2, 5).double(), torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2),
                          torch.zeros(2, dtype=torch.bool), torch.rand(2, dtype=torch.float64), -1)
