"""A step function compiled ahead of time, one package per row class: `torch.export` with the model's
weights as inputs, then AOTInductor.

`ExportedStep` wraps `fn(model, forms, *inputs, cache, n_slots)` (a function of `steps`). It knows r1lab's
`KVCache` layout and the row classes it is given; it knows nothing of sampling, requests or tokens.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable

import torch

from r1lab.model import KVCache

RowClass = tuple[int, int | None, object]  # (fewest rows, most rows or None, the forms the step runs in)


class ExportedStep:
    """`fn(model, forms, *inputs, cache, n_slots)` compiled ahead of time, one package per row class.

    `row_class(rows, tokens)` maps a call's rows (the inputs' first dim) and tokens per row (their second)
    to its class; the package for a class is compiled the first time a call falls in it and then called
    without guard evaluation. The rows are dynamic within a class (one row is a class of its own: a
    static shape), and so are the tokens per row when `dynamic_tokens` (a prefill).
    The weights are inputs of the package, so in-place updates (an optimiser step between rollouts) and
    replaced tensors are seen; a replacement of another shape, dtype or device builds the packages again.
    """

    __slots__ = ("fn", "row_class", "dynamic_tokens", "_model", "_names", "_homes", "_state", "_signature", "_steps")

    def __init__(self, fn: Callable, row_class: Callable[[int, int], RowClass], dynamic_tokens: bool = False):
        self.fn, self.row_class, self.dynamic_tokens = fn, row_class, dynamic_tokens
        self._model = None
        self._names: list[str] = []      # the model's parameters then buffers, as named_parameters names them
        self._homes: list[tuple[dict, str]] = []  # where each lives: (its module's _parameters or _buffers, key)
        self._state: list[torch.Tensor] = []     # the tensors the last call read
        self._signature: tuple = ()
        self._steps: dict[tuple, object] = {}    # (row class, input and cache layout) -> loaded package

    def __call__(self, model, *args):
        *inputs, cache, n_slots = args
        if model is not self._model:
            self._bind(model)
        # Read from their modules' dicts each call (cheap), so that replaced tensors are followed.
        state = [table[key] for table, key in self._homes]
        if len(state) != len(self._state) or any(a is not b for a, b in zip(state, self._state)):
            signature = tuple((t.shape, t.dtype, t.device) for t in state)
            if signature != self._signature:
                self._steps.clear()
                self._signature = signature
            self._state = state
        varying = 2 if self.dynamic_tokens else 1  # the leading dims of an input that vary between calls
        layout = tuple((t.shape[varying:], t.dtype) for t in inputs)
        key = (self.row_class(inputs[0].shape[0], inputs[0].shape[1]), layout, len(cache.layers),
               tuple((t.shape[2:], t.dtype) for t in cache.layers[0]))
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._export(model, state, inputs, cache, *key[0])
        layers = [t for layer in cache.layers for t in layer]
        slots = torch.empty(n_slots, dtype=torch.int8)  # its length is the slot count (a shape, not an int input)
        # The package reads its inputs with the strides it was traced with: contiguous (e.g. not expanded).
        out = step.loader.run([*state, *(t.contiguous() for t in inputs), *layers, slots])
        return out[0] if len(out) == 1 else tuple(out)

    def _bind(self, model) -> None:
        self._model, self._steps, self._state, self._signature = model, {}, [], ()
        self._names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
        n_params = len(self._names) - len(list(model.named_buffers()))
        self._homes = []
        for i, name in enumerate(self._names):
            owner, _, key = name.rpartition(".")
            module = model.get_submodule(owner)
            self._homes.append((module._parameters if i < n_params else module._buffers, key))

    def _export(self, model, state: list[torch.Tensor], inputs: list[torch.Tensor], cache: KVCache, low: int,
                high: int | None, forms):
        """Export `fn` for `low`..`high` rows over caches laid out as `cache`, the model's tensors as inputs;
        compile it with AOTInductor; load it."""
        per_layer, names, fn = len(cache.layers[0]), self._names, self.fn
        bound = _Module(lambda *args: fn(model, forms, *args), model)

        def step(state, inputs, layers, slots):
            grouped = [layers[i:i + per_layer] for i in range(0, len(layers), per_layer)]
            return torch.func.functional_call(bound, {"model." + n: t for n, t in zip(names, state)},
                                              (*inputs, KVCache(grouped), slots.shape[0]))

        Dim = torch.export.Dim
        rows = None if low == high else Dim("rows", min=low, max=high)  # (one row: a static shape)
        tokens = Dim("tokens", min=1) if self.dynamic_tokens else None
        slots, capacity = Dim("slots", min=1), Dim("capacity", min=2)

        def dims(t: torch.Tensor) -> dict | None:
            found = {} if rows is None else {0: rows}
            if tokens is not None and t.dim() > 1:
                found[1] = tokens
            return found or None

        def example(t: torch.Tensor, *sizes: int) -> torch.Tensor:
            """A fresh zero tensor like t with its leading sizes replaced (the engine's own are inference
            tensors, which export may not write to); each dynamic dim gets its own size, so none is tied."""
            return torch.zeros(*sizes, *t.shape[len(sizes):], dtype=t.dtype)

        n = 1 if rows is None else max(low, 2)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, while packaging
            inputs = [example(t, n, 3) if tokens is not None and t.dim() > 1 else example(t, n) for t in inputs]
            layers = [example(t, n, 16) for layer in cache.layers for t in layer]
            example_args = (state, inputs, layers, torch.empty(7, dtype=torch.int8))
            shapes = ([None] * len(state), [dims(t) for t in inputs],
                      [{1: capacity} if rows is None else {0: rows, 1: capacity}] * len(layers), {0: slots})
            exported = torch.export.export(_Module(step), example_args, dynamic_shapes=(shapes,), strict=False)
            with tempfile.TemporaryDirectory(prefix="r1lab-step-") as tmp:
                path = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(tmp, "step.pt2"))
                return torch._inductor.aoti_load_package(path)


class _Module(torch.nn.Module):
    """`fn` as a module. With `model`, the model is its submodule "model", so that `torch.func.functional_call`
    swaps the model's tensors for the step's inputs; without, nothing is registered (torch.export then takes
    the weights as inputs)."""

    def __init__(self, fn: Callable, model=None):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, *args):
        return self.fn(*args)
