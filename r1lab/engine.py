"""The one generator: batched prefill, one-token decode steps, sampling, continuous batching.

RL rollouts, evaluation, the server and the terminal chat all generate through `Engine`. It knows
token ids and a decoder (r1lab's Transformer, or anything with the same protocol: `new_cache`,
`decoder(tokens, positions=..., cache=..., n_slots=...) -> logits` where n_slots bounds the cache
slots a step reads, a cache with `max_len` (its slots), `select` and `extend`,
which joins caches of different lengths). It knows no tokenizer: stop strings need a `decode`
function handed in.

How a batch runs:
  * requests wait in a queue; at each step boundary waiting requests are prefilled together
    (prompts right-padded, one prefill per prompt) into a cache with the slots they can reach
    (prompt + max_new_tokens), the cache rows are repeated for the n samples of each prompt (the
    prompt is not recomputed) and join the running batch (`RunningBatch`);
  * one decode step feeds every running row its last token at its own position; the cache slot of
    a position is its index, so ragged rows need no padding mask and a rejected draft token is
    simply overwritten;
  * finished rows leave the batch when they are a `compact_fraction` of it (compacting the cache
    costs a copy, so it is batched), until then they are fed a frozen position and ignored.

Every step reports what each sample did as `StepEvent`s; `generate` collects them. An engine built
with `compile=True` runs its steps on the CPU backend (r1lab.backends.cpu) when the model qualifies,
else the model's own forward (eager); `speculative=True` drafts with the MTP module (`Speculation`).

Letter legend: B running rows, T tokens in a call, V vocabulary.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

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
    banning: bool = False  # some row bans EOS

    def __post_init__(self):
        self.modes = sampling_modes(self.temperature, self.top_k, self.top_p)
        self.banning = bool(self.ban.any())

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


def _uniforms(rows: list[_Row]) -> torch.Tensor:
    """Each row's next uniform in (0, 1] from its own stream, (B,)."""
    return torch.tensor([1.0 - r.rng.random() for r in rows], dtype=torch.float64)


class RunningBatch:
    """The running rows and everything kept row for row with them: the cache, each row's next token and
    its position, its sampling settings, and (speculative decoding) its draft. Rows `join`
    at the end; finished rows stay, frozen, until `compact` drops them."""

    def __init__(self, rows: list[_Row], cache, last: torch.Tensor, positions: torch.Tensor, settings: _Settings,
                 draft: torch.Tensor | None, decode: Callable[[list[int]], str] | None):
        self.rows, self.cache, self.settings, self.draft, self.decode = rows, cache, settings, draft, decode
        self.last, self.positions = last, positions  # (B,) the token each row feeds next, at this position
        # Kept with the rows so that a step needs no pass over them: how many have finished (they wait for
        # compaction), and the furthest any has reached (prompt_len + len(tokens): the cache slots a step reads).
        self.finished = 0
        self.front = 0

    @property
    def live(self) -> int:
        return len(self.rows) - self.finished

    def join(self, other: RunningBatch) -> None:
        """Append other's rows (requests just prefilled) after ours."""
        self.cache.extend(other.cache)
        self.rows.extend(other.rows)
        self.settings = self.settings.cat(other.settings)
        self.last = torch.cat([self.last, other.last])
        self.positions = torch.cat([self.positions, other.positions])
        if self.draft is not None:
            self.draft = torch.cat([self.draft, other.draft])
        self.finished += other.finished
        self.front = max(self.front, other.front)

    def compact(self, fraction: float) -> None:
        """Drop the finished rows once they are `fraction` of the batch (or all of it)."""
        if not self.finished or (self.finished < len(self.rows) and self.finished < fraction * len(self.rows)):
            return
        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
        if keep:
            idx = torch.tensor(keep, device=self.positions.device)
            self.cache.select(idx)
            self.settings = self.settings.select(idx)
            self.last, self.positions = self.last[idx], self.positions[idx]
            if self.draft is not None:
                self.draft = self.draft[idx]
        self.rows = [self.rows[i] for i in keep]
        self.finished = 0
        self.front = max((r.prompt_len + len(r.tokens) for r in self.rows), default=0)

    def n_slots(self, ahead: int = 0) -> int:
        """Cache slots the next step reads: every row feeds position prompt_len + len(tokens) - 1 or
        less (finished rows are frozen), plus `ahead` draft positions."""
        return min(self.front + ahead, self.cache.max_len)

    def advance(self, tokens: torch.Tensor, logps: torch.Tensor, events: list[StepEvent]) -> None:
        """One new token per row (B,): each running row records it and feeds it next; finished rows stay frozen."""
        token_list, logp_list = tokens.tolist(), logps.tolist()
        if not self.finished:  # (the common case: no finished row waiting for compaction)
            self.positions, self.last = self.positions + 1, tokens
            self.record(self.rows, token_list, logp_list, events)
            return
        live = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
        running = torch.zeros(len(self.rows), dtype=torch.bool, device=self.positions.device)
        running[live] = True
        self.positions = torch.where(running, self.positions + 1, self.positions)
        self.last = torch.where(running, tokens, self.last)
        self.record([self.rows[i] for i in live], [token_list[i] for i in live], [logp_list[i] for i in live], events)

    def record(self, rows: list[_Row], tokens: list[int], logps: list[float], events: list[StepEvent]) -> None:
        """Each row's new token: appended, its finish checked, an event each."""
        front, finished = self.front, 0
        for row, tok, lp in zip(rows, tokens, logps):
            row.tokens.append(tok)
            row.logprobs.append(lp)
            n = len(row.tokens)
            # The full check only where a finish is possible: a stop id, the token limit, or stop strings.
            reason = None
            if tok in row.stop_ids or n >= row.limit or row.params.stop_strings:
                reason = row.finish_reason = _finish_reason(row, tok, self.decode)
                finished += reason is not None
            if row.prompt_len + n > front:
                front = row.prompt_len + n
            events.append(StepEvent(row.request_id, row.sample_index, [tok], [lp], reason, row.text))
        self.front, self.finished = front, self.finished + finished

    def abort(self, cancelled: set[int], events: list[StepEvent]) -> None:
        """Finish the cancelled requests' running rows with reason `abort`."""
        for row in self.rows:
            if row.request_id in cancelled and row.finish_reason is None:
                row.finish_reason = "abort"
                self.finished += 1
                events.append(StepEvent(row.request_id, row.sample_index, [], [], "abort"))


def _finish_reason(row: _Row, token: int, decode: Callable[[list[int]], str] | None) -> str | None:
    """Why the row ends at its new `token`, or None; a stop string cuts its text right after the string."""
    if token in row.stop_ids:
        return "stop"
    if row.params.stop_strings:
        text = decode(row.tokens)
        cuts = [text.find(s) + len(s) for s in row.params.stop_strings if s in text]
        if cuts:
            row.text = text[:min(cuts)]
            return "stop"
    return "length" if len(row.tokens) >= row.limit else None


class Engine:
    """Generation over a decoder with a latent KV cache; one instance serves many calls."""

    def __init__(self, model, eos_id: int | None, decode: Callable[[list[int]], str] | None = None,
                 max_batch_size: int = 256, max_len: int | None = None, compact_fraction: float = 0.25,
                 speculative: bool = False, compile: bool = False):
        """`compile`: run prefill and decode steps on the CPU backend (r1lab.backends.cpu: steps compiled ahead
        of time, one per class of batch sizes, built the first time a step falls in it; C++ kernels built once
        on first use). A model it cannot run (another device or dtype, another decoder) decodes eagerly, with
        a warning saying why. `speculative`: draft with the model's MTP module (`Speculation`)."""
        if speculative and not getattr(model, "mtp", None):
            raise ValueError("speculative decoding drafts with the MTP module: the model has none (n_mtp_modules = 0)")
        if max_len is not None and max_len > model.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        self.model = model
        self.eos_id = eos_id
        self.decode = decode
        self.max_batch_size = max_batch_size
        self.max_len = max_len or model.config.max_seq_len
        self.compact_fraction = compact_fraction
        self.steps = EagerSteps()  # what runs a step, chosen once: the model's forward or the CPU backend
        if compile and (reason := cpu.unsupported(model)) is not None:
            warnings.warn(f"r1lab: the CPU backend cannot run this model ({reason}); it decodes eagerly", stacklevel=2)
        elif compile:
            self.steps = cpu.CpuBackend()
        self._sample_kernel = self.steps.sample
        self.speculation = Speculation(model, self.steps, self._sample) if speculative else None
        self._ids = itertools.count()
        self._waiting: deque[tuple[int, list[int], SamplingParams]] = deque()
        self._cancelled: set[int] = set()
        self._batch: RunningBatch | None = None

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
        return bool(self._waiting) or (self._batch is not None and self._batch.live > 0)

    # -- steps -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Apply cancellations, one decode step for every running row, then admit waiting requests (their
        prefill gives each sample its first token). Returns what each sample did."""
        events: list[StepEvent] = []
        if self._cancelled:
            self._waiting = deque(w for w in self._waiting if w[0] not in self._cancelled)
            if self._batch is not None:
                self._batch.abort(self._cancelled, events)
            self._cancelled.clear()
        if self._batch is not None and self._batch.live:
            (self._decode if self.speculation is None else self.speculation.step)(self._batch, events)
        self._admit(events)
        if self._batch is not None:
            self._batch.compact(self.compact_fraction)
            if not self._batch.rows:
                self._batch = None
        return events

    def _decode(self, batch: RunningBatch, events: list[StepEvent]) -> None:
        """One token for every running row."""
        logits = self.steps.decode(self.model, batch.last[:, None], batch.positions[:, None], batch.cache,
                                   batch.n_slots())  # (B, V)
        batch.advance(*self._sample(logits, batch.settings, _uniforms(batch.rows)), events)

    def _admit(self, events: list[StepEvent]) -> None:
        """Prefill the waiting requests that fit and join their samples to the running batch."""
        room = self.max_batch_size - (0 if self._batch is None else self._batch.live)
        admitted = []
        while self._waiting and room >= self._waiting[0][2].n:
            admitted.append(self._waiting.popleft())
            room -= admitted[-1][2].n
        if not admitted and self._waiting and self._batch is None:
            admitted.append(self._waiting.popleft())  # one request larger than the batch still runs
        if not admitted:
            return
        lengths = torch.tensor([len(p) for _, p, _ in admitted])
        T = int(lengths.max())
        tokens = torch.zeros(len(admitted), T, dtype=torch.long)
        for i, (_, prompt, _) in enumerate(admitted):
            tokens[i, :len(prompt)] = torch.tensor(prompt)
        device = next(self.model.parameters()).device
        tokens, positions = tokens.to(device), torch.arange(T, device=device).expand(len(admitted), T)
        last = (lengths - 1).to(device)
        counts = torch.tensor([params.n for _, _, params in admitted])
        # Slots for what these requests can reach (prompt + max_new_tokens), not max_len: the cache is
        # zeroed, and a max_len cache costs time to allocate at large batches (and grows on `extend`).
        slots = min(self.max_len, max(len(prompt) + params.max_new_tokens for _, prompt, params in admitted))
        if self.speculation is None:
            cache = self.model.new_cache(len(admitted), slots)
            last_logits = self.steps.prefill(self.model, tokens, positions, last, cache, T)  # (n_req, V)
        else:
            cache, last_logits, hidden = self.speculation.prefill(tokens, positions, last, slots)
        if bool((counts > 1).any()):  # row i of the cache becomes counts[i] consecutive rows
            cache.select(torch.arange(len(admitted), device=device).repeat_interleave(counts.to(device)))
        last_logits = last_logits.repeat_interleave(counts.to(device), dim=0)
        rows = []
        for (request_id, prompt, params) in admitted:
            eos = () if self.eos_id is None or params.ignore_eos else (self.eos_id,)
            stop_ids = frozenset((*params.stop_token_ids, *eos))
            for i in range(params.n):
                rows.append(_Row(request_id, i, params, len(prompt), random.Random(_mix_seed(params.seed, i)),
                                 stop_ids, min(params.max_new_tokens, self.max_len - len(prompt))))
        settings = _Settings.of(rows, device)
        first, logp = self._sample(last_logits, settings, _uniforms(rows))
        draft = None
        if self.speculation is not None:
            draft = self.speculation.first_drafts(hidden, tokens, lengths, counts.to(device), first, cache)
        joining = RunningBatch(rows, cache, first, lengths.repeat_interleave(counts).to(device), settings, draft,
                               self.decode)
        joining.record(rows, first.tolist(), logp.tolist(), events)
        if self._batch is None:
            self._batch = joining
        else:
            self._batch.join(joining)

    def _sample(self, logits: torch.Tensor, settings: _Settings, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row of logits (B, V) and its log-probability, from uniforms (B,) in (0, 1]."""
        logits = logits.float()
        if self._sample_kernel is not None:
            eos = self.eos_id if self.eos_id is not None and settings.banning else -1
            return self._sample_kernel(logits.contiguous(), settings.temperature.float(), settings.top_k,
                                       settings.top_p.float(), settings.ban, uniforms, eos)
        if settings.banning and self.eos_id is not None:
            logits[:, self.eos_id] = torch.where(settings.ban, float("-inf"), logits[:, self.eos_id])
        tokens = sample_tokens(logits, settings.temperature, settings.top_k, settings.top_p, uniforms, settings.modes)
        logp = logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
        return tokens, logp

    # -- whole calls -----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, first_index: int = 0) -> list[Completion]:
        """All samples of all prompts: prompt i's sample j is at index i * n + j (prompt i's seed is mixed
        from params.seed and first_index + i: a call split into parts samples what the whole call would).
        Steps it shares with requests added by `add_request` drop their events."""
        ids = {}  # request id -> prompt index
        for index, prompt in enumerate(prompts):
            seed = None if params.seed is None else _mix_seed(params.seed, first_index + index)
            ids[self.add_request(prompt, replace(params, seed=seed))] = index
        samples = {request_id: [Completion(index, j, [], "", []) for j in range(params.n)]
                   for request_id, index in ids.items()}
        running = len(prompts) * params.n
        while running:
            for event in self.step():
                if event.request_id in samples:
                    done = samples[event.request_id][event.sample_index]
                    done.token_ids += event.token_ids
                    done.logprobs += event.logprobs
                    if event.finish_reason is not None:
                        done.finish_reason, done.text = event.finish_reason, event.text
                        running -= 1
        out = [done for request in samples.values() for done in request]
        if self.decode is not None:
            for done in out:
                if done.text is None:
                    done.text = self.decode(done.token_ids)
        return out


class Speculation:
    """MTP self-speculative decoding: each step feeds [last, draft] at [p, p+1] and samples at p+1 as usual;
    when that sample equals the draft, the logits at p+2 are valid too and a second token comes for free.
    Exact for any sampling settings: every emitted token is drawn from the model's own distribution given
    the tokens before it. The next draft is the MTP module's greedy guess."""

    def __init__(self, model, steps: EagerSteps | cpu.CpuBackend, sample: Callable):
        self.model, self.sample = model, sample
        self.verify, self.draft = steps.verify, steps.draft
        self.drafted = 0   # rows that verified a draft, and how many drafts were accepted
        self.accepted = 0

    @property
    def acceptance_rate(self) -> float:
        """The share of drafts accepted (0 before any)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, slots: int):
        """The prompts (n_req, T) at positions (n_req, T) into a new cache with the MTP module's layer -> (cache,
        logits (n_req, V) at positions `last`, the trunk's hidden states (n_req, T, D) for `first_drafts`)."""
        cache = self.model.new_cache(len(tokens), slots, with_mtp=True)
        hidden, _ = self.model.trunk(tokens, positions=positions, cache=cache)
        return cache, self.model.logits(hidden[torch.arange(len(tokens), device=tokens.device), last]), hidden

    def first_drafts(self, hidden: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor,
                     first: torch.Tensor, cache) -> torch.Tensor:
        """Each sample's first draft (B,): MTP over its prompt, position t seeing hidden t and the token after it
        (the sample's first token after the last), its rows repeated `counts` times as the cache's are."""
        device, B, T = first.device, len(first), tokens.shape[1]
        hidden, following = hidden.repeat_interleave(counts, dim=0), tokens.repeat_interleave(counts, dim=0)
        row_lengths = lengths.to(device).repeat_interleave(counts)
        following = torch.cat([following[:, 1:], torch.zeros_like(following[:, :1])], dim=1)
        following[torch.arange(B, device=device), row_lengths - 1] = first
        positions = torch.arange(T, device=device).expand(B, T)
        mtp_hidden = self.model.mtp_step(0, hidden, following, positions, cache=cache)
        return self.model.mtp_logits(0, mtp_hidden[torch.arange(B, device=device), row_lengths - 1]).argmax(-1)

    def step(self, batch: RunningBatch, events: list[StepEvent]) -> None:
        live = torch.tensor([r.finish_reason is None for r in batch.rows], device=batch.positions.device)
        pos2 = torch.stack([batch.positions, (batch.positions + 1).clamp(max=batch.cache.max_len - 1)], dim=1)  # (B, 2)
        n_slots = batch.n_slots(ahead=1)
        fed = torch.stack([batch.last, batch.draft], dim=1)  # (B, 2)
        hidden, logits = self.verify(self.model, fed, pos2, batch.cache, n_slots)
        s0, lp0 = self.sample(logits[:, 0], batch.settings, _uniforms(batch.rows))
        s1, lp1 = self.sample(logits[:, 1], batch.settings, _uniforms(batch.rows))
        accept = (s0 == batch.draft) & live
        live_idx = [i for i, r in enumerate(batch.rows) if r.finish_reason is None]
        s0l, lp0l, s1l, lp1l, acc = s0.tolist(), lp0.tolist(), s1.tolist(), lp1.tolist(), accept.tolist()
        rows = batch.rows
        batch.record([rows[i] for i in live_idx], [s0l[i] for i in live_idx], [lp0l[i] for i in live_idx], events)
        second = [i for i in live_idx if acc[i] and rows[i].finish_reason is None]
        batch.record([rows[i] for i in second], [s1l[i] for i in second], [lp1l[i] for i in second], events)
        self.drafted += len(live_idx)
        self.accepted += int(accept.sum())
        took_two = torch.zeros_like(accept)
        took_two[second] = True
        # The next draft: MTP on (hidden at p, s0) and (hidden at p+1, s1); use the last accepted one.
        drafts = self.draft(self.model, hidden, torch.stack([s0, s1], dim=1), pos2, batch.cache, n_slots)  # (B, 2)
        batch.draft = torch.where(took_two, drafts[:, 1], drafts[:, 0])
        batch.last = torch.where(took_two, s1, torch.where(live, s0, batch.last))
        batch.positions = batch.positions + live.long() + took_two.long()


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

