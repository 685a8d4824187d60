"""The DeepSeek-V3-style transformer: RMSNorm, RoPE/YaRN, MLA, DeepSeekMoE, multi-token prediction.

The reference: plain torch (`F.linear`, einsum and batched products, SDPA for the naive MLA, a
sort-based MoE dispatch), one device-agnostic forward that trains at every position, float32 on
CPUs and bfloat16 on GPUs. The model knows token ids, positions and its KV cache; it knows no
tokenizer, no sampling, no optimiser and no fast kernels (the engine samples and owns its CPU
backend, which reads these modules' weights; the trainers optimise). Names follow DeepSeek's
inference code (`wq_a`, `wkv_b`, `kv_norm`, `wo`, `w1/w2/w3`), so its weights map one to one.

Letter legend used in shape comments:
  B batch, T new tokens in this call, S key slots (cache length), H heads, D model dim,
  R kv_lora_rank (latent width), P qk_rope_head_dim, C qk_nope_head_dim, V v_head_dim,
  N flattened tokens (B*T), E routed experts, K activated experts per token, G expert groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1lab.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings with YaRN

def _yarn_correction_dim(n_rotations: float, dim: int, base: float, max_len: int) -> float:
    # The dimension index whose wavelength completes `n_rotations` turns over `max_len` positions.
    return dim * math.log(max_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies (P/2,), interpolated by YaRN when the context is extended."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.yarn:
        low = max(math.floor(_yarn_correction_dim(config.beta_fast, dim, base, config.original_seq_len)), 0)
        high = min(math.ceil(_yarn_correction_dim(config.beta_slow, dim, base, config.original_seq_len)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: high-frequency pairs kept as they are; 0: low-frequency pairs interpolated
        freqs = freqs / config.rope_factor * (1 - keep) + freqs * keep
    return freqs.float()


def softmax_scale(config: ModelConfig) -> float:
    """(C + P)^-0.5, times mscale^2 under YaRN (the attention-temperature correction)."""
    scale = config.head_dim_qk ** -0.5
    if config.yarn:
        m = 0.1 * config.mscale * math.log(config.rope_factor) + 1.0
        scale = scale * m * m
    return scale


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim: x (B, T, [H,] P) read as P/2 pairs (a, b), each
    turned by its angle; `rotation` (..., P/2, 2) holds (cos, sin), broadcastable to x's pairs.

    The complex product (a + ib)(cos + i sin) written in real arithmetic (the same four products and
    two sums), which a compiler fuses with its neighbours."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = rotation[..., 0], rotation[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# KV cache

class KVCache:
    """Preallocated per-layer cache, slot s holding the token at position s of each row.

    `absorb`: the normalised latent c_kv and the shared RoPE key side by side, (B, S, R + P) per
    layer: R + P values per token per layer. `naive`: full per-head keys (B, S, H, C+P) and values
    (B, S, H, V). Rows can be selected (finished sequences leave) or repeated (n samples share a
    prefill) between steps.
    """

    def __init__(self, layers: list[list[torch.Tensor]]):
        """A cache over the given tensors (no copy): `zeros` allocates one, an exported step wraps its inputs."""
        self.layers, self.max_len = layers, layers[0][0].shape[1]

    @classmethod
    def zeros(cls, config: ModelConfig, n_layers: int, batch_size: int, max_len: int, dtype: torch.dtype,
              device: torch.device) -> KVCache:
        if config.attn_impl == "absorb":
            shapes = [(batch_size, max_len, config.kv_lora_rank + config.qk_rope_head_dim)]
        else:
            shapes = [(batch_size, max_len, config.n_heads, config.head_dim_qk),
                      (batch_size, max_len, config.n_heads, config.v_head_dim)]
        return cls([[torch.zeros(s, dtype=dtype, device=device) for s in shapes] for _ in range(n_layers)])

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (in that order; a row given n times becomes n rows sharing its prefill)."""
        self.layers = [[t.index_select(0, rows) for t in layer] for layer in self.layers]

    def extend(self, other: "KVCache") -> None:
        """Append other's rows after ours (requests joining a running batch); the shorter cache's rows
        get zeroed slots up to the longer's length."""
        length = max(self.max_len, other.max_len)

        def fit(t: torch.Tensor) -> torch.Tensor:
            return t if t.shape[1] == length else torch.cat([t, t.new_zeros(t.shape[0], length - t.shape[1], *t.shape[2:])], 1)

        self.layers = [[torch.cat([fit(a), fit(b)]) for a, b in zip(mine, theirs)]
                       for mine, theirs in zip(self.layers, other.layers)]
        self.max_len = length

    def write_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot ids (B*T,) of positions (B, T) in every layer's (B*S, ...) view: b * S + position."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        return (positions + rows * self.max_len).flatten()


def _write(buf: torch.Tensor, write_at: torch.Tensor, new: torch.Tensor) -> None:
    """buf (B, S, ...) viewed as (B*S, ...): rows write_at (B*T,) = new (B, T, ...)."""
    buf.view(-1, *buf.shape[2:]).index_copy_(0, write_at, new.flatten(0, 1).to(buf.dtype))


# ---------------------------------------------------------------------------------------------
# Multi-head Latent Attention

class MLA(nn.Module):
    """Multi-head Latent Attention. Keys and values come from one latent c_kv (R wide) per token and one
    RoPE key (P wide) shared by all heads.

    `naive` expands the latent into per-head keys and values (and caches those); `absorb` folds wkv_b
    into the query and the output, so attention runs over the cached latent itself (R + P values per
    token). Both give the same logits (tests/test_model.py).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H, C, P, V, R = (config.n_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                         config.v_head_dim, config.kv_lora_rank)
        if config.q_lora_rank == 0:
            self.wq = nn.Linear(config.dim, H * (C + P), bias=False)
        else:
            self.wq_a = nn.Linear(config.dim, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, config.norm_eps)
            self.wq_b = nn.Linear(config.q_lora_rank, H * (C + P), bias=False)
        self.wkv_a = nn.Linear(config.dim, R + P, bias=False)
        self.kv_norm = RMSNorm(R, config.norm_eps)
        self.wkv_b = nn.Linear(R, H * (C + V), bias=False)
        self.wo = nn.Linear(H * V, config.dim, bias=False)
        self.scale = softmax_scale(config)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor,
                write_at: torch.Tensor | None = None, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, D); rotation (B, T, P/2, 2) RoPE (cos, sin); mask (B, T, S) bool, True = may attend.

        Without a cache the keys are the T tokens of x (S = T). With a cache, the new keys are
        written at the flat slots `write_at` (`KVCache.write_index`) and attention runs over slots [0, S).
        """
        cfg = self.config
        B, T, _ = x.shape
        H, C, P, V, R = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = self.wq(x) if cfg.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, H, C + P).split([C, P], dim=-1)  # (B, T, H, C), (B, T, H, P)
        q_pe = apply_rope(q_pe, rotation[:, :, None])  # one rotation for every head
        c_kv, k_pe = self.wkv_a(x).split([R, P], dim=-1)  # (B, T, R), (B, T, P)
        k_pe = apply_rope(k_pe, rotation)  # one RoPE key shared by all heads
        c_kv = self.kv_norm(c_kv)
        S = mask.shape[-1]
        if cfg.attn_impl == "naive":
            k_nope, v = self.wkv_b(c_kv).view(B, T, H, C + V).split([C, V], dim=-1)
            k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, H, P)], dim=-1)  # (B, T, H, C+P)
            if cache is not None:
                _write(cache[0], write_at, k)
                _write(cache[1], write_at, v)
                k, v = cache[0][:, :S], cache[1][:, :S]  # (B, S, H, C+P), (B, S, H, V)
            out = F.scaled_dot_product_attention(
                torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask[:, None], scale=self.scale)  # (B, H, T, V)
            return self.wo(out.transpose(1, 2).reshape(B, T, H * V))
        # Absorbed: wkv_b's key half moves into the query and its value half after the attention, so every
        # head attends over one shared key [c_kv, k_pe] per token (MQA-shaped), the latent c_kv as the value.
        wkv_b = self.wkv_b.weight.view(H, C + V, R)
        q_lat = torch.einsum("bthc,hcr->bthr", q_nope, wkv_b[:, :C])  # (B, T, H, R)
        keys = torch.cat([c_kv, k_pe], dim=-1)  # (B, T, R+P)
        if cache is not None:
            _write(cache[0], write_at, keys)
            keys = cache[0][:, :S]  # (B, S, R+P)
        query = torch.cat([q_lat, q_pe], dim=-1).view(B, T * H, R + P)
        scores = torch.baddbmm(query.new_empty(()), query, keys.transpose(1, 2), beta=0, alpha=self.scale)
        scores = torch.where(mask[:, :, None], scores.view(B, T, H, S), float("-inf"))  # (B, T, H, S)
        probs = scores.float().softmax(dim=-1).type_as(query).view(B, T * H, S)
        out_lat = torch.bmm(probs, keys[..., :R]).view(B, T, H, R)
        out = torch.einsum("bthr,hvr->bthv", out_lat, wkv_b[:, C:])  # (B, T, H, V)
        return self.wo(out.reshape(B, T, H * V))


# ---------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU and DeepSeekMoE

class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Used for dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class Routing:
    weights: torch.Tensor  # (N, K) gate weights, from unbiased scores
    indices: torch.Tensor  # (N, K) chosen experts
    scores: torch.Tensor   # (N, E) unbiased affinity scores (softmax or sigmoid)


class Gate(nn.Module):
    """Router: affinity scores, bias-adjusted (and optionally group-limited) top-k selection.

    `expert_bias` is a buffer used for selection only (aux-loss-free balancing); `expert_load`
    counts the tokens each expert received while training since the last bias update (only the
    tokens `count` (N,) marks, when given: padding routes but does not count).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))
        nn.init.normal_(self.weight, std=config.init_std)
        self.register_buffer("expert_bias", torch.zeros(config.n_routed_experts))
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor, count: torch.Tensor | None = None) -> Routing:
        return self.route(F.linear(x, self.weight), count)

    def route(self, logits: torch.Tensor, count: torch.Tensor | None = None) -> Routing:
        """The routing from the router's logits (N, E) (in the tokens' dtype): `forward` after the product."""
        cfg = self.config
        scores = logits.float().softmax(dim=-1) if cfg.score_func == "softmax" else logits.float().sigmoid()
        biased = scores + self.expert_bias.float()
        if cfg.n_expert_groups > 1:
            grouped = biased.view(logits.shape[0], cfg.n_expert_groups, -1)  # (N, G, E/G)
            if cfg.score_func == "softmax":
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            keep = group_scores.topk(cfg.n_limited_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(dropped[:, :, None], float("-inf")).flatten(1)
        indices = biased.topk(cfg.n_activated_experts, dim=-1).indices  # (N, K)
        weights = scores.gather(1, indices)
        if cfg.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * cfg.route_scale
        if self.training:
            with torch.no_grad():
                # One per counted assignment, added at its expert: a count of fixed shape (no boolean
                # selection, no bincount), so a compiled training step keeps it in its graph.
                ones = indices.new_ones(indices.shape, dtype=self.expert_load.dtype)
                counted = ones if count is None else ones * count[:, None]
                self.expert_load.index_add_(0, indices.flatten(), counted.flatten())
        return Routing(weights.type_as(logits), indices, scores)

    @torch.no_grad()
    def update_bias(self, speed: float) -> torch.Tensor:
        """Move the bias of over-loaded experts down and under-loaded ones up; return the loads used."""
        load = self.expert_load.clone()
        if load.sum() > 0:
            self.expert_bias += speed * torch.sign(load.mean() - load)
        self.expert_load.zero_()
        return load


class Experts(nn.Module):
    """E routed SwiGLU experts held as stacked weights, laid out for batched products:
    w1, w3 (E, D, I) and w2 (E, I, D), so expert e computes (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e].

    Checkpoints keep DeepSeek's per-expert names and (out, in) shapes: the state dict shows
    `{e}.w1.weight` = w1[e].T etc., and loading accepts them (hooks below).
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        for weight in (self.w1, self.w2, self.w3):  # nn.Linear's default bound, 1/sqrt(fan_in)
            nn.init.uniform_(weight, -weight.shape[1] ** -0.5, weight.shape[1] ** -0.5)
        self.register_state_dict_post_hook(_experts_to_deepseek_names)
        self.register_load_state_dict_pre_hook(_experts_from_deepseek_names)

    def __len__(self) -> int:
        return self.w1.shape[0]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x (..., D)."""
        return _swiglu(x, self.w1[e], self.w2[e], self.w3[e])

    @torch.compiler.disable
    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x (N, D) -> (N, D): the sum over each token's K experts of weight * expert(x).

        With no more assignments than experts (decoding a few rows), each assignment gathers its expert's
        weights and all run as one batched product: only the chosen experts' weights are read. Otherwise
        the N*K assignments are sorted by expert, so each expert's tokens are one contiguous slice of the
        gathered rows, and the experts run as three grouped products over those slices (`F.grouped_mm`:
        no padding, no loop in Python, one backward for every expert); where grouped products do not
        take these tensors (`_grouped_mm_fits`), each expert runs on its slice in turn. Outputs are
        weighted and added back at their tokens.

        The slices' sizes depend on the routing, so a compiled training step runs this dispatch
        eagerly (its products are already grouped) and compiles what surrounds it.
        """
        indices, weights = routing.indices, routing.weights
        (N, K), E = indices.shape, len(self)
        if N * K <= E:  # decoding a few rows: gather the chosen experts' weights, one batched product
            chosen = indices.flatten()  # (N*K,)
            xs = x.repeat_interleave(K, dim=0)[:, None]  # (N*K, 1, D)
            y = _swiglu(xs, self.w1[chosen], self.w2[chosen], self.w3[chosen]).view(N, K, -1)  # (N, K, D)
            return (y * weights[..., None]).sum(dim=1)
        flat_expert = indices.flatten()  # (N*K,)
        order = flat_expert.argsort(stable=True)
        token_of = order // K  # which token each sorted assignment belongs to
        # index_select rather than x[token_of]: its backward adds rows back (index_add), which is faster
        # than the accumulating write that indexing backward does.
        xs = x.index_select(0, token_of)  # (N*K, D), expert by expert
        counts = torch.bincount(flat_expert, minlength=E)  # (E,) each expert's slice length
        if _grouped_mm_fits(xs, self.w1, self.w2):
            ends = counts.cumsum(0, dtype=torch.int32)  # (E,) where each expert's slice ends
            h = F.silu(F.grouped_mm(xs, self.w1, offs=ends)) * F.grouped_mm(xs, self.w3, offs=ends)
            y = F.grouped_mm(h, self.w2, offs=ends)  # (N*K, D) in sorted order
        else:
            y = torch.cat([self.expert(e, part) for e, part in enumerate(xs.split(counts.tolist()))])
        y = y * weights.flatten().index_select(0, order)[:, None]
        return y.new_zeros(x.shape).index_add_(0, token_of, y)


def _grouped_mm_fits(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands: one dtype (it does not autocast), on CPUs a 32- or
    16-bit float, on CUDA GPUs of compute capability 8.0 or later bfloat16 (the kernels torch has),
    nowhere else; every row a multiple of 16 bytes (its alignment rule)."""
    if x.device.type == "cpu":
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (8, 0):
        dtypes = (torch.bfloat16,)
    else:
        return False
    if x.dtype != w1.dtype or x.dtype not in dtypes:
        return False
    return all(d * x.element_size() % 16 == 0 for d in (x.shape[-1], w1.shape[2], w2.shape[2]))


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """(silu(x @ w1) * (x @ w3)) @ w2 for one expert (x (N, D)) or a batch of them (x (G, N, D), w (G, ...))."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


_EXPERT_WEIGHTS = ("w1", "w2", "w3")


def _experts_to_deepseek_names(module, state_dict, prefix, local_metadata) -> None:
    for name in _EXPERT_WEIGHTS:
        stacked = state_dict.pop(prefix + name)
        for e in range(stacked.shape[0]):
            state_dict[f"{prefix}{e}.{name}.weight"] = stacked[e].t()


def _experts_from_deepseek_names(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                 unexpected_keys, error_msgs) -> None:
    for name in _EXPERT_WEIGHTS:
        keys = [f"{prefix}{e}.{name}.weight" for e in range(len(module))]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k).t() for k in keys])


class MoE(nn.Module):
    """Shared experts plus top-k routed experts; tokens are dispatched by sorting, not looping."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.dim, config.moe_inter_dim)
        self.shared_experts = (MLP(config.dim, config.n_shared_experts * config.moe_inter_dim)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor, count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (out (B, T, D), sequence-wise balance loss (scalar)); `count` (B, T) as in `Gate`."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        routing = self.gate(flat, None if count is None else count.flatten())
        out = self.experts(flat, routing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        aux = self.balance_loss(routing, B, T) if (self.training and self.config.seq_aux_alpha > 0) else flat.new_zeros(())
        return out.view(B, T, D), aux

    def balance_loss(self, routing: Routing, B: int, T: int) -> torch.Tensor:
        """V3's sequence-wise balance loss: alpha * sum_i f_i P_i, averaged over sequences."""
        cfg = self.config
        E, K = cfg.n_routed_experts, cfg.n_activated_experts
        probs = routing.scores / routing.scores.sum(dim=-1, keepdim=True)  # (N, E)
        p = probs.view(B, T, E).mean(dim=1)  # (B, E)
        chosen = torch.zeros(B * T, E, device=probs.device).scatter_(1, routing.indices, 1.0)
        f = chosen.view(B, T, E).sum(dim=1) * (E / (K * T))  # (B, E)
        return cfg.seq_aux_alpha * (f * p).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# Blocks, multi-token prediction and the whole model

class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = MLA(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = MoE(config) if moe else MLP(config.dim, config.inter_dim)

    def forward(self, x, rotation, mask, write_at=None, cache=None, count=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), rotation, mask, write_at, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(h, count)
        else:
            y, aux = self.ffn(h), x.new_zeros(())
        return x + y, aux


class MTPModule(nn.Module):
    """Predicts token t+1+k from the depth-(k-1) hidden state at t and the embedding of t+k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hnorm = RMSNorm(config.dim, config.norm_eps)
        self.enorm = RMSNorm(config.dim, config.norm_eps)
        self.eh_proj = nn.Linear(2 * config.dim, config.dim, bias=False)
        self.block = Block(config, moe=config.n_moe_layers > 0)
        self.norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, h, emb, rotation, mask, write_at=None, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))
        return self.block(x, rotation, mask, write_at, cache)


@dataclass
class LossOutput:
    loss: torch.Tensor      # what to backpropagate: lm + mtp_weight * mtp + aux
    lm_loss: torch.Tensor   # next-token cross-entropy (mean over counted tokens)
    mtp_loss: torch.Tensor  # mean over the D modules of their cross-entropies (0 if D = 0)
    aux_loss: torch.Tensor  # sequence-wise balance loss summed over MoE layers


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            Block(config, moe=(config.n_routed_experts > 0 and i >= config.n_dense_layers))
            for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config) for _ in range(config.n_mtp_modules))
        freqs = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), rope_frequencies(config))
        # (cos, sin) per position and pair, (max_seq_len, P/2, 2): real, so `.to(dtype)` treats it like
        # the weights (a complex buffer would be cast to a real dtype, losing sin).
        self.register_buffer("rope", torch.stack([freqs.cos(), freqs.sin()], dim=-1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
                nn.init.normal_(module.weight, std=self.config.init_std)
            elif isinstance(module, Experts):
                for weight in (module.w1, module.w2, module.w3):
                    nn.init.normal_(weight, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # -- positions and masks --------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> torch.Tensor:
        # Reading the largest position back would split a compiled graph; there, indexing checks bounds itself.
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.config.max_seq_len}")
        return self.rope[positions].float()  # (B, T, P/2, 2): cos, sin

    def _placement(self, positions: torch.Tensor, valid: torch.Tensor | None, cache: KVCache | None,
                   n_slots: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(RoPE rotation, mask (B, T, S) bool, flat cache slots to write or None) for tokens at positions (B, T).

        Cached: slot s is visible to a query at position p iff s <= p. Uncached: key t' is visible iff it
        is valid and its position is <= the query's."""
        rotation = self._rope(positions)
        if cache is not None:
            slots = torch.arange(int(positions.max()) + 1 if n_slots is None else n_slots, device=positions.device)
            return rotation, slots[None, None, :] <= positions[:, :, None], cache.write_index(positions)
        mask = positions[:, None, :] <= positions[:, :, None]
        if valid is not None:
            mask = mask & valid[:, None, :]
        # A padding query that sees no key would give NaN; let it see itself.
        return rotation, mask | torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device), None

    def default_positions(self, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is None:
            return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return (valid.long().cumsum(dim=1) - 1).clamp(min=0)

    # -- forward ----------------------------------------------------------------------------------
    def trunk(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
              cache: KVCache | None = None, valid: torch.Tensor | None = None, n_slots: int | None = None,
              count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) -> (hidden before the final norm (B, T, D), summed balance loss).

        `valid` (B, T) bool marks real tokens when a batch is padded (left or right); positions
        default to the count of real tokens before each one. With a `cache`, each token's keys are
        stored at slot `positions[b, t]` and it attends to slots 0..positions[b, t]; attention reads
        slots [0, n_slots), n_slots defaulting to the largest position + 1 (a caller that knows it
        passes it and saves reading the positions back). `count` (B, T) bool marks the tokens a
        training forward adds to the experts' loads (default: all); it changes no output.
        """
        if positions is None:
            positions = self.default_positions(tokens, valid)
        rotation, mask, write_at = self._placement(positions, valid, cache, n_slots)
        h = self.embed(tokens)
        aux = h.new_zeros(())
        for i, layer in enumerate(self.layers):
            h, layer_aux = layer(h, rotation, mask, write_at, None if cache is None else cache.layers[i], count)
            aux = aux + layer_aux
        return h, aux

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, valid: torch.Tensor | None = None,
                n_slots: int | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for every position (`count` as in `trunk`)."""
        return self.logits(self.trunk(tokens, positions, cache, valid, n_slots, count)[0])

    def new_cache(self, batch_size: int, max_len: int | None = None, with_mtp: bool = False) -> KVCache:
        """A zeroed cache on this model's device and dtype (main layers, then MTP blocks if asked)."""
        p = self.head.weight
        n = len(self.layers) + (len(self.mtp) if with_mtp else 0)
        return KVCache.zeros(self.config, n, batch_size, max_len or self.config.max_seq_len, p.dtype, p.device)

    def mtp_step(self, k: int, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache | None = None, n_slots: int | None = None) -> torch.Tensor:
        """Run MTP module k (0-based) on hidden states h (B, T, D) and the embeddings of the tokens
        that follow them; returns the module's hidden state (B, T, D) (feed `mtp_logits` to predict).
        `n_slots` as in `trunk`."""
        rotation, mask, write_at = self._placement(positions, None, cache, n_slots)
        layer_cache = None if cache is None else cache.layers[len(self.layers) + k]
        out, _ = self.mtp[k](h, self.embed(next_tokens), rotation, mask, write_at, layer_cache)
        return out

    def mtp_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.mtp[k].norm(h))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
             valid: torch.Tensor | None = None) -> LossOutput:
        """Next-token loss plus MTP and balance losses. targets[b, t] is the token after tokens[b, t];
        loss_mask (B, T) weights which targets count (e.g. assistant tokens only in SFT)."""
        cfg = self.config
        h, aux = self.trunk(tokens, valid=valid)
        mask = torch.ones_like(targets, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        lm_loss = _masked_ce(self.logits(h), targets, mask)
        mtp_loss = h.new_zeros(())
        positions = self.default_positions(tokens, valid)
        T = tokens.shape[1]
        for k in range(cfg.n_mtp_modules):
            depth = k + 1
            if T - depth <= 0:
                break
            # Module k sees positions 0..T-1-depth: its input embedding is token t+depth (targets[t+depth-1])
            # and it predicts token t+1+depth (targets[t+depth]).
            sub_valid = None if valid is None else valid[:, :T - depth]
            rotation, sub_mask, _ = self._placement(positions[:, :T - depth], sub_valid, None, None)
            h, _ = self.mtp[k](h[:, :T - depth], self.embed(targets[:, depth - 1:T - 1]), rotation, sub_mask)
            mtp_loss = mtp_loss + _masked_ce(self.mtp_logits(k, h), targets[:, depth:], mask[:, depth:])
        if cfg.n_mtp_modules:
            mtp_loss = mtp_loss / cfg.n_mtp_modules
        total = lm_loss + cfg.mtp_loss_weight * mtp_loss + aux
        return LossOutput(total, lm_loss, mtp_loss, aux)

    # -- balancing --------------------------------------------------------------------------------
    def moe_gates(self) -> list[Gate]:
        return [m for m in self.modules() if isinstance(m, Gate)]

    @torch.no_grad()
    def update_expert_bias(self) -> dict[str, float]:
        """Aux-loss-free balancing after an optimiser step; returns the max/mean load it acted on."""
        ratios = []
        for gate in self.moe_gates():
            load = gate.update_bias(self.config.bias_update_speed)
            if load.sum() > 0:
                ratios.append(float(load.max() / load.mean()))
        return {"expert_load_max_over_mean": max(ratios) if ratios else 0.0}


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum().clamp(min=1)
