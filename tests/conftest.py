"""Shared fixtures: a tiny seeded float32 config (dim 64, 2 layers, 4 experts, top-2), and tiny
randomly initialised Hugging Face models (Qwen2, Llama) with a tiny tokenizer, saved to temp dirs."""

from pathlib import Path

import pytest
import torch

from r1lab.config import ModelConfig
from r1lab.tokenizer import Tokenizer

HF_VOCAB = 320  # the embedding rows of the tiny Hugging Face models (more than the tokenizer's ids)


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


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [f"{i} + {i} = {2 * i}. the cat sat on the mat <think> why </think>" for i in range(200)]
    return Tokenizer.train(texts, vocab_size=300)


def tiny_hf_model(tf, kind: str, out: Path, tokenizer: Tokenizer, max_len: int = 64, seed: int = 1) -> Path:
    """A random `kind` ("qwen2" or "llama") causal LM, hidden 32, 2 layers, saved with `tokenizer` to `out`."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=max_len, initializer_range=0.2,
                 tie_word_embeddings=False)
    config, model_cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                         "llama": (tf.LlamaConfig, tf.LlamaForCausalLM)}[kind]
    model_cls(config(**shape)).save_pretrained(out)
    tokenizer.save(out)
    return out


def bench_module(name: str):
    """A script of benchmarks/ imported as a module (its directory on sys.path, for its `common` import)."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
