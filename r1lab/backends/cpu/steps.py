"""The steps a compiled engine runs on the CPU: the reference model's forward (r1lab.model) with the
absorbed MLA, its products in the forms of one row class, its attention and routed experts in C++.

`prefill`, `decode`, `verify` and `draft` compute what the engine's eager steps compute with the
model's own forward (the same tokens; log-probs to float rounding: tests/test_engine.py). Each takes
the model, the `Forms` of its row class (fixed when it is traced), its inputs, the `KVCache` and the
number of cache slots it reads. They read the model's modules and weights and write its cache; they
know no sampling, requests or tokens' meaning.

Letters: B rows, T tokens per row, H heads, D model dim, R latent width, P rope width, C no-rope query
width, V value width, N = B*T token rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1lab.backends.cpu import ops
from r1lab.model import MLA, MLP, KVCache, MoE, apply_rope


class Blas:
    """Products for many token rows (a prefill, a decode step beyond the kernels' rows): torch's BLAS."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def mlp(self, x: torch.Tensor, mlp: MLP) -> torch.Tensor:
        return self.linear(F.silu(self.linear(x, mlp.w1.weight)) * self.linear(x, mlp.w3.weight), mlp.w2.weight)

    def head_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (B, T, H, K) @ weight (H, K, N) per head -> (B, T, H, N)."""
        return torch.einsum("bthc,hcr->bthr", x, weight)

    def head_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (B, T, H, K) @ weight (H, N, K)^T per head -> (B, T, H, N)."""
        return torch.einsum("bthr,hvr->bthv", x, weight)


class Streaming(Blas):
    """Products for one token row: each a broadcast multiply summed over the reduced dim, which inductor
    fuses with its neighbours into one loop streaming the weight once (a kernel call costs more than such
    a product, a BLAS call much more)."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-2) * weight).sum(dim=-1)


class Kernels(Blas):
    """Products for a few to a few hundred token rows: the C++ kernels (csrc/linear.cpp), which read each
    weight once for all rows where the BLAS repacks it per call."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return ops.linear(x.reshape(rows, x.shape[-1]).contiguous(), weight).view(*x.shape[:-1], weight.shape[0])

    def mlp(self, x: torch.Tensor, mlp: MLP) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return ops.mlp(flat, mlp.w1.weight, mlp.w2.weight, mlp.w3.weight).view(x.shape)

    def head_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        B, T, H, K = x.shape
        x = x.reshape(B * T, H, K)  # a view of the query's slice: the kernel reads it in place
        return ops.head_matmul(x if x.stride(2) == 1 else x.contiguous(), weight).view(B, T, H, weight.shape[2])

    def head_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        B, T, H, K = x.shape
        return ops.head_linear(x.reshape(B * T, H, K).contiguous(), weight).view(B, T, H, weight.shape[1])


Forms = Blas  # a row class's products: Blas, Streaming or Kernels


def prefill(model, forms: Forms, tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, cache: KVCache,
            n_slots: int) -> torch.Tensor:
    """Prompts tokens (B, T) at positions (B, T) into the cache -> logits (B, V) at each row's position `last` (B,)."""
    hidden = _trunk(model, forms, tokens, positions, cache, n_slots)
    return _logits(model, forms, hidden[torch.arange(tokens.shape[0], device=tokens.device), last])


def decode(model, forms: Forms, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
           n_slots: int) -> torch.Tensor:
    """One token per row: tokens (B, 1) at positions (B, 1) -> logits (B, V)."""
    return _logits(model, forms, _trunk(model, forms, tokens, positions, cache, n_slots))[:, -1]


def verify(model, forms: Forms, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
           n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative step, first half: [last, draft] (B, 2) -> (hidden (B, 2, D), logits (B, 2, V))."""
    hidden = _trunk(model, forms, tokens, positions, cache, n_slots)
    return hidden, _logits(model, forms, hidden)


def draft(model, forms: Forms, hidden: torch.Tensor, following: torch.Tensor, positions: torch.Tensor,
          cache: KVCache, n_slots: int) -> torch.Tensor:
    """Speculative step, second half: the first MTP module's greedy guesses (B, 2) for the token after each
    of `following` (B, 2), from the trunk's hidden states (B, 2, D) before them."""
    mtp = model.mtp[0]
    x = forms.linear(torch.cat([mtp.hnorm(hidden), mtp.enorm(model.embed(following))], dim=-1), mtp.eh_proj.weight)
    h = _block(mtp.block, forms, x, *_where(model, positions, cache), cache.layers[len(model.layers)], n_slots)
    return forms.linear(mtp.norm(h), model.head.weight).argmax(dim=-1)


def _where(model, positions: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rotation (B, T, P/2, 2), positions, flat cache slots (N,)) for tokens at positions (B, T)."""
    return model.rope[positions].float(), positions.contiguous(), cache.write_index(positions)


def _trunk(model, forms: Forms, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
           n_slots: int) -> torch.Tensor:
    where = _where(model, positions, cache)
    h = model.embed(tokens)
    for block, layer_cache in zip(model.layers, cache.layers):
        h = _block(block, forms, h, *where, layer_cache, n_slots)
    return h


def _logits(model, forms: Forms, h: torch.Tensor) -> torch.Tensor:
    return forms.linear(model.norm(h), model.head.weight)


def _block(block, forms: Forms, x: torch.Tensor, rotation: torch.Tensor, positions: torch.Tensor,
           write_at: torch.Tensor, layer_cache: list[torch.Tensor], n_slots: int) -> torch.Tensor:
    x = x + _attention(block.attn, forms, block.attn_norm(x), rotation, positions, write_at, layer_cache[0], n_slots)
    h = block.ffn_norm(x)
    return x + (_moe(block.ffn, forms, h) if isinstance(block.ffn, MoE) else forms.mlp(h, block.ffn))


def _attention(attn: MLA, forms: Forms, x: torch.Tensor, rotation: torch.Tensor, positions: torch.Tensor,
               write_at: torch.Tensor, cache: torch.Tensor, n_slots: int) -> torch.Tensor:
    """`MLA.forward`'s absorbed path over the cache (B, capacity, R + P); token t sees slots 0..positions[t]."""
    cfg = attn.config
    B, T, _ = x.shape
    H, C, P, V, R = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank == 0:
        q = forms.linear(x, attn.wq.weight)
    else:
        q = forms.linear(attn.q_norm(forms.linear(x, attn.wq_a.weight)), attn.wq_b.weight)
    q_nope, q_pe = q.view(B, T, H, C + P).split([C, P], dim=-1)  # (B, T, H, C), (B, T, H, P)
    q_pe = apply_rope(q_pe, rotation[:, :, None])
    c_kv, k_pe = forms.linear(x, attn.wkv_a.weight).split([R, P], dim=-1)  # (B, T, R), (B, T, P)
    keys = torch.cat([attn.kv_norm(c_kv), apply_rope(k_pe, rotation)], dim=-1)  # (B, T, R+P)
    cache.view(-1, R + P).index_copy_(0, write_at, keys.flatten(0, 1))
    wkv_b = attn.wkv_b.weight.view(H, C + V, R)
    q_lat = forms.head_matmul(q_nope, wkv_b[:, :C])  # (B, T, H, R)
    out = ops.latent_attention(q_lat.reshape(B, T * H, R).contiguous(), q_pe.reshape(B, T * H, P).contiguous(),
                               cache[:, :n_slots], positions, attn.scale)  # (B, T*H, R)
    out = forms.head_linear(out.view(B, T, H, R), wkv_b[:, C:])  # (B, T, H, V)
    return forms.linear(out.reshape(B, T, H * V), attn.wo.weight)


def _moe(moe: MoE, forms: Forms, x: torch.Tensor) -> torch.Tensor:
    B, T, D = x.shape
    flat = x.reshape(B * T, D)  # (N, D)
    routing = moe.gate.route(forms.linear(flat, moe.gate.weight))
    experts = moe.experts
    out = ops.grouped_experts(flat.contiguous(), routing.indices, routing.weights.contiguous(), experts.w1,
                              experts.w2, experts.w3)
    if moe.shared_experts is not None:
        out = out + forms.mlp(flat, moe.shared_experts)
    return out.view(B, T, D)
