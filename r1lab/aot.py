"""Step functions over r1lab's KVCache compiled ahead of time, for a compiled engine.

`ExportedStep` wraps a step function `fn(model, *inputs, cache, n_slots)` (the engine's decode step and
its speculative halves): `torch.export` with the model's weights as inputs, AOTInductor, one compiled
step per class of row counts, called with no per-call guard evaluation. It knows the model's cache
layout (`KVCache`) and the kernels' row thresholds; it knows nothing of sampling, requests or tokens.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Callable

import torch

from r1lab import kernels
from r1lab.model import KVCache


class ExportedStep:
    """A step function `fn(model, *inputs, cache, n_slots)` over r1lab's KVCache (the engine's decode
    step, speculative verify and MTP draft), compiled ahead of time: `torch.export` (non-strict) with the
    model's parameters and buffers as inputs, then AOTInductor; one compiled step per class of row counts
    (1; 2 to `kernels.STREAMING_ROWS`; to `kernels.KERNEL_ROWS`; more), built the first time a call falls
    in it (~15 s). The same graph torch.compile would run (outputs and cache writes bit for bit), called
    without torch.compile's per-call guard evaluation and entry (~0.3 ms of a ~4.5 ms batch-64 decode step
    of the benchmark's dense model, most of a batch-1 step). The weights being inputs, in-place updates
    (an optimiser step between rollouts) and replaced tensors are followed; replacements of another
    shape, dtype or device, or another cache layout, build the steps again. Other decoders' caches, and a
    row class whose graph cannot be exported, go to `fallback` (the function through torch.compile)."""

    __slots__ = ("fn", "fallback", "_model", "_names", "_homes", "_state", "_signature", "_steps")

    def __init__(self, fn: Callable, fallback: Callable):
        self.fn, self.fallback = fn, fallback
        self._model = None
        self._names: list[str] = []      # the model's parameters then buffers, as named_parameters names them
        self._homes: list[tuple[dict, str]] = []  # where each lives: (its module's _parameters or _buffers, key)
        self._state: list[torch.Tensor] = []     # the tensors the last call read
        self._signature: tuple = ()
        self._steps: dict[tuple, object] = {}    # (row class, input and cache layout) -> loaded AOTInductor package

    def __call__(self, model, *args):
        *inputs, cache, n_slots = args
        if not isinstance(cache, KVCache):
            return self.fallback(model, *args)
        if model is not self._model:
            self._bind(model)
        # Reading the tensors from their modules' dicts: ~3 us, against ~100 us for model.parameters().
        state = [table[key] for table, key in self._homes]
        if len(state) != len(self._state) or any(a is not b for a, b in zip(state, self._state)):
            signature = tuple((t.shape, t.dtype, t.device) for t in state)
            if signature != self._signature:
                self._steps.clear()
                self._signature = signature
            self._state = state
        key = (_row_class(inputs[0].shape[0], inputs[0].shape[1]), tuple((t.shape[1:], t.dtype) for t in inputs), cache.impl,
               len(cache.layers), tuple((t.shape[2:], t.dtype) for t in cache.layers[0]))
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._build(model, state, inputs, cache, *key[0])
        if step is _NOT_EXPORTED:
            return self.fallback(model, *args)
        layers = [t for layer in cache.layers for t in layer]
        slots = torch.empty(n_slots, dtype=torch.int8)  # its length is the slot count (a shape, not an int input)
        out = step.loader.run([*state, *inputs, *layers, slots])
        return out[0] if len(out) == 1 else tuple(out)

    def _build(self, model, state: list[torch.Tensor], inputs: list[torch.Tensor], cache: KVCache, low: int,
               high: int | None):
        try:
            return _export_step(self.fn, model, self._names, state, inputs, cache, low, high)
        except torch._dynamo.exc.UserError as e:
            if e.error_type != torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION:
                raise
            # The graph branches on the row count inside the class (e.g. the routed experts' path outside the
            # C++ kernels' dtype): no one graph serves it; torch.compile recompiles at each branch instead.
            warnings.warn(f"r1lab: {self.fn.__name__} for {low}-{high or 'more'} rows has a shape-dependent branch; "
                          f"it runs through torch.compile", stacklevel=3)
            return _NOT_EXPORTED

    def _bind(self, model) -> None:
        self._model, self._steps, self._state, self._signature = model, {}, [], ()
        self._names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
        n_params = len(self._names) - len(list(model.named_buffers()))
        self._homes = []
        for i, name in enumerate(self._names):
            owner, _, key = name.rpartition(".")
            module = model.get_submodule(owner)
            self._homes.append((module._parameters if i < n_params else module._buffers, key))


_NOT_EXPORTED = object()  # a row class whose step could not be exported (see `ExportedStep._build`)


def _row_class(rows: int, tokens_per_row: int) -> tuple[int, int | None]:
    """The range of row counts one compiled step serves: one row, else the kernels' thresholds on token rows
    (`kernels.STREAMING_ROWS`, `KERNEL_ROWS`) in rows of `tokens_per_row` tokens (None: unbounded)."""
    if rows == 1:
        return 1, 1
    low = 2
    for high in (kernels.STREAMING_ROWS, kernels.KERNEL_ROWS):
        if rows * tokens_per_row <= high:
            return low, high // tokens_per_row
        low = max(2, high // tokens_per_row + 1)
    return low, None


def _export_step(fn: Callable, model, names: list[str], state: list[torch.Tensor], inputs: list[torch.Tensor],
                 cache: KVCache, low: int, high: int | None):
    """Export `fn` for `low`..`high` rows (the inputs' first dim) over caches laid out as `cache`, the model's
    tensors (`names`, now `state`) as inputs; compile it with AOTInductor; load it."""
    per_layer, impl, bound = len(cache.layers[0]), cache.impl, _Bound(fn, model)

    def step(state, inputs, layers, slots):
        grouped = [layers[i:i + per_layer] for i in range(0, len(layers), per_layer)]
        return torch.func.functional_call(bound, {"model." + n: t for n, t in zip(names, state)},
                                          (*inputs, KVCache.over(impl, grouped), slots.shape[0]))

    Dim = torch.export.Dim
    rows = None if low == high else Dim("rows", min=low, max=high)  # (one row: a static shape)
    slots, capacity = Dim("slots", min=1), Dim("capacity", min=2)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, while packaging
        # Fresh example tensors (the engine's own are inference tensors, which export may not write to).
        example_rows, example_capacity = 1 if rows is None else max(low, 2), 16
        inputs = [torch.zeros(example_rows, *t.shape[1:], dtype=t.dtype, device=t.device) for t in inputs]
        layers = [torch.zeros(example_rows, example_capacity, *t.shape[2:], dtype=t.dtype, device=t.device)
                  for layer in cache.layers for t in layer]
        example = (state, inputs, layers, torch.empty(9, dtype=torch.int8))
        shapes = ([None] * len(state), [None if rows is None else {0: rows}] * len(inputs),
                  [{1: capacity} if rows is None else {0: rows, 1: capacity}] * len(layers), {0: slots})
        exported = torch.export.export(_Program(step), example, dynamic_shapes=shapes, strict=False)
        with tempfile.TemporaryDirectory(prefix="r1lab-step-") as tmp:
            path = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(tmp, "step.pt2"))
            return torch._inductor.aoti_load_package(path)


class _Bound(torch.nn.Module):
    """fn(model, ...) as a module over the model, for `torch.func.functional_call` to swap its tensors."""

    def __init__(self, fn: Callable, model):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, *args):
        return self.fn(self.model, *args)


class _Program(torch.nn.Module):
    """The step as the module torch.export takes (nothing registered: the weights stay inputs)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, state, inputs, layers, slots):
        return self.fn(state, inputs, layers, slots)
