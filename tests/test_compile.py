"""The compiled training loss (`train.common.loss_fn(model, compile=True)`) against the eager one.

Tolerance: Inductor fuses RMSNorm, softmax, SwiGLU and the cross-entropy into loops that sum in
another order than the eager kernels, so float32 results differ by a few ulps per op; through a
3-layer model and its backward that is ~1e-6 relative. rtol 1e-4 / atol 1e-6 leaves room for that
and still fails on any wrong term (a dropped MTP or balance loss moves the loss by > 1e-2). The
expert loads are integer counts and must be equal exactly.

Inductor compiles take 40-100 s on one thread, so those tests are `slow`; the default suite traces the
same graphs with the `aot_eager` backend (Dynamo + AOTAutograd, no code generation), which checks the
graph breaks and that the expert-load mutation inside the graph counts exactly.
"""

import pytest
import torch

from r1lab.model import Transformer
from r1lab.train.common import loss_fn

RTOL, ATOL = 1e-4, 1e-6


def _step(model, loss, tokens, mask=None):
    """One training forward and backward: (the loss's four parts, the gradients, the expert loads)."""
    for gate in model.moe_gates():
        gate.expert_load.zero_()
    model.zero_grad(set_to_none=True)
    out = loss(tokens[:, :-1], tokens[:, 1:], mask)
    out.loss.backward()
    parts = torch.stack([out.loss, out.lm_loss, out.mtp_loss, out.aux_loss]).detach()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return parts, grads, [g.expert_load.clone() for g in model.moe_gates()]


def _assert_same(eager, compiled):
    (parts_e, grads_e, loads_e), (parts_c, grads_c, loads_c) = eager, compiled
    torch.testing.assert_close(parts_c, parts_e, rtol=RTOL, atol=ATOL)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=RTOL, atol=ATOL, msg=name)
    assert len(loads_c) == len(loads_e)
    assert all(torch.equal(c, e) for c, e in zip(loads_c, loads_e))


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_compiled_loss_and_gradients_equal_eager(make_config, moe):
    changes = dict(seq_aux_alpha=0.01) if moe else dict(n_routed_experts=0, n_dense_layers=3)
    model = Transformer(make_config(init_std=0.2, **changes)).train()
    tokens = torch.randint(0, 97, (4, 17))
    mask = (torch.rand(4, 16) < 0.7).float()  # SFT-style: only some targets count
    compiled = loss_fn(model, compile=True)
    for m in (None, mask):
        eager = _step(model, model.loss, tokens, m)
        _assert_same(eager, _step(model, compiled, tokens, m))
        assert float(eager[0][3]) > 0 if moe else float(eager[0][3]) == 0  # the balance term is there
    if moe:
        assert all(float(load.sum()) == 4 * 16 * model.config.n_activated_experts for load in eager[2][:-1])


@pytest.mark.slow
def test_compiled_expert_load_counts_every_call_and_biases_move_alike(make_config):
    """The buffer mutated inside the compiled graph accumulates across calls, as eager does, and the
    aux-loss-free bias update reads the same loads."""
    torch.manual_seed(1)
    eager_model = Transformer(make_config(init_std=0.2)).train()
    compiled_model = Transformer(make_config(init_std=0.2)).train()
    compiled_model.load_state_dict(eager_model.state_dict())
    compiled = loss_fn(compiled_model, compile=True)
    for seed in range(3):
        tokens = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(seed))
        eager_model.loss(tokens[:, :-1], tokens[:, 1:])
        compiled(tokens[:, :-1], tokens[:, 1:])
    for e, c in zip(eager_model.moe_gates(), compiled_model.moe_gates()):
        assert torch.equal(e.expert_load, c.expert_load) and float(e.expert_load.sum()) > 0
    assert eager_model.update_expert_bias() == compiled_model.update_expert_bias()
    for e, c in zip(eager_model.moe_gates(), compiled_model.moe_gates()):
        assert torch.equal(e.expert_bias, c.expert_bias) and float(c.expert_load.sum()) == 0


def test_eager_loss_fn_is_the_models_own_loss(config):
    model = Transformer(config)
    assert loss_fn(model, compile=False) == model.loss


def test_traced_loss_breaks_only_at_the_expert_dispatch_and_counts_loads_exactly(make_config):
    model = Transformer(make_config(init_std=0.2, seq_aux_alpha=0.01)).train()
    tokens = torch.randint(0, 97, (4, 17))
    explained = torch._dynamo.explain(model.loss)(tokens[:, :-1], tokens[:, 1:])
    assert explained.break_reasons  # the dispatch's block size depends on the loads: it runs eagerly
    assert {b.user_stack[-1].line for b in explained.break_reasons} == {"out = self.experts(flat, routing)"}
    assert all("disable" in b.reason for b in explained.break_reasons)
    torch._dynamo.reset()
    traced = torch.compile(model.loss, backend="aot_eager", dynamic=False)
    _assert_same(_step(model, model.loss, tokens), _step(model, traced, tokens))
