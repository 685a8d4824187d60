"""Which torch device a run uses, and the mixed precision it trains in there.

`resolve_device(name)` turns what a user wrote (the recipe's `device`, or `--device`) into a
`torch.device` after checking that this machine has it: asking for CUDA on a CPU-only machine, a
GPU index past the last one, or MPS off Apple silicon is a `ConfigError` naming the device,
raised before any model is built. Library code below the command line takes that `torch.device`
and never spells a device itself.

`bf16_autocast(device, enabled)` is the training stages' precision: bfloat16 autocast of the
matmuls on a CUDA device when the stage's `bf16_autocast` field allows it, float32 everywhere
else (a CPU has no fast bfloat16 and MPS autocast is not what r1lab is tested with).

This module knows torch's device API; it knows no model, no recipe and no stage.
"""

from __future__ import annotations

import torch

from r1lab.config import ConfigError, check_device_name

def resolve_device(name: str, key: str = "device") -> torch.device:
    """The `torch.device` called `name`, or a ConfigError saying why this machine has none such."""
    check_device_name(name, key)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{key} {name!r}: not available on this machine ({why}); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key} {name!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} {name!r}: not available on this machine (MPS needs Apple silicon); use cpu")
    return device


def bf16_autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on a CUDA device when `enabled`; a no-op context (float32) otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")
