"""Builds the C++ kernels of csrc/ into one shared library, loads it, and registers its ops' CPU kernels.

The library is built once per source, compiler and torch version into the user cache
($XDG_CACHE_HOME/r1lab/kernels) with the C++ compiler inductor needs anyway. The kernels include
only torch's stable C shim (csrc/op.h) and link against the libtorch already loaded. This module
knows files, flags and compilers; it knows no tensors (the ops' schemas are in `ops`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
KERNELS = ("linear", "grouped_experts", "latent_attention", "sample")  # csrc/<name>.cpp, each registering its ops
_TORCH = Path(torch.__file__).parent
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17", f"-I{_TORCH / 'include'}",
          f"-L{_TORCH / 'lib'}", "-ltorch_cpu", f"-Wl,-rpath,{_TORCH / 'lib'}"]


@functools.cache
def load() -> str | None:
    """Build (when not cached) and load the kernels, once per process: None when they run here, else why not.

    Not running is ordinary on a CPU without AVX2 or a machine without a C++ compiler; a failed build, an
    unwritable cache or a library that does not load also warn, as they mean a broken setup."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU has no AVX2"
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return "no C++ compiler (c++, g++ or $CXX)"
    sources = [CSRC / f"{name}.cpp" for name in KERNELS]
    text = b"".join(p.read_bytes() for p in sources + sorted(CSRC.glob("*.h")))
    key = hashlib.sha256(text + " ".join([compiler, torch.__version__, *_FLAGS]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "r1lab" / "kernels"
    target = cache / f"cpu-{key}.so"
    if not target.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        except OSError as e:  # e.g. a read-only home
            return _warn(f"cannot build the CPU kernels in {cache} ({e})")
        os.close(fd)
        done = subprocess.run([compiler, *map(str, sources), "-o", tmp, *_FLAGS], capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            return _warn(f"building the CPU kernels failed ({compiler} exited with {done.returncode}) "
                         f"{done.stderr.strip()[:500]}".rstrip())
        os.replace(tmp, target)  # atomic: a concurrent build never loads a half-written file
    try:
        library = ctypes.CDLL(str(target))
        status = [getattr(library, f"r1lab_register_{name}")() for name in KERNELS]
    except (OSError, AttributeError) as e:  # e.g. a cache on a noexec mount
        return _warn(f"cannot load {target} ({e})")
    if any(status):
        return _warn(f"{target} did not register its ops (status {status})")
    return None


def _warn(reason: str) -> str:
    warnings.warn(f"r1lab: {reason}; decoding runs eager", stacklevel=3)
    return reason
