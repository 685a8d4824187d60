"""Loaders for the real evaluation sets (GSM8K, MATH-500, AIME 2024, AMC 2023) and any JSONL file.

`load_benchmark(name_or_path)` returns examples {"prompt", "answer", "id", "benchmark"} plus
"subject" and "level" where the file has them; answers are strings ready for
`rewards.accuracy_reward`. Known names map to files in a data directory, found in this order:
the `data_dir` argument, the `R1LAB_DATA_DIR` environment variable, then `shared/data/benchmarks`
and `data/benchmarks` beside or above the current directory and the repository. Anything else is
read as a JSONL path with `prompt_field` / `answer_field` (and optional `id_field`).

Answer rules: GSM8K keeps the text after `####` with thousands commas removed; numeric answers
(AIME integers, AMC floats such as 27.0) become plain integer strings when integral.
Bad data fails loudly: `BenchmarkNotFoundError` (a FileNotFoundError) lists where it looked, and
`BenchmarkDataError` (a ValueError) names the file, the line and the field. This module knows
only files and JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class BenchmarkNotFoundError(FileNotFoundError):
    """A benchmark file could not be found; the message lists the places searched."""


class BenchmarkDataError(ValueError):
    """A benchmark file is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class BenchmarkSpec:
    filename: str
    prompt_fields: tuple[str, ...]  # the first one present in a row is used
    answer_field: str
    id_field: str | None = None
    gsm8k_answer: bool = False  # the answer is a worked solution ending in "#### N"


BENCHMARKS = {
    "gsm8k": BenchmarkSpec("gsm8k_test.jsonl", ("question",), "answer", gsm8k_answer=True),
    "math500": BenchmarkSpec("math500_test.jsonl", ("problem",), "answer", "unique_id"),
    "aime24": BenchmarkSpec("aime24_test.jsonl", ("problem", "question"), "answer", "id"),
    "amc23": BenchmarkSpec("amc23_test.jsonl", ("problem", "question"), "answer", "id"),
}


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for benchmark files, most specific first."""
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("R1LAB_DATA_DIR"):
        dirs.append(Path(os.environ["R1LAB_DATA_DIR"]))
    repo = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo):
        for root in (base, *base.parents[:2]):
            for rel in ("shared/data/benchmarks", "data/benchmarks"):
                if root / rel not in dirs:
                    dirs.append(root / rel)
    return dirs


def find_benchmark_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    filename = BENCHMARKS[name].filename
    dirs = candidate_dirs(data_dir)
    for d in dirs:
        if (d / filename).is_file():
            return d / filename
    searched = ", ".join(str(d) for d in dirs)
    raise BenchmarkNotFoundError(f"{filename} for benchmark {name!r} not found; searched: {searched} "
                                 f"(set R1LAB_DATA_DIR to the directory holding it)")


def _answer_text(value, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise BenchmarkDataError(f"{where}: answer must be text or a number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise BenchmarkDataError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, row


def _read(path: Path, name: str, spec: BenchmarkSpec, limit: int | None) -> list[dict]:
    out = []
    for lineno, row in _rows(path):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}:{lineno}"
        prompt_field = next((f for f in spec.prompt_fields if f in row), None)
        if prompt_field is None:
            raise BenchmarkDataError(f"{where}: missing field {' or '.join(map(repr, spec.prompt_fields))}")
        if spec.answer_field not in row:
            raise BenchmarkDataError(f"{where}: missing field {spec.answer_field!r}")
        answer = _answer_text(row[spec.answer_field], where)
        if spec.gsm8k_answer:
            if "####" not in answer:
                raise BenchmarkDataError(f"{where}: field 'answer' has no '#### <number>' line")
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        if spec.id_field is not None and spec.id_field in row:
            ident = str(row[spec.id_field])
        else:
            ident = f"{name}-{lineno}"
        example = {"prompt": str(row[prompt_field]), "answer": answer, "id": ident, "benchmark": name}
        for extra in ("subject", "level"):
            if extra in row:
                example[extra] = row[extra]
        out.append(example)
    return out


def load_benchmark(name_or_path: str | os.PathLike, limit: int | None = None, *,
                   data_dir: str | os.PathLike | None = None, prompt_field: str | None = None,
                   answer_field: str | None = None, id_field: str | None = None) -> list[dict]:
    """Examples of a known benchmark (gsm8k, math500, aime24, amc23) or of a JSONL file.

    For a path, `prompt_field` and `answer_field` name the JSON fields (defaults: "prompt" and
    "answer"); `limit` keeps the first rows only.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    key = str(name_or_path).lower()
    if key in BENCHMARKS and not Path(name_or_path).is_file():
        if prompt_field or answer_field:
            raise ValueError(f"prompt_field/answer_field apply to JSONL paths, not to {key!r}")
        return _read(find_benchmark_file(key, data_dir), key, BENCHMARKS[key], limit)
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(BENCHMARKS)
        raise BenchmarkNotFoundError(f"{path}: no such file, and not a known benchmark ({known})")
    spec = BenchmarkSpec(path.name, (prompt_field or "prompt",), answer_field or "answer", id_field)
    return _read(path, path.stem, spec, limit)
