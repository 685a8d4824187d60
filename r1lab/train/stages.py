"""Stages of a run, each from a recipe and a run directory: tokenizer + corpus, pretraining, SFT,
R1-Zero GRPO and the control. The command line and the demo call these; each stage writes its own
directory (`checkpoint/`, `metrics.jsonl`) and resumes from it when interrupted.

Run directory layout:
    recipe.toml       the resolved recipe
    tokenizer/        the BPE trained on the corpus
    base/             pretraining           rl/      GRPO from base
    sft/              SFT                   control/ continued pretraining of base
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from r1lab.checkpoint import load_checkpoint
from r1lab.cost import train_flops_per_token
from r1lab.model import Transformer
from r1lab.recipe import Recipe
from r1lab.tasks import get_family
from r1lab.tokenizer import R1_ZERO, R1_ZERO_PROMPT, Tokenizer
from r1lab.train.common import CHECKPOINT
from r1lab.train.data import (ConversationSet, PackedStream, encode_documents, encode_texts, file_documents,
                              task_documents, tokenizer_texts)
from r1lab.train.pretrain import StageResult, train_supervised
from r1lab.train.rl import RLResult, train_grpo

HELDOUT_DOCS = 200


def run_metadata(recipe: Recipe) -> dict:
    """What a checkpoint says about how to prompt and evaluate it."""
    d = recipe.data
    return {"template": d.template, "task": d.task, "difficulty": d.difficulty, "task_options": d.task_options,
            "instruction": ""}  # the task's prompt is the whole question: no extra instruction


def prepare_tokenizer(recipe: Recipe, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: loaded if the run has one, else trained on the corpus and saved."""
    path = run_dir / "tokenizer"
    if (path / "tokenizer.json").exists():
        return Tokenizer.load(path)
    d = recipe.data
    if d.files:
        texts = file_documents(d.files, d.text_field)
    else:
        template_text = R1_ZERO_PROMPT if d.template == R1_ZERO else "{prompt}"
        texts = tokenizer_texts(task_documents(d), template_text)
    tokenizer = Tokenizer.train(texts, d.vocab_size)
    tokenizer.save(path)
    return tokenizer


def pretraining_data(recipe: Recipe, tokenizer: Tokenizer, seed: int) -> tuple[PackedStream, list]:
    """(train stream, fixed held-out batches): the synthetic corpus or the user's files."""
    d = recipe.data
    if d.files:
        docs = encode_texts(tokenizer, file_documents(d.files, d.text_field))
        cut = max(1, len(docs) // 50)
        train, heldout = docs[cut:] or docs, docs[:cut]
    else:
        train = encode_documents(tokenizer, task_documents(d), d.template)
        heldout = encode_documents(tokenizer, task_documents(d, "test", HELDOUT_DOCS), d.template)
    stream = PackedStream(train, d.seq_len, seed)
    held = PackedStream(heldout, d.seq_len, seed + 1).fixed_batches(recipe.pretrain.eval_batches, recipe.pretrain.batch_size)
    return stream, held


def _check_vocab(recipe: Recipe, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {recipe.model.vocab_size}")


def run_pretrain(recipe: Recipe, run_dir: Path, peak_flops: float, quiet: bool = False) -> StageResult:
    tokenizer = prepare_tokenizer(recipe, run_dir)
    _check_vocab(recipe, tokenizer)
    cfg = recipe.pretrain
    torch.manual_seed(cfg.seed)
    model = _initial_model(recipe, cfg.init_from)
    stream, heldout = pretraining_data(recipe, tokenizer, cfg.seed)
    return train_supervised(model, tokenizer, stream.batch, heldout, cfg, run_dir / "base", "pretrain", recipe.cost,
                            peak_flops, run_metadata(recipe), quiet)


def run_control(recipe: Recipe, run_dir: Path, peak_flops: float, quiet: bool = False,
                rl_flops: float | None = None) -> StageResult:
    """Continued pretraining of the base on the same corpus: what RL is measured against.

    With `control.match = "flops"` it runs as many steps as spend `rl_flops` (the RL stage's total:
    rollouts and updates), at least one.
    """
    model, tokenizer, state = load_checkpoint(run_dir / "base" / CHECKPOINT)
    cfg = recipe.control
    stream, heldout = pretraining_data(recipe, tokenizer, cfg.seed + 7)  # batches the base did not see in order
    if cfg.match == "flops":
        if rl_flops is None:
            raise ValueError("control.match = \"flops\" needs the RL stage's FLOPs")
        cfg = replace(cfg, steps=control_steps(recipe, rl_flops))
    return train_supervised(model, tokenizer, stream.batch, heldout, cfg, run_dir / "control", "control", recipe.cost,
                            peak_flops, run_metadata(recipe), quiet, optimizer_state=(state or {}).get("optimizer"))


def control_steps(recipe: Recipe, flops: float) -> int:
    """Supervised steps of the control that spend `flops` (rounded to the nearest step, at least one)."""
    cfg = recipe.control
    per_step = train_flops_per_token(recipe.model, recipe.data.seq_len) * recipe.data.seq_len * cfg.batch_size * cfg.grad_accum
    return max(1, round(flops / per_step))


def run_sft(recipe: Recipe, run_dir: Path, peak_flops: float, quiet: bool = False) -> StageResult:
    cfg, d = recipe.sft, recipe.data
    if not d.sft_files:
        raise ValueError("sft needs data.sft_files: JSONL files of {\"messages\": [...]} conversations")
    if not cfg.init_from:
        raise ValueError("sft needs sft.init_from: the checkpoint to fine-tune")
    model, tokenizer, _ = load_checkpoint(cfg.init_from)
    data = ConversationSet.from_jsonl(tokenizer, d.sft_files, d.template, d.seq_len, cfg.seed)
    return train_supervised(model, tokenizer, data.batch, data.fixed_batches(cfg.eval_batches, cfg.batch_size), cfg,
                            run_dir / "sft", "sft", recipe.cost, peak_flops, run_metadata(recipe), quiet)


def rl_pool(recipe: Recipe, n: int = 5000) -> list[dict]:
    """Train-split problems RL samples its prompts from."""
    d = recipe.data
    return get_family(d.task).generate(n, seed=d.seed + 1, split="train", difficulty=d.difficulty, **d.task_options)


def run_grpo(recipe: Recipe, run_dir: Path, peak_flops: float, evaluate=None, quiet: bool = False) -> RLResult:
    cfg = recipe.grpo
    init = Path(cfg.init_from) if cfg.init_from else run_dir / "base" / CHECKPOINT
    model, tokenizer, _ = load_checkpoint(init)
    if tokenizer is None:
        raise ValueError(f"{init} has no tokenizer")
    reference = load_checkpoint(init)[0].eval() if cfg.beta > 0 else None
    torch.manual_seed(cfg.seed)
    return train_grpo(model, tokenizer, rl_pool(recipe), cfg, run_dir / "rl", recipe.data.template, recipe.cost,
                      peak_flops, reference=reference, evaluate=evaluate, metadata=run_metadata(recipe), quiet=quiet)


def _initial_model(recipe: Recipe, init_from: str) -> Transformer:
    if init_from:
        return load_checkpoint(init_from)[0]
    return Transformer(recipe.model)
