import pytest
import torch

from r1lab.config import model_preset
from r1lab.cost import count_parameters, generate_flops_per_token, generation_flops, kv_cache_bytes, train_flops_per_token
from r1lab.model import Transformer


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_parameter_formula_matches_the_built_model(make_config, q_lora_rank):
    cfg = make_config(q_lora_rank=q_lora_rank)
    model = Transformer(cfg)
    counts = count_parameters(cfg)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert counts.total == main
    assert counts.mtp == sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    inactive = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * counts.per_expert
    assert counts.active == main - inactive - cfg.vocab_size * cfg.dim


def test_published_sizes():
    v3 = count_parameters(model_preset("v3"))
    assert abs(v3.total / 671e9 - 1) < 0.02
    assert abs(v3.active / 37e9 - 1) < 0.03
    lite = count_parameters(model_preset("v2-lite"))
    assert abs(lite.total / 15.7e9 - 1) < 0.02
    assert abs(lite.active / 2.4e9 - 1) < 0.03
    assert kv_cache_bytes(model_preset("v3")).mla_values_per_layer == 576
    assert kv_cache_bytes(model_preset("v3")).mha_values_per_layer == 32768


def test_flops_match_a_hand_count(make_config):
    # Dense, no MTP, no q-lora: every matmul is easy to list by hand.
    cfg = make_config(n_routed_experts=0, n_mtp_modules=0, n_layers=2, n_dense_layers=2, vocab_size=100,
                      dim=64, inter_dim=128, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16)
    attn_weights = 64 * 4 * 24 + 64 * 40 + 32 * 4 * 32 + 4 * 16 * 64  # wq, wkv_a, wkv_b, wo
    mlp_weights = 3 * 64 * 128
    per_token = 2 * (2 * (attn_weights + mlp_weights) + 64 * 100)
    ctx = 10
    absorbed_attn = 2 * (2 * 4 * ctx * ((32 + 8) + 32))
    assert generate_flops_per_token(cfg, ctx) == per_token + absorbed_attn
    seq = 9  # mean keys (9 + 1) / 2 = 5 per token, causal
    assert train_flops_per_token(cfg, seq) == 3 * (per_token + 2 * (2 * 4 * 5 * ((32 + 8) + 32)))


def test_generation_flops_match_a_hand_count(make_config):
    # The dense config above: M matmul FLOPs per token, A attention FLOPs per key (absorbed, 2 layers).
    cfg = make_config(n_routed_experts=0, n_mtp_modules=0, n_layers=2, n_dense_layers=2, vocab_size=100,
                      dim=64, inter_dim=128, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16)
    M = 2 * (2 * (64 * 4 * 24 + 64 * 40 + 32 * 4 * 32 + 4 * 16 * 64 + 3 * 64 * 128) + 64 * 100)
    A = 2 * (2 * 4 * ((32 + 8) + 32))
    # A prompt of 3 tokens, prefilled once: its tokens see 1, 2 and 3 keys. A sample of 4 tokens feeds
    # back its first 3 (4, 5 and 6 keys); a sample of 1 token feeds back none.
    prefill = 3 * M + (1 + 2 + 3) * A
    assert generation_flops(cfg, 3, []) == prefill
    assert generation_flops(cfg, 3, [4]) == prefill + 3 * M + (4 + 5 + 6) * A
    assert generation_flops(cfg, 3, [4, 1, 4]) == prefill + 2 * (3 * M + (4 + 5 + 6) * A)


def test_flops_count_matches_profiler(make_config):
    """The analytic forward count equals the matmul FLOPs torch counts on the dense tiny model."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = make_config(n_routed_experts=0, n_mtp_modules=0, attn_impl="absorb")
    model = Transformer(cfg).eval()
    T = 16
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, T, dtype=torch.long))
    measured = counter.get_total_flops()
    # Full (unmasked) attention over T keys is what bmm computes: T keys per token.
    analytic = T * generate_flops_per_token(cfg, T)
    assert measured == pytest.approx(analytic, rel=1e-9)
