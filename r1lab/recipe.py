"""Run recipes: one TOML file describes the model, the data, each training stage and evaluation.

    preset = "tiny"            # the model preset [model] starts from
    device                     cpu (the default), cuda, cuda:N or mps; --device overrides it
    [model]    ModelConfig fields (override the preset)
    [data]     the corpus and the task family
    [pretrain] [sft] [control] supervised stages (TrainConfig)
    [grpo]     the RL stage (GRPOConfig)
    [eval]     held-out evaluation (EvalConfig)
    [generate] k samples per prompt, graded and filtered into SFT data (GenerateConfig)
    [pipeline] which of R1's four stages start from what (PipelineConfig)
    [cost]     prices and the peak used for MFU

Every key is typed by its dataclass; `--section.field=value` on the command line overrides it.
Each section checks its own values, and the recipe checks what sections imply for each other (a
task family that exists, options it takes, reward names RL knows), so a mistake is one line naming
the key before any work starts. This module describes runs; it runs nothing and imports no torch.
"""

from __future__ import annotations

import inspect
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from r1lab.config import (DEFAULT_DEVICE, ConfigError, ModelConfig, apply_overrides, check_device_name, check_range,
                          from_dict, model_preset, to_dict)
from r1lab.rewards import REWARD_FUNCTIONS, REWARD_NAMES
from r1lab.tasks import FAMILIES


# The JSON fields an rl_files line is read from when data.rl_fields does not name them: the first
# present of each tuple (GSM8K has question/answer, MATH-500 and AIME problem/answer).
RL_FIELD_DEFAULTS = {"prompt": ("prompt", "question", "problem"), "answer": ("answer",)}


@dataclass
class DataConfig:
    """The synthetic reasoning corpus (or the user's files) and the task family RL trains on."""

    task: str = "arithmetic"
    """Task family of the corpus, the RL prompts and the held-out evaluation."""
    difficulty: int = 3
    """The family's difficulty knob (for arithmetic: digits per operand)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the family's `generate` (e.g. ops = ["+"] for arithmetic)."""
    n_problems: int = 20000
    """Problems in the synthetic pretraining corpus (train split only)."""
    scratchpad_share: float = 0.7
    """Share of corpus documents with a worked solution; the others answer directly."""
    slip_rate: float = 0.0
    """Share of slips in worked solutions (as the family's `solution_with_slips` defines it)."""
    direct_extra: float = 0.0
    """Direct-answer documents per problem on top of its one document (1.5: each problem also appears
    as a direct answer once or twice, on average 1.5 times), so a corpus can teach the worked method
    on every problem while answering directly more often than not."""
    direct_slip_rate: float = 0.0
    """Share of slips behind direct answers: the answer is the one a worked solution with this slip
    rate reaches, written without the work (1.0 with kind = "carry": additions that never carry)."""
    slip_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of `solution_with_slips` (e.g. kind = "carry")."""
    files: list[str] = field(default_factory=list)
    """Text (.txt) or JSONL files to pretrain on instead of the synthetic corpus."""
    text_field: str = "text"
    """JSONL field holding a document's text."""
    sft_files: list[str] = field(default_factory=list)
    """JSONL conversations (`messages` with roles) for `r1lab sft`."""
    sft_task_examples: int = 0
    """Cold-start conversations `r1lab sft` generates from data.task's train split (with data.difficulty and
    data.task_options): readable R1-format reasoning, summary and answer (`r1lab.tasks.coldstart`), added to
    data.sft_files (0: none)."""
    sft_task_style: Literal["readable", "corpus"] = "readable"
    """How those conversations reason: "readable" rewrites the worked solution in sentences; "corpus" keeps
    the corpus's own worked solution (its notation, which pretraining taught) and adds the one-line English
    summary, so SFT teaches the R1 turn without making the base relearn the method."""
    rl_files: list[str] = field(default_factory=list)
    """JSONL files of questions with reference answers: GRPO's prompt pool instead of the task family's
    train split, graded by the accuracy reward (math-verify). GSM8K's `#### N` answers are cut to N."""
    rl_fields: dict[str, str] = field(default_factory=dict)
    """Which JSON field of an rl_files line is the prompt and which the answer, e.g. {prompt = "question",
    answer = "answer"}; by default the first of prompt/question/problem, and answer."""
    template: Literal["r1-zero", "r1"] = "r1-zero"
    """Prompt template of the corpus, RL and evaluation."""
    vocab_size: int = 512
    """Size of the byte-level BPE trained on the corpus (must fit model.vocab_size)."""
    seq_len: int = 256
    """Tokens per training sequence (documents are packed)."""
    seed: int = 0
    """Seed of the corpus (problems, slips, document order)."""

    def validate(self) -> None:
        _check(self, "in [0, 1]", "scratchpad_share", "slip_rate", "direct_slip_rate")
        _check(self, ">= 0", "direct_extra")
        for name, low in (("n_problems", 1), ("seq_len", 8), ("vocab_size", 300), ("sft_task_examples", 0)):
            _check(self, f">= {low}", name)
        if not self.text_field:
            raise ConfigError("text_field must not be empty")
        _check_keys(self.rl_fields, RL_FIELD_DEFAULTS, "rl_fields", "key")
        if any(not name for name in self.rl_fields.values()):
            raise ConfigError(f"rl_fields: a field name must not be empty, got {self.rl_fields}")
        self._check_task()

    def _check_task(self) -> None:
        """The family exists and takes this difficulty and these options: one problem tells."""
        if self.task not in FAMILIES:
            raise ConfigError(f"task: unknown task family {self.task!r}; known: {', '.join(sorted(FAMILIES))}")
        family = FAMILIES[self.task]
        if not 1 <= self.difficulty <= family.MAX_DIFFICULTY:
            raise ConfigError(f"difficulty must be in 1..{family.MAX_DIFFICULTY} for task {self.task!r}, "
                              f"got {self.difficulty}")
        _check_options(self.task_options, family.generate, "task_options", ("n", "seed", "split", "difficulty"))
        _check_options(self.slip_options, family.solution_with_slips, "slip_options",
                       ("example", "rng", "slip_rate"))
        try:
            (example,) = family.generate(1, seed=self.seed, split="train", difficulty=self.difficulty,
                                         **self.task_options)
        except ValueError as e:
            raise ConfigError(f"task_options {self.task_options}: {e}") from None
        try:
            family.solution_with_slips(example, random.Random(0), self.slip_rate, **self.slip_options)
        except ValueError as e:
            raise ConfigError(f"slip_options {self.slip_options}: {e}") from None


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (DeepSeek-V3: betas 0.9/0.95, weight decay 0.1)."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine ends at lr * min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warmup from 0."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms, biases or the gate bias)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm (0: off)."""

    def validate(self) -> None:
        _check(self, "> 0", "lr")
        _check(self, "in [0, 1]", "min_lr_ratio")
        _check(self, ">= 0", "warmup_steps")
        _check(self, "in [0, 1)", "beta1", "beta2")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay} and {self.grad_clip}")


@dataclass
class TrainConfig:
    """A supervised stage: pretraining, SFT, or the control's continued pretraining."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    bf16_autocast: bool = True
    """bfloat16 autocast of the matmuls when the run's device is CUDA (false: float32 there too); on a
    CPU, which has no fast bfloat16, training is float32 whatever this says."""
    compile: bool = False
    """Compile the training loss (`torch.compile`, static shapes; the MoE dispatch stays eager). On a
    2-core CPU it cuts a tiny-model step by 7-13% after a one-off compile of ~80 s (seconds once
    Inductor's cache holds it), so it pays only after thousands of steps: the demo's 500 pretraining
    steps stay eager (benchmarks/RESULTS.md, bench_pretrain)."""
    eval_every: int = 100
    """Held-out loss every this many steps (0: only at the end)."""
    eval_batches: int = 4
    """Micro-batches of held-out loss."""
    save_every: int = 200
    """Checkpoint every this many steps (0: only at the end)."""
    log_every: int = 10
    """Metrics line every this many steps."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    init_from: str = ""
    """Checkpoint to start from (empty: a fresh model)."""

    def validate(self) -> None:
        _check(self, ">= 1", "steps", "batch_size", "grad_accum", "eval_batches", "log_every")
        _check(self, ">= 0", "eval_every", "save_every")


@dataclass
class ControlConfig(TrainConfig):
    """The control: the base pretrained further on the same corpus, to measure RL against imitation."""

    match: Literal["flops", "steps"] = "flops"
    """flops: run as many steps as spend the FLOPs the RL stage spent (`steps` is then ignored);
    steps: run `steps` steps."""


@dataclass
class GRPOConfig:
    """R1-Zero reinforcement learning: P prompts x G samples per step, rule-based rewards."""

    steps: int = 100
    """Rollout steps."""
    prompts_per_step: int = 16
    """P: prompts sampled per step."""
    group_size: int = 8
    """G: samples per prompt (one group)."""
    max_new_tokens: int = 160
    """Longest completion."""
    temperature: float = 1.0
    top_p: float = 1.0
    loss: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """grpo: std-normalised advantages, per-sequence mean; dr_grpo: no std, constant normaliser;
    dapo: token mean over the batch (use with eps_high 0.28, dynamic_sampling, overlong_buffer)."""
    epochs: int = 2
    """Optimisation passes over each rollout batch (old log-probs recomputed before the first)."""
    minibatch_size: int = 64
    """Sequences per optimizer step within a pass."""
    eps_low: float = 0.2
    eps_high: float = 0.2
    """Clip range: the ratio is clipped to [1 - eps_low, 1 + eps_high]."""
    beta: float = 0.0
    """k3 KL coefficient to the frozen initial policy (0: no reference model at all)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0,
                                                                   weight_decay=0.0))
    reward_weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    """Weights of the reward functions by name: accuracy, format, language, overlong."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts to refill the batch."""
    max_refill_rounds: int = 3
    """Dynamic sampling gives up refilling after this many extra rounds."""
    overlong_buffer: int = 0
    """DAPO overlong shaping: linear penalty over this many tokens before max_new_tokens (0: off)."""
    bf16_autocast: bool = True
    """bfloat16 autocast of the policy updates when the run's device is CUDA (false: float32 there
    too; rollouts decode in the model's own dtype); on a CPU training is float32 whatever this says."""
    compile_rollouts: bool = False
    """Rollouts on the CPU backend (`Engine(compile=True)`): steps compiled ahead of time, about a
    minute per row class on first use, faster per token after; it reads the weights the optimizer
    updates in place. A model the backend cannot run (a GPU, bf16, an HF policy) decodes eagerly."""
    rollout_backend: Literal["r1lab", "vllm"] = "r1lab"
    """Who samples the rollouts: r1lab's engine, or an in-process vLLM engine sent the policy's weights
    after each update (a Hugging Face policy on a CUDA GPU; `pip install 'r1lab[scale]'`)."""
    vllm_gpu_memory_utilization: float = 0.3
    """With rollout_backend = "vllm": the share of the GPU's memory vLLM takes for its weights and KV cache;
    the policy, its gradients and the optimizer state live in the rest."""
    eval_every: int = 0
    """Held-out greedy pass@1 and format rate on eval.problems problems of data.task's test split every
    this many steps, logged as heldout_* (0: none; the demo and `r1lab eval` evaluate after training)."""
    save_every: int = 25
    """Checkpoint every this many steps."""
    log_every: int = 1
    seed: int = 0
    init_from: str = ""
    """The base checkpoint RL starts from."""

    def validate(self) -> None:
        _check(self, ">= 1", "steps", "prompts_per_step", "max_new_tokens", "epochs", "minibatch_size", "log_every")
        _check(self, ">= 0", "max_refill_rounds", "overlong_buffer", "eval_every", "save_every")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2: advantages compare samples within a group, got {self.group_size}")
        _check(self, ">= 0", "eps_low", "eps_high", "beta")
        _check(self, "> 0", "temperature")
        _check(self, "in (0, 1]", "top_p", "vllm_gpu_memory_utilization")
        if self.rollout_backend == "vllm" and self.compile_rollouts:
            raise ConfigError("compile_rollouts compiles r1lab's engine, which rollout_backend = \"vllm\" does not use")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ConfigError(f"overlong_buffer ({self.overlong_buffer}) must be smaller than max_new_tokens "
                              f"({self.max_new_tokens})")
        _check_keys(self.reward_weights, REWARD_NAMES, "reward_weights", "reward")
        if "overlong" in self.reward_weights and not self.overlong_buffer:
            raise ConfigError("reward_weights.overlong weighs the overlong penalty, which is off: "
                              "set grpo.overlong_buffer > 0")
        if not self.overlong_buffer and not any(self.reward_weights.get(n) for n in REWARD_FUNCTIONS):
            raise ConfigError(f"reward_weights gives no reward a nonzero weight ({self.reward_weights}): "
                              f"every sample would score 0")


@dataclass
class EvalConfig:
    """Held-out evaluation with the R1 report's protocol: k samples, pass@1 = mean correctness."""

    problems: int = 200
    """Held-out problems (the same ones for every model)."""
    k: int = 32
    """Samples per problem at `temperature`: pass@1 is their mean correctness, pass@j for j = 1, 2, 4, ... k."""
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 160
    seed: int = 1234
    samples_shown: int = 4
    """Held-out problems drawn at random (seeded) whose completions the report shows."""

    def validate(self) -> None:
        _check(self, ">= 1", "problems", "k", "max_new_tokens")
        _check(self, ">= 0", "samples_shown")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (the greedy run is made as well), got {self.temperature}")
        _check(self, "in (0, 1]", "top_p")


@dataclass
class GenerateConfig:
    """Rejection sampling and distillation data: k samples per prompt, graded, the good ones kept."""

    k: int = 4
    """Samples per prompt."""
    prompts: int = 256
    """Prompts drawn from data.task's train split when no prompt file is given."""
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 160
    """Longest completion generated (a truncated one is never kept: its format reward is 0)."""
    seed: int = 0
    """Seed of the sampling (and of the task prompts drawn)."""
    max_tokens: int = 0
    """Longest completion kept, in tokens (0: max_new_tokens)."""
    min_language: float = 0.0
    """Least language consistency kept (0: not checked)."""
    per_prompt: int = 0
    """Most samples kept per prompt (0: no cap)."""
    batch_size: int = 256
    """Samples decoded together by the engine."""

    def validate(self) -> None:
        _check(self, ">= 1", "k", "prompts", "max_new_tokens", "batch_size")
        _check(self, ">= 0", "max_tokens", "per_prompt", "temperature")
        _check(self, "in (0, 1]", "top_p")
        _check(self, "in [0, 1]", "min_language")


COMPARE_ROLES = ("r1_zero", "control", "teacher", "student_base", "student", "student_rl")
"""The roles of `pipeline.compare`, in the report's order."""


@dataclass
class PipelineConfig:
    """`r1lab pipeline`: cold-start SFT, reasoning RL, rejection sampling + SFT, a final RL stage."""

    pretrain_base: bool = True
    """Pretrain the base first ([pretrain], data.task's corpus); false: start from `init_from`."""
    init_from: str = ""
    """The base checkpoint when `pretrain_base` is false."""
    cold_start_examples: int = 256
    """Cold-start conversations of stage 1's SFT (data.sft_task_examples of that stage)."""
    sft_seq_len: int = 0
    """Tokens per SFT sequence of stages 1 and 3 (0: data.seq_len): readable reasoning is longer than
    the pretraining corpus's documents, and a conversation longer than this is skipped."""
    rejection_cold_start: bool = True
    """Stage 3 fine-tunes the base on the kept samples plus the cold-start conversations (false: kept only)."""
    rejection_sft_steps: int = 0
    """SFT steps of stage 3 (0: sft.steps)."""
    final_grpo_steps: int = 0
    """GRPO steps of stage 4 (0: grpo.steps)."""
    compare: dict[str, str] = field(default_factory=dict)
    """Models of other runs judged beside the stages, role -> model directory. Roles: r1_zero (GRPO from a
    base, no cold start), control (a compute-matched control of stages 2-4: the cold start's SFT run on for
    their FLOPs), teacher, student_base, student (the teacher distilled into student_base) and
    student_rl (GRPO from student_base). Each is evaluated on the same held-out problems with the same
    settings, is a row of the report, and the report states the margins that pairs of them decide."""

    def validate(self) -> None:
        _check(self, ">= 1", "cold_start_examples")
        _check(self, ">= 0", "rejection_sft_steps", "final_grpo_steps", "sft_seq_len")
        if not self.pretrain_base and not self.init_from:
            raise ConfigError("init_from must name the base checkpoint when pretrain_base = false")
        _check_keys(self.compare, COMPARE_ROLES, "compare", "role")
        empty = [role for role, path in self.compare.items() if not path]
        if empty:
            raise ConfigError(f"compare.{empty[0]} must name a model directory")


@dataclass
class CostConfig:
    """Prices for the cost ledger (defaults: the V3 report's $2 per H800-hour, a cloud vCPU-hour)."""

    gpu_hour_usd: float = 2.0
    cpu_core_hour_usd: float = 0.05
    peak_gflops: float = 0.0
    """Matmul peak per device for MFU; 0 measures it on this machine."""


@dataclass
class Recipe:
    """A whole run description."""

    preset: str = "tiny"
    """Model preset the `[model]` table starts from."""
    device: str = DEFAULT_DEVICE
    """Where every stage builds its model, optimizer and engine: cpu, cuda, cuda:N or mps
    (`--device` on the command line overrides it)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape; keys given here override the preset."""
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, optim=OptimConfig(lr=3e-4, warmup_steps=10)))
    control: ControlConfig = field(default_factory=lambda: ControlConfig(steps=100))
    """The control: continued pretraining of the base, by default for the RL stage's FLOPs."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Rejection sampling / distillation data (`r1lab distill`, `r1lab pipeline`)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    def validate(self) -> None:
        check_device_name(self.device)
        self.model.validate()
        if self.data.vocab_size > self.model.vocab_size:
            raise ConfigError(f"data.vocab_size ({self.data.vocab_size}) exceeds model.vocab_size ({self.model.vocab_size})")
        if self.grpo.reward_weights.get("code") and self.data.rl_files:
            raise ConfigError("grpo.reward_weights.code needs examples with tests to run, and data.rl_files "
                              "lines have only a prompt and an answer: every sample would score 0 (use accuracy)")
        if self.grpo.reward_weights.get("code"):
            # The code reward runs each example's tests; a family without them would score every sample 0.
            family = FAMILIES[self.data.task]
            (example,) = family.generate(1, seed=self.data.seed, split="train", difficulty=self.data.difficulty,
                                         **self.data.task_options)
            if not example.get("tests"):
                raise ConfigError(f"grpo.reward_weights.code needs examples with tests to run, and data.task "
                                  f"{self.data.task!r} has none: every sample would score 0 (use accuracy)")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                preset: str | None = None) -> Recipe:
    """Read a TOML recipe (or start from a preset), apply overrides, validate.

    The `[model]` table overrides the preset named by `preset = "..."` (default "tiny").
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file") from None
    preset_name = preset or data.get("preset", "tiny")
    if not isinstance(preset_name, str):
        raise ConfigError(f"preset must be a string, got {preset_name!r}")
    base = to_dict(model_preset(preset_name))
    model_table = data.get("model", {})
    if not isinstance(model_table, dict):
        raise ConfigError(f"model must be a table, got {model_table!r}")
    merged = dict(data)
    merged["preset"] = preset_name
    merged["model"] = {**base, **model_table}
    try:
        recipe = from_dict(Recipe, merged)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    return apply_overrides(recipe, overrides) if overrides else recipe


def _check(section: Any, want: str, *names: str) -> None:
    """Each named field of `section` is in range `want` (as `check_range` takes it)."""
    for name in names:
        check_range(name, getattr(section, name), want)


def _check_keys(table: dict[str, Any], known: Any, key: str, what: str) -> None:
    """Every key of the table `key` is one of `known` (its keys, if a dict); `what` names one in the error."""
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{key}: unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")


def _check_options(options: dict[str, Any], fn: Any, key: str, fixed: tuple[str, ...]) -> None:
    """Each key of `options` is a keyword argument `fn` takes besides its `fixed` ones."""
    takes = [p for p in inspect.signature(fn).parameters if p not in fixed]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ConfigError(f"{key}: {fn.__module__}.{fn.__name__} takes no option {', '.join(map(repr, unknown))}; "
                          f"it takes: {', '.join(takes) or 'none'}")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as TOML (what a run actually used)."""
    Path(path).write_text(_to_toml(to_dict(recipe)))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _to_toml(data: dict, prefix: str = "") -> str:
    scalars = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if k not in _TABLES]
    out = ""
    if scalars:
        out += (f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n\n"
    for key, value in data.items():
        if key in _TABLES:
            out += _to_toml(value, f"{prefix}.{key}" if prefix else key)
    return out


# Dataclass-valued fields are written as TOML tables; plain dicts (task_options, ...) inline.
_TABLES = {"model", "data", "pretrain", "sft", "control", "grpo", "eval", "generate", "pipeline", "cost", "optim"}
