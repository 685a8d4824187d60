"""Shared by the benchmark scripts: machine and version lines, and appending a section to RESULTS.md."""

from __future__ import annotations

import datetime
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def versions(*packages: str) -> str:
    parts = [f"python {platform.python_version()}"]
    for pkg in packages:
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} not installed")
    return ", ".join(parts)


def machine() -> str:
    from r1lab.hardware import describe_machine

    return describe_machine()


def append_results(title: str, body: str, packages: tuple[str, ...] = ()) -> str:
    """Append a dated section (title, machine, versions, body) to RESULTS.md; return its text."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title} ({stamp})\n\nMachine: {machine()}.\n"
               f"Versions: {versions('r1lab', *packages)}.\n\n{body.rstrip()}\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach benchmark script appends its own dated section.\n")
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(section)
    return section
