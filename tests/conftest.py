"""Shared fixtures: a tiny seeded float32 config (dim 64, 2 layers, 4 experts, top-2)."""

import pytest
import torch

from r1lab.config import ModelConfig


def tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
                n_heads=4, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                max_seq_len=64, original_seq_len=64, n_mtp_modules=1, init_std=0.02)
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture
def config() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def make_config():
    """The tiny config with some fields changed: make_config(attn_impl="naive")."""
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
