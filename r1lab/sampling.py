"""Sample k completions per example through the engine and grade them with the reward functions.

What RL rollouts, engine evaluation and every generate-then-grade job (distillation sets, rejection
sampling: k samples per prompt, graded, kept or not) share: an example's question under a chat
template (`question_text`, then the tokenizer's `render_prompt`), the template's stop rule
(`tokenizer.template_stop_ids`: R1-Zero ends at `</answer>`, R1 at EOS), an engine whose context holds the longest
prompt plus the new tokens (`sized_engine`), k samples per example as named records (`sample` ->
`Group` of `Sampled`) and their grades (`grade`). A group's FLOPs come from `cost.generation_flops`.

It knows the engine, the tokenizer's templates and the reward functions; it knows no training
step, no result files and no metrics, and it never loads a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from r1lab.config import ModelConfig
from r1lab.cost import DenseShape, generation_flops
from r1lab.engine import Engine, SamplingParams
from r1lab.rewards import REWARD_FUNCTIONS, overlong_penalty, score_batch
from r1lab.tokenizer import Tokenizer, render_prompt, template_stop_ids


@dataclass
class Sampled:
    """One completion of one example, and (once graded) what the reward functions gave it. An
    OpenAI-compatible endpoint returns text and token counts, no ids: its ids are empty and
    `usage_tokens` holds its count."""
    example: dict
    prompt_ids: list[int]
    token_ids: list[int]          # generated ids, the stop id included
    text: str                     # decoded without special tokens
    finish_reason: str            # "stop", "length" or "abort"
    reward: float = 0.0           # weighted total, set by `grade`
    rewards: dict[str, float] = field(default_factory=dict)  # reward name -> unweighted value, set by `grade`
    usage_tokens: int | None = None  # generated tokens an endpoint reported

    @property
    def truncated(self) -> bool:
        """Cut off by the token limit: it never reached a stop."""
        return self.finish_reason == "length"

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids) if self.usage_tokens is None else self.usage_tokens


@dataclass
class Group:
    """The k completions of one example; none when its prompt was skipped."""
    example: dict
    prompt_ids: list[int]
    samples: list[Sampled]
    skipped: str | None = None    # why nothing was generated (the prompt does not fit the context)
    usage_prompt_tokens: int | None = None  # prompt tokens an endpoint reported (it renders the prompt)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids) if self.usage_prompt_tokens is None else self.usage_prompt_tokens

    def flops(self, config: ModelConfig | DenseShape) -> float:
        """Model FLOPs of generating this group: one prefill, then each sample's decode steps."""
        return 0.0 if self.skipped else generation_flops(config, len(self.prompt_ids),
                                                         [len(s.token_ids) for s in self.samples])


def question_text(example: dict, instruction: str = "") -> str:
    """The user message: the example's prompt, then the instruction on its own line (if any)."""
    return f"{example['prompt']}\n{instruction}" if instruction else str(example["prompt"])


def with_stop_rule(params: SamplingParams, tokenizer: Tokenizer, template: str) -> SamplingParams:
    """`params` with the template's stop ids added to its own (each once)."""
    own = tuple(params.stop_token_ids)
    return replace(params, stop_token_ids=own + tuple(i for i in template_stop_ids(tokenizer, template) if i not in own))


def longest_prompt(tokenizer: Tokenizer, examples: Sequence[dict], template: str, instruction: str = "") -> int:
    """Tokens in the longest rendered prompt of `examples`: what the engine's context must hold."""
    return max(len(render_prompt(tokenizer, question_text(ex, instruction), template)) for ex in examples)


def sized_engine(model, tokenizer: Tokenizer, longest: int, max_new_tokens: int, max_batch_size: int,
                 compile: bool = False) -> Engine:
    """An engine for prompts of up to `longest` tokens and `max_new_tokens` each, within max_seq_len;
    `compile`: on the CPU backend (`Engine(compile=True)`)."""
    return Engine(model, eos_id=tokenizer.eos_id, max_batch_size=max_batch_size,
                  max_len=min(model.config.max_seq_len, longest + max_new_tokens), compile=compile)


def sample(engine: Engine, tokenizer: Tokenizer, examples: Sequence[dict], params: SamplingParams, template: str,
           instruction: str = "", first_index: int = 0) -> list[Group]:
    """`params.n` completions of every example in one `engine.generate` call, under the template's stop rule;
    `first_index`: where `examples` start in a larger list split over processes (`Engine.generate`)."""
    params = with_stop_rule(params, tokenizer, template)
    prompts = [render_prompt(tokenizer, question_text(ex, instruction), template) for ex in examples]
    fits = [i for i, p in enumerate(prompts) if len(p) < engine.max_len]
    outs = engine.generate([prompts[i] for i in fits], params, first_index=first_index) if fits else []
    groups = [Group(ex, p, [], f"prompt of {len(p)} tokens does not fit max_len {engine.max_len}")
              for ex, p in zip(examples, prompts)]
    for slot, i in enumerate(fits):
        ex, prompt, group = examples[i], prompts[i], outs[slot * params.n:(slot + 1) * params.n]
        groups[i] = Group(ex, prompt, [Sampled(ex, prompt, o.token_ids, tokenizer.decode(o.token_ids, skip_special=True),
                                               o.finish_reason) for o in group])
    return groups


def grade(samples: Sequence[Sampled], weights: Mapping[str, float], *, think_opened: bool,
          max_new_tokens: int = 0, overlong_buffer: int = 0) -> list[Sampled]:
    """`samples` with their rewards: each named reward function (`rewards.REWARD_FUNCTIONS`) at its weight.

    `think_opened`: the prompt already opened `<think>` (the R1 template does). A truncated
    completion's format part is 0. With `overlong_buffer`, the DAPO overlong penalty of
    `rewards.overlong_penalty` (against `max_new_tokens`) is added as part "overlong" at
    `weights["overlong"]` (default 1).
    """
    names = [name for name in weights if name in REWARD_FUNCTIONS]
    scored = score_batch([(REWARD_FUNCTIONS[n], weights[n]) for n in names], [s.text for s in samples],
                         [{**s.example, "think_opened": think_opened} for s in samples])
    parts = {name: list(scored.per_function[REWARD_FUNCTIONS[name].__name__]) for name in names}
    totals = list(scored.totals)
    if "format" in parts:
        for i, s in enumerate(samples):
            if s.truncated and parts["format"][i]:
                totals[i] -= weights["format"] * parts["format"][i]
                parts["format"][i] = 0.0
    if overlong_buffer:
        parts["overlong"] = [overlong_penalty(len(s.token_ids), max_new_tokens, overlong_buffer) for s in samples]
        totals = [t + weights.get("overlong", 1.0) * p for t, p in zip(totals, parts["overlong"])]
    return [replace(s, reward=t, rewards={name: values[i] for name, values in parts.items()})
            for i, (s, t) in enumerate(zip(samples, totals))]
