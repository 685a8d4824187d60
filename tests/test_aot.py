"""The CPU backend (r1lab.backends.cpu): which models it runs, what each row class runs, and its steps
compiled ahead of time, driven through a compiled engine as users drive it."""

import re

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from r1lab.backends import cpu
from r1lab.backends.cpu import ops, steps
from r1lab.engine import Engine, SamplingParams
from r1lab.model import Transformer

needs_kernels = pytest.mark.skipif(ops.load() is not None, reason="the kernels need an AVX2 CPU and a C++ compiler")


@pytest.mark.parametrize("change, reason", [
    (dict(attn_impl="naive"), "attn_impl 'naive'"),
    (dict(moe_inter_dim=36), "moe_inter_dim 36"),
    (dict(n_routed_experts=0, inter_dim=100), "MLP hidden width 100"),
    (dict(v_head_dim=14), "v_head_dim 14 is not a multiple of 4"),
])
def test_the_backend_says_why_it_cannot_run_a_model(make_config, change, reason):
    said = cpu.unsupported(Transformer(make_config(**change)))
    assert said is not None and re.search(reason, said), said


def test_the_backend_runs_only_float32_cpu_transformers(make_config):
    model = Transformer(make_config())
    assert cpu.unsupported(model) == ops.load()  # None where the kernels build
    assert "torch.float64 on cpu" in cpu.unsupported(model.double())
    assert "is not r1lab's Transformer" in cpu.unsupported(torch.nn.Linear(2, 2))


def test_the_row_classes_cover_every_row_count_once():
    seen = {}
    for tokens in (1, 2):
        for rows in range(1, 300):
            low, high, forms = cpu.decode_class(rows, tokens)
            assert low <= rows and (high is None or rows <= high)
            token_rows = rows * tokens
            expected = (steps.Streaming if token_rows == 1 else
                        steps.Kernels if token_rows <= cpu.KERNEL_ROWS else steps.Blas)
            assert type(forms) is expected
            seen.setdefault((tokens, low, high), set()).add(rows)
    for (tokens, low, high), rows in seen.items():  # each class is a contiguous range of rows
        assert rows == set(range(low, (high or 299) + 1))
    assert cpu.prefill_class(1, 7)[:2] == (1, 1) and cpu.prefill_class(5, 7)[:2] == (2, None)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 12, 300])
def test_each_row_class_runs_the_ops_of_the_table(make_config, rows):
    # The decode step traced op by op: the products in the class's forms, attention and experts in C++.
    model = Transformer(make_config(q_lora_rank=24)).eval()
    forms = cpu.decode_class(rows, 1)[2]
    cache = model.new_cache(rows, 16)

    def step(tokens, positions):
        return steps.decode(model, forms, tokens, positions, cache, 9)

    with torch.no_grad():
        graph = make_fx(step)(torch.randint(0, 97, (rows, 1)), torch.full((rows, 1), 8))
    called = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"r1lab.latent_attention.default", "r1lab.grouped_experts.default"} <= called
    kernels = {"r1lab.linear.default", "r1lab.mlp.default", "r1lab.head_matmul.default", "r1lab.head_linear.default"}
    assert (kernels <= called) == isinstance(forms, steps.Kernels)
    assert not (kernels & called) or isinstance(forms, steps.Kernels)
    assert ("aten.mm.default" in called) == (type(forms) is steps.Blas)


@needs_kernels
def test_exported_decode_step_follows_the_weights(make_config):
    # Two packages (a prefill of 12 prompts, decoding 12 rows), on a one-layer MoE model to keep the compiling
    # short (tests/test_engine.py compiles the rest, marked slow). The weights are inputs of the compiled
    # steps: updated in place or replaced by tensors of the same shape, the steps see them without being
    # built again.
    model = Transformer(make_config(init_std=0.1, n_layers=1, n_dense_layers=0, n_mtp_modules=0)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]] * 4
    params = SamplingParams(max_new_tokens=6, temperature=0)
    eager_engine, compiled_engine = Engine(model, eos_id=None), Engine(model, eos_id=None, compile=True)

    def same_outputs():
        eager, compiled = eager_engine.generate(prompts, params), compiled_engine.generate(prompts, params)
        assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
        return [o.token_ids for o in eager]

    before = same_outputs()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    updated = same_outputs()
    model.norm.weight = torch.nn.Parameter(torch.rand_like(model.norm.weight) + 0.5)
    replaced = same_outputs()
    assert before != updated != replaced
    step = compiled_engine.steps.decode
    assert len(step._steps) == 1 and any(t is model.norm.weight for t in step._state)
    assert (model.norm.weight.shape, torch.float32, model.norm.weight.device) in step._signature
