"""More than one process: the only module that knows torch.distributed.

`join(device)` reads torchrun's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`). Without it, or
with a world of one, it returns `World()` (rank 0 of 1, no process group) and every caller runs
exactly as a single process always did: each helper below is then the identity. With it, the
process joins a group (gloo on a CPU, NCCL on CUDA with device `cuda:LOCAL_RANK`) and the stages
use these helpers:

- `shard(n, world)`: the contiguous slice of n items (rows of a batch, prompts of a step) that
  this rank owns; n must be a multiple of the world size.
- `sum_floats(values, world)`: per-rank sums (loss parts, token counts, denominators) added up.
- `sync_gradients(model, world)`: each rank's gradients summed, so that a loss each rank scaled by
  its share of the global denominator gives every rank the single-process gradient. A parameter
  without a gradient on every rank keeps none (AdamW then skips it, as in one process).
- `sync_expert_load(model, world)`: the routers' token counts summed before the aux-loss-free
  bias update, so every rank moves its biases by the same, global, load.
- `broadcast_model(model, world)`: rank 0's weights and buffers on every rank.
- `gather(obj, world)`: one picklable object per rank, in rank order (rollout records for metrics).

It knows processes, tensors and a model's parameters and `moe_gates()`; it knows no loss, no
batch, no recipe and no file: which rank writes is decided by callers through `world.is_main`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1lab.config import ConfigError

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1: a single process)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # where this rank's collectives put their tensors

    @property
    def is_main(self) -> bool:
        """The process that writes checkpoints, metrics and progress."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: torchrun sets it to an integer") from None


def join(device: torch.device) -> tuple[World, torch.device]:
    """This process's World and the device it trains on; joins torchrun's process group when launched by it.

    CUDA: one GPU per process, `cuda:LOCAL_RANK`, NCCL. CPU: gloo. Other devices have no backend here."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return World(), device
    size, rank, local = (_env_int(name) for name in ENV)
    if device.type == "cuda":
        device, backend = torch.device(device.type, local), "nccl"
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"device {str(device)!r}: more than one process runs on cpu (gloo) or cuda (nccl)")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank, size, local, device), device


def leave() -> None:
    """Tear down the process group if this process joined one (the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down its connections while another still uses them
        dist.destroy_process_group()


def check_divisible(n: int, world: World, field: str) -> None:
    """A ConfigError naming `field` unless its value n splits evenly over the processes."""
    if n % world.size:
        raise ConfigError(f"{field} ({n}) must be a multiple of the number of processes ({world.size})")


def shard(n: int, world: World) -> range:
    """The items of 0..n-1 this rank owns: one contiguous block of n / size (n a multiple of size)."""
    per = n // world.size
    return range(world.rank * per, (world.rank + 1) * per)


def sum_floats(values: list[float], world: World) -> list[float]:
    """The element-wise sum over ranks of `values` (float64 on the wire: counts stay exact)."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def gather(obj, world: World) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_model(model: torch.nn.Module, world: World) -> None:
    """Every rank starts from rank 0's parameters and buffers (seeded inits agree; a resume read the same file)."""
    if world.size == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def sync_gradients(model: torch.nn.Module, world: World) -> None:
    """Sum each trainable parameter's gradient over ranks in one flat all-reduce.

    A rank whose share of a batch never reached a parameter (an unused expert) contributes zeros; a
    parameter no rank reached keeps `grad = None`, as it would in one process."""
    if world.size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=device)])
    dist.all_reduce(flat)
    present = flat[-len(params):]
    offset = 0
    for p, seen in zip(params, present.tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if seen else None
        offset += n


@torch.no_grad()
def sync_expert_load(model: torch.nn.Module, world: World) -> None:
    """Sum every router's token counts over ranks (before `update_expert_bias`), so biases stay identical."""
    if world.size == 1 or not hasattr(model, "moe_gates"):
        return
    gates = model.moe_gates()
    if not gates:
        return
    loads = torch.stack([g.expert_load for g in gates])  # (L, E)
    dist.all_reduce(loads)
    for gate, load in zip(gates, loads):
        gate.expert_load.copy_(load)
