"""`r1lab pipeline`: R1's four stages end to end on a tiny model, each evaluated and costed, and a second
invocation that skips the finished stages and resumes an interrupted one."""

import json

import pytest

from r1lab import pipeline as pipeline_mod
from r1lab.checkpoint import read_trainer_summary
from r1lab.cli import main
from r1lab.config import ConfigError
from r1lab.cost import StageCost
from r1lab.pipeline import COMPARED, STAGES, STATE_FILE, checkpoint_of
from r1lab.recipe import load_recipe

QUICK = ["--model.dim=64", "--model.n_layers=2", "--model.n_dense_layers=1", "--model.n_heads=2",
         "--model.inter_dim=128", "--model.moe_inter_dim=32", "--model.kv_lora_rank=32", "--model.qk_nope_head_dim=16",
         "--model.qk_rope_head_dim=8", "--model.v_head_dim=16", "--model.n_routed_experts=4",
         "--model.n_activated_experts=2", "--model.max_seq_len=256", "--model.original_seq_len=256",
         "--model.vocab_size=512", "--data.vocab_size=512", "--data.n_problems=300", "--data.difficulty=2",
         "--data.seq_len=160", "--data.template=r1", "--data.task_options={ops = [\"+\"]}",
         "--pretrain.steps=6", "--pretrain.batch_size=4", "--pretrain.eval_every=0", "--pretrain.eval_batches=1",
         "--sft.steps=3", "--sft.batch_size=4", "--sft.eval_batches=1", "--sft.eval_every=0",
         "--sft.optim.warmup_steps=0", "--grpo.steps=2", "--grpo.prompts_per_step=2", "--grpo.group_size=2",
         "--grpo.max_new_tokens=16", "--grpo.minibatch_size=4", "--grpo.epochs=1",
         "--grpo.reward_weights={accuracy = 1.0, format = 0.5, language = 0.1}", "--generate.k=2",
         "--generate.prompts=4", "--generate.max_new_tokens=16", "--eval.problems=4", "--eval.k=2",
         "--eval.max_new_tokens=16", "--pipeline.cold_start_examples=16", "--pipeline.final_grpo_steps=1",
         "--pipeline.sft_seq_len=192",
         "--cost.peak_gflops=100"]


def _recipe(tmp_path):
    path = tmp_path / "quick.toml"
    path.write_text("preset = \"tiny\"\n")
    return path


def _state(run):
    return json.loads((run / STATE_FILE).read_text())


def test_pipeline_runs_every_stage_then_skips_them(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    starts = {}
    for name, section in (("run_sft", "sft"), ("run_grpo", "grpo")):
        real = getattr(pipeline_mod, name)

        def spy(recipe, stage_dir, *args, _real=real, _section=section, **kwargs):
            starts[stage_dir.name] = (getattr(recipe, _section).init_from, getattr(recipe, _section).steps,
                                      recipe.data.sft_task_examples, recipe.data.seq_len)
            return _real(recipe, stage_dir, *args, **kwargs)

        monkeypatch.setattr(pipeline_mod, name, spy)
    code = main(["pipeline", "--recipe", str(_recipe(tmp_path)), "--run", str(run), "--quiet", *QUICK])
    out = capsys.readouterr()
    assert code == 0, out.err
    state = _state(run)
    assert list(state["stages"]) == list(STAGES)
    steps = {"base": 6, "cold_start": 3, "reasoning_rl": 2, "rejection_sft": 3, "final_rl": 1}
    for stage, n in steps.items():
        assert read_trainer_summary(checkpoint_of(run, stage))["step"] == n
        assert (run / stage / "eval" / "results.json").is_file() or stage == "base"
    # Each stage starts from the one before it, except stage 3, which fine-tunes the base (not stage 2).
    base, cold, rej = (str(checkpoint_of(run, s)) for s in ("base", "cold_start", "rejection_sft"))
    # The SFT stages read pipeline.sft_seq_len, pretraining and RL data.seq_len.
    assert starts == {"cold_start": (base, 3, 16, 192), "reasoning_rl": (cold, 2, 0, 160),
                      "rejection_sft": (base, 3, 16, 192), "final_rl": (rej, 1, 0, 160)}
    stats = json.loads((run / "rejection_sft" / "generate" / "kept.jsonl.stats.json").read_text())
    assert stats["samples"] == 4 * 2 and stats["source"]["model"] == str(checkpoint_of(run, "reasoning_rl").resolve())
    summary = json.loads((run / "summary.json").read_text())
    for stage in STAGES:
        row = summary["stages"][stage]
        assert 0 <= row["greedy_pass@1"] <= 1 and 0 <= row["sampled_pass@1"] <= 1 and row["mean_tokens"] > 0
        assert row["cost_dollars"] > 0
    assert summary["cost"]["dollars"] == pytest.approx(sum(s["cost_dollars"] for s in summary["stages"].values()))
    report = (run / "report.md").read_text()
    assert all(label in report for label in pipeline_mod.LABELS.values()) and "| **total** |" in report

    # A second invocation trains, samples and evaluates nothing.
    monkeypatch.undo()
    original_evaluate = pipeline_mod.evaluate_stage

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("run_pretrain", "run_sft", "run_grpo", "generate_step", "evaluate_stage"):
        monkeypatch.setattr(pipeline_mod, name, refuse)
    code = main(["pipeline", "--recipe", str(_recipe(tmp_path)), "--run", str(run), "--quiet", *QUICK])
    assert code == 0, capsys.readouterr().err
    assert _state(run)["stages"] == state["stages"]

    # A model of another run named in pipeline.compare is evaluated once, and only it, then is a report row.
    evaluated = []
    monkeypatch.setattr(pipeline_mod, "evaluate_stage", lambda r, ckpt, out, *a: evaluated.append((ckpt, out))
                        or original_evaluate(r, ckpt, out, *a))
    teacher = checkpoint_of(run, "reasoning_rl")
    compare = [f'--pipeline.compare={{teacher = "{teacher}"}}']
    for _ in range(2):
        code = main(["pipeline", "--recipe", str(_recipe(tmp_path)), "--run", str(run), "--quiet", *QUICK, *compare])
        assert code == 0, capsys.readouterr().err
    assert evaluated == [(teacher, run / "compare" / "teacher" / "eval")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compared"]["teacher"]["greedy_pass@1"] == summary["stages"]["reasoning_rl"]["greedy_pass@1"]
    assert summary["compared"]["teacher"]["training_flops"] == read_trainer_summary(teacher)["flops"] > 0
    assert "| teacher |" in (run / "report.md").read_text() and _state(run)["stages"] == state["stages"]


def test_an_interrupted_stage_resumes_and_finished_ones_are_skipped(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    original = pipeline_mod.evaluate_stage

    def interrupted(recipe, checkpoint, out_dir, *args):
        if out_dir.parent.name == "rejection_sft":
            raise KeyboardInterrupt
        return original(recipe, checkpoint, out_dir, *args)

    monkeypatch.setattr(pipeline_mod, "evaluate_stage", interrupted)
    code = main(["pipeline", "--recipe", str(_recipe(tmp_path)), "--run", str(run), "--quiet", *QUICK])
    assert code == 130
    first = _state(run)["stages"]
    assert list(first) == ["base", "cold_start", "reasoning_rl"]
    assert read_trainer_summary(checkpoint_of(run, "rejection_sft"))["step"] == 3  # trained, not evaluated
    monkeypatch.setattr(pipeline_mod, "evaluate_stage", original)
    trained = []
    for name in ("run_pretrain", "run_sft", "run_grpo"):
        real = getattr(pipeline_mod, name)
        monkeypatch.setattr(pipeline_mod, name, lambda r, d, *a, _real=real, _n=name, **k:
                            trained.append((_n, d.name)) or _real(r, d, *a, **k))
    code = main(["pipeline", "--recipe", str(_recipe(tmp_path)), "--run", str(run), "--quiet", *QUICK])
    assert code == 0, capsys.readouterr().err
    second = _state(run)["stages"]
    assert all(second[s]["finished_at"] == first[s]["finished_at"] for s in first)  # not redone
    assert trained == [("run_sft", "rejection_sft"), ("run_grpo", "final_rl")]
    metrics = (run / "rejection_sft" / "sft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [3]  # logged once: the resumed stage trained no step again

    # A stage whose evaluation kept no per-item scores (a run of an older r1lab) is evaluated again, not retrained.
    state = _state(run)
    del state["stages"]["cold_start"]["eval"]["scores"]
    (run / STATE_FILE).write_text(json.dumps(state))
    evaluated, trained = [], []
    monkeypatch.setattr(pipeline_mod, "evaluate_stage", lambda r, ckpt, out, *a: evaluated.append(out.parent.name)
                        or original(r, ckpt, out, *a))
    code = main(["pipeline", "--recipe", str(_recipe(tmp_path)), "--run", str(run), "--quiet", *QUICK])
    assert code == 0, capsys.readouterr().err
    third = _state(run)["stages"]
    assert evaluated == ["cold_start"] and trained == []
    timeless = lambda row: {k: v for k, v in row.items() if k != "eval_seconds"}  # noqa: E731
    assert timeless(third["cold_start"]["eval"]) == timeless(second["cold_start"]["eval"])  # greedy, seeded: same scores
    assert [c["stage"] for c in third["cold_start"]["cost"]] == [c["stage"] for c in second["cold_start"]["cost"]]
    assert third["cold_start"]["finished_at"] == second["cold_start"]["finished_at"]


def _item_scores(mean: float, k: int, n: int = 200) -> dict[str, float]:
    """n items' pass@1 over k samples with the given mean (to 1/(n k)), the correct samples on the first items."""
    left = round(mean * n * k)
    scores = {}
    for i in range(n):
        scores[str(i)], left = min(k, left) / k, left - min(k, left)
    return scores


def _crafted_state(rows: dict[str, tuple[float, float]], compared: dict[str, tuple[float, float]]) -> dict:
    """pipeline.json as run_pipeline writes it, with chosen (greedy, sampled) pass@1 per stage and compared model
    (200 items, 4 samples each); every stage and evaluation cost 36 s on one core ($0.0005 at $0.05 per
    core-hour)."""
    def done(name, greedy, sampled):
        line = StageCost(name, 1e9, 36.0, 1, "cpu-core", 1e11, 0.05).as_dict()
        return {"checkpoint": f"/runs/{name}", "finished_at": "2026-12-05T10:00:00+00:00", "cost": [line],
                "eval": {"greedy_pass@1": greedy, "sampled_pass@1": sampled, "cons@k": sampled + 0.05,
                         "format_rate": 1.0, "mean_tokens": 40.0, "language_consistency": 0.5,
                         "eval_seconds": 1.0, "eval_flops": 1.0,
                         "scores": {"greedy": _item_scores(greedy, 1), "sampled": _item_scores(sampled, 4)}}}
    return {"stages": {n: done(n, *v) for n, v in rows.items()},
            "compared": {n: {**done(n, *v), "training": {"step": 25, "seconds": 72.0, "flops": 4.3e12}}
                         for n, v in compared.items()}}


def test_the_report_puts_stages_and_compared_models_side_by_side_with_their_margins():
    recipe = load_recipe(None, ["--eval.k=4", '--pipeline.compare={r1_zero = "a", teacher = "b", student_base = "c", '
                                'student = "d", student_rl = "e", control = "f"}'])
    stages = {"base": (0.005, 0.14), "cold_start": (0.40, 0.35), "reasoning_rl": (0.55, 0.50),
              "rejection_sft": (0.50, 0.45), "final_rl": (0.62, 0.60)}
    compared = {"r1_zero": (0.645, 0.623), "teacher": (0.645, 0.623), "student_base": (0.005, 0.14),
                "student": (0.58, 0.57), "student_rl": (0.645, 0.623), "control": (0.66, 0.6)}
    state = _crafted_state(stages, compared)
    summary = pipeline_mod.summarize(recipe, state)
    assert summary["stages"]["base"]["best_pass@1"] == 0.14 and summary["stages"]["base"]["best_decoding"] == "sampled"
    assert summary["stages"]["final_rl"]["best_decoding"] == "greedy"
    margins = {(m["a"], m["b"]): round(m["margin"], 4) for m in summary["margins"]}
    assert margins == {("reasoning_rl", "cold_start"): 0.15, ("final_rl", "rejection_sft"): 0.12,
                       ("final_rl", "cold_start"): 0.22, ("final_rl", "base"): 0.48, ("final_rl", "r1_zero"): -0.025, ("final_rl", "control"): -0.04,
                       ("student", "student_base"): 0.44,
                       ("student", "student_rl"): -0.065, ("student", "teacher"): -0.065}
    # the ledger counts every stage and every compared model's evaluation: 11 lines of $0.0005
    assert summary["cost"]["dollars"] == pytest.approx(11 * 0.0005)
    text = pipeline_mod.report(recipe, summary, pipeline_mod.ledger_of(state))
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    rows = lines[head + 2:lines.index("", head)]
    labels = [row.split(" | ")[0][2:] for row in rows]
    assert labels == ["base", COMPARED["r1_zero"], *[pipeline_mod.LABELS[s] for s in STAGES[1:]], COMPARED["control"], "teacher",
                      "student's base", "distilled student", "RL on the student"]
    assert "| model | greedy pass@1 | pass@1, T=0.6 | best | cons@4 | format rate |" in text
    # a stage's training FLOPs are its own ledger lines' (the crafted line is named after the stage, not
    # "eval ..."); a compared model's, those its checkpoint recorded
    assert rows[0] == "| base | 0.5% | 14.0% | **14.0%** | 19.0% | 100.0% | 40.0 | 50.0% | 1e+09 | $0.0005 |"
    assert rows[-1] == ("| RL on the student | 64.5% | 62.3% | **64.5%** | 67.3% | 100.0% | 40.0 | 50.0% | 4.3e+12 | "
                        "its own run's |")
    assert summary["compared"]["teacher"]["training_flops"] == 4.3e12
    assert "- 4. final RL beats base: +48.0 points (paired standard error 3.5; a win needs more than two)" in text
    assert "- distilled student does not beat RL on the student: -6.5 points" in text
    assert "- distilled student beats student's base: +44.0 points" in text
    assert "scores" not in summary["stages"]["base"]  # per-item scores stay in pipeline.json
    # each of stages 1-4 trained on 1e9 FLOPs: the control is the cold start's SFT for four times its steps
    steps = 4 * recipe.sft.steps
    assert summary["control_sft_steps"] == steps
    assert (f"`r1lab sft --recipe RECIPE --sft.init_from=/runs/base --sft.steps={steps} "
            f"--data.sft_task_examples={recipe.pipeline.cold_start_examples} --run CONTROL_RUN`") in text


def test_the_control_command_sets_what_the_cold_start_sets_and_nothing_else():
    """The printed `r1lab sft` overrides are the cold start's own data fields where they differ from the recipe's."""
    recipe = load_recipe(None, ["--pipeline.sft_seq_len=96", "--data.seq_len=128", "--pipeline.cold_start_examples=64"])
    state = _crafted_state({"base": (0.0, 0.1), "cold_start": (0.5, 0.4), "reasoning_rl": (0.5, 0.4),
                            "rejection_sft": (0.5, 0.4), "final_rl": (0.5, 0.4)}, {})
    text = pipeline_mod.report(recipe, pipeline_mod.summarize(recipe, state), pipeline_mod.ledger_of(state))
    assert f"--sft.steps={4 * recipe.sft.steps} --data.sft_task_examples=64 --data.seq_len=96 --run CONTROL_RUN`" in text
    same = load_recipe(None, ["--pipeline.sft_seq_len=128", "--data.seq_len=128"])
    text = pipeline_mod.report(same, pipeline_mod.summarize(same, state), pipeline_mod.ledger_of(state))
    assert "--data.seq_len" not in text and "--data.sft_files" not in text


def test_a_margin_within_two_paired_standard_errors_is_not_a_win():
    """+1 point carried by 2 of 200 items: more than zero, not more than noise."""
    recipe = load_recipe(None, [])
    state = _crafted_state({"base": (0.30, 0.25), "cold_start": (0.1, 0.1), "reasoning_rl": (0.1, 0.1),
                            "rejection_sft": (0.1, 0.1), "final_rl": (0.31, 0.2)}, {})
    (m,) = [m for m in pipeline_mod.summarize(recipe, state)["margins"] if (m["a"], m["b"]) == ("final_rl", "base")]
    assert m["margin"] == pytest.approx(0.01) and 0.005 < m["stderr"] and not m["beat"]
    text = pipeline_mod.report(recipe, pipeline_mod.summarize(recipe, state), pipeline_mod.ledger_of(state))
    assert "- 4. final RL does not beat base: +1.0 points" in text


def test_without_compared_models_the_report_has_no_margin_to_them():
    recipe = load_recipe(None, [])
    state = _crafted_state({"base": (0.2, 0.3), "cold_start": (0.1, 0.1), "reasoning_rl": (0.1, 0.1),
                            "rejection_sft": (0.1, 0.1), "final_rl": (0.25, 0.2)}, {})
    summary = pipeline_mod.summarize(recipe, state)
    assert summary["compared"] == {}
    assert [(m["a"], m["b"]) for m in summary["margins"]] == [("reasoning_rl", "cold_start"), ("final_rl", "rejection_sft"),
                                                              ("final_rl", "cold_start"), ("final_rl", "base")]
    text = pipeline_mod.report(recipe, summary, pipeline_mod.ledger_of(state))
    assert "- 4. final RL does not beat base: -5.0 points" in text and "its own run's" not in text


def test_compared_roles_and_directories_are_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="compare: unknown role 'judge'; known: r1_zero, control, teacher"):
        load_recipe(None, ['--pipeline.compare={judge = "x"}'])
    with pytest.raises(ConfigError, match="compare.teacher must name a model directory"):
        load_recipe(None, ['--pipeline.compare={teacher = ""}'])
    run = tmp_path / "run"
    code = main(["pipeline", "--recipe", str(_recipe(tmp_path)), "--run", str(run), "--quiet", *QUICK,
                 f'--pipeline.compare={{student = "{tmp_path / "nowhere"}"}}'])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(f"pipeline.compare.student: {tmp_path / 'nowhere'}: "
                                                    "no such model directory")
    assert not run.exists()
