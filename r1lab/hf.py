"""Hugging Face interop: export r1lab models as `DeepseekV3ForCausalLM`, import them back, and
drive any local Hugging Face causal LM through the decoder protocol the engine uses.

- `hf_config_from_model_config` / `model_config_from_hf_config`: a `ModelConfig` <-> the
  `DeepseekV3Config` of the same shape. What HF's DeepseekV3 cannot express is a ValueError
  naming the field: softmax routing (HF scores experts with a sigmoid only), MoE layers without
  shared experts or with fewer than two experts per group (HF's group score is a top-2 sum even
  for one group), and `norm_eps` other than 1e-6 (HF's `q_a_layernorm`/`kv_a_layernorm` use a
  fixed 1e-6). RoPE maps to `rope_interleave=True`: r1lab rotates interleaved pairs, HF rotates
  the same pairs and lays them out de-interleaved, which changes no dot product.
- `export_hf` writes config.json, model.safetensors (HF names, experts one tensor per expert as
  DeepSeek's released checkpoints and `save_pretrained` store them; transformers fuses them into
  `gate_up_proj`/`down_proj` on load) and the tokenizer. `import_hf` reads such a directory back
  (single or sharded safetensors, per-expert or fused experts). The MTP modules are not exported:
  HF's DeepseekV3 forward does not run them, and its MTP loader only looks for DeepSeek-V3's
  layer 61. Training-only fields (balancing speed, aux and MTP loss weights) are not part of
  the HF config; an import gets r1lab's defaults and no MTP modules.
- `HFDecoder` wraps any HF causal LM with full (not sliding-window) attention so that the engine
  can generate with it: `new_cache`, `decoder(tokens, positions=..., cache=...)` and a cache with
  `select` (rows kept, reordered or repeated) and `extend`. r1lab's cache stores position p in slot p, so pads
  and rejected tokens are simply overwritten; HF's `DynamicCache` only appends, so `HFCache`
  keeps, per row, the position each slot holds and whether a later write at that position has
  superseded it, and hands the model an explicit 4D mask. Superseded slots are masked, not freed.
- `load_causal_lm` opens an r1lab checkpoint or an HF model directory the same way.

Letters in shape comments: B rows, T tokens in this call, S cached slots.

transformers is optional: it is imported inside the functions that need it, and only local
directories are read (nothing is downloaded). This module knows file layouts and parameter names;
it knows no sampling, no training and no chat template (the tokenizer owns that).
"""

from __future__ import annotations

import inspect
import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from r1lab.checkpoint import CheckpointError, load_checkpoint, new_model, read_json_object
from r1lab.config import ConfigError, ModelConfig, model_config_from_dict
from r1lab.model import Transformer
from r1lab.tokenizer import TOKENIZER_FILE, Tokenizer

HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
HF_NORM_EPS = 1e-6  # the eps HF's DeepseekV3 hard-codes for q_a_layernorm and kv_a_layernorm


# ---------------------------------------------------------------------------------------------
# Config mapping

def _check_expressible(cfg: ModelConfig) -> None:
    """Raise ConfigError (a ValueError) for what HF's DeepseekV3 cannot run identically."""
    if cfg.score_func != "sigmoid":
        raise ConfigError(f"model.score_func={cfg.score_func!r}: Hugging Face DeepseekV3 scores "
                          f"experts with a sigmoid only")
    if cfg.n_moe_layers > 0:
        if cfg.n_shared_experts == 0:
            raise ConfigError("model.n_shared_experts=0: Hugging Face DeepseekV3 MoE layers always "
                              "have shared experts")
        if cfg.n_routed_experts // cfg.n_expert_groups < 2:
            raise ConfigError(f"model.n_routed_experts={cfg.n_routed_experts} with "
                              f"n_expert_groups={cfg.n_expert_groups}: Hugging Face DeepseekV3 "
                              f"needs at least 2 experts per group")
    if cfg.norm_eps != HF_NORM_EPS:
        raise ConfigError(f"model.norm_eps={cfg.norm_eps}: Hugging Face DeepseekV3 normalises the "
                          f"query and KV latents with a fixed eps of {HF_NORM_EPS}")


def hf_config_from_model_config(cfg: ModelConfig):
    """The `transformers.DeepseekV3Config` of the same shape (raises ValueError if there is none)."""
    from transformers import DeepseekV3Config

    cfg.validate()
    _check_expressible(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.yarn:  # r1lab's rule: only when the context is really extended
        # mscale == mscale_all_dim leaves cos/sin unscaled (attention_factor 1, said explicitly so
        # mscale 0 means the same) and multiplies the softmax scale by (0.1 mscale ln s + 1)^2.
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len,
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
                "mscale_all_dim": cfg.mscale, "attention_factor": 1.0}
    moe = cfg.n_routed_experts > 0
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        moe_intermediate_size=cfg.moe_inter_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        first_k_dense_replace=cfg.n_dense_layers if moe else cfg.n_layers,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.n_activated_experts, n_group=cfg.n_expert_groups,
        topk_group=cfg.n_limited_groups, routed_scaling_factor=cfg.route_scale,
        norm_topk_prob=True,  # r1lab renormalises sigmoid top-k weights
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_parameters=rope,
        rope_interleave=True,  # r1lab rotates interleaved pairs, as DeepSeek's own code does
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, hidden_act="silu", attention_bias=False,
        tie_word_embeddings=False, num_mtp_layers=0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        architectures=["DeepseekV3ForCausalLM"],
    )


_HF_SHAPE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "first_k_dense_replace", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={value!r}: r1lab needs an integer here")


def model_config_from_hf_config(hf: Any) -> ModelConfig:
    """A validated ModelConfig from a DeepseekV3 config (config.json as a dict, or the object).

    Raises ConfigError (a ValueError) naming the key for anything r1lab's model cannot reproduce.
    """
    d = dict(hf) if isinstance(hf, dict) else hf.to_dict()
    if d.get("model_type") != "deepseek_v3":
        raise ConfigError(f"model_type={d.get('model_type')!r}: only 'deepseek_v3' maps onto r1lab's "
                          f"model; run other models through HFDecoder")
    if d.get("quantization_config"):
        raise ConfigError("quantization_config is set: dequantize the checkpoint to bf16/fp32 first")
    required = {"hidden_act": "silu", "attention_bias": False, "rope_interleave": True,
                "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}
    for key, want in required.items():
        if d.get(key, want) != want:
            raise ConfigError(f"{key}={d[key]!r}: r1lab's model supports only {want!r}")
    missing = [k for k in _HF_SHAPE_KEYS if k not in d]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(missing)}")
    heads = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, heads):
        raise ConfigError(f"num_key_value_heads={d['num_key_value_heads']} differs from "
                          f"num_attention_heads={heads}")
    eps = d.get("rms_norm_eps", HF_NORM_EPS)
    if eps != HF_NORM_EPS:
        raise ConfigError(f"rms_norm_eps={eps}: r1lab uses one eps for every norm, HF's DeepseekV3 "
                          f"uses {HF_NORM_EPS} inside attention")

    max_len = d["max_position_embeddings"]
    rope = dict(d.get("rope_parameters") or {})
    if not rope:  # configs written before transformers 5: rope_theta + rope_scaling
        rope = {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", 10000.0)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", 10000.0)),
                              "original_seq_len": max_len}
    if rope_type == "yarn" and (rope.get("factor") or 1) > 1:
        factor, original = float(rope["factor"]), rope["original_max_position_embeddings"]
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            unscaled = bool(mscale and mscale_all and mscale == mscale_all)
        else:
            unscaled = attention_factor == 1
        if not unscaled:
            raise ConfigError("rope_parameters: YaRN that scales cos/sin (attention_factor != 1, or "
                              "mscale != mscale_all_dim) is not supported")
        if not rope.get("truncate", True):
            raise ConfigError("rope_parameters.truncate=false is not supported")
        if max_len <= original:
            raise ConfigError(f"YaRN with max_position_embeddings={max_len} <= "
                              f"original_max_position_embeddings={original} is not supported")
        fields.update(rope_factor=factor, original_seq_len=original,
                      beta_fast=_as_int(rope.get("beta_fast") or 32, "rope_parameters.beta_fast"),
                      beta_slow=_as_int(rope.get("beta_slow") or 1, "rope_parameters.beta_slow"),
                      mscale=float(mscale_all or 0.0))
    elif rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported")

    n_layers = d["num_hidden_layers"]
    cfg = model_config_from_dict({
        **fields,
        "vocab_size": d["vocab_size"], "dim": d["hidden_size"], "inter_dim": d["intermediate_size"],
        "moe_inter_dim": d["moe_intermediate_size"], "n_layers": n_layers,
        "n_dense_layers": min(d["first_k_dense_replace"], n_layers), "n_heads": heads,
        "n_routed_experts": d["n_routed_experts"], "n_shared_experts": d["n_shared_experts"],
        "n_activated_experts": d["num_experts_per_tok"], "n_expert_groups": d["n_group"] or 1,
        "n_limited_groups": d["topk_group"] or 1, "score_func": "sigmoid",
        "route_scale": float(d["routed_scaling_factor"]), "q_lora_rank": d["q_lora_rank"] or 0,
        "kv_lora_rank": d["kv_lora_rank"], "qk_nope_head_dim": d["qk_nope_head_dim"],
        "qk_rope_head_dim": d["qk_rope_head_dim"], "v_head_dim": d["v_head_dim"],
        "max_seq_len": max_len, "n_mtp_modules": 0, "norm_eps": float(eps),
        "init_std": float(d.get("initializer_range", 0.006)),
    })
    _check_expressible(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Parameter names

_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
         "wo": "o_proj"}
_SWIGLU = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def hf_name(name: str) -> str | None:
    """The HF DeepseekV3 name of an r1lab state-dict entry; None for the MTP modules."""
    if name in _TOP:
        return _TOP[name]
    if name.startswith("mtp."):
        return None
    m = _LAYER.fullmatch(name)
    if m:
        try:
            return _hf_layer_name(f"model.layers.{m[1]}.", m[2].split("."))
        except (KeyError, IndexError, ValueError):
            pass
    raise KeyError(f"no Hugging Face name for r1lab parameter {name!r}")


def _hf_layer_name(prefix: str, parts: list[str]) -> str:
    if parts == ["attn_norm", "weight"]:
        return prefix + "input_layernorm.weight"
    if parts == ["ffn_norm", "weight"]:
        return prefix + "post_attention_layernorm.weight"
    if parts[0] == "attn" and parts[2:] == ["weight"]:
        return prefix + f"self_attn.{_ATTN[parts[1]]}.weight"
    if parts[0] == "ffn":
        rest = parts[1:]
        if rest == ["gate", "weight"]:
            return prefix + "mlp.gate.weight"
        if rest == ["gate", "expert_bias"]:
            return prefix + "mlp.gate.e_score_correction_bias"
        if rest[0] == "experts" and rest[3:] == ["weight"]:
            return prefix + f"mlp.experts.{int(rest[1])}.{_SWIGLU[rest[2]]}.weight"
        if rest[0] == "shared_experts" and rest[2:] == ["weight"]:
            return prefix + f"mlp.shared_experts.{_SWIGLU[rest[1]]}.weight"
        if rest[1:] == ["weight"]:
            return prefix + f"mlp.{_SWIGLU[rest[0]]}.weight"
    raise KeyError(prefix + ".".join(parts))


# ---------------------------------------------------------------------------------------------
# Export and import

def export_hf(model: Transformer, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` as a Hugging Face `DeepseekV3ForCausalLM` directory; return it.

    `AutoModelForCausalLM.from_pretrained(out_dir)` then gives the same logits. MTP modules are
    dropped (see the module docstring). The tokenizer, if given, is saved beside the weights
    (tokenizer.json + tokenizer_config.json with the chat template) and names the BOS/EOS/PAD ids.
    """
    cfg = model.config
    hf_config = hf_config_from_model_config(cfg)
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                             f"{cfg.vocab_size}")
        hf_config.bos_token_id, hf_config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
        hf_config.pad_token_id = tokenizer.pad_id
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        target = hf_name(name)
        if target is None:
            continue
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[target] = tensor
    hf_config.dtype = model.head.weight.dtype
    out = Path(out_dir)
    if (out / HF_INDEX_FILE).exists():
        raise FileExistsError(f"{out / HF_INDEX_FILE}: {out} already holds a sharded model; "
                              f"export into an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    save_file(tensors, out / HF_WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _stored_names(root: Path) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index if sharded, else the single file."""
    index = root / HF_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        for file in set(weight_map.values()):
            if not (root / file).is_file():
                raise CheckpointError(f"{root / file}: missing (listed in {HF_INDEX_FILE})")
        return dict(weight_map)
    if not (root / HF_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{root / HF_WEIGHTS_FILE}: missing (and no {HF_INDEX_FILE})")
    with safe_open(root / HF_WEIGHTS_FILE, framework="pt") as f:
        return dict.fromkeys(f.keys(), HF_WEIGHTS_FILE)


def _is_ignored(name: str, n_layers: int) -> bool:
    """Stored tensors r1lab does not load: MTP layers (numbered past the main ones), rotary caches."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return (m is not None and int(m[1]) >= n_layers) or name.endswith("rotary_emb.inv_freq")


def read_hf_config(root: Path) -> dict[str, Any]:
    """The config.json of a Hugging Face model directory, or an error naming the file."""
    file = root / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; not a Hugging Face model directory")
    return read_json_object(file, ConfigError)


def import_hf(hf_dir: str | Path, device: torch.device | None = None) -> Transformer:
    """An r1lab Transformer from a DeepseekV3-format Hugging Face directory (float32).

    Every tensor the model needs is checked for presence and shape before any is read; an
    unexpected tensor is an error too, except MTP layers and rotary caches, which are skipped.
    """
    root = Path(hf_dir)
    doc = read_hf_config(root)
    try:
        cfg = model_config_from_hf_config(doc)
    except ConfigError as e:
        raise ConfigError(f"{root / CONFIG_FILE}: {e}") from None
    stored = _stored_names(root)
    model = new_model(cfg, device)
    expected = model.state_dict()

    # r1lab name -> (stored name, how to cut the stored tensor: None, or (expert, half) of a fused one)
    plan: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for name in expected:
        target = hf_name(name)
        if target in stored:
            plan[name] = (target, None)
            continue
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", target)
        if m and m[3] != "down_proj" and f"{m[1]}.gate_up_proj" in stored:
            plan[name] = (f"{m[1]}.gate_up_proj", (int(m[2]), 0 if m[3] == "gate_proj" else 1))
        elif m and m[3] == "down_proj" and f"{m[1]}.down_proj" in stored:
            plan[name] = (f"{m[1]}.down_proj", (int(m[2]), -1))
        elif target == _TOP["head.weight"] and doc.get("tie_word_embeddings") and _TOP["embed.weight"] in stored:
            plan[name] = (_TOP["embed.weight"], None)
        else:
            raise CheckpointError(f"{root}: tensor {target!r} is missing (r1lab's {name!r} needs it)")
    used = {source for source, _ in plan.values()}
    for source in stored:
        if source not in used and not _is_ignored(source, cfg.n_layers):
            raise CheckpointError(f"{root / stored[source]}: unexpected tensor {source!r}")

    with ExitStack() as stack, torch.no_grad():
        try:
            handles = {file: stack.enter_context(safe_open(root / file, framework="pt"))
                       for file in sorted({stored[s] for s in used})}
            for name, (source, cut) in plan.items():  # every shape first, then any data
                shape = tuple(handles[stored[source]].get_slice(source).get_shape())
                want = tuple(expected[name].shape)
                if cut is not None:  # (E, 2I, D) for gate_up_proj, (E, D, I) for down_proj
                    want = (shape[0],) + ((2 * want[0], want[1]) if cut[1] >= 0 else want)
                    if cut[0] >= shape[0]:
                        want = (cut[0] + 1,) + want[1:]
                if shape != want:
                    raise CheckpointError(f"{root / stored[source]}: tensor {source!r} has shape "
                                          f"{list(shape)}, {CONFIG_FILE} implies {list(want)}")
            fused: dict[str, torch.Tensor] = {}  # one fused tensor at a time keeps memory flat
            for name, (source, cut) in plan.items():
                f = handles[stored[source]]
                if cut is None:
                    expected[name].copy_(f.get_tensor(source))
                    continue
                if source not in fused:
                    fused = {source: f.get_tensor(source)}
                expert, half = cut
                part = fused[source][expert]  # gate_up_proj rows: the gate's, then the up's
                expected[name].copy_(part.chunk(2, dim=0)[half] if half >= 0 else part)
        except SafetensorError as e:
            raise CheckpointError(f"{root}: a weights file cannot be read ({e})") from None
    return model


# ---------------------------------------------------------------------------------------------
# Hugging Face causal LMs behind the decoder protocol

@dataclass(frozen=True)
class DecoderConfig:
    """What the engine reads from a decoder's `config`."""

    vocab_size: int
    max_seq_len: int


class HFCache:
    """A `DynamicCache` plus, per row, the position each slot holds and whether it is still valid.

    A write at position p supersedes (masks) every earlier slot of that row at p, which is what
    overwriting slot p does in r1lab's `KVCache`. Slots grow by T per call.
    """

    def __init__(self, kv: Any, batch_size: int, max_len: int, device: torch.device | None = None):
        self.kv = kv
        self.max_len = max_len
        self.slot_pos = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # (B, S)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)     # (B, S)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def n_slots(self) -> int:
        return self.valid.shape[1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (in that order; a row given n times becomes n rows)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        if self.n_slots:
            self.kv.batch_select_indices(rows)
        self.slot_pos, self.valid = self.slot_pos[rows], self.valid[rows]

    def extend(self, other: HFCache) -> None:
        """Append other's rows after ours; the shorter cache is padded with invalid slots."""
        self.max_len = max(self.max_len, other.max_len)
        S = max(self.n_slots, other.n_slots)
        mine, theirs = _layer_tensors(self), _layer_tensors(other)
        if S:
            template = mine or theirs
            joined = type(self.kv)()
            for i, pair in enumerate(zip(_fit(mine, template, self.batch_size, S),
                                         _fit(theirs, template, other.batch_size, S))):
                (k1, v1), (k2, v2) = pair
                joined.update(torch.cat([k1, k2]), torch.cat([v1, v2]), i)
            self.kv = joined

        def pad(t: torch.Tensor, value: Any) -> torch.Tensor:
            return F.pad(t, (0, S - t.shape[1]), value=value)

        self.slot_pos = torch.cat([pad(self.slot_pos, -1), pad(other.slot_pos, -1)])
        self.valid = torch.cat([pad(self.valid, False), pad(other.valid, False)])


def _layer_tensors(cache: HFCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), shaped (B, heads, S, head_dim); empty before the first write."""
    if not cache.n_slots:
        return []
    return [(layer.keys, layer.values) for layer in cache.kv.layers]


def _fit(layers: list[tuple[torch.Tensor, torch.Tensor]], template: list[tuple[torch.Tensor, torch.Tensor]],
         batch_size: int, n_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-pad every layer's tensors along the slot axis to `n_slots` (create them if absent)."""
    if not layers:
        return [tuple(t.new_zeros(batch_size, t.shape[1], n_slots, t.shape[3]) for t in pair)
                for pair in template]
    return [tuple(F.pad(t, (0, 0, 0, n_slots - t.shape[2])) for t in pair) for pair in layers]


class HFDecoder(nn.Module):
    """A Hugging Face causal LM behind r1lab's decoder protocol (see the module docstring).

    Only decoders whose every layer attends fully over a KV cache qualify: sliding-window and
    recurrent layers would need a different bookkeeping and are refused. The model receives an
    explicit 4D additive mask, so the attention backend must accept one (eager and sdpa do).
    """

    def __init__(self, hf_model: nn.Module, max_seq_len: int | None = None):
        super().__init__()
        self.hf_model = hf_model
        config = hf_model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer_types = getattr(text, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or (
                getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)):
            raise ValueError(f"{type(hf_model).__name__}: sliding-window or non-attention layers are "
                             f"not supported by HFDecoder")
        if max_seq_len is None:
            max_seq_len = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions",
                                                           "max_sequence_length") if getattr(text, k, None)), None)
        if not max_seq_len:
            raise ValueError(f"{type(hf_model).__name__}: the config names no maximum length; "
                             f"pass max_seq_len")
        head = hf_model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else text.vocab_size
        self.config = DecoderConfig(vocab_size=int(vocab), max_seq_len=int(max_seq_len))
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | None = None, **kwargs: Any) -> HFDecoder:
        """Load a local Hugging Face model directory (never the hub); kwargs go to transformers."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path / CONFIG_FILE}: missing; not a Hugging Face model directory")
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
        if device is not None:
            hf_model.to(device)
        return cls(hf_model.eval())

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def new_cache(self, batch_size: int, max_len: int | None = None) -> HFCache:
        from transformers import DynamicCache

        device = self.hf_model.get_input_embeddings().weight.device
        return HFCache(DynamicCache(), batch_size, max_len or self.max_seq_len, device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: HFCache | None = None, valid: torch.Tensor | None = None,
                n_slots: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); the same contract as `Transformer.forward` (`n_slots`, a hint for
        r1lab's slot cache, means nothing to this one).

        With a cache, token (b, t) attends to the still-valid cached slots of row b at positions
        <= positions[b, t] and to this call's tokens at positions <= its own. Without one, keys
        are this call's tokens (filtered by `valid` if given).
        """
        B, T = tokens.shape
        if positions is None:
            positions = (torch.arange(T, device=tokens.device).expand(B, T) if valid is None
                         else (valid.long().cumsum(dim=1) - 1).clamp(min=0))
        limit = self.max_seq_len if cache is None else min(self.max_seq_len, cache.max_len)
        if positions.numel() and int(positions.max()) >= limit:
            raise ValueError(f"position {int(positions.max())} exceeds the maximum length {limit}")
        query = positions[:, :, None]  # (B, T, 1)
        allowed = positions[:, None, :] <= query  # (B, T, T) this call's keys
        if cache is None:
            if valid is not None:
                allowed = allowed & valid[:, None, :]
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=tokens.device)
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} rows, tokens have {B}")
            rewritten = (cache.slot_pos[:, :, None] == positions[:, None, :]).any(dim=-1)  # (B, S)
            still_valid = cache.valid & ~rewritten
            old = still_valid[:, None, :] & (cache.slot_pos[:, None, :] <= query)  # (B, T, S)
            allowed = torch.cat([old, allowed], dim=-1)  # (B, T, S + T)
        dtype = self.hf_model.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=tokens.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, T, S')
        kwargs = {self._cache_kwarg: None if cache is None else cache.kv}
        out = self.hf_model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                            use_cache=cache is not None, **kwargs)
        if cache is not None:
            cache.slot_pos = torch.cat([cache.slot_pos, positions], dim=1)
            cache.valid = torch.cat([still_valid, torch.ones_like(positions, dtype=torch.bool)], dim=1)
        return out.logits


# ---------------------------------------------------------------------------------------------
# One loader for both kinds of directory

def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> tuple[nn.Module, Tokenizer | None]:
    """(decoder, tokenizer or None) from an r1lab checkpoint or a local Hugging Face model dir.

    An r1lab checkpoint is recognised by `format_version` in its config.json and loads as a
    `Transformer`; anything else loads through `HFDecoder.from_pretrained`. The tokenizer is
    `Tokenizer.load(path)` when the directory has a tokenizer.json.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such model directory")
    config_file = root / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; not an r1lab checkpoint or a Hugging Face "
                                f"model directory")
    try:
        doc = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if isinstance(doc, dict) and "format_version" in doc:
        model, tokenizer, _ = load_checkpoint(root, device=device)
        if model.head.weight.dtype != dtype:
            model = model.to(dtype)
        return model.eval(), tokenizer
    decoder = HFDecoder.from_pretrained(root, dtype=dtype, device=device)
    tokenizer = Tokenizer.load(root) if (root / TOKENIZER_FILE).is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > decoder.vocab_size:
        raise ValueError(f"{root / TOKENIZER_FILE}: {tokenizer.vocab_size} ids exceed the model's "
                         f"vocabulary of {decoder.vocab_size}")
    return decoder, tokenizer
