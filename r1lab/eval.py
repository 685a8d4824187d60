"""Evaluation with the R1 report's protocol: k samples per question, graded by the reward functions.

Metrics (all fractions in 0..1; the markdown shows percentages like the report's tables):
  pass@1        mean correctness over the k samples of each item, averaged over items (R1's pass@1)
  pass@j        the unbiased estimator 1 - C(n-c, j) / C(n, j) (Codex), for each j in `ks`
  cons@k        correctness of the majority answer among the k samples (see `majority_vote`)
  format_rate   mean `rewards.format_reward` (the R1-Zero `<think>..</think><answer>..</answer>` shape)
  answer_rate   share of samples from which a final answer could be extracted
  mean_tokens, max_tokens   generated ids per sample (the final stop id included)
  truncated     share of samples that ended for "length"
  breakdowns    pass@1 and cons@k per "subject" and per "level" where the examples carry them
and the cost: wall time, model FLOPs (prefill + decode), core-hours and MFU against the measured
matmul peak.

What is graded. With `grade="answer"` (default) the graded text is the response after the
reasoning (`split_reasoning`), which is what an OpenAI-compatible endpoint returns as `content`;
a sample whose reasoning never closes gave no answer. `grade="completion"` grades the whole
completion, exactly as an RL reward sees it. Either way the graders are `rewards.accuracy_reward`
and `rewards.format_reward`, applied through `rewards.score_batch`.

Runs are resumable: `samples.jsonl` gets one line per finished item, appended and fsynced chunk by
chunk; a rerun with the same settings skips the items already there. Sampling seeds are fixed per
chunk of items (`chunk_size`), so an interrupted and resumed run draws the same samples as an
uninterrupted one. The OpenAI-endpoint client lives in `r1lab.evalapi`, the tables in
`r1lab.evalreport`. This module generates only through `Engine`; it knows no training code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from r1lab import __version__
from r1lab.checkpoint import model_metadata, model_template, write_text_atomic
from r1lab.config import ConfigError, ModelConfig
from r1lab.engine import Engine, SamplingParams
from r1lab.evalreport import (best_decoding, default_ks, item_scores, pass_at_k,  # noqa: F401 (re-exported)
                              results_markdown, summarize)
from r1lab.hardware import describe_machine, measure_matmul_peak
from r1lab.hf import load_causal_lm
from r1lab.mathcheck import extract_answer, normalize, quick_equal
from r1lab.rewards import accuracy_reward, format_reward, score_batch
from r1lab.tasks import FAMILIES, get_family
from r1lab.tasks.benchmarks import BENCHMARKS, BenchmarkNotFoundError, load_benchmark
from r1lab.sampling import Group, Sampled, longest_prompt, sample, sized_engine, with_stop_rule
from r1lab.tokenizer import R1, R1_ZERO, TEMPLATES, Tokenizer, split_reasoning

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_K = 4                 # the report uses 4-64 samples; 4 keeps a CPU run short
DEFAULT_MAX_NEW_TOKENS = 512
R1_TEMPERATURE, R1_TOP_P = 0.6, 0.95
FAMILY_DEFAULT_LIMIT = 200
GRADES = ("answer", "completion")
SAMPLES_FILE, SETTINGS_FILE = "samples.jsonl", "settings.json"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
RESUME_KEYS = ("model", "bench", "difficulty", "template", "instruction", "grade", "k", "sampling")
"""Settings that must match for a rerun to reuse the samples already in `samples.jsonl`."""


class EvalError(ConfigError):
    """A user-caused evaluation problem (settings, output directory, endpoint); names what is wrong."""


# ------------------------------------------------------------------------------------- voting
@dataclass(frozen=True)
class Vote:
    answer: str | None   # the winning answer, as its first voter wrote it (None: nobody answered)
    index: int | None    # the sample that first gave it: its correctness is the vote's
    votes: int           # samples agreeing with it
    tied: int            # answer groups sharing the top count (1: a clear majority; 0: no answers)


def majority_vote(answers: Sequence[str | None]) -> Vote:
    """The majority among extracted answers; samples without an answer do not vote.

    Two answers agree when their `mathcheck.normalize` forms are equal or `mathcheck.quick_equal`
    is certain they are equal (0.5 and \\frac{1}{2}); each group is compared through its first
    member. A tie goes to the tied answer given first (lowest sample index).
    """
    groups: list[list[int]] = []  # sample indices, the first one representing the group
    keys: list[str] = []
    for i, answer in enumerate(answers):
        if answer is None or not answer.strip():
            continue
        key = normalize(answer)
        for group, group_key in zip(groups, keys):
            if key == group_key or quick_equal(answer, answers[group[0]]) is True:
                group.append(i)
                break
        else:
            groups.append([i])
            keys.append(key)
    if not groups:
        return Vote(None, None, 0, 0)
    top = max(len(g) for g in groups)
    tied = [g for g in groups if len(g) == top]
    return Vote(answers[tied[0][0]], tied[0][0], top, len(tied))  # groups are in order of first appearance


# ------------------------------------------------------------------------------------- data
def load_examples(bench: str, limit: int | None = None, seed: int = 0, difficulty: int = 1,
                  data_dir: str | os.PathLike | None = None, task_options: dict | None = None) -> list[dict]:
    """Examples of a benchmark (math500, gsm8k, aime24, amc23), a task family or a JSONL file.

    A task family gives its held-out split: `generate(limit or 200, seed, "test", difficulty)`; with
    no limit, a small held-out space (arithmetic at difficulty 1) gives all of its problems.
    Benchmarks and files give their first `limit` rows (`seed` and `difficulty` do not apply).
    `task_options` go to the family's `generate` (e.g. the operators a model was trained on).
    """
    options = task_options or {}
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    if bench in FAMILIES:
        family = get_family(bench)
        try:
            return family.generate(limit or FAMILY_DEFAULT_LIMIT, seed, "test", difficulty, **options)
        except ValueError as e:  # too few held-out problems at this difficulty, or a bad difficulty
            found = re.search(r"only (\d+) distinct", str(e))
            if limit is None and found and int(found.group(1)) > 0:  # no limit asked: take all there are
                return family.generate(int(found.group(1)), seed, "test", difficulty, **options)
            raise EvalError(f"bench {bench!r}: {e}") from None
    if bench.lower() in BENCHMARKS or Path(bench).is_file():
        return load_benchmark(bench, limit, data_dir=data_dir)
    raise BenchmarkNotFoundError(f"unknown bench {bench!r}: not a benchmark ({', '.join(BENCHMARKS)}), "
                                 f"a task family ({', '.join(FAMILIES)}) or an existing JSONL file")


def bench_label(bench: str, difficulty: int = 1) -> str:
    """A short name for output paths: the benchmark or family name, or a file's stem."""
    if bench in FAMILIES:
        return bench if difficulty == 1 else f"{bench}-d{difficulty}"
    return bench.lower() if bench.lower() in BENCHMARKS else Path(bench).stem


def default_instruction(template: str) -> str:
    """R1's recommended math instruction for the chat template; none for R1-Zero, whose prompt
    already asks for <answer> tags."""
    return "" if template == R1_ZERO else MATH_INSTRUCTION


# ------------------------------------------------------------------------------------- generation
SampleChunk = Callable[[list[dict], int], list[Group]]
"""(examples of one chunk, index of its first item) -> one `sampling.Group` of k samples per example."""


def chunk_seed(seed: int, start: int) -> int:
    """The sampling seed of the chunk starting at item `start` (stable across processes)."""
    return int.from_bytes(hashlib.sha256(f"r1lab-eval:{seed}:{start}".encode()).digest()[:8], "big") >> 2


def engine_sampler(engine: Engine, tokenizer: Tokenizer, params: SamplingParams, template: str,
                   instruction: str) -> SampleChunk:
    """Generate a chunk with one `sampling.sample` call (n = k per prompt); a prompt that does not fit
    the engine's context gives k empty samples that end for "length"."""

    def sample_chunk(examples: list[dict], start: int) -> list[Group]:
        groups = sample(engine, tokenizer, examples, replace(params, seed=chunk_seed(params.seed, start)), template,
                        instruction)
        return [replace(g, samples=[Sampled(g.example, g.prompt_ids, [], "", "length")] * params.n) if g.skipped
                else g for g in groups]

    return sample_chunk


# ------------------------------------------------------------------------------------- grading
def grade_items(examples: list[dict], generated: list[Group], grade: str, think_opened: bool,
                config: ModelConfig | None) -> list[dict]:
    """One samples.jsonl record per item: every completion graded, plus the majority vote; FLOPs from
    `config` (known for r1lab models only)."""
    flat_examples = [{**ex, "think_opened": think_opened} for ex, g in zip(examples, generated) for _ in g.samples]
    samples = [s for g in generated for s in g.samples]
    graded = [split_reasoning(s.text, think_opened=think_opened)[1] if grade == "answer" else s.text for s in samples]
    correct = score_batch([(accuracy_reward, 1.0)], graded, flat_examples).totals
    # The format is judged on the whole completion, tags and all, whatever part is graded.
    formats = score_batch([(format_reward, 1.0)], [s.text for s in samples], flat_examples).totals
    records, at = [], 0
    for example, gen in zip(examples, generated):
        completions = []
        for s in gen.samples:
            completions.append({"text": s.text, "answer": extract_answer(graded[at]),
                                "correct": correct[at], "format": formats[at],
                                "tokens": s.n_tokens, "finish_reason": s.finish_reason})
            at += 1
        vote = majority_vote([c["answer"] for c in completions])
        record = {"id": example["id"], "prompt": example["prompt"], "gold": example.get("answer"),
                  **{f: example[f] for f in ("subject", "level") if f in example},
                  "prompt_tokens": gen.prompt_tokens, "completions": completions,
                  "n_correct": sum(c["correct"] >= 1.0 for c in completions),
                  "cons": {"answer": vote.answer, "votes": vote.votes, "tied": vote.tied,
                           "correct": completions[vote.index]["correct"] if vote.index is not None else 0.0},
                  "flops": gen.flops(config) if config else None}
        if gen.skipped:
            record["skipped"] = gen.skipped
        records.append(record)
    return records


# ------------------------------------------------------------------------------------- the run
@dataclass
class EvalResult:
    metrics: dict[str, Any]                    # pass@1, pass@j, cons@k, rates, lengths
    breakdown: dict[str, dict[str, dict]]      # field -> value -> {n, pass@1, cons@k}
    cost: dict[str, Any]                       # wall time, FLOPs, core-hours, MFU, items resumed from out_dir
    settings: dict[str, Any]                   # everything needed to reproduce the run
    items: list[dict] = field(default_factory=list, repr=False)  # the samples.jsonl records
    greedy: EvalResult | None = None           # the same items decoded greedily, when asked for

    def best(self) -> dict[str, Any] | None:
        """The better of greedy and sampled pass@1 (None without a greedy run)."""
        if self.greedy is None:
            return None
        best = best_decoding(item_scores(self.greedy.items), item_scores(self.items))
        return {"decoding": best.decoding, "pass@1": best.pass1}

    def spent(self) -> dict[str, float]:
        """`eval_seconds` and `eval_flops`: wall time and model FLOPs of this run and its greedy twin together."""
        runs = [self] if self.greedy is None else [self, self.greedy]
        return {"eval_seconds": sum(r.cost["wall_seconds"] for r in runs),
                "eval_flops": sum(r.cost["flops"] or 0.0 for r in runs)}

    def to_dict(self) -> dict[str, Any]:
        """results.json: everything but the per-item records."""
        doc = {"metrics": self.metrics, "breakdown": self.breakdown, "cost": self.cost, "settings": self.settings}
        if self.greedy is not None:
            g = self.greedy.metrics
            doc["greedy"] = {key: g[key] for key in GREEDY_KEYS if key in g}
            doc["best"] = self.best()
        return doc

    def markdown(self) -> str:
        return results_markdown(self.to_dict())


GREEDY_KEYS = ("pass@1", "format_rate", "answer_rate", "mean_tokens", "truncated", "skipped_items")
"""What results.json keeps of the greedy run (its samples stay in <out>/greedy/samples.jsonl)."""


def with_greedy(sampled: EvalResult, greedy: EvalResult, out_dir: str | os.PathLike | None) -> EvalResult:
    """The sampled result with its greedy twin attached (and its results files rewritten)."""
    if [str(it["id"]) for it in greedy.items] != [str(it["id"]) for it in sampled.items]:
        raise EvalError("the greedy and sampled runs must grade the same items")
    result = replace(sampled, greedy=greedy)
    if out_dir is not None:
        _write_results(Path(out_dir), result)
    return result


def run_evaluation(sample_chunk: SampleChunk, examples: list[dict], *, k: int, settings: dict[str, Any],
                   ks: Sequence[int] | None = None, out_dir: str | os.PathLike | None = None,
                   resume: bool = True, chunk_size: int = 8, grade: str = "answer", think_opened: bool = False,
                   cores: int | None = None, peak_gflops: float | None = None, config: ModelConfig | None = None,
                   progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Sample, grade and summarise `examples` chunk by chunk; the engine-free core of every evaluation."""
    if grade not in GRADES:
        raise EvalError(f"grade must be one of {GRADES}, got {grade!r}")
    ks = sorted(set(ks or default_ks(k)))
    if k < 1 or any(not 1 <= j <= k for j in ks):
        raise EvalError(f"need k >= 1 and every pass@j with 1 <= j <= k, got k={k}, ks={ks}")
    if chunk_size < 1:
        raise EvalError(f"chunk_size must be >= 1, got {chunk_size}")
    examples = [ex if "id" in ex else {**ex, "id": f"item-{i}"} for i, ex in enumerate(examples)]
    ids = [str(ex["id"]) for ex in examples]
    if len(set(ids)) != len(ids):
        raise EvalError("example ids must be unique: " + ", ".join(sorted({i for i in ids if ids.count(i) > 1})[:5]))
    settings = {**settings, "k": k, "ks": ks, "grade": grade, "n_items": len(examples),
                "r1lab_version": __version__, "machine": describe_machine()}
    out = Path(out_dir) if out_dir is not None else None
    done = _open_run(out, settings, resume, {i: ex for i, ex in zip(ids, examples)}) if out else {}
    resumed = sum(i in done for i in ids)
    started = time.perf_counter()
    for start in range(0, len(examples), chunk_size):
        todo = [ex for ex in examples[start:start + chunk_size] if str(ex["id"]) not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        records = grade_items(todo, sample_chunk(todo, start), grade, think_opened, config)
        share = (time.perf_counter() - t0) / len(records)
        for record in records:
            record["seconds"] = share
            done[str(record["id"])] = record
        if out:
            _append(out / SAMPLES_FILE, records)
        if progress:
            progress(sum(i in done for i in ids), len(ids))
    items = [done[i] for i in ids]
    metrics, breakdown = summarize(items, k, ks)
    cost = {**_cost(items, time.perf_counter() - started, cores, peak_gflops), "resumed_items": resumed}
    result = EvalResult(metrics, breakdown, cost, settings, items)
    if out:
        _write_results(out, result)
    return result


def _write_results(out: Path, result: EvalResult) -> None:
    write_text_atomic(out / RESULTS_JSON, json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / RESULTS_MD, result.markdown())


def _cost(items: list[dict], run_seconds: float, cores: int | None, peak_gflops: float | None) -> dict[str, Any]:
    wall = sum(it["seconds"] for it in items)
    flops = None if any(it["flops"] is None for it in items) else sum(it["flops"] for it in items)
    tokens = sum(c["tokens"] for it in items for c in it["completions"])
    return {"wall_seconds": wall, "this_run_seconds": run_seconds, "generated_tokens": tokens,
            "tokens_per_second": tokens / wall if wall else None, "flops": flops, "cores": cores,
            "core_hours": wall * cores / 3600 if cores else None, "peak_gflops": peak_gflops,
            "mfu": flops / wall / (peak_gflops * 1e9) if flops is not None and wall and peak_gflops else None}


# ------------------------------------------------------------------------------------- files
def _open_run(out: Path, settings: dict, resume: bool, by_id: dict[str, dict]) -> dict[str, dict]:
    """Prepare `out`; return the finished records of a matching earlier run (by item id)."""
    out.mkdir(parents=True, exist_ok=True)
    samples, settings_file = out / SAMPLES_FILE, out / SETTINGS_FILE
    done: dict[str, dict] = {}
    if resume and samples.is_file() and samples.stat().st_size:
        if not settings_file.is_file():
            raise EvalError(f"{samples}: found without {SETTINGS_FILE}; pass --fresh to start over")
        old = json.loads(settings_file.read_text(encoding="utf-8"))
        for key in RESUME_KEYS:
            if old.get(key) != settings.get(key):
                raise EvalError(f"{out}: holds samples of a run with {key}={old.get(key)!r}, this run has "
                                f"{settings.get(key)!r}; pass --fresh (resume=False) to discard them, or another --out")
        for record in _read_records(samples):
            key = str(record["id"])
            if key in by_id and record["prompt"] != by_id[key]["prompt"]:
                raise EvalError(f"{samples}: item {key!r} has a different prompt than this run's; pass --fresh")
            done[key] = record
    else:
        samples.unlink(missing_ok=True)
    write_text_atomic(settings_file, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return done


def _read_records(path: Path) -> list[dict]:
    """Records of samples.jsonl; a torn last line (a write cut short) is dropped from the file."""
    data = path.read_bytes()
    records, offset = [], 0
    for line in data.splitlines(keepends=True):
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if offset + len(line) < len(data) or line.endswith(b"\n"):
                raise EvalError(f"{path}: line {len(records) + 1} is not valid JSON; pass --fresh") from None
            with open(path, "r+b") as f:
                f.truncate(offset)
            break
        offset += len(line)
    return records


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------- entry points
def evaluate(engine: Engine, tokenizer: Tokenizer, examples: list[dict], *, k: int = DEFAULT_K,
             params: SamplingParams | None = None, template: str = R1, think_opened: bool | None = None,
             ks: Sequence[int] | None = None, out_dir: str | os.PathLike | None = None, resume: bool = True,
             instruction: str | None = None, grade: str = "answer", chunk_size: int | None = None,
             peak_gflops: float | None = None, settings: dict[str, Any] | None = None,
             progress: Callable[[int, int], None] | None = None, greedy: bool = False) -> EvalResult:
    """Evaluate an in-memory model (behind `engine`) on `examples` with k samples each.

    With `greedy`, the same items are also decoded greedily (one sample, temperature 0) into
    `out_dir/greedy`, and the result carries both and the better of the two (`EvalResult.best`):
    a model is judged at its best decoding.

    `params` default to R1's protocol (temperature 0.6, top-p 0.95); its `n` is set to k, a seed of
    None means 0. Generation stops at the engine's EOS and, under R1-Zero, after `</answer>`.
    `instruction` None means `default_instruction(template)`. `think_opened` None means "the
    template opened <think>" (true for "r1"). `peak_gflops` None or 0 measures the matmul peak once
    (for MFU) when the model is an r1lab Transformer. `chunk_size` defaults to as many prompts as
    fill the engine's batch. With `out_dir`, files are written and a matching earlier run resumed.
    """
    if template not in TEMPLATES:
        raise EvalError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    params = params or SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=R1_TEMPERATURE, top_p=R1_TOP_P)
    params = replace(with_stop_rule(params, tokenizer, template), n=k, seed=0 if params.seed is None else params.seed)
    params.validate()
    think_opened = template == R1 if think_opened is None else think_opened
    instruction = default_instruction(template) if instruction is None else instruction
    config = getattr(engine.model, "config", None)
    config = config if isinstance(config, ModelConfig) else None  # FLOPs are known for r1lab models only
    if not peak_gflops and config:
        peak_gflops = measure_matmul_peak()
    sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed,
                "max_new_tokens": params.max_new_tokens, "stop_token_ids": list(params.stop_token_ids)}
    settings = {"model": None, "bench": None, "difficulty": None, **(settings or {}), "template": template,
                "instruction": instruction, "think_opened": think_opened, "sampling": sampling,
                "max_len": engine.max_len}
    sample_chunk = engine_sampler(engine, tokenizer, params, template, instruction)
    result = run_evaluation(sample_chunk, examples, k=k, settings=settings, ks=ks, out_dir=out_dir, resume=resume,
                            chunk_size=chunk_size or max(1, engine.max_batch_size // k), grade=grade,
                            think_opened=think_opened, cores=torch.get_num_threads(), peak_gflops=peak_gflops,
                            config=config, progress=progress)
    if not greedy:
        return result
    greedy_run = result if params.temperature == 0 else evaluate(  # a greedy run is its own greedy twin
        engine, tokenizer, examples, k=1, params=replace(params, temperature=0.0, top_p=1.0, top_k=0, n=1),
        template=template, think_opened=think_opened, out_dir=None if out_dir is None else Path(out_dir) / "greedy",
        resume=resume, instruction=instruction, grade=grade, peak_gflops=peak_gflops, settings=settings,
        progress=progress)
    return with_greedy(result, greedy_run, out_dir)


def evaluate_checkpoint(model_dir: str | os.PathLike, bench: str, *, k: int = DEFAULT_K,
                        temperature: float = R1_TEMPERATURE, top_p: float = R1_TOP_P,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, limit: int | None = None, seed: int = 0,
                        difficulty: int | None = None, out_dir: str | os.PathLike | None = None,
                        template: str | None = None, batch_size: int = 256, device: torch.device | None = None,
                        **options: Any) -> EvalResult:
    """`r1lab eval --model DIR`: load an r1lab checkpoint or Hugging Face directory and evaluate it.

    The template comes from the checkpoint metadata unless given; results go to `out_dir`, by
    default `<model_dir>/eval/<bench>`. The model is loaded on `device` (default: the CPU).
    `options` go to `evaluate` (ks, resume, instruction, ...).
    When the bench is the task family the checkpoint was trained on (metadata "task"), its
    difficulty (unless given) and task options come from the metadata too, so the held-out set is
    the one the training run evaluated.
    """
    model_dir = Path(model_dir)
    meta = model_metadata(model_dir)
    own_task = bench in FAMILIES and meta.get("task") == bench
    if difficulty is None:
        difficulty = int(meta.get("difficulty", 1)) if own_task else 1
    examples = load_examples(bench, limit, seed, difficulty, task_options=meta.get("task_options") if own_task else None)
    template = template or model_template(model_dir)
    decoder, tokenizer = load_causal_lm(model_dir, device=device)
    if tokenizer is None:
        raise EvalError(f"{model_dir}: has no tokenizer.json; evaluation needs the model's tokenizer")
    instruction = options.get("instruction")
    if instruction is None and own_task:
        instruction = meta.get("instruction")  # how the training run prompted its own task
    instruction = default_instruction(template) if instruction is None else instruction
    engine = sized_engine(decoder, tokenizer, longest_prompt(tokenizer, examples, template, instruction),
                          max_new_tokens, batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    settings = {"model": str(model_dir.resolve()), "bench": bench_label(bench, difficulty), "limit": limit,
                "difficulty": difficulty if bench in FAMILIES else None}
    out = Path(out_dir) if out_dir is not None else model_dir / "eval" / bench_label(bench, difficulty)
    return evaluate(engine, tokenizer, examples, k=k, params=params, template=template, out_dir=out,
                    settings=settings, **{**options, "instruction": instruction})
