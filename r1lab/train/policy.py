"""The model a training stage updates, from either kind of directory, and how it is saved back.

A `sft.init_from` / `grpo.init_from` is an r1lab checkpoint (its config.json has `format_version`)
or a local Hugging Face causal-LM directory (Qwen2, Llama, DeepseekV3, ... anything transformers
loads with `AutoModelForCausalLM` whose layers all attend fully). Which one is decided here, once;
the training loops see one seam, which r1lab's `Transformer` has and `HFPolicy` adds to `HFDecoder`:

    model(tokens) -> logits (B, T, V)          model.loss(tokens, targets, mask) -> LossOutput
    model.update_expert_bias() -> dict         model.mtp: the modules RL leaves frozen
    model.config: vocab_size, max_seq_len and what `cost` counts FLOPs from; state_dict / parameters

A Hugging Face policy is saved in its own format: `save_pretrained` of the transformers model, the
tokenizer it was trained with (tokenizer.json + tokenizer_config.json, whose chat template is
r1lab's), the run's metadata in `r1lab_metadata.json` (which transformers ignores) and the trainer
state (optimizer, step, RNG) in trainer_state.pt/.json, all written into a temp dir and renamed
into place by `checkpoint.write_atomically`: a stage killed at any point resumes from its last
committed save exactly as with r1lab checkpoints. A tokenizer with more ids than the model's
embedding (r1lab adds its chat tags when the tokenizer lacks them) grows the embedding and head
(`resize_token_embeddings`) before training, and the saved model keeps the larger vocabulary.

This module knows both directory layouts and the loss of a causal LM; it knows no sampling, no
optimiser and no schedule.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r1lab.checkpoint import (METADATA_FILE, committed_checkpoint, load_checkpoint, load_model_config,
                              save_checkpoint, write_atomically, write_trainer_state)
from r1lab.config import ConfigError
from r1lab.cost import DenseShape
from r1lab.hf import CONFIG_FILE, HFDecoder, read_hf_config
from r1lab.model import LossOutput
from r1lab.tokenizer import Tokenizer


# What must match for a Hugging Face stage checkpoint to continue from another start (the vocabulary
# may have grown by the chat tags, so it is not compared).
HF_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size")


class HFPolicy(HFDecoder):
    """A Hugging Face causal LM with the training seam (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, max_seq_len: int | None = None):
        super().__init__(hf_model, max_seq_len)
        self.mtp = nn.ModuleList()  # no multi-token-prediction modules: nothing for RL to freeze
        text = hf_model.config.get_text_config()
        heads = text.num_attention_heads
        self.config = DenseShape(vocab_size=self.config.vocab_size, max_seq_len=self.config.max_seq_len,
                                 matmul_params=matmul_params(hf_model), n_layers=text.num_hidden_layers,
                                 n_heads=heads, head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: Any = None,
                valid: torch.Tensor | None = None, n_slots: int | None = None) -> torch.Tensor:
        """Logits (B, T, V). A plain causal call (training rows are right-padded, so no mask is needed)
        lets the attention backend use its causal kernel; the engine's calls go through `HFDecoder`."""
        if cache is None and positions is None and valid is None:
            return self.hf_model(input_ids=tokens, use_cache=False).logits
        return super().forward(tokens, positions=positions, cache=cache, valid=valid, n_slots=n_slots)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
             valid: torch.Tensor | None = None) -> LossOutput:
        """Next-token cross-entropy over the targets `loss_mask` counts; no MTP, no balance loss."""
        logits = self(tokens, valid=valid)  # (B, T, V)
        mask = torch.ones_like(targets, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
        lm_loss = (losses * mask.flatten()).sum() / mask.sum().clamp(min=1)
        zero = lm_loss.new_zeros(())
        return LossOutput(lm_loss, lm_loss, zero, zero)

    def update_expert_bias(self) -> dict[str, float]:
        return {}  # aux-loss-free balancing is r1lab's; a Hugging Face model trains as it is


def matmul_params(hf_model: nn.Module) -> int:
    """Weights each token multiplies through: every matrix but the input embedding (a lookup), the
    head counted once even when it shares the embedding's storage. Exact for dense models; for a
    Hugging Face mixture of experts it counts every expert, an upper bound on the active ones."""
    embedding = hf_model.get_input_embeddings().weight
    head = hf_model.get_output_embeddings()
    total = sum(p.numel() for p in hf_model.parameters() if p.dim() == 2) - embedding.numel()
    if head is not None and head.weight is embedding:
        total += embedding.numel()
    return total


# ---------------------------------------------------------------------------------------------
# What a directory is, read without loading weights

def _config_doc(path: Path) -> dict:
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"{path}: not an r1lab checkpoint or a Hugging Face model directory (no {CONFIG_FILE})")
    return read_hf_config(path)


def policy_dir(path: str | Path, key: str) -> Path:
    """The committed directory at `path` (a checkpoint, or a Hugging Face dir), or a ConfigError naming `key`."""
    found = committed_checkpoint(path)
    if found is None:
        raise ConfigError(f"{key}: {path}: no such model directory")
    return found


def is_r1lab(path: str | Path) -> bool:
    return "format_version" in _config_doc(Path(path))


def model_shape(path: str | Path) -> dict:
    """What identifies the model at `path` for resuming: an r1lab ModelConfig, or a Hugging Face shape."""
    path = Path(path)
    if is_r1lab(path):
        return asdict(load_model_config(path))
    doc = _config_doc(path)
    text = doc.get("text_config") or doc
    return {"model_type": doc.get("model_type"), **{k: text.get(k) for k in HF_SHAPE_KEYS[1:]}}


def model_max_len(path: str | Path) -> int:
    """Positions the model at `path` can hold."""
    path = Path(path)
    if is_r1lab(path):
        return load_model_config(path).max_seq_len
    doc = _config_doc(path)
    text = doc.get("text_config") or doc
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(text.get(key), int):
            return text[key]
    raise ConfigError(f"{path / CONFIG_FILE}: names no maximum length (max_position_embeddings)")


# ---------------------------------------------------------------------------------------------
# Loading and saving

def load_policy(path: str | Path, device: torch.device | None = None, tokenizer: Tokenizer | None = None) -> nn.Module:
    """The trainable model at `path` on `device`, in float32 (the stages autocast on CUDA).

    A Hugging Face model whose embedding has fewer rows than `tokenizer` has ids is resized to fit.
    """
    path = Path(path)
    if is_r1lab(path):
        return load_checkpoint(path, device)[0]
    try:
        policy = HFPolicy.from_pretrained(path, dtype=torch.float32, device=device)
    except ImportError:
        raise ConfigError(f"{path} is a Hugging Face model: training it needs the transformers package") from None
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: transformers cannot load it as a causal LM ({e})") from None
    if tokenizer is not None and tokenizer.vocab_size > policy.vocab_size:
        policy.hf_model.resize_token_embeddings(tokenizer.vocab_size)
        policy = HFPolicy(policy.hf_model, policy.max_seq_len)
    return policy


def load_weights_into(path: str | Path, model: nn.Module) -> None:
    """Copy the weights saved at `path` (a stage checkpoint of the same kind as `model`) into `model`."""
    device = next(model.parameters()).device
    if isinstance(model, HFPolicy):
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        model.hf_model.load_state_dict(saved.state_dict())
    else:
        model.load_state_dict(load_checkpoint(path, device)[0].state_dict())


def save_policy(path: str | Path, model: nn.Module, tokenizer: Tokenizer | None, trainer_state: dict,
                metadata: dict | None) -> Path:
    """Save `model` atomically in its own format: an r1lab checkpoint, or a Hugging Face directory."""
    if not isinstance(model, HFPolicy):
        return save_checkpoint(path, model, tokenizer, trainer_state, metadata=metadata)

    def write(tmp: Path) -> None:
        model.hf_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if metadata:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        write_trainer_state(tmp, trainer_state)

    return write_atomically(Path(path), write)
