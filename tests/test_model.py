import dataclasses
import math

import pytest
import torch

from r1lab.config import ModelConfig
from r1lab.model import MoE, Routing, Transformer, _grouped_mm_fits, apply_rope, rope_frequencies, softmax_scale


def twin(model: Transformer, **changes) -> Transformer:
    """The same weights under a changed config (e.g. the other attention path)."""
    other = Transformer(dataclasses.replace(model.config, **changes))
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_cached_prefill_then_decode_equals_full_forward(make_config, impl, q_lora_rank):
    model = Transformer(make_config(attn_impl=impl, q_lora_rank=q_lora_rank)).eval()
    tokens = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3, 32)
        prefill = model(tokens[:, :7], positions=torch.arange(7).expand(3, 7), cache=cache)
        steps = [model(tokens[:, t:t + 1], positions=torch.full((3, 1), t), cache=cache) for t in range(7, 20)]
    decoded = torch.cat([prefill] + steps, dim=1)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=0)


def test_absorb_equals_naive(make_config):
    model = Transformer(make_config(attn_impl="absorb", q_lora_rank=16)).eval()
    naive = twin(model, attn_impl="naive")
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), naive(tokens), atol=1e-5, rtol=0)


def test_cache_is_latent_sized(make_config):
    cfg = make_config(attn_impl="absorb")
    cache = Transformer(cfg).new_cache(2, 16)
    per_token_per_layer = sum(t[0, 0].numel() for t in cache.layers[0])
    assert per_token_per_layer == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    naive = Transformer(dataclasses.replace(cfg, attn_impl="naive")).new_cache(2, 16)
    assert sum(t[0, 0].numel() for t in naive.layers[0]) == cfg.n_heads * (cfg.head_dim_qk + cfg.v_head_dim)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(config, side):
    model = Transformer(config).eval()
    a, b = torch.randint(1, 97, (1, 12)), torch.randint(1, 97, (1, 7))
    pad = torch.zeros(1, 5, dtype=torch.long)
    b_padded = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    valid_b = (torch.arange(12) >= 5) if side == "left" else (torch.arange(12) < 7)
    tokens = torch.cat([a, b_padded])
    valid = torch.stack([torch.ones(12, dtype=torch.bool), valid_b])
    with torch.no_grad():
        batch = model(tokens, valid=valid)
        torch.testing.assert_close(batch[0], model(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[1][valid_b], model(b)[0], atol=1e-5, rtol=0)


def test_cached_ragged_prefill_then_decode(config):
    """Right-padded prompts of different lengths, each row decoding at its own position."""
    model = Transformer(config).eval()
    seqs = [torch.randint(1, 97, (n,)) for n in (9, 4)]
    lengths = torch.tensor([9, 4])
    prompt = torch.zeros(2, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        prompt[i, :len(s)] = s
    nxt = torch.randint(1, 97, (2, 3))
    with torch.no_grad():
        cache = model.new_cache(2, 20)
        model(prompt, positions=torch.arange(9).expand(2, 9), cache=cache)
        outs = [model(nxt[:, j:j + 1], positions=(lengths + j)[:, None], cache=cache)[:, 0] for j in range(3)]
        for i, s in enumerate(seqs):
            ref = model(torch.cat([s, nxt[i]])[None])[0, len(s):]
            torch.testing.assert_close(torch.stack([o[i] for o in outs]), ref, atol=1e-5, rtol=0)


def test_cache_select_and_repeat(config):
    model = Transformer(config).eval()
    tokens = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        model(tokens, positions=torch.arange(6).expand(2, 6), cache=cache)
        cache.select(torch.tensor([1, 1, 1]))  # row 1, three times
        nxt = torch.randint(0, 97, (3, 1))
        out = model(nxt, positions=torch.full((3, 1), 6), cache=cache)[:, 0]
        for i in range(3):
            ref = model(torch.cat([tokens[1], nxt[i]])[None])[0, -1]
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_caches_of_different_lengths_join_and_decode_on(config):
    # A running batch sized for short requests takes a request that needs more slots: the shorter
    # cache's rows get zeroed slots, and decoding continues as if each row had its own cache.
    model = Transformer(config).eval()
    a, b = torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        short, long = model.new_cache(1, 6), model.new_cache(1, 12)
        model(a, positions=torch.arange(4)[None], cache=short)
        model(b, positions=torch.arange(7)[None], cache=long)
        short.extend(long)
        assert short.max_len == 12 and short.batch_size == 2
        assert short.layers[0][0][0, 6:].abs().sum() == 0  # the grown slots are zeros
        nxt = torch.randint(0, 97, (2, 1))
        out = model(nxt, positions=torch.tensor([[4], [7]]), cache=short)[:, 0]
        torch.testing.assert_close(out[0], model(torch.cat([a[0], nxt[0]])[None])[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], model(torch.cat([b[0], nxt[1]])[None])[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("loads", ["balanced", "skewed", "few tokens", "unaligned widths"])
def test_vectorised_moe_equals_per_token_loop(make_config, loads):
    # balanced: the grouped products; skewed: the same with one expert taking every token (the other
    # slices empty); few tokens (no more assignments than experts): gathered expert weights; unaligned
    # widths (rows not a multiple of 16 bytes, which grouped products refuse): each expert in turn.
    unaligned = loads == "unaligned widths"
    cfg = make_config(n_routed_experts=8, n_activated_experts=3, n_expert_groups=4, n_limited_groups=2,
                      route_scale=2.5, **(dict(dim=62, moe_inter_dim=30, n_heads=2) if unaligned else {}))
    moe = MoE(cfg).eval()
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    moe.gate.expert_bias.normal_(std=0.1)
    if loads == "skewed":
        moe.gate.expert_bias[5] = 100.0
    x = torch.randn(2, 1 if loads == "few tokens" else 11, cfg.dim)
    assert _grouped_mm_fits(x, moe.experts.w1, moe.experts.w2) != unaligned
    with torch.no_grad():
        out, _ = moe(x)
        flat = x.reshape(-1, cfg.dim)
        routing = moe.gate(flat)
        expected = []
        for n in range(flat.shape[0]):
            y = moe.shared_experts(flat[n])
            for k in range(cfg.n_activated_experts):
                e = int(routing.indices[n, k])
                y = y + routing.weights[n, k] * moe.experts.expert(e, flat[n])
            expected.append(y)
    torch.testing.assert_close(out.reshape(-1, cfg.dim), torch.stack(expected), atol=1e-5, rtol=0)


def test_grouped_expert_gradients_equal_the_per_expert_loop(make_config):
    # The grouped products' backward (what training runs) against autograd through one expert at a time.
    cfg = make_config(n_routed_experts=8, n_activated_experts=2)
    experts = MoE(cfg).experts
    x = torch.randn(40, cfg.dim, requires_grad=True)
    routing = Routing(torch.rand(40, 2), torch.randint(0, 8, (40, 2)), torch.rand(40, 8))
    grads = []
    for run in (experts, lambda x, r: sum(r.weights[:, k, None] * torch.stack(
            [experts.expert(int(r.indices[n, k]), x[n]) for n in range(len(x))]) for k in range(2))):
        x.grad = None
        experts.zero_grad()
        run(x, routing).square().sum().backward()
        grads.append([x.grad.clone()] + [w.grad.clone() for w in (experts.w1, experts.w2, experts.w3)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_selection_bias_changes_choice_not_weight_formula(make_config, score_func):
    cfg = make_config(n_routed_experts=8, n_activated_experts=2, score_func=score_func, route_scale=2.0)
    moe = MoE(cfg).eval()
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(64, cfg.dim)
    before = moe.gate(x)
    moe.gate.expert_bias[3] = 10.0  # a huge bias: expert 3 is chosen by every token
    after = moe.gate(x)
    assert not torch.equal(before.indices, after.indices)
    assert (after.indices == 3).any(dim=1).all()
    # The scores themselves are untouched, and the weights are still a function of the unbiased scores.
    torch.testing.assert_close(after.scores, before.scores)
    w = after.scores.gather(1, after.indices)
    if score_func == "sigmoid":
        w = w / w.sum(dim=1, keepdim=True)
    torch.testing.assert_close(after.weights, w * cfg.route_scale)


def test_group_limited_routing_stays_in_chosen_groups(make_config):
    cfg = make_config(n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=1)
    moe = MoE(cfg).eval()
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    routing = moe.gate(torch.randn(200, cfg.dim))
    groups = routing.indices // 2
    assert (groups[:, 0] == groups[:, 1]).all()


def test_bias_updates_balance_a_skewed_batch(make_config):
    cfg = make_config(n_routed_experts=8, n_activated_experts=2, bias_update_speed=0.01)
    moe = MoE(cfg).train()
    # A skewed router: the gate prefers experts 0 and 1 for a batch of similar tokens.
    direction = torch.randn(cfg.dim) / cfg.dim ** 0.5
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.05)
        moe.gate.weight[:2] += direction
    x = torch.randn(256, cfg.dim) * 0.3 + 3 * direction * cfg.dim ** 0.5

    def imbalance() -> float:
        load = torch.bincount(moe.gate(x).indices.flatten(), minlength=8).float()
        moe.gate.expert_load.zero_()
        return float(load.max() / load.mean())

    start = imbalance()
    for _ in range(200):
        moe.gate(x)
        moe.gate.update_bias(cfg.bias_update_speed)
    end = imbalance()
    assert start > 3.0
    assert end < 0.6 * start  # e.g. 4.0 (two experts take everything) -> 1.6 to 2.3 across seeds


def test_uncounted_padding_adds_no_expert_load_and_changes_no_output(make_config):
    model = Transformer(make_config(init_std=0.2, n_mtp_modules=0)).train()
    rows = [torch.randint(1, 97, (n,)) for n in (9, 4, 6)]
    batch, count = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.bool)
    for i, row in enumerate(rows):
        batch[i, :len(row)], count[i, :len(row)] = row, True

    def run(*args, **kwargs):
        for gate in model.moe_gates():
            gate.expert_load.zero_()
        model.zero_grad()
        logits = model(*args, **kwargs)
        logits.sum().backward()
        return logits, [g.expert_load.clone() for g in model.moe_gates()], [p.grad.clone() for p in model.parameters()]

    alone = [run(row[None])[1] for row in rows]
    unpadded = [sum(loads) for loads in zip(*alone)]
    plain, plain_loads, plain_grads = run(batch)
    counted, counted_loads, counted_grads = run(batch, count=count)
    assert all(torch.equal(a, b) for a, b in zip(counted_loads, unpadded))
    assert all(float(load.sum()) == 19 * model.config.n_activated_experts for load in counted_loads)
    assert all(float(load.sum()) == 27 * model.config.n_activated_experts for load in plain_loads)
    assert torch.equal(counted, plain) and all(torch.equal(a, b) for a, b in zip(counted_grads, plain_grads))


def test_mtp_loss_is_finite_and_reaches_the_trunk(config):
    model = Transformer(config).train()
    tokens = torch.randint(0, 97, (2, 16))
    out = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert torch.isfinite(out.mtp_loss) and out.mtp_loss > 0
    out.mtp_loss.backward()
    assert model.layers[0].attn.wkv_a.weight.grad.abs().sum() > 0
    assert model.embed.weight.grad.abs().sum() > 0
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0


def test_loss_combines_parts_and_respects_mask(config):
    model = Transformer(config).train()
    tokens = torch.randint(0, 97, (2, 12))
    out = model.loss(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(out.loss, out.lm_loss + config.mtp_loss_weight * out.mtp_loss + out.aux_loss)
    assert out.aux_loss > 0
    mask = torch.zeros(2, 11)
    mask[:, 5:] = 1
    masked = model.loss(tokens[:, :-1], tokens[:, 1:], loss_mask=mask)
    logits = model(tokens[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), tokens[:, 6:].reshape(-1))
    torch.testing.assert_close(masked.lm_loss, ce, atol=1e-5, rtol=0)


def test_tiny_model_overfits_one_batch(config):
    model = Transformer(config).train()
    tokens = torch.randint(0, 97, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = model.loss(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_expert_bias()
        first = first if first is not None else out.lm_loss.item()
    assert first > 4.0
    assert out.lm_loss.item() < 0.05


def test_bfloat16_forward_matches_float32(config):
    model = Transformer(config).eval()
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_yarn_keeps_high_frequencies_and_stretches_low_ones(make_config):
    # V3's RoPE width and original context: pairs 0-9 turn > 32 times in 4096 positions, pairs >= 23 < once.
    base = make_config(qk_rope_head_dim=64, max_seq_len=16384, original_seq_len=4096)
    yarn = dataclasses.replace(base, rope_factor=4.0, mscale=1.0)
    f0, f1 = rope_frequencies(base), rope_frequencies(yarn)
    assert torch.allclose(f1[:10], f0[:10])  # fast rotations untouched
    assert torch.allclose(f1[23:], f0[23:] / 4.0)  # slow ones interpolated by the factor
    ratio = f1[10:23] / f0[10:23]
    assert (ratio[1:] < 1).all() and (ratio > 0.25).all() and (ratio[1:] < ratio[:-1]).all()
    m = 0.1 * math.log(4.0) + 1
    assert softmax_scale(yarn) == pytest.approx(softmax_scale(base) * m * m)


def test_rope_is_relative(make_config):
    """Scores between rotated q and k depend only on the position difference."""
    freqs = rope_frequencies(make_config())
    q, k = torch.randn(8), torch.randn(8)

    def rot(x, p):
        return apply_rope(x, torch.stack([(p * freqs).cos(), (p * freqs).sin()], dim=-1))

    assert torch.dot(rot(q, 5), rot(k, 2)).item() == pytest.approx(torch.dot(rot(q, 13), rot(k, 10)).item(), abs=1e-5)
    assert torch.dot(rot(q, 5), rot(k, 2)).item() != pytest.approx(torch.dot(rot(q, 5), rot(k, 4)).item(), abs=1e-3)


def test_rope_is_the_complex_product(make_config):
    """Each interleaved pair (a, b) becomes (a + ib)(cos + i sin)."""
    freqs = rope_frequencies(make_config())
    x, angles = torch.randn(3, 5, 2 * len(freqs)), torch.rand(3, 5, len(freqs)) * 40
    cos, sin = angles.cos(), angles.sin()
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos, sin))
    rotated = apply_rope(x, torch.stack([cos, sin], dim=-1))
    torch.testing.assert_close(rotated, expected.flatten(-2), rtol=1e-6, atol=1e-6)


def test_position_past_max_seq_len_is_an_error(config):
    model = Transformer(config)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[63, 64]]))


def test_dense_model_without_experts(make_config):
    model = Transformer(make_config(n_routed_experts=0, n_mtp_modules=0))
    assert not model.moe_gates()
    out = model.loss(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
    assert out.mtp_loss == 0 and out.aux_loss == 0 and torch.isfinite(out.loss)


def test_invalid_config_is_rejected_at_construction():
    with pytest.raises(ValueError, match="n_activated_experts"):
        Transformer(ModelConfig(n_routed_experts=4, n_activated_experts=5))


def test_expert_weights_keep_deepseek_names_in_the_state_dict(make_config):
    cfg = make_config(n_routed_experts=4, n_activated_experts=2)
    moe = MoE(cfg)
    state = moe.state_dict()
    assert "experts.w1" not in state
    for e in range(4):
        torch.testing.assert_close(state[f"experts.{e}.w1.weight"], moe.experts.w1[e].t())
        assert state[f"experts.{e}.w2.weight"].shape == (cfg.dim, cfg.moe_inter_dim)  # (out, in) like nn.Linear
    other = MoE(cfg)
    other.load_state_dict(state)
    x = torch.randn(1, 5, cfg.dim)
    with torch.no_grad():
        torch.testing.assert_close(other(x)[0], moe(x)[0])


def test_grouped_products_only_where_torch_has_them():
    def fits(dtype=torch.float32, device="cpu", dim=64, inter=32):
        x = torch.empty(3, dim, dtype=dtype, device=device)
        return _grouped_mm_fits(x, torch.empty(4, dim, inter, dtype=dtype, device=device),
                                torch.empty(4, inter, dim, dtype=dtype, device=device))

    assert fits() and fits(torch.bfloat16)
    assert not fits(torch.float64)  # no kernel for it
    assert not fits(dim=62)  # rows not a multiple of 16 bytes
    assert not fits(device="meta")  # neither a CPU nor a CUDA device
    x = torch.empty(3, 64)
    assert not _grouped_mm_fits(x, torch.empty(4, 64, 32, dtype=torch.bfloat16), torch.empty(4, 32, 64))  # mixed
