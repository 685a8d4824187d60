"""Corpora and batches for the supervised stages.

The synthetic reasoning corpus: problems from a task family's train split, each rendered with the
run's template and answered either with a worked solution (which, like real scratch work, may
contain slips that lead to a wrong answer) or directly. Held-out documents come from the family's
test split, which never overlaps. Documents are tokenised once and packed into one token stream;
the batch of step s is a function of (seed, s) only, so a resumed run reads exactly the batches an
uninterrupted one would. SFT batches are padded conversations with a loss mask on the assistant
turn, read from JSONL files or generated as cold-start conversations (`r1lab.tasks.coldstart`). A
data file that cannot be used raises `DataError` naming the file and line. This module knows text,
the tokenizer and the task families; it knows no model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from r1lab.config import DataError
from r1lab.recipe import RL_FIELD_DEFAULTS, DataConfig
from r1lab.tasks import get_family
from r1lab.tasks.base import completion_text
from r1lab.tasks.coldstart import cold_start_conversations
from r1lab.tokenizer import Tokenizer, render_conversation


@dataclass
class Document:
    prompt: str          # the question (the template is applied when rendering)
    completion: str      # <think>...</think>\n<answer>...</answer>
    worked: bool         # a worked solution (scratchpad), not a direct answer
    correct: bool        # its final answer is right (slips make some wrong)


def task_documents(data: DataConfig, split: str = "train", n: int | None = None) -> list[Document]:
    """Problems of the task family rendered as R1-Zero-shaped completions."""
    family = get_family(data.task)
    try:
        examples = family.generate(n or data.n_problems, seed=data.seed, split=split, difficulty=data.difficulty,
                                   **data.task_options)
    except ValueError as e:  # the family's problem space is smaller than asked
        raise DataError(f"data.n_problems: {e}") from None
    rng = random.Random(f"r1lab-corpus:{data.task}:{data.seed}:{split}")
    docs = []
    for ex in examples:
        if rng.random() < data.scratchpad_share:
            solution, answer = family.solution_with_slips(ex, rng, data.slip_rate, **data.slip_options)
            docs.append(Document(ex["prompt"], completion_text(solution, answer), True, family.verify(answer, ex)))
        else:
            docs.append(_direct(family, ex, rng, data))
        if data.direct_extra:
            extra = int(data.direct_extra) + (rng.random() < data.direct_extra % 1)
            docs += [_direct(family, ex, rng, data) for _ in range(extra)]
    if data.direct_extra:
        rng.shuffle(docs)  # a problem's documents apart, as they would be in any corpus
    return docs


def _direct(family, ex: dict, rng: random.Random, data: DataConfig) -> Document:
    """A direct answer: the thought only restates the problem; the answer may carry unseen slips."""
    answer = ex["answer"]
    if data.direct_slip_rate > 0:
        answer = family.solution_with_slips(ex, rng, data.direct_slip_rate, **data.slip_options)[1]
    return Document(ex["prompt"], completion_text(ex["solution"].splitlines()[0], answer), False,
                    family.verify(answer, ex))


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; bad JSON is an error naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def rl_examples(paths: list[str], fields: dict[str, str] | None = None) -> list[dict]:
    """GRPO prompts from JSONL files: {"prompt", "answer", "id"} per line, graded by the accuracy reward.

    `fields` names the prompt and answer fields (data.rl_fields); a missing one takes the first of
    `RL_FIELD_DEFAULTS` present in the line. An answer holding GSM8K's worked solution keeps only what
    follows its last `####`. A line without a usable prompt or answer is a `DataError` naming file and line.
    """
    fields = fields or {}
    candidates = {key: (fields[key],) if key in fields else names for key, names in RL_FIELD_DEFAULTS.items()}
    examples = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"data.rl_files: {path}: no such file")
        for i, row in read_jsonl(path):
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object per line")
            values = {}
            for key, names in candidates.items():
                found = next((n for n in names if n in row), None)
                value = row.get(found) if found else None
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = str(int(value)) if float(value).is_integer() else str(value)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{path}:{i}: needs a non-empty text {key} in field "
                                    f"{' or '.join(map(repr, names))} (data.rl_fields)")
                values[key] = value.strip()
            if "####" in values["answer"]:  # a GSM8K worked solution: the answer is its last line
                values["answer"] = values["answer"].rsplit("####", 1)[1].strip().replace(",", "")
            examples.append({**values, "id": f"{path.name}:{i}"})
    if not examples:
        raise DataError(f"data.rl_files: no examples in {', '.join(paths)}")
    return examples


def file_documents(paths: list[str], text_field: str = "text") -> list[str]:
    """Plain texts from .txt files (one document per file) or JSONL files (one per line)."""
    texts = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"data.files: {path}: no such file")
        if path.suffix == ".jsonl":
            for i, row in read_jsonl(path):
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise DataError(f"{path}:{i}: missing string field {text_field!r} (data.text_field)")
                texts.append(row[text_field])
        else:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not texts:
        raise DataError(f"data.files: no documents in {', '.join(paths)}")
    return texts


def tokenizer_texts(docs: list[Document], template_text: str) -> list[str]:
    """What the BPE is trained on: rendered documents (template included, so it compresses well)."""
    return [template_text.format(prompt=d.prompt) + d.completion for d in docs]


def encode_documents(tokenizer: Tokenizer, docs: list[Document], template: str) -> list[list[int]]:
    """Each document as BOS + prompt (template) + completion + EOS."""
    return [render_conversation(tokenizer, [{"role": "user", "content": d.prompt},
                                            {"role": "assistant", "content": d.completion}], template)[0]
            for d in docs]


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [[tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]


class PackedStream:
    """Documents packed end to end; batches are random windows of seq_len + 1 tokens."""

    def __init__(self, docs: list[list[int]], seq_len: int, seed: int):
        if not docs:
            raise ValueError("no documents to pack")
        self.tokens = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        if len(self.tokens) <= seq_len + 1:
            reps = (seq_len + 2) // len(self.tokens) + 1
            self.tokens = self.tokens.repeat(reps)
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(inputs, targets, loss mask) of micro-batch `micro` of step `step`; deterministic."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + micro)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (batch_size,), generator=g)
        windows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:], None

    def fixed_batches(self, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
        """The same n batches every time (held-out loss)."""
        return [self.batch(-1 - i, 0, batch_size) for i in range(n)]


def read_conversations(paths: list[str]) -> tuple[list[list[dict]], list[str]]:
    """(conversations, "file:line" of each) from JSONL lines {"messages": [{role, content}, ...]}."""
    conversations, sources = [], []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"data.sft_files: {path}: no such file")
        for i, row in read_jsonl(path):
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise DataError(f"{path}:{i}: needs 'messages', a list of {{role, content}} objects")
            conversations.append(messages)
            sources.append(f"{path}:{i}")
    if not conversations:
        raise DataError(f"data.sft_files: no conversations in {', '.join(paths)}")
    return conversations, sources


def task_conversations(data: DataConfig) -> list[list[dict]]:
    """data.sft_task_examples cold-start conversations from data.task's train split (seed data.seed + 2: other
    draws than the corpus's, seed data.seed, and the RL pool's, seed data.seed + 1)."""
    try:
        return cold_start_conversations(data.task, data.sft_task_examples, seed=data.seed + 2,
                                        difficulty=data.difficulty, style=data.sft_task_style, **data.task_options)
    except ValueError as e:  # the family's problem space is smaller than asked
        raise DataError(f"data.sft_task_examples: {e}") from None


class ConversationSet:
    """SFT data: conversations with a loss mask on the final assistant turn, padded per batch."""

    def __init__(self, tokenizer: Tokenizer, conversations: list[list[dict]], template: str, seq_len: int, seed: int,
                 sources: list[str] | None = None):
        """`sources` names each conversation ("file:line") in errors."""
        self.items, self.too_long = [], 0
        for i, messages in enumerate(conversations):
            try:
                ids, mask = render_conversation(tokenizer, messages, template)
            except ValueError as e:  # roles the template cannot render
                raise DataError(f"{sources[i] if sources else f'conversation {i}'}: {e}") from None
            if len(ids) > seq_len + 1:  # cutting it would drop the assistant turn the loss is about
                self.too_long += 1
                continue
            self.items.append((ids, mask))
        if not self.items:
            raise DataError(f"no conversation fits data.seq_len={seq_len} ({self.too_long} longer ones skipped)")
        self.pad_id, self.seed = tokenizer.pad_id, seed

    @classmethod
    def from_jsonl(cls, tokenizer: Tokenizer, paths: list[str], template: str, seq_len: int, seed: int):
        conversations, sources = read_conversations(paths)
        return cls(tokenizer, conversations, template, seq_len, seed, sources)

    @classmethod
    def from_data(cls, tokenizer: Tokenizer, data: DataConfig, seed: int):
        """The SFT set a recipe describes: data.sft_files, then data.sft_task_examples cold-start ones."""
        conversations, sources = read_conversations(data.sft_files) if data.sft_files else ([], [])
        if data.sft_task_examples:
            generated = task_conversations(data)
            conversations += generated
            sources += [f"data.sft_task_examples, conversation {i}" for i in range(len(generated))]
        return cls(tokenizer, conversations, data.template, data.seq_len, seed, sources)

    def batch(self, step: int, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = random.Random(self.seed * 1_000_003 + step * 1009 + micro)
        chosen = [self.items[g.randrange(len(self.items))] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in chosen) - 1
        inputs = torch.full((batch_size, width), self.pad_id, dtype=torch.long)
        targets = torch.full((batch_size, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(batch_size, width)
        for b, (ids, m) in enumerate(chosen):
            n = len(ids) - 1
            inputs[b, :n] = torch.tensor(ids[:-1])
            targets[b, :n] = torch.tensor(ids[1:])
            mask[b, :n] = torch.tensor(m[1:], dtype=torch.float32)  # mask[t] weights the target ids[t + 1]
        return inputs, targets, mask

    def fixed_batches(self, n: int, batch_size: int):
        return [self.batch(-1 - i, 0, batch_size) for i in range(n)]
