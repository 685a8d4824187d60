"""Configuration: the model shape (`ModelConfig`), its presets, and typed dict/CLI conversion.

`from_dict` and `apply_overrides` map TOML tables and `--section.field=value` strings onto nested
dataclasses; every value is checked against the field's type and every config validates its own
invariants, so a typo or an impossible value is one line naming the key, not a traceback deep in
the model. Run recipes (data, training, RL, evaluation sections) live in `r1lab.recipe`. This
module knows nothing of torch: it only describes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass
from typing import Any, Literal


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line naming the key or file."""


class DataError(ConfigError):
    """A user's data file that cannot be used; the message names the file (and line, for JSONL)."""


DEFAULT_DEVICE = "cpu"  # a recipe's default; library code takes the torch.device resolved from it
DEVICE_NAMES = re.compile(r"cpu|mps|cuda(:\d+)?")
"""What a device may be called in a recipe or on the command line: cpu, cuda, cuda:N or mps."""


def check_device_name(name: Any, key: str = "device") -> None:
    """A ConfigError naming `key` unless `name` is one of the forms DEVICE_NAMES allows (the form
    only: whether this machine has the device is `r1lab.device.resolve_device`'s to say)."""
    if not isinstance(name, str) or not DEVICE_NAMES.fullmatch(name):
        raise ConfigError(f"{key} must be cpu, cuda, cuda:N or mps, got {name!r}")


RANGES = {"> 0": lambda v: v > 0, "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1]": lambda v: 0 <= v <= 1,
          "in [0, 1)": lambda v: 0 <= v < 1}
"""Ranges a value may be checked against, keyed by how an error message states them."""


def check_range(key: str, value: Any, want: str) -> None:
    """A ConfigError "KEY must be WANT, got VALUE" unless `value` is in `want`: ">= N" for a number N,
    or one of the RANGES."""
    ok = value >= float(want[3:]) if want.startswith(">= ") else RANGES[want](value)
    if not ok:
        raise ConfigError(f"{key} must be {want}, got {value}")


@dataclass
class ModelConfig:
    """Shape of a DeepSeek-V3-style transformer. Field names follow DeepSeek's inference code."""

    vocab_size: int = 512
    """Number of token ids (embedding rows and output logits)."""
    dim: int = 128
    """Model width (residual stream)."""
    inter_dim: int = 384
    """Hidden width of the dense SwiGLU MLP used by the first `n_dense_layers` layers."""
    moe_inter_dim: int = 96
    """Hidden width of each (shared or routed) expert."""
    n_layers: int = 4
    """Number of transformer blocks in the main model."""
    n_dense_layers: int = 1
    """The first this-many blocks use a dense MLP instead of MoE."""
    n_heads: int = 4
    """Attention heads."""
    # DeepSeekMoE
    n_routed_experts: int = 8
    """Fine-grained routed experts per MoE layer (0 makes every layer dense)."""
    n_shared_experts: int = 1
    """Always-on experts per MoE layer."""
    n_activated_experts: int = 2
    """Routed experts chosen per token (top-k)."""
    n_expert_groups: int = 1
    """Groups the routed experts are split into for group-limited routing."""
    n_limited_groups: int = 1
    """Groups a token may route into (top groups by their best two scores)."""
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    """Router scoring: V2 uses softmax, V3 sigmoid."""
    route_scale: float = 1.0
    """Multiplier on the (renormalised) routing weights (2.5 in V3)."""
    bias_update_speed: float = 0.001
    """Aux-loss-free balancing: step gamma of the per-expert selection bias."""
    seq_aux_alpha: float = 0.0001
    """Weight of the sequence-wise balance loss (0 disables it)."""
    # Multi-head Latent Attention
    q_lora_rank: int = 0
    """Rank of the low-rank query path (0: full-rank `wq`)."""
    kv_lora_rank: int = 64
    """Width of the cached latent `c_kv`."""
    qk_nope_head_dim: int = 32
    """Per-head query/key width without RoPE."""
    qk_rope_head_dim: int = 16
    """Per-head query width with RoPE; also the width of the one shared RoPE key."""
    v_head_dim: int = 32
    """Per-head value width."""
    attn_impl: Literal["naive", "absorb"] = "absorb"
    """`naive` caches full per-head K/V; `absorb` caches only c_kv + the RoPE key (V3's way)."""
    # Rotary embeddings and YaRN
    max_seq_len: int = 512
    """Longest sequence the model (and its KV cache) supports."""
    original_seq_len: int = 512
    """Context length of pretraining; YaRN scaling applies beyond it."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_factor: float = 1.0
    """YaRN extension factor s (40 in V3); 1 disables YaRN."""
    beta_fast: int = 32
    """YaRN: rotations above which frequencies are kept unchanged."""
    beta_slow: int = 1
    """YaRN: rotations below which frequencies are fully interpolated."""
    mscale: float = 1.0
    """YaRN attention-temperature coefficient: softmax scale gets (0.1 * mscale * ln s + 1)^2."""
    # Multi-token prediction
    n_mtp_modules: int = 0
    """Depth D of multi-token prediction (V3: 1); module k predicts token t+1+k."""
    mtp_loss_weight: float = 0.3
    """lambda: weight of the averaged MTP losses."""
    # Misc
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.006
    """Std of the normal init of linear and embedding weights (V3 value)."""

    @property
    def head_dim_qk(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        """YaRN applies only when the context is really extended: a rope_factor above 1 and max_seq_len
        beyond original_seq_len."""
        return self.rope_factor > 1 and self.max_seq_len > self.original_seq_len

    @property
    def n_moe_layers(self) -> int:
        return 0 if self.n_routed_experts == 0 else self.n_layers - self.n_dense_layers

    def validate(self) -> None:
        positive = ["vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"]
        for name in positive:
            check_range(f"model.{name}", getattr(self, name), "> 0")
        non_negative = ["n_dense_layers", "n_routed_experts", "n_shared_experts", "q_lora_rank",
                        "qk_nope_head_dim", "n_mtp_modules", "bias_update_speed", "seq_aux_alpha",
                        "mtp_loss_weight"]
        for name in non_negative:
            check_range(f"model.{name}", getattr(self, name), ">= 0")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.n_dense_layers > self.n_layers:
            raise ConfigError(f"model.n_dense_layers ({self.n_dense_layers}) exceeds model.n_layers ({self.n_layers})")
        if self.n_routed_experts > 0:
            check_range("model.moe_inter_dim", self.moe_inter_dim, "> 0")
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                raise ConfigError(f"model.n_activated_experts must be in 1..n_routed_experts "
                                  f"({self.n_routed_experts}), got {self.n_activated_experts}")
            if self.n_expert_groups < 1 or self.n_routed_experts % self.n_expert_groups:
                raise ConfigError(f"model.n_expert_groups ({self.n_expert_groups}) must divide "
                                  f"model.n_routed_experts ({self.n_routed_experts})")
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                raise ConfigError(f"model.n_limited_groups must be in 1..n_expert_groups "
                                  f"({self.n_expert_groups}), got {self.n_limited_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_expert_groups > 1 and per_group < 2:
                raise ConfigError("model.n_expert_groups leaves fewer than 2 experts per group; "
                                  "group scores need the top two")
            if self.n_limited_groups * per_group < self.n_activated_experts:
                raise ConfigError(f"model.n_activated_experts ({self.n_activated_experts}) exceeds the "
                                  f"experts in {self.n_limited_groups} limited group(s) ({self.n_limited_groups * per_group})")
        check_range("model.route_scale", self.route_scale, "> 0")
        check_range("model.rope_factor", self.rope_factor, ">= 1")
        if self.original_seq_len > self.max_seq_len and self.rope_factor > 1:
            raise ConfigError("model.original_seq_len exceeds model.max_seq_len while YaRN is on")


def _preset_tiny() -> ModelConfig:
    # The CPU demo size: a few million parameters, MoE on, MLA with the absorbed cache, one MTP module.
    return ModelConfig(vocab_size=512, dim=192, inter_dim=512, moe_inter_dim=128, n_layers=4,
                       n_dense_layers=1, n_heads=4, n_routed_experts=8, n_shared_experts=1,
                       n_activated_experts=2, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, max_seq_len=512, original_seq_len=512,
                       n_mtp_modules=1, init_std=0.02)  # V3's 0.006 suits width 7168; at 192 it stalls learning


def _preset_small() -> ModelConfig:
    return ModelConfig(vocab_size=8192, dim=512, inter_dim=1408, moe_inter_dim=256, n_layers=8,
                       n_dense_layers=1, n_heads=8, n_routed_experts=16, n_shared_experts=1,
                       n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                       route_scale=1.0, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                       qk_rope_head_dim=32, v_head_dim=64, max_seq_len=2048, original_seq_len=2048,
                       n_mtp_modules=1, init_std=0.02)


def _preset_v2_lite() -> ModelConfig:
    # DeepSeek-V2-Lite (config_16B.json): 15.7B total, 2.4B active.
    return ModelConfig(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408,
                       n_layers=27, n_dense_layers=1, n_heads=16, n_routed_experts=64,
                       n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
                       n_limited_groups=1, score_func="softmax", route_scale=1.0, q_lora_rank=0,
                       kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                       max_seq_len=16384, original_seq_len=4096, rope_factor=40.0, mscale=0.707,
                       n_mtp_modules=0)


def _preset_v3() -> ModelConfig:
    # DeepSeek-V3 (config_671B.json): 671B total, 37B active, one MTP module.
    return ModelConfig(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048,
                       n_layers=61, n_dense_layers=3, n_heads=128, n_routed_experts=256,
                       n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                       n_limited_groups=4, score_func="sigmoid", route_scale=2.5, q_lora_rank=1536,
                       kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                       max_seq_len=16384, original_seq_len=4096, rope_factor=40.0, mscale=1.0,
                       n_mtp_modules=1)


PRESETS = {"tiny": _preset_tiny, "small": _preset_small, "v2-lite": _preset_v2_lite, "v3": _preset_v3}


def model_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# Typed conversion from TOML / JSON / command-line values onto dataclasses.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against type `tp` (a float field also takes an int); dataclass tables recurse."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, value_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__} {value!r}")
        return {str(k): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be a bool, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be finite, got {value!r}")
            return float(value)
        raise ConfigError(f"{key} must be a float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, type-checking every key; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown key {full!r}; known keys: {', '.join(sorted(names))}")
        kwargs[key] = _convert(value, hints[key], full)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError as e:
            # A section's own check names its fields bare ("steps must be >= 1"); say which section.
            message = str(e)
            if prefix and not message.startswith(f"{prefix}."):
                message = f"{prefix}.{message}"
            raise ConfigError(message) from None
    return obj


def model_config_from_dict(data: dict) -> ModelConfig:
    """A validated ModelConfig from a plain dict (e.g. a checkpoint's config.json)."""
    return from_dict(ModelConfig, data, prefix="model")


def _parse_cli_value(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line string according to the field's type."""
    origin = typing.get_origin(tp)
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} must be a bool (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key} must be an int, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key} must be a float, got {text!r}") from None
    if origin is dict:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key} must be an inline table like {{a = 1}}, got {text!r}") from None
    if origin is list:
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = [s for s in text.split(",") if s]
            (item_tp, *_) = typing.get_args(tp) or (str,)
            return [_parse_cli_value(s, item_tp, key) for s in value]
        return value
    return text


def apply_overrides(obj: Any, overrides: list[str]) -> Any:
    """Apply `--section.field=value` strings to a (nested) dataclass, returning a validated copy."""
    data = to_dict(obj)
    cls = type(obj)
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.field=value")
        path, raw = text.split("=", 1)
        keys = path.split(".")
        node, node_cls = data, cls
        for i, key in enumerate(keys):
            names = {f.name for f in dataclasses.fields(node_cls)}
            if key not in names:
                raise ConfigError(f"unknown key {'.'.join(keys[:i + 1])!r}; known keys: {', '.join(sorted(names))}")
            tp = typing.get_type_hints(node_cls)[key]
            if i == len(keys) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{path!r} is a section; set one of its fields, e.g. --{path}.<field>=...")
                node[key] = _parse_cli_value(raw, tp, path)
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{'.'.join(keys[:i + 1])!r} is not a section")
                node, node_cls = node[key], tp
    return from_dict(cls, data)


def to_dict(obj: Any) -> dict:
    """A plain nested dict of a dataclass (JSON/TOML-able)."""
    return dataclasses.asdict(obj)
