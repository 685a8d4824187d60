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
                        samples: int = 5, device: torch.device | None = None) -> float:
    """Median GFLOP/s of square matmuls (the best of the sizes): what MFU divides by."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        torch.mm(a, b)  # warm-up: thread pool, caches
        rates = []
        for _ in range(samples):
            start = time.perf_counter()
            torch.mm(a, b)
            if a.device.type != "cpu":
                torch.accelerator.synchronize()
            rates.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
        best = max(best, statistics.median(rates))
    return best


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
