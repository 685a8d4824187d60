"""The compiled-step kernels against the eager forms they replace."""

import pytest
import torch

from r1lab import kernels
from r1lab.kernels import STREAMING_ROWS, expert_mixture, grouped_experts_op, routed_experts

needs_grouped = pytest.mark.skipif(kernels._library("grouped_experts") is None,
                                   reason="the grouped expert kernel needs an AVX2 CPU and a C++ compiler")


def capturing(graphs: list):
    """A torch.compile backend that records each traced graph's call targets in graphs and runs it as traced."""
    def backend(gm, example_inputs):
        graphs.append({node.target for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward
    return backend


def calls(graph_targets: set, op) -> bool:
    """Whether a traced graph calls op (as its packet or its default overload)."""
    return op in graph_targets or op.default in graph_targets


def expert_args(n_tokens, k, n_experts, dim, hidden, unused=()):
    """Random tokens routed to k distinct experts each (never those in `unused`), stacked weights."""
    allowed = torch.tensor([e for e in range(n_experts) if e not in unused])
    indices = torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(n_tokens)])
    w1, w3 = torch.randn(n_experts, dim, hidden) * 0.1, torch.randn(n_experts, dim, hidden) * 0.1
    w2 = torch.randn(n_experts, hidden, dim) * 0.1
    return torch.randn(n_tokens, dim), indices, torch.rand(n_tokens, k), w1, w2, w3


@needs_grouped
@pytest.mark.parametrize("n_tokens, k, n_experts, dim, hidden", [
    (1, 1, 4, 16, 8),      # one token, one expert, an 8-column block only
    (5, 2, 8, 24, 24),     # 16 + 8 column blocks, partial row tiles
    (37, 3, 6, 64, 40),    # several 6-row tiles per expert, uneven loads
    (64, 2, 8, 192, 128),  # the tiny preset's decode step at batch 64
])
def test_grouped_experts_equal_the_dispatch(n_tokens, k, n_experts, dim, hidden):
    args = expert_args(n_tokens, k, n_experts, dim, hidden, unused=(0,))  # expert 0 gets no token
    torch.testing.assert_close(grouped_experts_op(*args), routed_experts(*args), atol=1e-5, rtol=1e-5)


@needs_grouped
def test_grouped_experts_reject_an_out_of_range_expert():
    x, indices, weights, w1, w2, w3 = expert_args(3, 2, 4, 16, 8)
    indices[1, 0] = 4
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        grouped_experts_op(x, indices, weights, w1, w2, w3)


@needs_grouped
@pytest.mark.parametrize("n_tokens", [3, 12])
def test_compiled_mixture_takes_the_grouped_kernel_beyond_the_streaming_rows(n_tokens):
    graphs = []
    args = expert_args(n_tokens, 2, 4, 16, 8)
    compiled = torch.compile(expert_mixture, backend=capturing(graphs), dynamic=False)
    torch.testing.assert_close(compiled(*args), routed_experts(*args), atol=1e-5, rtol=1e-5)
    assert calls(graphs[0], torch.ops.r1lab.grouped_experts) == (n_tokens > STREAMING_ROWS)


def test_a_failed_build_warns_and_leaves_the_generic_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2: the kernel is never built here")
    with pytest.warns(UserWarning, match="generic path"):
        assert kernels._library.__wrapped__("grouped_experts") is None
    assert not list((tmp_path / "r1lab" / "kernels").glob("*.so"))  # nothing half-written left behind


@pytest.mark.parametrize("name", ["grouped_experts", "latent_attention", "linear", "sample"])
def test_each_kernel_is_its_ops_cpu_kernel_in_cpp(name):
    # Registered from C++ (csrc/op.h), a compiled graph calls the op without entering Python.
    if not kernels.kernel_built(name):
        pytest.skip("the kernel is not built here")
    for op in [name] + (["linear_pair", "mlp", "head_linear", "head_matmul"] if name == "linear" else []):
        cpu = [line for line in torch._C._dispatch_dump(f"r1lab::{op}").splitlines() if line.startswith("CPU:")]
        assert len(cpu) == 1 and "csrc/op.h" in cpu[0], cpu


def test_an_unwritable_cache_warns_and_leaves_the_generic_path(tmp_path, monkeypatch):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or kernels.shutil.which("c++") is None:
        pytest.skip("the kernel is never built here")
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="cannot build"):
        assert kernels._library.__wrapped__("linear") is None


needs_attention = pytest.mark.skipif(kernels._library("latent_attention") is None,
                                     reason="the attention kernel needs an AVX2 CPU and a C++ compiler")


@needs_attention
@pytest.mark.parametrize("tokens, heads, slots, latent, rope", [
    (1, 4, 13, 32, 8),    # a decode step: 13 slots (an 8-wide block and a tail)
    (2, 4, 37, 64, 16),   # a speculative verify step: two tokens, each with its own mask row
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
    mask = torch.arange(slots)[None, None, :] < (lengths[:, None, None] - (tokens - 1) + torch.arange(tokens)[None, :, None])
    halves = query[..., :latent].contiguous(), query[..., latent:].contiguous()  # each row's latent and rope halves
    expected = kernels.latent_attention(*halves, keys, mask, 0.3)  # eager: the batched GEMMs
    got = kernels.latent_attention_op(*halves, keys, mask, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    masked = keys.clone()
    masked[1, 2:] = 1e4  # slots row 1 may not see must not leak into its output
    torch.testing.assert_close(kernels.latent_attention_op(*halves, masked, mask, 0.3)[1], got[1])
    # The mask's cached form: each token's last visible slot (its position), the same result bit for bit.
    positions = lengths[:, None] - tokens + torch.arange(tokens)[None, :]  # (batch, tokens)
    assert torch.equal(kernels.latent_attention_op(*halves, keys, positions, 0.3), got)
    assert torch.equal(kernels.latent_attention_op(*halves, masked, positions, 0.3)[1], got[1])


@needs_attention
def test_compiled_attention_takes_the_kernel_beyond_the_streaming_rows():
    graphs = []
    for batch in (STREAMING_ROWS, STREAMING_ROWS + 1):  # few sequences: the compiler's own loops
        query, query_rope, keys = torch.randn(batch, 4, 32), torch.randn(batch, 4, 8), torch.randn(batch, 9, 40)
        mask = torch.ones(batch, 1, 9, dtype=torch.bool)
        compiled = torch.compile(kernels.latent_attention, backend=capturing(graphs), dynamic=False)
        torch.testing.assert_close(compiled(query, query_rope, keys, mask, 0.5),
                                   kernels.latent_attention(query, query_rope, keys, mask, 0.5), atol=1e-5, rtol=1e-5)
    assert [calls(graph, torch.ops.r1lab.latent_attention) for graph in graphs] == [False, True]


@needs_grouped
@needs_attention
def test_the_kernels_refuse_tensors_they_cannot_read():
    x, indices, weights, w1, w2, w3 = expert_args(3, 2, 4, 16, 8)
    with pytest.raises(ValueError, match="float32"):
        grouped_experts_op(x.double(), indices, weights, w1.double(), w2.double(), w3.double())
    query, query_rope, keys = torch.randn(2, 4, 32), torch.randn(2, 4, 8), torch.randn(2, 9, 40)
    mask = torch.ones(2, 1, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool mask"):
        kernels.latent_attention_op(query, query_rope, keys, mask.float(), 0.5)
    with pytest.raises(ValueError, match="positions 2-d"):
        kernels.latent_attention_op(query, query_rope, keys, torch.zeros(2, 1, 9, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="disagree"):
        kernels.latent_attention_op(query, query_rope, keys[..., :32], mask, 0.5)


needs_linear = pytest.mark.skipif(kernels._library("linear") is None,
                                  reason="the linear kernel needs an AVX2 CPU and a C++ compiler")


@needs_linear
@pytest.mark.parametrize("rows, k, n", [(9, 8, 4), (10, 40, 12), (64, 192, 512), (256, 256, 384), (9, 8, 1),
                                        (11, 16, 6), (64, 256, 382)])
def test_linear_kernel_equals_the_blas(rows, k, n):
    # 9 and 10 rows: the 3-row tiles plus a 1-row remainder of 0 and 1; 1, 6 and 382 outputs: a last task of
    # fewer than 4 weight rows (an LM head over a vocabulary that is not a multiple of 4).
    x, weight = torch.randn(rows, k), torch.randn(n, k)
    torch.testing.assert_close(kernels.linear_op(x, weight), torch.nn.functional.linear(x, weight),
                               atol=1e-4, rtol=1e-5)


@needs_linear
@pytest.mark.parametrize("rows, k, n_a, n_b", [(9, 8, 5, 3), (64, 256, 256, 112), (12, 16, 4, 1)])
def test_linear_pair_kernel_equals_two_products(rows, k, n_a, n_b):
    # 5 + 3 rows: a task of fewer than 4 rows at the end of each product, the prefetch crossing between them.
    x, weight_a, weight_b = torch.randn(rows, k), torch.randn(n_a, k), torch.randn(n_b, k)
    a, b = kernels.linear_pair_op(x, weight_a, weight_b)
    torch.testing.assert_close(a, x @ weight_a.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b, x @ weight_b.T, atol=1e-4, rtol=1e-5)


@needs_linear
@pytest.mark.parametrize("rows", [4, 12])
def test_compiled_linear_pair_takes_the_kernel_beyond_the_streaming_rows(rows):
    graphs = []
    x, weight_a, weight_b = torch.randn(rows, 1, 16), torch.randn(12, 16), torch.randn(8, 16)
    compiled = torch.compile(kernels.linear_pair, backend=capturing(graphs), dynamic=False)
    for got, expected in zip(compiled(x, weight_a, weight_b), (x @ weight_a.T, x @ weight_b.T)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert calls(graphs[0], torch.ops.r1lab.linear_pair) == (rows > STREAMING_ROWS)


@needs_linear
def test_linear_kernel_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="K % 8"):
        kernels.linear_op(torch.randn(9, 12), torch.randn(8, 12))


@needs_linear
@pytest.mark.parametrize("rows, dim, hidden", [
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
    torch.testing.assert_close(kernels.mlp_op(x, w1, w2, w3), expected, atol=1e-5, rtol=1e-5)


@needs_linear
def test_mlp_kernel_refuses_widths_it_cannot_tile():
    with pytest.raises(ValueError, match="I % 8"):
        kernels.mlp_op(torch.randn(9, 8), torch.randn(12, 8), torch.randn(8, 12), torch.randn(12, 8))


@needs_linear
@pytest.mark.parametrize("rows", [4, 12])
def test_compiled_mlp_takes_the_kernel_beyond_the_streaming_rows(rows):
    graphs = []
    x, w1, w2, w3 = torch.randn(rows, 1, 16), torch.randn(24, 16), torch.randn(16, 24), torch.randn(24, 16)
    compiled = torch.compile(kernels.mlp, backend=capturing(graphs), dynamic=False)
    torch.testing.assert_close(compiled(x, w1, w2, w3), kernels.mlp(x, w1, w2, w3), atol=1e-4, rtol=1e-5)
    assert calls(graphs[0], torch.ops.r1lab.mlp) == (rows > STREAMING_ROWS)


@needs_linear
@pytest.mark.parametrize("rows, heads, k, n", [(9, 1, 8, 8), (10, 4, 32, 24), (64, 4, 64, 32), (37, 16, 40, 72)])
def test_per_head_kernels_equal_the_einsums(rows, heads, k, n):
    # Weights as MLA slices them: wkv_b viewed (H, C + V, R), the query part [:, :C] (in, out) per head and the
    # value part [:, C:] (out, in); 24 and 72 columns end in an 8-column panel, 9 and 10 rows in partial tiles.
    wkv_b = torch.randn(heads, k + n, k + 8)  # rows of width k + 8: a row stride beyond the (in, out) panel's width
    x = torch.randn(rows, heads, k)
    query_part = wkv_b[:, :k, :n]  # (H, K, N), row stride k + 8, head stride (k + n)(k + 8)
    torch.testing.assert_close(kernels.head_matmul_op(x, query_part), torch.einsum("mhc,hcr->mhr", x, query_part),
                               atol=1e-4, rtol=1e-5)
    q = torch.randn(rows, heads, k + 16)  # MLA's query: the nope slice of each head read in place (strided x)
    torch.testing.assert_close(kernels.head_matmul_op(q[..., :k], query_part),
                               torch.einsum("mhc,hcr->mhr", q[..., :k], query_part), atol=1e-4, rtol=1e-5)
    value_part = wkv_b[:, k:, :k]  # (H, N, K): rows of k of a (k + 8)-wide row, so not unit-stride between rows
    with pytest.raises(ValueError, match="unit-stride rows"):
        kernels.head_linear_op(x, value_part)
    value_part = torch.randn(heads, k + n, k)[:, k:]  # (H, N, K) rows contiguous, head stride (k + n) k
    torch.testing.assert_close(kernels.head_linear_op(x, value_part), torch.einsum("mhr,hvr->mhv", x, value_part),
                               atol=1e-4, rtol=1e-5)


@needs_linear
@pytest.mark.parametrize("rows", [4, 12])
def test_compiled_mla_takes_the_per_head_kernels_beyond_the_streaming_rows(rows):
    graphs = []
    x, query_weight, value_weight = torch.randn(rows, 1, 4, 32), torch.randn(4, 32, 64), torch.randn(4, 64, 32)
    compiled = torch.compile(kernels.head_matmul, backend=capturing(graphs), dynamic=False)
    torch.testing.assert_close(compiled(x, query_weight), torch.einsum("bthc,hcr->bthr", x, query_weight),
                               atol=1e-4, rtol=1e-5)
    compiled = torch.compile(kernels.head_linear, backend=capturing(graphs), dynamic=False)
    torch.testing.assert_close(compiled(x, value_weight), torch.einsum("bthr,hvr->bthv", x, value_weight),
                               atol=1e-4, rtol=1e-5)
    assert calls(graphs[0], torch.ops.r1lab.head_matmul) == (rows > STREAMING_ROWS)
    assert calls(graphs[1], torch.ops.r1lab.head_linear) == (rows > STREAMING_ROWS)


needs_sample = pytest.mark.skipif(kernels._library("sample") is None,
                                  reason="the sampling kernel needs an AVX2 CPU and a C++ compiler")


def eager_draw(logits, temperature, top_k, top_p, ban, uniforms, eos):
    from r1lab.engine import sample_tokens
    logits = logits.clone()
    if eos >= 0:
        logits[:, eos] = torch.where(ban, float("-inf"), logits[:, eos])
    tokens = sample_tokens(logits, temperature, top_k, top_p, uniforms)
    return tokens, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]


@needs_sample
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
    tokens, logp = kernels.sample_op(logits, temperature, top_k, top_p, ban, uniforms, 3)
    ref_tokens, ref_logp = eager_draw(logits, temperature, top_k, top_p, ban, uniforms, 3)
    assert tokens.equal(ref_tokens)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    assert not (tokens[ban] == 3).any()


@needs_sample
def test_sampling_kernel_never_draws_a_token_of_probability_zero():
    logits = torch.tensor([[-float("inf"), 2.0, 1.0, 0.5, 0.1, -1.0]]).expand(6, 6).contiguous()
    u = torch.tensor([1.0, 1e-300, 0.5, 1.0, 1.0, 1e-300], dtype=torch.float64)
    top_k = torch.tensor([2, 2, 0, 0, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.6, 1.0, 1.0])
    ban = torch.zeros(6, dtype=torch.bool)
    tokens, _ = kernels.sample_op(logits, torch.ones(6), top_k, top_p, ban, u, -1)
    ref, _ = eager_draw(logits, torch.ones(6), top_k, top_p, ban, u, -1)
    assert tokens.tolist() == ref.tolist()


@needs_sample
def test_sampling_kernel_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="float32 CPU logits"):
        kernels.sample_op(torch.randn(2, 5).double(), torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2),
                          torch.zeros(2, dtype=torch.bool), torch.rand(2, dtype=torch.float64), -1)
