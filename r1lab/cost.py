"""What a model costs: parameter counts, FLOPs per token, KV-cache bytes.

Counts come from the config alone (closed formulas, checked against the built module in the
tests), so the 671B shape is counted without allocating it. FLOPs count matmuls only (2 per
multiply-add), the convention of MFU: norms, softmax and activations are left out. A dense
decoder that is not r1lab's (a Hugging Face Qwen2 or Llama) is a `DenseShape`: its matmul weights
counted (from the module, or from its config.json with `dense_shape`), and the same FLOPs functions
take it. This module knows configs and arithmetic; it does not run models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from r1lab.config import ModelConfig


@dataclass
class ParamCounts:
    total: int            # main model, embedding and head included
    active: int           # touched per token: total minus the embedding table and unchosen routed experts
    mtp: int              # the MTP modules on top (they share the embedding and head)
    per_expert: int


def _attn_params(c: ModelConfig) -> tuple[int, int]:
    """(matmul weights, norm weights) of one MLA block."""
    H, C, P, V, R, D = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.dim
    if c.q_lora_rank == 0:
        q, q_norm = D * H * (C + P), 0
    else:
        q, q_norm = D * c.q_lora_rank + c.q_lora_rank * H * (C + P), c.q_lora_rank
    return q + D * (R + P) + R * H * (C + V) + H * V * D, q_norm + R


def _ffn_params(c: ModelConfig, moe: bool) -> tuple[int, int]:
    """(all matmul weights, matmul weights active per token) of one feed-forward."""
    if not moe:
        dense = 3 * c.dim * c.inter_dim
        return dense, dense
    expert = 3 * c.dim * c.moe_inter_dim
    shared = 3 * c.dim * c.moe_inter_dim * c.n_shared_experts
    gate = c.n_routed_experts * c.dim
    return gate + shared + c.n_routed_experts * expert, gate + shared + c.n_activated_experts * expert


def _block_params(c: ModelConfig, moe: bool) -> tuple[int, int]:
    attn, attn_norms = _attn_params(c)
    ffn_all, ffn_active = _ffn_params(c, moe)
    norms = attn_norms + 2 * c.dim
    return attn + ffn_all + norms, attn + ffn_active + norms


def _layer_is_moe(c: ModelConfig, i: int) -> bool:
    return c.n_routed_experts > 0 and i >= c.n_dense_layers


def count_parameters(c: ModelConfig) -> ParamCounts:
    embedding = c.vocab_size * c.dim
    total = active = embedding + c.dim + c.vocab_size * c.dim  # embed, final norm, head
    active -= embedding  # a table lookup, not a matmul
    for i in range(c.n_layers):
        block_total, block_active = _block_params(c, _layer_is_moe(c, i))
        total += block_total
        active += block_active
    mtp_block, _ = _block_params(c, c.n_moe_layers > 0)
    mtp = c.n_mtp_modules * (3 * c.dim + 2 * c.dim * c.dim + mtp_block)
    return ParamCounts(total, active, mtp, 3 * c.dim * c.moe_inter_dim)


def _matmul_params_per_token(c: ModelConfig, with_mtp: bool) -> int:
    """Matmul weights each token multiplies through (forward)."""
    n = c.vocab_size * c.dim  # head
    for i in range(c.n_layers):
        n += _attn_params(c)[0] + _ffn_params(c, _layer_is_moe(c, i))[1]
    if with_mtp:
        per_module = 2 * c.dim * c.dim + _attn_params(c)[0] + _ffn_params(c, c.n_moe_layers > 0)[1] + c.vocab_size * c.dim
        n += c.n_mtp_modules * per_module
    return n


def attention_flops_per_token(c: ModelConfig, n_keys: float) -> float:
    """Forward FLOPs of the score and value products of one token attending to n_keys keys, all layers.

    The naive path works per head in the C+P / V widths; the absorbed path in the latent (R+P / R).
    """
    H, C, P, V, R = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    per_layer = 2 * H * n_keys * ((C + P) + V) if c.attn_impl == "naive" else 2 * H * n_keys * ((R + P) + R)
    return per_layer * c.n_layers


@dataclass(frozen=True)
class DenseShape:
    """A dense decoder with grouped-query attention, as the FLOPs formulas and the engine see it."""

    vocab_size: int
    max_seq_len: int
    matmul_params: int  # weights each token multiplies through: every layer's projections and the head
    n_layers: int
    n_heads: int
    head_dim: int


def dense_shape(config: dict[str, Any]) -> DenseShape:
    """The DenseShape of a Llama-style Hugging Face config.json (Qwen2, Llama, Mistral): q/k/v/o
    projections with `num_key_value_heads` key-value heads, a SwiGLU MLP and an untied or tied head."""
    D, L, H = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    hd = config.get("head_dim") or D // H
    kv = config.get("num_key_value_heads") or H
    per_layer = D * H * hd + 2 * D * kv * hd + H * hd * D + 3 * D * config["intermediate_size"]
    return DenseShape(config["vocab_size"], config["max_position_embeddings"],
                      L * per_layer + config["vocab_size"] * D, L, H, hd)


def _forward_flops(c: ModelConfig | DenseShape, n_keys: float, with_mtp: bool) -> float:
    """Forward FLOPs of one token attending to n_keys keys; a DenseShape has no MTP modules."""
    if isinstance(c, DenseShape):
        return 2 * c.matmul_params + 2 * c.n_heads * n_keys * 2 * c.head_dim * c.n_layers  # scores and values
    forward = 2 * _matmul_params_per_token(c, with_mtp) + attention_flops_per_token(c, n_keys)
    if with_mtp and c.n_mtp_modules:
        forward += c.n_mtp_modules * attention_flops_per_token(c, n_keys) / c.n_layers
    return forward


def train_flops_per_token(c: ModelConfig | DenseShape, seq_len: int, with_mtp: bool = True) -> float:
    """Forward + backward (3x forward) per trained token of a causal sequence of `seq_len`."""
    return 3 * _forward_flops(c, (seq_len + 1) / 2, with_mtp)


def generate_flops_per_token(c: ModelConfig | DenseShape, context_len: float) -> float:
    """Forward FLOPs to produce one token with `context_len` keys already in the cache."""
    return _forward_flops(c, context_len, with_mtp=False)


def generation_flops(c: ModelConfig | DenseShape, prompt_len: int, completion_lens: Sequence[int]) -> float:
    """FLOPs to sample completions of one prompt: one prefill they share, then each one's decode steps.

    Prefill token t (t = 1..P) attends to t keys. A completion of n tokens feeds n - 1 of them back
    (its last is sampled, never fed): fed token j (j = 1..n-1) attends to P + j keys. The cost of a
    token is linear in its keys, so each sum is its count times the mean number of keys.
    """
    total = prompt_len * generate_flops_per_token(c, (prompt_len + 1) / 2)
    for n in completion_lens:
        total += max(n - 1, 0) * generate_flops_per_token(c, prompt_len + n / 2)
    return total


@dataclass
class CacheBytes:
    mla_values_per_layer: int     # what the absorbed path caches per token per layer
    naive_values_per_layer: int   # full per-head keys and values (the naive path)
    mha_values_per_layer: int     # a plain multi-head-attention cache: 2 x heads x head_dim (v_head_dim)
    bytes_per_token: int          # MLA, all layers, at the given dtype width
    mha_bytes_per_token: int


def kv_cache_bytes(c: ModelConfig, bytes_per_value: int = 2) -> CacheBytes:
    mla = c.kv_lora_rank + c.qk_rope_head_dim
    naive = c.n_heads * (c.head_dim_qk + c.v_head_dim)
    mha = 2 * c.n_heads * c.v_head_dim
    return CacheBytes(mla, naive, mha, mla * c.n_layers * bytes_per_value, mha * c.n_layers * bytes_per_value)


# ---------------------------------------------------------------------------------------------
# The cost ledger: what each stage of a run cost, in the V3 report's terms.

@dataclass
class StageCost:
    stage: str
    flops: float            # matmul FLOPs done (model FLOPs: recomputation not counted)
    seconds: float          # wall time
    devices: int            # GPUs, or CPU cores (torch threads) for a CPU run
    device_kind: str        # "cpu-core" or a GPU name
    peak_flops: float       # measured matmul peak of all devices together, FLOP/s
    price_per_device_hour: float

    @property
    def device_hours(self) -> float:
        return self.devices * self.seconds / 3600

    @property
    def dollars(self) -> float:
        return self.device_hours * self.price_per_device_hour

    @property
    def mfu(self) -> float:
        return self.flops / (self.seconds * self.peak_flops) if self.seconds > 0 and self.peak_flops > 0 else 0.0

    def as_dict(self) -> dict:
        return {"stage": self.stage, "flops": self.flops, "seconds": self.seconds, "devices": self.devices,
                "device_kind": self.device_kind, "device_hours": self.device_hours, "dollars": self.dollars,
                "mfu": self.mfu, "peak_flops": self.peak_flops, "price_per_device_hour": self.price_per_device_hour}


@dataclass
class CostLedger:
    """Stages in order; totals; a table shaped like the V3 report's (stage, device-hours, cost)."""

    stages: list[StageCost]

    @classmethod
    def empty(cls) -> "CostLedger":
        return cls([])

    def add(self, stage: StageCost) -> None:
        self.stages.append(stage)

    def totals(self) -> dict:
        flops = sum(s.flops for s in self.stages)
        seconds = sum(s.seconds for s in self.stages)
        weighted_peak = sum(s.peak_flops * s.seconds for s in self.stages)
        return {"flops": flops, "seconds": seconds, "device_hours": sum(s.device_hours for s in self.stages),
                "dollars": sum(s.dollars for s in self.stages),
                "mfu": flops / weighted_peak if weighted_peak else 0.0}

    def as_dict(self) -> dict:
        return {"stages": [s.as_dict() for s in self.stages], "totals": self.totals()}

    @classmethod
    def from_dict(cls, data: dict) -> "CostLedger":
        keys = ("stage", "flops", "seconds", "devices", "device_kind", "peak_flops", "price_per_device_hour")
        return cls([StageCost(**{k: s[k] for k in keys}) for s in data.get("stages", [])])

    def table(self) -> str:
        kind = self.stages[0].device_kind if self.stages else "device"
        unit = "CPU core-hours" if kind == "cpu-core" else f"{kind} GPU-hours"
        lines = [f"| stage | wall time | {unit} | FLOPs | MFU | cost |", "|---|---|---|---|---|---|"]
        for s in self.stages:
            lines.append(f"| {s.stage} | {_duration(s.seconds)} | {s.device_hours:.4f} | {s.flops:.3g} | "
                         f"{100 * s.mfu:.1f}% | ${s.dollars:.4f} |")
        t = self.totals()
        lines.append(f"| **total** | {_duration(t['seconds'])} | {t['device_hours']:.4f} | {t['flops']:.3g} | "
                     f"{100 * t['mfu']:.1f}% | **${t['dollars']:.4f}** |")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
