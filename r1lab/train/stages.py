"""Stages of a run, each from a recipe and a run directory: tokenizer + corpus, pretraining, SFT,
R1-Zero GRPO and the control. The command line and the demo call these; each stage writes its own
directory (`checkpoint/`, `metrics.jsonl`) and resumes from it when interrupted.

Each stage first checks what it can without heavy work (that this machine has the recipe's
`device`, the checkpoint it starts from, its data files line by line, that sequences and prompts
fit the model, that a checkpoint it would resume was made by the same recipe) and raises `ConfigError` (or `CheckpointError`) naming the field, file or
value; only then does it measure the matmul peak (when the recipe gives none), train a tokenizer or
build a model, on that device.

Launched by torchrun (`train/distributed.py`), pretrain, SFT and GRPO join the process group
first, run the same checks on every rank, and let rank 0 alone write the run directory (recipe,
tokenizer, checkpoints, metrics); the other ranks wait for the tokenizer and read it.

Run directory layout:
    recipe.toml       the resolved recipe
    tokenizer/        the BPE trained on the corpus
    base/             pretraining           rl/      GRPO from base
    sft/              SFT                   control/ continued pretraining of base
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from r1lab.checkpoint import (CheckpointError, committed_checkpoint, load_checkpoint, load_model_config,
                              load_tokenizer)
from r1lab.config import ConfigError, ModelConfig
from r1lab.cost import train_flops_per_token
from r1lab.device import resolve_device
from r1lab.model import Transformer
from r1lab.recipe import Recipe, save_recipe
from r1lab.engine import SamplingParams
from r1lab.eval import EvalResult, evaluate
from r1lab.sampling import grade, longest_prompt, sample, sized_engine
from r1lab.tasks import get_family
from r1lab.tokenizer import R1, R1_ZERO, R1_ZERO_PROMPT, TOKENIZER_FILE, Tokenizer
from r1lab.train.common import CHECKPOINT, check_resumable
from r1lab.train.distributed import World, barrier, check_divisible, join, sum_floats
from r1lab.train.data import (ConversationSet, PackedStream, encode_documents, encode_texts, file_documents,
                              rl_examples, task_documents, tokenizer_texts)
from r1lab.train.policy import is_r1lab, load_policy, model_max_len, model_shape, policy_dir
from r1lab.train.pretrain import StageResult, train_supervised
from r1lab.train.rl import train_grpo
from r1lab.train.vllm_rollout import check_vllm_device, import_vllm

HELDOUT_DOCS = 200
RL_POOL = 5000


def run_metadata(recipe: Recipe) -> dict:
    """What a checkpoint says about how to prompt and evaluate it."""
    d = recipe.data
    meta = {"template": d.template, "task": d.task, "difficulty": d.difficulty, "task_options": d.task_options,
            "instruction": ""}  # the task's prompt is the whole question: no extra instruction
    if d.rl_files:  # only then, so that checkpoints of runs without them still resume
        meta["rl_files"] = d.rl_files
    return meta


CORPUS_FILE = "corpus.json"  # beside the tokenizer: the [data] section it was trained for


def corpus_config(recipe: Recipe) -> dict:
    """The [data] fields that decide the pretraining corpus (and so the tokenizer trained on it)."""
    not_corpus = ("sft_files", "sft_task_examples", "rl_files", "rl_fields")
    return {k: v for k, v in asdict(recipe.data).items() if k not in not_corpus}


def check_tokenizer_corpus(recipe: Recipe, run_dir: Path) -> None:
    """Refuse a run's tokenizer that was trained for another corpus: a run directory reused with a changed
    [data] section would otherwise pretrain on the new corpus with the old one's merges, silently."""
    path = run_dir / "tokenizer" / CORPUS_FILE
    if not path.exists():  # runs from before the file was written
        return
    saved, now = json.loads(path.read_text()), json.loads(json.dumps(corpus_config(recipe)))
    if saved != now:
        changed = [f"data.{k} {saved.get(k)!r} (now {v!r})" for k, v in now.items() if saved.get(k) != v]
        raise ConfigError(f"{path.parent} was trained for another corpus: {', '.join(changed)}; use another --run, "
                          f"or delete {run_dir} to start over")


def train_tokenizer(recipe: Recipe, run_dir: Path) -> None:
    """Train the run's tokenizer on the corpus and save it in run_dir/tokenizer, with the [data] it is for."""
    d = recipe.data
    if d.files:
        texts = file_documents(d.files, d.text_field)
    else:
        template_text = R1_ZERO_PROMPT if d.template == R1_ZERO else "{prompt}"
        texts = tokenizer_texts(task_documents(d), template_text)
    tokenizer = Tokenizer.train(texts, d.vocab_size)
    # Saved aside and renamed into place: a kill mid-save must not leave a half tokenizer to load.
    tmp = run_dir / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    (tmp / CORPUS_FILE).write_text(json.dumps(corpus_config(recipe), indent=2) + "\n")
    shutil.rmtree(run_dir / "tokenizer", ignore_errors=True)
    os.rename(tmp, run_dir / "tokenizer")


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


def run_pretrain(recipe: Recipe, run_dir: Path, peak_flops: float | None = None, quiet: bool = False) -> StageResult:
    """Pretraining into run_dir/base. `peak_flops` None: the recipe's, else measured after the checks."""
    cfg, d = recipe.pretrain, recipe.data
    world, device = join(resolve_device(recipe.device))
    check_divisible(cfg.batch_size, world, "pretrain.batch_size")
    model_cfg = load_model_config(cfg.init_from) if cfg.init_from else recipe.model
    _check_seq_len(recipe, model_cfg.max_seq_len, f"pretrain.init_from ({cfg.init_from})" if cfg.init_from else "")
    check_resumable(run_dir / "base", "pretrain", model_cfg, cfg.steps, run_metadata(recipe))
    has_tokenizer = (run_dir / "tokenizer" / TOKENIZER_FILE).exists()
    if has_tokenizer:
        _check_vocab(_run_tokenizer(run_dir / "tokenizer"), model_cfg, run_dir / "tokenizer")
        check_tokenizer_corpus(recipe, run_dir)
    elif d.vocab_size > model_cfg.vocab_size:  # the recipe checked its own [model]; not a checkpoint's
        raise ConfigError(f"data.vocab_size ({d.vocab_size}) exceeds the vocab_size ({model_cfg.vocab_size}) of "
                          f"pretrain.init_from ({cfg.init_from})")
    for name in d.files:
        if not Path(name).is_file():
            raise ConfigError(f"data.files: {name}: no such file")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.toml")
        if not has_tokenizer:
            train_tokenizer(recipe, run_dir)
    barrier(world)  # the other ranks read the tokenizer rank 0 trained
    tokenizer = _run_tokenizer(run_dir / "tokenizer")
    _check_vocab(tokenizer, model_cfg, run_dir / "tokenizer")
    stream, heldout = pretraining_data(recipe, tokenizer, cfg.seed)
    peak = _peak(recipe, peak_flops, device, world)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = load_checkpoint(cfg.init_from, device)[0]
    else:
        with device:  # initialised in place: a large model never exists on the CPU first
            model = Transformer(model_cfg)
    return train_supervised(model, tokenizer, stream.batch, heldout, cfg, run_dir / "base", "pretrain", recipe.cost,
                            peak, run_metadata(recipe), quiet, world=world)


def run_control(recipe: Recipe, run_dir: Path, peak_flops: float | None = None, quiet: bool = False,
                rl_flops: float | None = None) -> StageResult:
    """Continued pretraining of the base on the same corpus: what RL is measured against.

    With `control.match = "flops"` it runs as many steps as spend `rl_flops` (the RL stage's total:
    rollouts and updates), at least one.
    """
    cfg = recipe.control
    device = resolve_device(recipe.device)
    if cfg.match == "flops":
        if rl_flops is None:
            raise ConfigError("control.match = \"flops\" needs the RL stage's FLOPs: run the control after grpo")
        cfg = replace(cfg, steps=control_steps(recipe, rl_flops))
    base = run_dir / "base" / CHECKPOINT
    check_resumable(run_dir / "control", "control", load_model_config(base), cfg.steps, run_metadata(recipe))
    model, tokenizer, state = load_checkpoint(base, device)
    stream, heldout = pretraining_data(recipe, tokenizer, cfg.seed + 7)  # batches the base did not see in order
    return train_supervised(model, tokenizer, stream.batch, heldout, cfg, run_dir / "control", "control", recipe.cost,
                            _peak(recipe, peak_flops, device), run_metadata(recipe), quiet,
                            optimizer_state=(state or {}).get("optimizer"))


def control_steps(recipe: Recipe, flops: float) -> int:
    """Supervised steps of the control that spend `flops` (rounded to the nearest step, at least one)."""
    cfg = recipe.control
    per_step = train_flops_per_token(recipe.model, recipe.data.seq_len) * recipe.data.seq_len * cfg.batch_size * cfg.grad_accum
    return max(1, round(flops / per_step))


SFT_NEEDS_DATA = ("sft needs data.sft_files: JSONL files of {\"messages\": [...]} conversations "
                  "(or data.sft_task_examples: cold-start conversations from data.task)")


def run_sft(recipe: Recipe, run_dir: Path, peak_flops: float | None = None, quiet: bool = False) -> StageResult:
    """Supervised fine-tuning of sft.init_from (an r1lab checkpoint or a Hugging Face model directory)
    on data.sft_files and data.sft_task_examples into run_dir/sft, saved in the format it came in."""
    cfg, d = recipe.sft, recipe.data
    world, device = join(resolve_device(recipe.device))
    check_divisible(cfg.batch_size, world, "sft.batch_size")
    if not d.sft_files and not d.sft_task_examples:
        raise ConfigError(SFT_NEEDS_DATA)
    if not cfg.init_from:
        raise ConfigError("sft needs sft.init_from: the checkpoint or Hugging Face model directory to fine-tune")
    init = policy_dir(cfg.init_from, "sft.init_from")
    _check_seq_len(recipe, model_max_len(init), f"sft.init_from ({cfg.init_from})")
    tokenizer = _checkpoint_tokenizer(init, "sft.init_from")
    check_resumable(run_dir / "sft", "sft", model_shape(init), cfg.steps, run_metadata(recipe))
    data = ConversationSet.from_data(tokenizer, d, cfg.seed)
    peak = _peak(recipe, peak_flops, device, world)
    model = load_policy(init, device, tokenizer)
    return train_supervised(model, tokenizer, data.batch, data.fixed_batches(cfg.eval_batches, cfg.batch_size), cfg,
                            run_dir / "sft", "sft", recipe.cost, peak, run_metadata(recipe), quiet, world=world)


def rl_pool(recipe: Recipe, n: int = RL_POOL) -> list[dict]:
    """The problems RL samples its prompts from: data.rl_files, else the task family's train split."""
    d = recipe.data
    if d.rl_files:
        return rl_examples(d.rl_files, d.rl_fields)
    try:
        return get_family(d.task).generate(n, seed=d.seed + 1, split="train", difficulty=d.difficulty,
                                           **d.task_options)
    except ValueError as e:  # the family's problem space is smaller than the pool
        raise ConfigError(f"data.task {d.task!r}: RL draws from {n} train problems: {e}") from None


def run_grpo(recipe: Recipe, run_dir: Path, peak_flops: float | None = None, evaluate=None,
             quiet: bool = False) -> StageResult:
    """R1-Zero GRPO from grpo.init_from (default run_dir/base; an r1lab checkpoint or a Hugging Face model
    directory) into run_dir/rl, saved in the format it came in."""
    cfg = recipe.grpo
    if cfg.rollout_backend == "vllm":  # before the device is probed: vLLM names the GPU it needs
        check_vllm_device(recipe.device)
        import_vllm()
    world, device = join(resolve_device(recipe.device))
    check_divisible(cfg.prompts_per_step, world, "grpo.prompts_per_step")
    if cfg.rollout_backend == "vllm" and world.size > 1:
        raise ConfigError("grpo.rollout_backend = \"vllm\" runs in one process; launch it without torchrun")
    init = init_dir(recipe, "grpo", run_dir)
    if cfg.rollout_backend == "vllm" and is_r1lab(init):
        raise ConfigError(f"grpo.rollout_backend = \"vllm\" serves Hugging Face models and {init} is an r1lab "
                          f"checkpoint: `r1lab export` it and set grpo.init_from to the export")
    max_len = model_max_len(init)
    tokenizer = _checkpoint_tokenizer(init, "grpo.init_from")
    pool = rl_pool(recipe)
    longest = longest_prompt(tokenizer, pool, recipe.data.template)
    if longest + cfg.max_new_tokens > max_len:
        source = "data.rl_files" if recipe.data.rl_files else recipe.data.task
        raise ConfigError(f"the longest {source} prompt ({longest} tokens, template {recipe.data.template!r}) "
                          f"plus grpo.max_new_tokens ({cfg.max_new_tokens}) exceeds the max_seq_len "
                          f"({max_len}) of {init}")
    check_resumable(run_dir / "rl", "grpo", model_shape(init), cfg.steps, run_metadata(recipe))
    if evaluate is None and cfg.eval_every:
        evaluate = heldout_evaluator(recipe, tokenizer)
    peak = _peak(recipe, peak_flops, device, world)
    model = load_policy(init, device, tokenizer)
    reference = load_policy(init, device, tokenizer).eval() if cfg.beta > 0 else None
    torch.manual_seed(cfg.seed)
    return train_grpo(model, tokenizer, pool, cfg, run_dir / "rl", recipe.data.template, recipe.cost,
                      peak, reference=reference, evaluate=evaluate, metadata=run_metadata(recipe), quiet=quiet,
                      max_prompt_len=longest, world=world)


def heldout_examples(recipe: Recipe) -> list[dict]:
    """The eval.problems held-out problems of data.task (its test split) every model of a run is judged on."""
    d, e = recipe.data, recipe.eval
    return get_family(d.task).generate(e.problems, seed=e.seed, split="test", difficulty=d.difficulty, **d.task_options)


def evaluate_heldout(recipe: Recipe, model, tokenizer: Tokenizer, examples: list[dict], out_dir: Path,
                     peak_gflops: float, rows: int, name: str) -> EvalResult:
    """`model` (named `name` in the results) on the held-out examples, greedy and sampled (eval.k at
    eval.temperature, eval.top_p), `rows` sequences decoded at once, the results in `out_dir`."""
    model.eval()
    e, template = recipe.eval, recipe.data.template
    engine = sized_engine(model, tokenizer, longest_prompt(tokenizer, examples, template), e.max_new_tokens, rows)
    params = SamplingParams(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=e.seed)
    return evaluate(engine, tokenizer, examples, k=e.k, params=params, template=template, instruction="",
                    out_dir=out_dir, peak_gflops=peak_gflops, greedy=True,
                    settings={"model": name, "bench": recipe.data.task, "difficulty": recipe.data.difficulty})


def heldout_evaluator(recipe: Recipe, tokenizer: Tokenizer):
    """model -> {"greedy_pass@1", "format_rate"} on eval.problems problems of data.task's test split:
    what `grpo.eval_every` logs during RL (as heldout_*), greedy so that it moves only with the policy."""
    d, cfg = recipe.data, recipe.grpo
    if d.rl_files:
        raise ConfigError("grpo.eval_every evaluates on data.task's test split; with data.rl_files set it has "
                          "none: set grpo.eval_every = 0 and run `r1lab eval` on your held-out file")
    try:
        examples = heldout_examples(recipe)
    except ValueError as e:
        raise ConfigError(f"grpo.eval_every: data.task {d.task!r}: {e}") from None
    longest = longest_prompt(tokenizer, examples, d.template)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)

    def evaluate(model) -> dict[str, float]:
        engine = sized_engine(model, tokenizer, longest, cfg.max_new_tokens, max_batch_size=len(examples))
        samples = [s for group in sample(engine, tokenizer, examples, params, d.template) for s in group.samples]
        graded = grade(samples, {"accuracy": 1.0, "format": 1.0}, think_opened=d.template == R1)
        return {"greedy_pass@1": sum(s.rewards["accuracy"] for s in graded) / len(examples),
                "format_rate": sum(s.rewards["format"] for s in graded) / len(examples)}

    return evaluate


STAGE_DATA = {"pretrain": "files", "sft": "sft_files", "grpo": "rl_files"}  # the [data] key each stage reads


def dry_run(recipe: Recipe, stage: str, run_dir: Path) -> list[str]:
    """What `stage` would lack on this machine, one line each: the device, the model directory it
    starts from, data files. Loads nothing heavy and writes nothing.

    The recipe itself was validated when it was loaded; what makes the stage impossible whatever the
    machine (SFT without conversations or init_from, a data file with a bad line) is a ConfigError.
    """
    cfg, d = getattr(recipe, stage), recipe.data
    if stage == "sft" and not d.sft_files and not d.sft_task_examples:
        raise ConfigError(SFT_NEEDS_DATA)
    if stage == "sft" and not cfg.init_from:
        raise ConfigError("sft needs sft.init_from: the checkpoint or Hugging Face model directory to fine-tune")
    missing = []
    if stage == "grpo" and cfg.rollout_backend == "vllm":
        check_vllm_device(recipe.device)  # the recipe's mistake on any machine
        try:
            import_vllm()
        except ConfigError as e:
            missing.append(str(e))
    try:
        resolve_device(recipe.device)
    except ConfigError as e:
        missing.append(str(e))
    key = STAGE_DATA[stage]
    files = getattr(d, key)
    absent = [name for name in files if not Path(name).is_file()]
    missing += [f"data.{key}: {name}: no such file" for name in absent]
    if stage == "grpo" and files and not absent:
        rl_examples(files, d.rl_fields)  # a bad line is an error now, not after the model is loaded
    if cfg.init_from or stage == "grpo":
        try:
            found = init_dir(recipe, stage, run_dir)
            model_shape(found)
            _checkpoint_tokenizer(found, f"{stage}.init_from")
        except (ConfigError, CheckpointError) as e:
            missing.append(str(e))
    return missing


def init_dir(recipe: Recipe, stage: str, run_dir: Path) -> Path:
    """The committed model directory `stage` starts from: its init_from, else (grpo) the run's base."""
    cfg = getattr(recipe, stage)
    if cfg.init_from:
        return policy_dir(cfg.init_from, f"{stage}.init_from")
    found = committed_checkpoint(run_dir / "base" / CHECKPOINT)
    if found is None:
        raise ConfigError(f"grpo starts from {run_dir / 'base' / CHECKPOINT}, which does not exist: run `r1lab "
                          f"pretrain --run {run_dir}` first, or set grpo.init_from")
    return found


def _peak(recipe: Recipe, peak_flops: float | None, device: torch.device, world: World = World()) -> float:
    """FLOP/s of one device for MFU: the caller's, the recipe's, or measured (a few seconds, so after every
    check; by rank 0 alone, which tells the others)."""
    if peak_flops:
        return peak_flops
    if recipe.cost.peak_gflops:
        return recipe.cost.peak_gflops * 1e9
    from r1lab.hardware import measure_matmul_peak

    return sum_floats([measure_matmul_peak(device=device) * 1e9 if world.is_main else 0.0], world)[0]


def _run_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.load(path)
    except ValueError as e:
        raise ConfigError(f"{e}; delete {path} to train it again") from None


def _checkpoint_tokenizer(path: str | Path, key: str) -> Tokenizer:
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ConfigError(f"{key}: {path} has no tokenizer ({TOKENIZER_FILE}) to prompt it with")
    return tokenizer


def _check_seq_len(recipe: Recipe, max_seq_len: int, checkpoint: str) -> None:
    """Training windows fit the model's positions (`checkpoint` names where the model comes from, if not [model])."""
    if recipe.data.seq_len > max_seq_len:
        where = f"the max_seq_len of {checkpoint}" if checkpoint else "model.max_seq_len"
        raise ConfigError(f"data.seq_len ({recipe.data.seq_len}) exceeds {where} ({max_seq_len})")


def _check_vocab(tokenizer: Tokenizer, model_cfg: ModelConfig, path: Path) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer in {path} has {tokenizer.vocab_size} ids but model.vocab_size is "
                          f"{model_cfg.vocab_size}; use another --run, or delete {path} to train one that fits")
