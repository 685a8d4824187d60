"""The one generator: batched prefill, one-token decode steps, sampling, continuous batching.

RL rollouts, evaluation, the server and the terminal chat all generate through `Engine`. It knows
token ids and a decoder (r1lab's Transformer, or anything with the same protocol: `new_cache`,
`decoder(tokens, positions=..., cache=..., n_slots=...) -> logits` where n_slots bounds the cache
slots a step reads, a cache with `max_len` (its slots), `select`, `repeat_interleave` and `extend`,
which joins caches of different lengths). It knows no tokenizer: stop strings need a `decode`
function handed in.

How a batch runs:
  * requests wait in a queue; at each step boundary waiting requests are prefilled together
    (prompts right-padded, one prefill per prompt) into a cache with the slots they can reach
    (prompt + max_new_tokens), the cache rows are repeated for the n samples of each prompt (the
    prompt is not recomputed) and appended to the running batch;
  * one decode step feeds every running row its last token at its own position; the cache slot of
    a position is its index, so ragged rows need no padding mask and a rejected draft token is
    simply overwritten;
  * finished rows leave the batch when they are a `compact_fraction` of it (compacting the cache
    costs a copy, so it is batched), until then they are fed a frozen position and ignored.

Letter legend: B running rows, T tokens in a call, V vocabulary.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from r1lab.backends import cpu


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    """Generated tokens at most (finish reason `length` when reached)."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    n: int = 1
    """Samples per prompt; they share one prefill."""
    seed: int | None = None
    """Same seed, same samples (each sample draws from its own random stream)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a sample (kept in the output), besides the engine's EOS."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a sample; needs the engine's `decode`. The text is cut right after the string."""
    ignore_eos: bool = False
    """Generate past EOS (for benchmarks of a fixed amount of work)."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass(slots=True)
class Completion:
    request_id: int
    sample_index: int
    token_ids: list[int]
    finish_reason: str            # "stop", "length" or "abort"
    logprobs: list[float]         # log p(token) under the model (temperature 1, no truncation)
    text: str | None = None       # decoded and cut at a stop string, when the engine has `decode`


@dataclass(slots=True)
class StepEvent:
    """What one sample did in one step: new tokens, and its finish reason when it ended."""
    request_id: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    text: str | None = None       # on a stop-string finish: the whole sample's text, cut after the string


@dataclass(slots=True)
class _Row:
    request_id: int
    sample_index: int
    params: SamplingParams
    prompt_len: int
    rng: random.Random  # this sample's own stream: one uniform per sampled token
    stop_ids: frozenset[int]  # tokens that end it: its stop_token_ids, and EOS unless ignored
    limit: int  # tokens it may reach: max_new_tokens, or fewer when the engine's max_len comes first
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing), so nearby seeds give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, uniforms: torch.Tensor,
                  modes: tuple[bool, bool, bool, bool, bool] | None = None) -> torch.Tensor:
    """One token per row of logits (B, V) under per-row temperature / top-k / top-p.

    Rows with temperature 0 take the argmax. Random rows invert their cumulative distribution at
    their own uniform u in (0, 1] (B,): the first token whose cumulative mass reaches u times the
    total, an exact sample that makes each row's draw depend on nothing but its logits and its u.
    `modes` (`sampling_modes` of the settings) skips the work no row needs; read from the tensors if None.
    """
    any_random, all_random, unit_temperature, any_top_k, any_top_p = modes or sampling_modes(temperature, top_k, top_p)
    if not any_random:
        return logits.argmax(dim=-1)
    scaled = logits if unit_temperature else logits / temperature.clamp(min=1e-6)[:, None]  # (x / 1 is x)
    if any_top_k:
        k = torch.where(top_k > 0, top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if any_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop_sorted = before >= top_p[:, None]  # the first token is never dropped
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.double().cumsum(dim=-1)  # (B, V); a token of probability 0 adds no width
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # in (0, total]: some token always reaches it
    drawn = torch.searchsorted(cdf, target)[:, 0].clamp(max=logits.shape[-1] - 1)
    if all_random:  # (an argmax over (B, V) costs as much as the draw)
        return drawn
    return torch.where(temperature > 0, drawn, logits.argmax(dim=-1))


def sampling_modes(temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[bool, ...]:
    """(any row samples, every row samples, every temperature is 1, any row has top-k, any has top-p)."""
    return (bool((temperature > 0).any()), bool((temperature > 0).all()), bool((temperature == 1).all()),
            bool((top_k > 0).any()), bool((top_p < 1).any()))


@dataclass(slots=True)
class _Settings:
    """The running rows' sampling settings as tensors (B,), kept in step with the rows."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    ban: torch.Tensor  # ignore_eos: EOS may not be drawn
    modes: tuple[bool, ...] = ()
    banning: str = "none"  # "none", "all" or "some" rows ban EOS

    def __post_init__(self):
        self.modes = sampling_modes(self.temperature, self.top_k, self.top_p)
        self.banning = "all" if bool(self.ban.all()) else "some" if bool(self.ban.any()) else "none"

    @classmethod
    def of(cls, rows: list[_Row], device: torch.device) -> _Settings:
        return cls(torch.tensor([r.params.temperature for r in rows], device=device),
                   torch.tensor([r.params.top_k for r in rows], device=device),
                   torch.tensor([r.params.top_p for r in rows], device=device),
                   torch.tensor([r.params.ignore_eos for r in rows], device=device, dtype=torch.bool))

    def cat(self, other: _Settings) -> _Settings:
        return _Settings(*(torch.cat([a, b]) for a, b in
                           zip((self.temperature, self.top_k, self.top_p, self.ban),
                               (other.temperature, other.top_k, other.top_p, other.ban))))

    def select(self, idx: torch.Tensor) -> _Settings:
        return _Settings(self.temperature[idx], self.top_k[idx], self.top_p[idx], self.ban[idx])


class _Uniforms:
    """The running rows' next uniforms in (0, 1], `block` of them drawn ahead from each row's own stream:
    a step reads one row of the table (one tensor op) instead of calling every row's generator (~60 us a
    step at batch 64, most of it cache misses after a decode step). All rows read the same table row; a
    row joining mid-block gets its stream's next values in the block's remaining table rows, so each row
    still draws its own stream in order: the values one draw per call would give."""

    __slots__ = ("block", "table", "next_draw")

    def __init__(self, block: int = 32):
        self.block = block
        self.table = torch.zeros(block, 0, dtype=torch.float64)  # (block, B)
        self.next_draw = block  # the table row read next; block: used up

    def next(self, rows: list[_Row]) -> torch.Tensor:
        """One uniform per row (B,); `rows` are the running rows, in the table's order."""
        if self.next_draw == self.block:
            self.table = self.draw(rows, self.block)
            self.next_draw = 0
        self.next_draw += 1
        return self.table[self.next_draw - 1]

    def add(self, rows: list[_Row]) -> None:
        """Rows joining the batch (after its rows)."""
        new = torch.zeros(self.block, len(rows), dtype=torch.float64)
        new[self.next_draw:] = self.draw(rows, self.block - self.next_draw)
        self.table = torch.cat([self.table, new], dim=1)

    def select(self, idx: torch.Tensor) -> None:
        self.table = self.table[:, idx.cpu()]

    @staticmethod
    def draw(rows: list[_Row], n: int) -> torch.Tensor:
        """The next n uniforms of each row's stream, (n, B)."""
        return torch.tensor([[1.0 - r.rng.random() for _ in range(n)] for r in rows],
                            dtype=torch.float64).view(len(rows), n).T.contiguous()


class Engine:
    """Generation over a decoder with a latent KV cache; one instance serves many calls."""

    def __init__(self, model, eos_id: int | None, decode: Callable[[list[int]], str] | None = None,
                 max_batch_size: int = 256, max_len: int | None = None, compact_fraction: float = 0.25,
                 speculative: bool = False, compile: bool = False):
        """`compile`: run prefill and decode steps on the CPU backend (r1lab.backends.cpu: steps compiled ahead
        of time, one per class of batch sizes, built the first time a step falls in it; C++ kernels built once
        on first use). A model it cannot run (another device or dtype, another decoder) decodes eagerly, with
        a warning saying why."""
        if speculative and not getattr(model, "mtp", None):
            raise ValueError("speculative decoding drafts with the MTP module: the model has none (n_mtp_modules = 0)")
        if max_len is not None and max_len > model.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        self.model = model
        self.steps = EagerSteps()  # what runs a step, chosen once: the model's forward or the CPU backend
        if compile and (reason := cpu.unsupported(model)) is not None:
            warnings.warn(f"r1lab: the CPU backend cannot run this model ({reason}); it decodes eagerly", stacklevel=2)
        elif compile:
            self.steps = cpu.CpuBackend()
        self._settings: _Settings | None = None  # the running rows' sampling settings, row for row
        self._uniforms = _Uniforms()  # and their next uniforms
        self._sample_kernel = self.steps.sample
        self.speculative = speculative
        self.drafted = 0   # speculative: rows that verified a draft, and how many drafts were accepted
        self.accepted = 0
        self.eos_id = eos_id
        self.decode = decode
        self.max_batch_size = max_batch_size
        self.max_len = max_len or model.config.max_seq_len
        self.compact_fraction = compact_fraction
        self._ids = itertools.count()
        self._waiting: deque[tuple[int, list[int], SamplingParams]] = deque()
        self._rows: list[_Row] = []
        self._cache = None
        self._last = torch.zeros(0, dtype=torch.long)   # (B,) the token each row feeds next
        self._pos = torch.zeros(0, dtype=torch.long)    # (B,) its position
        self._draft = torch.zeros(0, dtype=torch.long)  # (B,) speculative: the MTP guess for the token after
        self._cancelled: set[int] = set()
        # generate()'s requests: request id -> the list their rows go to as they finish (generate reads the
        # rows, so its steps build no per-token events).
        self._collect: dict[int, list[_Row]] = {}
        # Kept with the rows so a step needs no pass over them: how many have finished (they wait for compaction),
        # and the furthest any has reached (prompt_len + len(tokens): the cache slots a step reads).
        self._finished = 0
        self._front = 0

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams) -> int:
        """Queue a prompt; it joins the running batch at the next step boundary. Returns its id."""
        params.validate()
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room under max_len {self.max_len}")
        if params.stop_strings and self.decode is None:
            raise ValueError("stop_strings need an engine built with a decode function")
        if params.seed is None:
            params = replace(params, seed=int(torch.randint(0, 2**62, ()).item()))
        request_id = next(self._ids)
        self._waiting.append((request_id, list(prompt), params))
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request (e.g. its client went away); its samples finish with reason `abort`."""
        self._cancelled.add(request_id)

    def has_work(self) -> bool:
        return bool(self._waiting) or self._finished < len(self._rows)

    # -- the step ------------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """Admit waiting requests (prefill), then one decode step for every running row."""
        events: list[StepEvent] = []
        self._step(events)
        return events

    @torch.inference_mode()
    def _step(self, events: list[StepEvent] | None) -> None:
        """`step`, its events appended to `events`; with None, no per-token events are built (generate)."""
        self._apply_cancellations(events)
        if self._finished < len(self._rows):  # some row is decoding
            (self._speculative_step if self.speculative else self._decode_step)(events)
        self._admit(events)
        self._maybe_compact()

    def _apply_cancellations(self, events: list[StepEvent] | None) -> None:
        if not self._cancelled:
            return
        self._waiting = deque(w for w in self._waiting if w[0] not in self._cancelled)
        for row in self._rows:
            if row.request_id in self._cancelled and row.finish_reason is None:
                row.finish_reason = "abort"
                self._finished += 1
                if row.request_id in self._collect:
                    self._collect[row.request_id].append(row)
                if events is not None:
                    events.append(StepEvent(row.request_id, row.sample_index, [], [], "abort"))
        self._cancelled.clear()

    def _admit(self, events: list[StepEvent] | None) -> None:
        room = self.max_batch_size - (len(self._rows) - self._finished)
        batch = []
        while self._waiting and room >= self._waiting[0][2].n:
            item = self._waiting.popleft()
            batch.append(item)
            room -= item[2].n
        if not batch and self._waiting and not self._rows:
            batch.append(self._waiting.popleft())  # one request larger than the batch still runs
        if not batch:
            return
        lengths = torch.tensor([len(p) for _, p, _ in batch])
        T = int(lengths.max())
        tokens = torch.zeros(len(batch), T, dtype=torch.long)
        for i, (_, prompt, _) in enumerate(batch):
            tokens[i, :len(prompt)] = torch.tensor(prompt)
        device = self._device()
        tokens, positions_T = tokens.to(device), torch.arange(T, device=device).expand(len(batch), T)
        rows_of = torch.arange(len(batch), device=device)
        counts = torch.tensor([params.n for _, _, params in batch])
        # Slots for what these requests can reach (prompt + max_new_tokens), not max_len: the cache is
        # zeroed and, at batch 64, a max_len cache costs tens of ms to allocate (and grows on `extend`).
        slots = min(self.max_len, max(len(prompt) + params.max_new_tokens for _, prompt, params in batch))
        if self.speculative:
            cache = self.model.new_cache(len(batch), slots, with_mtp=True)
            hidden, _ = self.model.trunk(tokens, positions=positions_T, cache=cache)  # (n_req, T, D)
            last_logits = self.model.logits(hidden[rows_of, (lengths - 1).to(device)])
        else:
            cache = self.model.new_cache(len(batch), slots)
            last_logits = self.steps.prefill(self.model, tokens, positions_T, (lengths - 1).to(device), cache, T)
        _repeat_rows(cache, counts.to(device))
        last_logits = last_logits.repeat_interleave(counts.to(device), dim=0)
        new_rows = []
        for (request_id, prompt, params) in batch:
            eos = () if self.eos_id is None or params.ignore_eos else (self.eos_id,)
            stop_ids = frozenset((*params.stop_token_ids, *eos))
            for i in range(params.n):
                new_rows.append(_Row(request_id, i, params, len(prompt), random.Random(_mix_seed(params.seed, i)),
                                     stop_ids, min(params.max_new_tokens, self.max_len - len(prompt))))
        positions = lengths.repeat_interleave(counts)
        settings = _Settings.of(new_rows, device)
        first, logp = self._sample(last_logits, settings, _Uniforms.draw(new_rows, 1)[0])
        draft = torch.zeros_like(first)
        if self.speculative:
            # MTP over the prompt: position t sees hidden t and the token after it (the first sample at the end).
            rep = counts.to(device)
            hidden, following = hidden.repeat_interleave(rep, dim=0), tokens.repeat_interleave(rep, dim=0)
            row_lengths = lengths.to(device).repeat_interleave(rep)
            following = torch.cat([following[:, 1:], torch.zeros_like(following[:, :1])], dim=1)
            following[torch.arange(len(first), device=device), row_lengths - 1] = first
            mtp_hidden = self.model.mtp_step(0, hidden, following, positions_T[:1].expand(len(first), T), cache=cache)
            draft = self.model.mtp_logits(0, mtp_hidden[torch.arange(len(first), device=device), row_lengths - 1]).argmax(-1)
        if self._cache is None or not self._rows:
            self._cache, self._rows, self._settings, self._uniforms = cache, new_rows, settings, _Uniforms()
            self._uniforms.add(new_rows)
            self._finished = self._front = 0
            self._last, self._pos, self._draft = first, positions.to(device), draft
        else:
            self._cache.extend(cache)
            self._rows.extend(new_rows)
            self._settings = self._settings.cat(settings)
            self._uniforms.add(new_rows)
            self._last = torch.cat([self._last, first])
            self._pos = torch.cat([self._pos, positions.to(device)])
            self._draft = torch.cat([self._draft, draft])
        self._record(new_rows, first.tolist(), logp.tolist(), events)

    def _n_slots(self, ahead: int = 0) -> int:
        """Cache slots the next step reads: every row feeds position prompt_len + len(tokens) - 1 or
        less (finished rows are frozen), plus `ahead` draft positions."""
        return min(self._front + ahead, self._cache.max_len)

    def _decode_step(self, events: list[StepEvent] | None) -> None:
        logits = self.steps.decode(self.model, self._last[:, None], self._pos[:, None], self._cache, self._n_slots())  # (B, V)
        nxt, logp = self._sample(logits, self._settings, self._uniforms.next(self._rows))
        tokens, logps = nxt.tolist(), logp.tolist()
        if not self._finished:  # (the common case: no finished row waiting for compaction)
            self._pos, self._last = self._pos + 1, nxt
            self._record(self._rows, tokens, logps, events)
            return
        live = [i for i, r in enumerate(self._rows) if r.finish_reason is None]
        running = torch.zeros(len(self._rows), dtype=torch.bool, device=self._pos.device)
        running[live] = True
        self._pos = torch.where(running, self._pos + 1, self._pos)
        self._last = torch.where(running, nxt, self._last)
        self._record([self._rows[i] for i in live], [tokens[i] for i in live], [logps[i] for i in live], events)

    def _speculative_step(self, events: list[StepEvent] | None) -> None:
        """Feed [last, draft] at [p, p+1]; sample at p+1 as usual; if that sample equals the draft, the
        logits at p+2 are valid too and a second token comes for free. Exact for any sampling settings:
        every emitted token is drawn from the model's own distribution given the tokens before it."""
        live = torch.tensor([r.finish_reason is None for r in self._rows], device=self._pos.device)
        pos2 = torch.stack([self._pos, (self._pos + 1).clamp(max=self._cache.max_len - 1)], dim=1)  # (B, 2)
        n_slots = self._n_slots(ahead=1)
        hidden, logits = self.steps.verify(self.model, torch.stack([self._last, self._draft], dim=1), pos2, self._cache, n_slots)
        s0, lp0 = self._sample(logits[:, 0], self._settings, self._uniforms.next(self._rows))
        s1, lp1 = self._sample(logits[:, 1], self._settings, self._uniforms.next(self._rows))
        accept = (s0 == self._draft) & live
        live_idx = [i for i, r in enumerate(self._rows) if r.finish_reason is None]
        s0l, lp0l, s1l, lp1l, acc = s0.tolist(), lp0.tolist(), s1.tolist(), lp1.tolist(), accept.tolist()
        self._record([self._rows[i] for i in live_idx], [s0l[i] for i in live_idx], [lp0l[i] for i in live_idx], events)
        second = [i for i in live_idx if acc[i] and self._rows[i].finish_reason is None]
        self._record([self._rows[i] for i in second], [s1l[i] for i in second], [lp1l[i] for i in second], events)
        self.drafted += len(live_idx)
        self.accepted += int(accept.sum())
        took_two = torch.zeros_like(accept)
        took_two[second] = True
        # The next draft: MTP on (hidden at p, s0) and (hidden at p+1, s1); use the last accepted one.
        drafts = self.steps.draft(self.model, hidden, torch.stack([s0, s1], dim=1), pos2, self._cache, n_slots)  # (B, 2)
        self._draft = torch.where(took_two, drafts[:, 1], drafts[:, 0])
        self._last = torch.where(took_two, s1, torch.where(live, s0, self._last))
        self._pos = self._pos + live.long() + took_two.long()

    @property
    def acceptance_rate(self) -> float:
        """Share of speculative steps whose MTP draft was accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def _sample(self, logits: torch.Tensor, settings: _Settings, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row of logits (B, V) and its log-probability, from uniforms (B,) in (0, 1]."""
        logits = logits.float()
        if self._sample_kernel is not None:
            eos = -1 if self.eos_id is None or settings.banning == "none" else self.eos_id
            return self._sample_kernel(logits.contiguous(), settings.temperature.float(), settings.top_k,
                                     settings.top_p.float(), settings.ban, uniforms, eos)
        if settings.banning == "all" and self.eos_id is not None:
            logits[:, self.eos_id] = float("-inf")
        elif settings.banning == "some" and self.eos_id is not None:
            logits[:, self.eos_id] = torch.where(settings.ban, float("-inf"), logits[:, self.eos_id])
        tokens = sample_tokens(logits, settings.temperature, settings.top_k, settings.top_p, uniforms, settings.modes)
        logp = logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
        return tokens, logp

    def _record(self, rows: list[_Row], tokens: list[int], logps: list[float], events: list[StepEvent] | None) -> None:
        """Each row's new token: appended, finish checked; an event each (when `events` is not None), and
        finished rows of generate()'s requests handed to it."""
        front, finished, add = self._front, 0, None if events is None else events.append
        for row, tok, lp in zip(rows, tokens, logps):
            row.tokens.append(tok)
            row.logprobs.append(lp)
            n = len(row.tokens)
            # The full check only where a finish is possible: a stop id, the token limit, or stop strings.
            reason = None
            if tok in row.stop_ids or n >= row.limit or row.params.stop_strings:
                reason = row.finish_reason = self._finish_reason(row, tok)
            if row.prompt_len + n > front:
                front = row.prompt_len + n
            if reason is not None:
                finished += 1
                if row.request_id in self._collect:
                    self._collect[row.request_id].append(row)
            if add is not None:
                add(StepEvent(row.request_id, row.sample_index, [tok], [lp], reason, row.text))
        self._front, self._finished = front, self._finished + finished

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        if token in row.stop_ids:
            return "stop"
        p = row.params
        if p.stop_strings:
            text = self.decode(row.tokens)
            cut = _stop_cut(text, p.stop_strings)
            if cut is not None:
                row.text = text[:cut]
                return "stop"
        if len(row.tokens) >= row.limit:
            return "length"
        return None

    def _maybe_compact(self) -> None:
        finished = self._finished
        if finished and (finished == len(self._rows) or finished >= self.compact_fraction * len(self._rows)):
            keep = [i for i, r in enumerate(self._rows) if r.finish_reason is None]
            if keep:
                idx = torch.tensor(keep, device=self._pos.device)
                self._cache.select(idx)
                self._settings = self._settings.select(idx)
                self._uniforms.select(idx)
                self._last, self._pos, self._draft = self._last[idx], self._pos[idx], self._draft[idx]
            else:
                self._cache = None
            self._rows = [self._rows[i] for i in keep]
            self._finished = 0
            self._front = max((r.prompt_len + len(r.tokens) for r in self._rows), default=0)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- whole calls -----------------------------------------------------------------------------------
    def stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[StepEvent]:
        """Generate for all prompts, yielding every sample's new tokens as they come.

        Request ids in the events are indices into `prompts`.
        """
        ids = self._add_all(prompts, params)
        pending = set(ids)
        finished: dict[int, int] = {rid: 0 for rid in ids}
        while pending:
            for event in self.step():
                if event.request_id in ids:
                    if event.finish_reason is not None:
                        finished[event.request_id] += 1
                        if finished[event.request_id] == params.n:
                            pending.discard(event.request_id)
                    event.request_id = ids[event.request_id]  # events are fresh per step: ours to relabel
                    yield event

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """All samples of all prompts: prompt i's sample j is at index i * n + j (the samples `stream` gives).
        Its steps build no per-token events: each sample's row comes back whole when it finishes (steps it
        shares with other requests' rows give those no events either)."""
        ids = self._add_all(prompts, params)
        done: list[_Row] = []
        self._collect.update((request_id, done) for request_id in ids)
        try:
            while len(done) < len(ids) * params.n:
                self._step(None)
        finally:
            for request_id in ids:
                self._collect.pop(request_id, None)
        out = {}
        for row in done:
            index = ids[row.request_id]
            text = None
            if self.decode is not None:
                text = row.text if row.text is not None else self.decode(row.tokens)
            out[(index, row.sample_index)] = Completion(index, row.sample_index, row.tokens, row.finish_reason,
                                                        row.logprobs, text)
        return [out[(i, j)] for i in range(len(prompts)) for j in range(params.n)]

    def _add_all(self, prompts: list[list[int]], params: SamplingParams) -> dict[int, int]:
        """Queue every prompt (prompt i's seed mixed from params.seed and i) -> request id: prompt index."""
        ids = {}
        for index, prompt in enumerate(prompts):
            seed = None if params.seed is None else _mix_seed(params.seed, index)
            ids[self.add_request(prompt, replace(params, seed=seed))] = index
        return ids


class EagerSteps:
    """The engine's steps as the model's own forward: any decoder, device and dtype. `cpu.CpuBackend` has
    the same steps (and a sampling kernel), compiled."""

    sample = None  # draws with `sample_tokens`

    @staticmethod
    def prefill(model, tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, cache,
                n_slots: int) -> torch.Tensor:
        """The prompts' forward pass (tokens (B, T) at positions 0..T-1), writing the cache -> the logits (B, V)
        at each prompt's last position `last` (B,). The slots read are the T written (passed: no read-back)."""
        return model(tokens, positions=positions, cache=cache, n_slots=n_slots)[torch.arange(tokens.shape[0]), last]

    @staticmethod
    def decode(model, tokens: torch.Tensor, positions: torch.Tensor, cache, n_slots: int) -> torch.Tensor:
        """One decode step: tokens (B, 1) at positions (B, 1), reading cache slots [0, n_slots) -> logits (B, V)."""
        return model(tokens, positions=positions, cache=cache, n_slots=n_slots)[:, -1]

    @staticmethod
    def verify(model, tokens: torch.Tensor, positions: torch.Tensor, cache, n_slots: int):
        """Speculative step, first half: the trunk over [last, draft] -> (hidden (B, 2, D), logits (B, 2, V))."""
        hidden, _ = model.trunk(tokens, positions=positions, cache=cache, n_slots=n_slots)
        return hidden, model.logits(hidden)

    @staticmethod
    def draft(model, hidden: torch.Tensor, following: torch.Tensor, positions: torch.Tensor, cache,
              n_slots: int) -> torch.Tensor:
        """Speculative step, second half: the MTP module's greedy guesses (B, 2) for the token after each
        of the two sampled ones."""
        mtp_hidden = model.mtp_step(0, hidden, following, positions, cache=cache, n_slots=n_slots)
        return model.mtp_logits(0, mtp_hidden).argmax(dim=-1)


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    """Index just past the earliest stop string in text, or None."""
    best = None
    for s in stops:
        at = text.find(s)
        if at >= 0 and (best is None or at + len(s) < best):
            best = at + len(s)
    return best


def _repeat_rows(cache, counts: torch.Tensor) -> None:
    """Row i of the cache becomes counts[i] consecutive rows."""
    if bool((counts == 1).all()):
        return  # (a copy of the whole preallocated cache otherwise: 20 ms at batch 64 for the tiny preset)
    if bool((counts == counts[0]).all()):
        cache.repeat_interleave(int(counts[0]))
    else:
        cache.select(torch.arange(len(counts), device=counts.device).repeat_interleave(counts))
