"""What this machine can do: its measured matmul peak (the denominator of MFU) and a description.

Peaks are measured, never assumed: a 2-core CPU VM and an H800 differ by four orders of magnitude,
and the same CPU differs by 20% run to run. This module times matmuls; it knows no model.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def measure_matmul_peak(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (1024, 2048),
                        samples: int = 7, min_sample_seconds: float = 0.05, device: torch.device | None = None) -> float:
    """Median GFLOP/s of square matmuls at the best of `sizes`: what MFU divides by.

    Each size is warmed up (thread pool, caches, clock ramp) and timed in samples of enough
    repetitions to last `min_sample_seconds`, so one slow call does not set the figure.
    """
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        reps = _reps_for(a, b, min_sample_seconds)
        rates = []
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            _sync(a)
            rates.append(2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9)
        best = max(best, statistics.median(rates))
    return best


def _sync(t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        torch.accelerator.synchronize()


def _reps_for(a: torch.Tensor, b: torch.Tensor, seconds: float) -> int:
    """Warm up, and find how many matmuls take about `seconds`."""
    reps, elapsed = 1, 0.0
    while elapsed < seconds:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(a)
        elapsed = time.perf_counter() - start
        if elapsed < seconds:
            reps *= 2
    return reps


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """One line: CPU model, cores, torch threads, memory, accelerator."""
    mem = ""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages * page / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    accel = "no GPU"
    if torch.cuda.is_available():
        accel = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{mem}, {accel}"
