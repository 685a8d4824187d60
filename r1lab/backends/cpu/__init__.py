"""The CPU backend: the compiled steps and C++ kernels an `Engine(compile=True)` decodes with on a CPU.

An engine built with compile=True makes one `CpuBackend` if the backend can run its model (`unsupported`
says why not: another decoder, device or dtype, the naive MLA cache, widths the kernels do not tile, a
CPU without AVX2 or no C++ compiler), and from then on runs the backend's steps (`steps`: prefill,
decode, and speculative verify and draft) in place of the model's forward, and samples with one C++
call. Training and eager engines never see it. Each step is compiled ahead of time (`aot`), one
package per row class, so what runs inside is fixed per class:

| token rows in the step  | projections, head, dense SwiGLU | MLA per-head products | attention, routed experts |
|-------------------------|---------------------------------|-----------------------|---------------------------|
| 1                       | fused reductions (inductor)     | batched GEMMs         | C++ kernels               |
| 2-256                   | C++ kernels                     | C++ kernels           | C++ kernels               |
| more, and every prefill | BLAS                            | batched GEMMs         | C++ kernels               |

(float32 only; a decode step's token rows are its rows, a speculative step's twice that; one row is a
class of its own, a static shape.) The C++ sources live in csrc/, built by `build` and exposed as torch
ops by `ops`.
"""

from __future__ import annotations

import torch

from r1lab.backends.cpu import ops, steps
from r1lab.backends.cpu.aot import ExportedStep, RowClass
from r1lab.model import MLP, MoE, Transformer

KERNEL_ROWS = 256  # the most token rows whose products the C++ kernels take (the table)
_STREAMING, _KERNELS, _BLAS = steps.Streaming(), steps.Kernels(), steps.Blas()


def decode_class(rows: int, tokens: int) -> RowClass:
    """The table's row class of a decode step of `rows` rows of `tokens` tokens: its bounds in rows, its forms."""
    if rows == 1:
        return 1, 1, _STREAMING if tokens == 1 else _KERNELS
    if rows * tokens <= KERNEL_ROWS:
        return 2, KERNEL_ROWS // tokens, _KERNELS
    return KERNEL_ROWS // tokens + 1, None, _BLAS


def prefill_class(rows: int, tokens: int) -> RowClass:
    """A prefill's row class: one prompt or several, any length; the BLAS forms."""
    return (1, 1, _BLAS) if rows == 1 else (2, None, _BLAS)


class CpuBackend:
    """One engine's steps, each `fn(model, *inputs, cache, n_slots)` as in `steps` (less the forms) and
    compiled on its first call in a row class, and its sampler (the engine's `sample_tokens` in C++)."""

    sample = staticmethod(ops.sample)

    def __init__(self):
        self.prefill = ExportedStep(steps.prefill, prefill_class, dynamic_tokens=True)
        self.decode = ExportedStep(steps.decode, decode_class)
        self.verify = ExportedStep(steps.verify, decode_class)
        self.draft = ExportedStep(steps.draft, decode_class)


def unsupported(model) -> str | None:
    """Why the backend cannot run `model`, or None when it can (the kernels are then built and loaded)."""
    if not isinstance(model, Transformer):
        return f"{type(model).__name__} is not r1lab's Transformer"
    cfg = model.config
    if cfg.attn_impl != "absorb":
        return f"attn_impl {cfg.attn_impl!r} (the kernels read the absorbed latent cache)"
    kinds = {(t.dtype, t.device.type) for t in model.parameters()}
    if kinds != {(torch.float32, "cpu")}:
        found = ", ".join(f"{dtype} on {device}" for dtype, device in sorted(kinds, key=str))
        return f"weights of {found} (the kernels take float32 on the CPU)"
    widths = {"dim": cfg.dim, "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
              "q_lora_rank": cfg.q_lora_rank, "n_heads * v_head_dim": cfg.n_heads * cfg.v_head_dim}
    widths.update(("MLP hidden width", m.w1.weight.shape[0]) for m in model.modules() if isinstance(m, MLP))
    if any(isinstance(m, MoE) for m in model.modules()):
        widths["moe_inter_dim"] = cfg.moe_inter_dim
    odd = [f"{name} {value}" for name, value in widths.items() if value % 8]
    if odd:
        return f"widths the kernels do not tile (multiples of 8): {', '.join(odd)}"
    if cfg.v_head_dim % 4:
        return f"v_head_dim {cfg.v_head_dim} is not a multiple of 4"
    return ops.load()

