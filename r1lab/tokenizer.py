"""Text <-> token ids: byte-level BPE, the special tokens and the chat templates.

This module trains a byte-level BPE with the `tokenizers` library (digits split one per token,
because arithmetic needs them), loads ours or any Hugging Face `tokenizer.json`, and renders the
two chat templates r1lab speaks:

- ``"r1-zero"``: BOS + the plain R1-Zero prompt ("A conversation between User and Assistant ...
  User: {prompt}. Assistant:"); the model writes ``<think> ... </think> <answer> ... </answer>``
  then EOS.
- ``"r1"``: BOS, optional system text, ``<｜User｜>{content}`` / ``<｜Assistant｜>{content}EOS``
  turns, and the generation prompt ``<｜Assistant｜><think>\\n``. Earlier assistant turns keep only
  the text after ``</think>``.

The chat template lives here and nowhere else. Prompts and completions are encoded piece by piece
and the ids concatenated, so the ids a trainer masks are exactly the ids the engine generates after
the prompt.

It knows text and ids only: no torch, no model, no sampling. Decoding with ``skip_special=True``
drops BOS/EOS/PAD (and a foreign tokenizer's own special tokens) but always keeps the tags
``<think>``, ``</think>``, ``<answer>``, ``</answer>``, ``<｜User｜>`` and ``<｜Assistant｜>``,
because rewards read them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜pad｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, USER, ASSISTANT)
"""Added tokens that are not special: one id each, kept by ``decode(skip_special=True)``."""

R1_ZERO = "r1-zero"
R1 = "r1"
TEMPLATES = (R1_ZERO, R1)

R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

# The "r1" template for Hugging Face `apply_chat_template`, written into tokenizer_config.json so an
# exported tokenizer renders the same text as `render_prompt` (tests check they agree).
R1_CHAT_TEMPLATE_JINJA = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}" + USER + "{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set c = m['content'] -%}"
    "{%- if '" + THINK_CLOSE + "' in c -%}{%- set c = c.split('" + THINK_CLOSE + "')[-1].strip() -%}"
    "{%- endif -%}" + ASSISTANT + "{{ c }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + THINK_OPEN + "{{ '\\n' }}{%- endif -%}"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_N_BYTES = 256


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` plus the roles r1lab needs (BOS, EOS, PAD, tags).

    Building one adds any of our special tokens the backend lacks, so every tag is one id.
    """

    def __init__(self, backend: HFTokenizer, *, bos: str = BOS, eos: str = EOS, pad: str = PAD):
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        backend.add_special_tokens([_added(t, special=True) for t in (bos, eos, pad) if t not in added])
        backend.add_tokens([_added(t, special=False) for t in TAGS if t not in added])
        self._backend = backend
        self._bos, self._eos, self._pad = bos, eos, pad
        self.bos_id = backend.token_to_id(bos)
        self.eos_id = backend.token_to_id(eos)
        self.pad_id = backend.token_to_id(pad)
        decoder = backend.get_added_tokens_decoder()
        self._skip_ids = frozenset(
            {self.bos_id, self.eos_id, self.pad_id}
            | {i for i, t in decoder.items() if t.special and t.content not in TAGS}
        )
        # Ids run 0..vocab_size-1: the embedding table needs this many rows, even past gaps.
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    # ---------------------------------------------------------------- construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE of at most `vocab_size` ids on `texts` (any iterator of str)."""
        n_fixed = _N_BYTES + 3 + len(TAGS)
        if vocab_size < n_fixed:
            raise ValueError(f"vocab_size={vocab_size} is too small: 256 bytes + {n_fixed - 256} "
                             f"special tokens need at least {n_fixed}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[_added(t, special=True) for t in (BOS, EOS, PAD, *TAGS)],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        # The trainer marks every token it is given as special; the tags must not be, so that
        # Hugging Face's skip_special_tokens keeps them too. Re-adding flips the flag in place.
        backend.add_tokens([_added(t, special=False) for t in TAGS])
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a directory holding `tokenizer.json` (ours or any Hugging Face one), or the file.

        BOS/EOS/PAD names come from `tokenizer_config.json` beside it when present; any of our
        special tokens the file lacks are added (with new ids past its vocabulary).
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: tokenizer file not found")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        return cls(backend, **_role_names(file.parent / TOKENIZER_CONFIG_FILE))

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory`; return it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._bos,
            "eos_token": self._eos,
            "pad_token": self._pad,
            "clean_up_tokenization_spaces": False,
            "chat_template": R1_CHAT_TEMPLATE_JINJA,
            "r1lab_templates": list(TEMPLATES),
        }
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / TOKENIZER_CONFIG_FILE).write_text(text, encoding="utf-8")
        return directory

    # ---------------------------------------------------------------- ids <-> text
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never adds BOS/EOS (the templates do)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`. With `skip_special`, BOS/EOS/PAD are dropped; the tags are always kept."""
        ids = list(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._skip_ids]
        return self._backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (for interop; r1lab code uses the methods above)."""
        return self._backend

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos!r}, eos={self._eos!r})"


class IncrementalDecoder:
    """Turn ids arriving one at a time into text, emitting only complete UTF-8 characters.

    A byte-level token may hold part of a character (an emoji spans several byte tokens); such
    a tail is held back until the character completes. Each step decodes a short window that
    starts at the previous emission point, so decoders whose output depends on the preceding
    token (leading-space rules) also stream correctly.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids[:read] have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (a broken tail decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        shown = decode(self._ids[self._prefix:self._read], self._skip_special)
        text = decode(self._ids[self._prefix:], self._skip_special)
        if not final and text.endswith("\ufffd"):
            return ""
        if len(text) <= len(shown):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(shown):]


# -------------------------------------------------------------------- chat templates
def template_stop_ids(tokenizer: Tokenizer, template: str) -> tuple[int, ...]:
    """Ids that end a reply under `template`, besides EOS: `</answer>` for R1-Zero (nothing may follow
    the answer), none for R1 (its turn ends at EOS)."""
    return (tokenizer.token_to_id(ANSWER_CLOSE),) if template == R1_ZERO else ()


def render_prompt(tokenizer: Tokenizer, messages_or_question: str | Sequence[Mapping[str, str]],
                  template: str) -> list[int]:
    """Ids to feed the model for generation: a question string or a list of role/content dicts.

    The last message must come from the user. "r1-zero" takes exactly one user message.
    """
    messages = _as_messages(messages_or_question)
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be from the user to render a prompt, "
                         f"got role {messages[-1]['role']!r}")
    if template == R1_ZERO:
        if len(messages) != 1:
            roles = [m["role"] for m in messages]
            raise ValueError(f"the r1-zero template takes one user question, got roles {roles}")
        text = R1_ZERO_PROMPT.format(prompt=messages[0]["content"])
        return [tokenizer.bos_id] + tokenizer.encode(text)

    ids = [tokenizer.bos_id]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if system:
        ids += tokenizer.encode(system)
    user_id, assistant_id = tokenizer.token_to_id(USER), tokenizer.token_to_id(ASSISTANT)
    for m in messages:
        if m["role"] == "user":
            ids += [user_id] + tokenizer.encode(m["content"])
        elif m["role"] == "assistant":
            ids += [assistant_id] + tokenizer.encode(strip_reasoning(m["content"]))
            ids += [tokenizer.eos_id]
    return ids + [assistant_id, tokenizer.token_to_id(THINK_OPEN)] + tokenizer.encode("\n")


def render_conversation(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                        template: str) -> tuple[list[int], list[int]]:
    """Ids and loss mask for SFT: the mask is 1 exactly on the final assistant message + EOS.

    The final assistant message keeps its reasoning; earlier ones are stripped to their answer.
    Under "r1" the generation prompt already opens ``<think>\\n``, so a leading ``<think>`` (and
    one newline) of the final message is dropped, and a message without ``</think>`` is treated
    as an answer with empty reasoning (``</think>\\n\\n`` is put in front). The masked ids are
    therefore exactly what the engine generates after `render_prompt`.
    """
    messages = _as_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be from the assistant to render a training "
                         f"conversation, got role {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise ValueError("a training conversation needs a user message before the assistant's")
    prompt = render_prompt(tokenizer, messages[:-1], template)
    content = messages[-1]["content"]
    if template == R1:
        if content.startswith(THINK_OPEN):
            content = content[len(THINK_OPEN):]
            content = content[1:] if content.startswith("\n") else content
        if THINK_CLOSE not in content:
            content = THINK_CLOSE + "\n\n" + content
    completion = tokenizer.encode(content) + [tokenizer.eos_id]
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def strip_reasoning(content: str) -> str:
    """What an assistant turn contributes to later prompts: the text after its ``</think>``."""
    if THINK_CLOSE not in content:
        return content
    return content.rpartition(THINK_CLOSE)[2].strip()


def split_reasoning(text: str, *, think_opened: bool = False) -> tuple[str, str]:
    """Split a completion into (reasoning inside ``<think>``, answer after ``</think>``).

    A completion of the "r1" template starts inside the think block (the prompt opened it), so a
    missing ``<think>`` is fine. An unfinished think block is all reasoning and no answer. Text
    with no tags at all is an answer, unless `think_opened` says the prompt opened the block
    (then it is unfinished reasoning). Both parts are stripped of surrounding whitespace.
    """
    head, closed, answer = text.partition(THINK_CLOSE)
    if closed:
        reasoning = head.partition(THINK_OPEN)[2] if THINK_OPEN in head else head
        return reasoning.strip(), answer.strip()
    if THINK_OPEN in text:
        return text.partition(THINK_OPEN)[2].strip(), ""
    if think_opened:
        return text.strip(), ""
    return "", text.strip()


# -------------------------------------------------------------------- helpers
def _added(content: str, special: bool) -> AddedToken:
    return AddedToken(content, special=special, normalized=False)


def _role_names(config_file: Path) -> dict[str, str]:
    """BOS/EOS/PAD token names from a Hugging Face tokenizer_config.json, where it names them."""
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    names = {}
    for role in ("bos", "eos", "pad"):
        value = config.get(f"{role}_token")
        if isinstance(value, Mapping):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            names[role] = value
    return names


def _as_messages(messages_or_question: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    if isinstance(messages_or_question, str):
        return [{"role": "user", "content": messages_or_question}]
    messages = []
    for i, m in enumerate(messages_or_question):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a mapping with a string 'content', got {m!r}")
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has role {m.get('role')!r}; "
                             f"expected 'system', 'user' or 'assistant'")
        messages.append({"role": m["role"], "content": m["content"]})
    if not messages:
        raise ValueError("no messages to render")
    return messages
