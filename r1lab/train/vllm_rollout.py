"""GRPO rollouts on vLLM: an in-process `vllm.LLM` samples for a Hugging Face policy and is sent the
policy's weights whenever an optimizer step has changed them (`grpo.rollout_backend = "vllm"`).

To the RL loop a `VLLMRollout` is an engine in the sense `sampling.sample` uses: `max_len` and
`generate(prompts, params, first_index) -> list[Completion]` with prompt i's sample j at index i * n + j. So the
records (`Group`, `Sampled`), the grading, advantages, losses and the FLOPs counted for generation
(`Group.flops`, i.e. `cost.generation_flops`) are the same code as with r1lab's `Engine`.

Written against vLLM 0.10.2's offline API (V1 engine); the names it uses:
  * `LLM(model=DIR, dtype=..., seed=..., gpu_memory_utilization=..., max_model_len=...,
    skip_tokenizer_init=True, load_format="dummy")`: DIR holds only the policy's config.json (its
    vocabulary as resized for r1lab's chat tags); the "dummy" weights are replaced by the policy's
    own before the first `generate`, so nothing is written to disk but the config;
  * `SamplingParams(n, temperature, top_p, top_k, max_tokens, stop_token_ids, seed, ignore_eos,
    detokenize=False)`, one per prompt (each prompt its own seed, mixed from the step's);
  * `LLM.generate([{"prompt_token_ids": ids}, ...], params, use_tqdm=False)` -> `RequestOutput`s
    whose `.outputs` carry `index`, `token_ids` (the stop id included) and `finish_reason`;
  * `LLM.apply_model(fn)` runs `fn(model)` in the worker, whose `model.load_weights(pairs)` takes
    (Hugging Face parameter name, tensor) pairs; `LLM.reset_prefix_cache()` drops KV blocks cached
    under the old weights. `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the worker in this process, so
    the tensors are handed over on the GPU, never pickled.
vLLM ends a sample whose last allowed token is a stop id with finish reason "length"; r1lab's engine
calls it "stop" (the template's stop was reached, so its format counts). The adapter says "stop".

vLLM needs a CUDA GPU and is an optional extra (`pip install 'r1lab[scale]'`); without it the first
use is a `ConfigError` saying so. It runs on the process's first visible GPU. An r1lab `Transformer`
policy is refused: vLLM serves Hugging Face architectures (`r1lab export` writes one).

This module knows vLLM's API and the names Hugging Face checkpoints give parameters; it knows no
rewards, no loss, no optimiser beyond its step hook, and it never imports vllm at module level.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from r1lab.config import ConfigError
from r1lab.engine import Completion, SamplingParams
from r1lab.recipe import GRPOConfig
from r1lab.tokenizer import Tokenizer
from r1lab.train.policy import HFPolicy

MISSING_VLLM = ("grpo.rollout_backend = \"vllm\" needs the vllm package and a CUDA GPU: "
                "pip install 'r1lab[scale]' on a GPU machine, or use rollout_backend = \"r1lab\"")


def import_vllm() -> Any:
    """The vllm module, or a ConfigError naming the extra that installs it."""
    try:
        import vllm
    except ImportError:
        raise ConfigError(MISSING_VLLM) from None
    return vllm


def check_vllm_device(device: str) -> None:
    """vLLM runs on the process's first visible CUDA GPU: `device` must be cuda or cuda:0."""
    if device not in ("cuda", "cuda:0"):
        raise ConfigError(f"grpo.rollout_backend = \"vllm\" runs on a CUDA GPU, and device is {device!r}: set "
                          f"device = \"cuda\" (pick the GPU with CUDA_VISIBLE_DEVICES) or rollout_backend = \"r1lab\"")


def prompt_seed(seed: int, index: int) -> int:
    """Prompt `index`'s seed within a call seeded `seed`: unrelated streams for repeated prompts (vLLM seeds a
    prompt's n samples seed, seed + 1, ..., so neighbouring integers would share samples across prompts)."""
    return random.Random(f"{seed}:{index}").getrandbits(62)


class VLLMRollout:
    """Rollouts from an in-process vLLM engine that holds its own copy of `policy`'s weights."""

    def __init__(self, policy: HFPolicy, tokenizer: Tokenizer, max_len: int, *, dtype: str, seed: int,
                 gpu_memory_utilization: float, vllm: Any = None):
        """`max_len`: prompt + completion tokens a sequence may hold (capped at the policy's positions);
        `dtype`: vLLM's ("bfloat16", "float32"); `vllm`: the module providing `LLM` and `SamplingParams`
        (default: vllm itself, imported on first use; tests hand in a fake that records calls)."""
        if not isinstance(policy, HFPolicy):
            raise ConfigError(f"grpo.rollout_backend = \"vllm\" serves Hugging Face policies, and this one is "
                              f"an r1lab {type(policy).__name__}: `r1lab export` it and set grpo.init_from to the "
                              f"export, or use rollout_backend = \"r1lab\"")
        self.policy, self.eos_id = policy, tokenizer.eos_id
        self.max_len = min(policy.max_seq_len, max_len)
        self.dtype, self.seed, self.gpu_memory_utilization = dtype, seed, gpu_memory_utilization
        self._vllm, self._llm, self._config_dir = vllm, None, None
        self.stale = True  # vLLM starts from dummy weights: the policy's are sent before it first samples

    @classmethod
    def for_grpo(cls, policy, tokenizer: Tokenizer, cfg: GRPOConfig, longest_prompt: int,
                 vllm: Any = None) -> VLLMRollout:
        """The backend for a GRPO run: the recipe's precision (bfloat16 where the updates autocast to it)."""
        device = next(policy.parameters()).device
        dtype = "bfloat16" if cfg.bf16_autocast and device.type == "cuda" else "float32"
        return cls(policy, tokenizer, longest_prompt + cfg.max_new_tokens, dtype=dtype, seed=cfg.seed,
                   gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, vllm=vllm)

    def weights_changed(self, *_: Any) -> None:
        """The policy's weights moved (an optimizer step post-hook): push them before the next sample."""
        self.stale = True

    @property
    def llm(self) -> Any:
        """The vLLM engine, built on first use from the policy's config (weights follow in `sync`)."""
        if self._llm is None:
            vllm = self._vllm if self._vllm is not None else import_vllm()
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model in this process
            self._config_dir = tempfile.TemporaryDirectory(prefix="r1lab-vllm-")
            self.policy.hf_model.config.save_pretrained(self._config_dir.name)
            self._llm = vllm.LLM(model=self._config_dir.name, dtype=self.dtype, seed=self.seed,
                                 gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_len,
                                 skip_tokenizer_init=True, load_format="dummy")
        return self._llm

    @torch.no_grad()
    def sync(self) -> None:
        """Send the policy's weights to vLLM if they changed since the last push."""
        if not self.stale:
            return
        llm = self.llm
        weights = list(hf_weights(self.policy))
        llm.apply_model(lambda model: model.load_weights(weights))
        llm.reset_prefix_cache()  # blocks cached under the old weights would be reused for repeated prompts
        self.stale = False

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 first_index: int = 0) -> list[Completion]:
        """`params.n` samples of every prompt in one vLLM `generate` call, as r1lab's engine returns them
        (prompt i seeded from params.seed and first_index + i, as `Engine.generate` seeds it)."""
        if params.stop_strings:
            raise ValueError("vLLM rollouts stop on token ids only; stop_strings need r1lab's engine")
        params.validate()
        self.sync()
        stops = tuple(params.stop_token_ids)
        if self.eos_id is not None and not params.ignore_eos and self.eos_id not in stops:
            stops += (self.eos_id,)  # r1lab's engine always stops at EOS; vLLM without a tokenizer knows none
        options = [self.sampling_params(params, stops, len(p), None if params.seed is None
                                        else prompt_seed(params.seed, first_index + i))
                   for i, p in enumerate(prompts)]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], options, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        completions = []
        for i, out in enumerate(outputs):
            samples = sorted(out.outputs, key=lambda o: o.index)
            if len(samples) != params.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples of prompt {i}, asked for {params.n}")
            for j, o in enumerate(samples):
                ids = [int(t) for t in o.token_ids]
                reason = o.finish_reason or "abort"
                if reason == "length" and ids and ids[-1] in stops:
                    reason = "stop"
                completions.append(Completion(i, j, ids, reason, []))
        return completions

    def sampling_params(self, params: SamplingParams, stops: tuple[int, ...], prompt_len: int,
                        seed: int | None) -> Any:
        """vLLM's SamplingParams for one prompt: r1lab's settings, the room left in max_len, the prompt's seed."""
        vllm = self._vllm if self._vllm is not None else import_vllm()
        extra = {"top_k": params.top_k} if params.top_k else {}  # 0 (all tokens) is spelled -1 in older vLLMs
        return vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                   max_tokens=max(1, min(params.max_new_tokens, self.max_len - prompt_len)),
                                   stop_token_ids=list(stops), seed=seed, ignore_eos=params.ignore_eos,
                                   detokenize=False, **extra)


def hf_weights(policy: HFPolicy):
    """(name, tensor) for every parameter under the names a Hugging Face checkpoint stores (and vLLM's
    `load_weights` reads): the transformers model's own, without r1lab's wrapper prefix. A head tied to
    the embedding appears once, as the embedding, which is how vLLM loads tied models."""
    for name, param in policy.hf_model.named_parameters():
        yield name, param.detach()
