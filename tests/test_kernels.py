"""The compiled-step kernels against the eager forms they replace."""

import pytest
import torch

from r1lab import kernels
from r1lab.kernels import STREAMING_ROWS, expert_mixture, grouped_experts_op, routed_experts

needs_grouped = pytest.mark.skipif(kernels._grouped_experts_library() is None,
                                   reason="the grouped expert kernel needs an AVX2 CPU and a C++ compiler")


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

    def capture(gm, example_inputs):
        graphs.append({node.target for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    args = expert_args(n_tokens, 2, 4, 16, 8)
    compiled = torch.compile(expert_mixture, backend=capture, dynamic=False)
    torch.testing.assert_close(compiled(*args), routed_experts(*args), atol=1e-5, rtol=1e-5)
    assert (torch.ops.r1lab.grouped_experts.default in graphs[0]) == (n_tokens > STREAMING_ROWS)


def test_a_failed_build_warns_and_leaves_the_generic_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2: the kernel is never built here")
    with pytest.warns(UserWarning, match="generic path"):
        assert kernels._grouped_experts_library.__wrapped__() is None
    assert not list((tmp_path / "r1lab" / "kernels").glob("*.so"))  # nothing half-written left behind
