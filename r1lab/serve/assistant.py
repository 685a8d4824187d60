"""What the server and the terminal chat share: the served model, its prompts, and its replies as text.

* `load_served_model(dir)`: decoder + tokenizer + chat template (``checkpoint.model_template``: the
  metadata's ``"template"``, also beside a Hugging Face model r1lab trained, else ``"r1"``).
* `chat_prompt(model, messages)`: ids for a conversation. Under ``"r1"`` earlier assistant turns
  keep only their answer (``render_prompt`` strips the reasoning, as DeepSeek's API does). The
  ``"r1-zero"`` template has no turns, so it is given the last user message alone.
* `ReplyParser` / `SampleDecoder`: a completion's ids, token by token, into reasoning text (inside
  ``<think>``) and answer text (after ``</think>``; under ``"r1-zero"`` without the ``<answer>``
  tags), both stripped of surrounding whitespace. Streaming and whole replies run the same code,
  so a streamed reply concatenates to exactly the non-streamed one. Text that could still become
  a tag or a stop string is held back until it is decided, and only complete UTF-8 characters are
  emitted (`IncrementalDecoder`).

It knows token ids and text; it does not know HTTP, threads or the terminal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from r1lab.checkpoint import model_template
from r1lab.engine import Engine
from r1lab.hf import load_causal_lm
from r1lab.tokenizer import (ANSWER_CLOSE, ANSWER_OPEN, R1, R1_ZERO, THINK_CLOSE, THINK_OPEN,
                             IncrementalDecoder, Tokenizer, render_prompt)

REASONING, CONTENT = "reasoning", "content"
RAW = None
"""The 'template' of plain text completion (/v1/completions): no tags are interpreted."""


@dataclass
class ServedModel:
    decoder: object           # r1lab Transformer or anything with the engine's decoder protocol
    tokenizer: Tokenizer
    template: str             # "r1" or "r1-zero"
    name: str                 # the model id clients send

    @property
    def max_len(self) -> int:
        return int(self.decoder.config.max_seq_len)


def load_served_model(path: str | Path, name: str | None = None, device=None) -> ServedModel:
    """Load an r1lab checkpoint or a local Hugging Face model directory for chatting."""
    path = Path(path)
    decoder, tokenizer = load_causal_lm(path, device=device)
    if tokenizer is None:
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: missing; serving needs the model's tokenizer")
    return ServedModel(decoder, tokenizer, model_template(path), name or path.resolve().name)


def make_engine(model: ServedModel, max_batch_size: int = 256, compile: bool = False) -> Engine:
    tok = model.tokenizer
    return Engine(model.decoder, tok.eos_id, decode=lambda ids: tok.decode(ids, skip_special=True),
                  max_batch_size=max_batch_size, max_len=model.max_len, compile=compile)


def chat_prompt(model: ServedModel, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt ids for a conversation (role/content dicts) under the model's template.

    Raises ValueError when the conversation cannot be rendered (e.g. it does not end with a user turn).
    """
    if not messages or messages[-1]["role"] != "user":
        role = messages[-1]["role"] if messages else None
        raise ValueError(f"the last message must be from the user, got role {role!r}")
    if model.template == R1_ZERO:
        return render_prompt(model.tokenizer, messages[-1]["content"], R1_ZERO)
    return render_prompt(model.tokenizer, messages, model.template)


def text_prompt(model: ServedModel, prompt: str) -> list[int]:
    """Ids for a plain-text completion: BOS then the text, no template."""
    return [model.tokenizer.bos_id] + model.tokenizer.encode(prompt)


def _held_prefix(text: str, words: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of words (could still grow into it)."""
    best = 0
    for w in words:
        for k in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:k]):
                best = k
                break
    return best


class ReplyParser:
    """Incremental split of completion text into ("reasoning" | "content", text) pieces.

    `feed(text)` returns the pieces that are decided; `close()` the rest. Phases: under "r1" the
    prompt opened ``<think>`` so text starts as reasoning (a repeated leading ``<think>`` is
    dropped); under "r1-zero" a leading ``<think>`` opens reasoning and anything else is the
    answer; `RAW` (plain completion) is all content with no tags. ``</think>`` ends reasoning.
    Under "r1-zero" ``<answer>`` / ``</answer>`` are removed from the answer. A stop string ends
    the reply before it (its text is not shown, as in OpenAI's API).
    """

    def __init__(self, template: str | None, stop: Sequence[str] = ()):
        self.phase = {R1: REASONING, R1_ZERO: "start", RAW: CONTENT}[template]
        self.template = template
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self._raw = ""      # held back: might be the start of a stop string
        self._buf = ""      # held back: might be the start of a tag
        self._ws = ""       # held back: trailing whitespace of the current part
        self._started = {REASONING: False, CONTENT: template is RAW}  # RAW keeps leading whitespace
        self._opened = False  # reasoning saw text (a leading <think> is dropped only before it)

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.stopped or not text:
            return out
        self._raw += text
        if self.stop:
            at = min((i for i in (self._raw.find(s) for s in self.stop) if i >= 0), default=-1)
            if at >= 0:
                self._process(self._raw[:at], out)
                self._raw = ""
                self.stopped = True
                self._close(out)
                return out
            keep = _held_prefix(self._raw, self.stop)
            ready, self._raw = self._raw[:len(self._raw) - keep], self._raw[len(self._raw) - keep:]
        else:
            ready, self._raw = self._raw, ""
        self._process(ready, out)
        return out

    def close(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if not self.stopped:
            self._process(self._raw, out)
            self._raw = ""
            self._close(out)
        return out

    # -- phases ------------------------------------------------------------------------------------
    def _tags(self) -> tuple[str, ...]:
        if self.phase == REASONING:
            return (THINK_CLOSE,)
        if self.phase == CONTENT and self.template == R1_ZERO:
            return (ANSWER_OPEN, ANSWER_CLOSE)
        return ()

    def _process(self, text: str, out: list, final: bool = False) -> None:
        self._buf += text
        while self._buf:
            if self.phase == "start":
                self._buf = self._buf.lstrip()
                if self._buf.startswith(THINK_OPEN):
                    self._buf = self._buf[len(THINK_OPEN):]
                    self.phase = REASONING
                elif self._buf and THINK_OPEN.startswith(self._buf) and not final:
                    return
                elif self._buf:
                    self.phase = CONTENT
                continue
            if self.phase == REASONING and not self._opened:
                head = self._buf.lstrip()
                if head.startswith(THINK_OPEN):   # the model repeated the prompt's <think>
                    self._buf = head[len(THINK_OPEN):]
                    continue
                if head and not (THINK_OPEN.startswith(head) and not final):
                    self._opened = True
                elif not final:
                    return
            tags = self._tags()
            hits = [(i, t) for t in tags if (i := self._buf.find(t)) >= 0]
            if hits:
                at, tag = min(hits)
                self._emit(self._buf[:at], out)
                self._buf = self._buf[at + len(tag):]
                if tag == THINK_CLOSE:
                    self._ws = ""
                    self.phase = CONTENT
                continue
            keep = 0 if final else _held_prefix(self._buf, tags)
            self._emit(self._buf[:len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            return

    def _emit(self, text: str, out: list) -> None:
        kind = self.phase
        if not self._started[kind]:
            text = text.lstrip()
            if not text:
                return
            self._started[kind] = True
        if self.template is RAW:
            if text:
                out.append((kind, text))
            return
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if body:
            out.append((kind, body))

    def _close(self, out: list) -> None:
        self._process("", out, final=True)
        if self.phase == "start":
            self.phase = CONTENT
        self._ws = ""


class SampleDecoder:
    """One sample's ids -> reasoning/content pieces, with token counts for `usage`."""

    def __init__(self, tokenizer: Tokenizer, template: str | None, stop: Sequence[str] = ()):
        self._decoder = IncrementalDecoder(tokenizer, skip_special=True)
        self.parser = ReplyParser(template, stop)
        self.tokens = 0
        self.reasoning_tokens = 0
        self._undecided = 0  # r1-zero: tokens before we know whether they open reasoning
        self.reasoning = []
        self.content = []

    def push(self, token_id: int) -> list[tuple[str, str]]:
        self.tokens += 1
        before = self.parser.phase
        pieces = self.parser.feed(self._decoder.push(token_id))
        if before == REASONING:
            self.reasoning_tokens += 1
        elif before == "start":
            self._undecided += 1
            if self.parser.phase != "start":
                self.reasoning_tokens += self._undecided if self.parser.phase == REASONING else 0
                self._undecided = 0
        return self._keep(pieces)

    def finish(self) -> list[tuple[str, str]]:
        tail = self.parser.feed(self._decoder.flush()) + self.parser.close()
        return self._keep(tail)

    def _keep(self, pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for kind, text in pieces:
            (self.reasoning if kind == REASONING else self.content).append(text)
        return pieces

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def content_text(self) -> str:
        return "".join(self.content)
