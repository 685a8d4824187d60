"""Numbers and tables from graded evaluation records: pass@k, summaries, results.md, comparisons.

A record is one line of samples.jsonl (see `r1lab.eval.grade_items`): an item's completions with
their correctness, format flag, length and finish reason, plus its majority vote. This module only
counts and formats; it generates and grades nothing, so a results.json can be rebuilt from
samples.jsonl alone. Fractions stay in 0..1 in JSON; tables print percentages as the R1 report does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1lab.config import ConfigError

BREAKDOWN_FIELDS = ("subject", "level")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def default_ks(k: int) -> list[int]:
    """The pass@j a run reports by default: 1, 2, 4, ... up to k, and k itself."""
    return sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _item_pass1(item: dict) -> float:
    return sum(c["correct"] for c in item["completions"]) / len(item["completions"])


def summarize(items: list[dict], k: int, ks: Sequence[int]) -> tuple[dict[str, Any], dict[str, dict]]:
    """(metrics, breakdown) of graded records; see `r1lab.eval` for the definitions."""
    samples = [c for it in items for c in it["completions"]]
    metrics: dict[str, Any] = {"items": len(items), "samples": len(samples),
                               "pass@1": _mean([_item_pass1(it) for it in items])}
    for j in ks:
        if j > 1:
            metrics[f"pass@{j}"] = _mean([pass_at_k(len(it["completions"]), it["n_correct"], j) for it in items])
    metrics[f"cons@{k}"] = _mean([it["cons"]["correct"] for it in items])
    metrics["cons_ties"] = sum(it["cons"]["tied"] > 1 for it in items)
    metrics["format_rate"] = _mean([c["format"] for c in samples])
    metrics["answer_rate"] = _mean([c["answer"] is not None for c in samples])
    metrics["mean_tokens"] = _mean([c["tokens"] for c in samples])
    metrics["max_tokens"] = max((c["tokens"] for c in samples), default=None)
    metrics["truncated"] = _mean([c["finish_reason"] == "length" for c in samples])
    metrics["skipped_items"] = sum("skipped" in it for it in items)
    breakdown: dict[str, dict] = {}
    for name in BREAKDOWN_FIELDS:
        groups: dict[str, list[dict]] = {}
        for it in items:
            if name in it:
                groups.setdefault(str(it[name]), []).append(it)
        if groups:
            breakdown[name] = {value: {"items": len(group), "pass@1": _mean([_item_pass1(it) for it in group]),
                                       f"cons@{k}": _mean([it["cons"]["correct"] for it in group])}
                               for value, group in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}
    return metrics, breakdown


def _sort_key(value: str) -> tuple[int, Any]:
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)


# ------------------------------------------------------------------------------------- formatting
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _rows(doc: dict[str, Any]) -> list[tuple[str, str, float | None, bool]]:
    """(key, label, value, is a percentage) of the main table, in display order."""
    m, cost = doc["metrics"], doc["cost"]
    rows = [("items", "items", m.get("items"), False),
            ("k", "samples per item (k)", doc["settings"].get("k"), False)]
    if "greedy" in doc:
        best = doc["best"]
        rows += [("greedy pass@1", "greedy pass@1", doc["greedy"].get("pass@1"), True),
                 ("best decoding", "best decoding (the higher pass@1)", best["decoding"], False),
                 ("best pass@1", "pass@1 at the best decoding", best["pass@1"], True)]
    rows += [(key, key, m[key], True) for key in m if key.startswith("pass@")]
    rows += [(key, f"{key} (majority vote)", m[key], True) for key in m if key.startswith("cons@")]
    rows += [("cons_ties", "items with a tied vote", m.get("cons_ties"), False),
             ("format_rate", "format rate", m.get("format_rate"), True),
             ("answer_rate", "answer extracted", m.get("answer_rate"), True),
             ("mean_tokens", "mean tokens", m.get("mean_tokens"), False),
             ("max_tokens", "max tokens", m.get("max_tokens"), False),
             ("truncated", "truncated (length)", m.get("truncated"), True),
             ("skipped_items", "items whose prompt did not fit", m.get("skipped_items"), False),
             ("wall_seconds", "wall time (s)", cost.get("wall_seconds"), False),
             ("flops", "model FLOPs", cost.get("flops"), False),
             ("core_hours", "CPU core-hours", cost.get("core_hours"), False),
             ("mfu", "MFU", cost.get("mfu"), True)]
    return rows


_FORMATS = {"flops": ".3g", "core_hours": ".4f", "mean_tokens": ".1f", "wall_seconds": ".1f"}
"""How the main table prints the numbers that are neither percentages nor counts."""


def _fmt(key: str, value: float | None, pct: bool) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.2f}" if key == "mfu" else _pct(value)
    return format(value, _FORMATS[key]) if key in _FORMATS else str(value)


def results_markdown(doc: dict[str, Any]) -> str:
    """results.md: the main table (percentages), breakdowns, then the settings."""
    s = doc["settings"]
    sampling = s.get("sampling") or {}
    lines = [f"# r1lab eval: {s.get('bench') or 'examples'}", "",
             f"model: `{s.get('model')}`", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {label}{' (%)' if pct else ''} | {_fmt(key, value, pct)} |" for key, label, value, pct in _rows(doc)]
    k = s.get("k")
    for name, groups in doc.get("breakdown", {}).items():
        lines += ["", f"## by {name}", "", f"| {name} | items | pass@1 (%) | cons@{k} (%) |", "|---|---:|---:|---:|"]
        lines += [f"| {value} | {g['items']} | {_pct(g['pass@1'])} | {_pct(g[f'cons@{k}'])} |"
                  for value, g in groups.items()]
    settings = (f"template `{s.get('template')}`, temperature {sampling.get('temperature')}, "
                f"top-p {sampling.get('top_p')}, max new tokens {sampling.get('max_new_tokens')}, "
                f"seed {sampling.get('seed')}, graded: {s.get('grade')}; {s.get('machine', '')}")
    lines += ["", "## settings", "", settings]
    if s.get("instruction"):
        lines += ["", f"instruction: {s['instruction']}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- comparing
def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json, given the file or the directory holding it."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such results file (run `r1lab eval` first)")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not {"metrics", "cost", "settings"} <= doc.keys():
        raise ConfigError(f"{file}: not an r1lab results.json (needs metrics, cost and settings)")
    return doc


def _label(path: str | os.PathLike) -> str:
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    return "/".join(directory.resolve().parts[-2:])


def compare_results(a: str | os.PathLike, b: str | os.PathLike) -> str:
    """A markdown table of two runs' main numbers side by side, with B - A."""
    docs = [load_results(a), load_results(b)]
    rows = [{key: (label, value, pct) for key, label, value, pct in _rows(doc)} for doc in docs]
    keys = list(rows[0]) + [key for key in rows[1] if key not in rows[0]]
    la, lb = _label(a), _label(b)
    lines = [f"| metric | A: {la} | B: {lb} | B - A |", "|---|---:|---:|---:|"]
    for key in keys:
        label, _, pct = rows[0].get(key) or rows[1][key]
        va, vb = (r.get(key, (None, None, pct))[1] for r in rows)
        delta = "-"
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and key != "flops":
            delta = f"{100 * (vb - va):+.1f}" if pct else f"{vb - va:+.4g}"
        lines.append(f"| {label}{' (%)' if pct else ''} | {_fmt(key, va, pct)} | {_fmt(key, vb, pct)} | {delta} |")
    sa, sb = docs[0]["settings"], docs[1]["settings"]
    for name in ("bench", "template", "k"):
        if sa.get(name) != sb.get(name):
            lines.append(f"\nnote: the runs differ in {name} ({sa.get(name)!r} vs {sb.get(name)!r})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- verdicts
GREEDY, SAMPLED = "greedy", "sampled"


def item_scores(items: list[dict]) -> dict[str, float]:
    """Item id -> its pass@1 (mean correctness of its samples; 0 or 1 for one greedy sample)."""
    return {str(it["id"]): _item_pass1(it) for it in items}


@dataclass(frozen=True)
class BestDecoding:
    """A model's held-out score at its best decoding: the higher of greedy and sampled pass@1."""

    decoding: str                 # GREEDY or SAMPLED
    pass1: float
    scores: dict[str, float]      # item id -> score at that decoding


def best_decoding(greedy: dict[str, float], sampled: dict[str, float]) -> BestDecoding:
    """The decoding with the higher mean score over the same items (greedy wins a tie: it is free)."""
    if set(greedy) != set(sampled):
        raise ValueError("greedy and sampled scores must cover the same items")
    g, s = _mean(list(greedy.values())) or 0.0, _mean(list(sampled.values())) or 0.0
    return BestDecoding(GREEDY, g, greedy) if g >= s else BestDecoding(SAMPLED, s, sampled)


@dataclass(frozen=True)
class Verdict:
    """Whether model A beat model B, each at its best decoding, on the same items."""

    a: str
    b: str
    a_best: BestDecoding
    b_best: BestDecoding
    margin: float                 # A's best pass@1 minus B's, in 0..1
    stderr: float                 # standard error of that margin (paired over items)
    beat: bool                    # margin > 0 and more than `z` standard errors
    basis: str = "at each one's best decoding"

    def sentence(self) -> str:
        def side(name: str, best: BestDecoding) -> str:
            return f"{name} {100 * best.pass1:.1f}% ({best.decoding})"
        held = "beat" if self.beat else "did not beat"
        return (f"{self.a} {held} {self.b} {self.basis}: {side(self.a, self.a_best)} against "
                f"{side(self.b, self.b_best)}, {100 * self.margin:+.1f} points (paired standard error "
                f"{100 * self.stderr:.1f}).")

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "basis": self.basis, "beat": self.beat, "margin": self.margin,
                "stderr": self.stderr,
                f"{self.a}_best": {"decoding": self.a_best.decoding, "pass@1": self.a_best.pass1},
                f"{self.b}_best": {"decoding": self.b_best.decoding, "pass@1": self.b_best.pass1}}


def verdict(a: str, a_best: BestDecoding, b: str, b_best: BestDecoding, z: float = 2.0,
            basis: str = "at each one's best decoding") -> Verdict:
    """A beat B when A's best-decoding pass@1 exceeds B's by more than z paired standard errors.

    The margin is the mean over items of A's score minus B's; its standard error comes from the
    spread of those per-item differences, so a gain carried by a handful of items is not a win.
    """
    if set(a_best.scores) != set(b_best.scores) or not a_best.scores:
        raise ValueError("a verdict compares two models on the same, non-empty set of items")
    diffs = [a_best.scores[i] - b_best.scores[i] for i in a_best.scores]
    n = len(diffs)
    margin = sum(diffs) / n
    var = sum((d - margin) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    stderr = math.sqrt(var / n)
    return Verdict(a, b, a_best, b_best, margin, stderr, margin > 0 and margin > z * stderr, basis)
