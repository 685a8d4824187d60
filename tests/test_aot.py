"""The ahead-of-time compiled step (r1lab.aot), driven through a compiled engine as users drive it."""

import pytest
import torch

from r1lab.aot import ExportedStep
from r1lab.engine import Engine, SamplingParams, _decode
from r1lab.model import Transformer


def test_exported_decode_step_follows_the_weights(make_config):
    # One row-count class (12 rows: on AVX2 the C++ products, grouped expert GEMM and latent attention),
    # ~20 s of compiling. The weights are inputs of the compiled step: updated in place or replaced by
    # tensors of the same shape, the step sees them without being built again.
    model = Transformer(make_config(init_std=0.1)).eval()
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
    step = compiled_engine._decode
    assert len(step._steps) == 1 and any(t is model.norm.weight for t in step._state)
    assert (model.norm.weight.shape, torch.float32, model.norm.weight.device) in step._signature


@pytest.mark.slow
def test_a_row_class_that_cannot_be_exported_runs_through_torch_compile(make_config):
    # In float64 the routed experts miss the C++ kernels and their path depends on the row count within
    # the 9-256 class: no one exported graph serves it.
    model = Transformer(make_config(init_std=0.1)).double().eval()
    prompts = [[5, 6, 7], [1, 2]] * 6
    params = SamplingParams(max_new_tokens=4, temperature=0)
    engine = Engine(model, eos_id=None, compile=True)
    with pytest.warns(UserWarning, match="shape-dependent branch"):
        compiled = engine.generate(prompts, params)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in Engine(model, eos_id=None).generate(prompts, params)]


def test_exported_step_hands_other_caches_to_its_fallback():
    step = ExportedStep(_decode, fallback=lambda model, tokens, positions, cache, n_slots: ("fallback", n_slots))
    assert step(None, torch.zeros(2, 1), torch.zeros(2, 1), object(), 7) == ("fallback", 7)
