"""The embedded demo model: a small decoder-only transformer built from a config with seeded weights.

It needs no download: the same ``TinyTransformerConfig`` (seed included) gives the same weights on
every machine. Attention reads and writes a preallocated KV cache (:class:`KVCache`), the buffer the
demo server allocates under ``tag("kv_cache")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TinyTransformerConfig", "TinyTransformer", "KVCache"]


@dataclass(frozen=True)
class TinyTransformerConfig:
    vocab_size: int = 258
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    max_seq_len: int = 512  #: tokens, prompt plus completion
    seed: int = 0  #: seed of the weight initialisation

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")


class KVCache:
    """Keys and values of one sequence: a tensor ``[n_layers, 2, n_heads, max_seq_len, head_dim]``.

    Not thread-safe: one sequence at a time (the engine serializes requests)."""

    def __init__(self, config: TinyTransformerConfig, device: torch.device, dtype: torch.dtype = torch.float32):
        self.buffer = torch.zeros(
            (config.n_layers, 2, config.n_heads, config.max_seq_len, config.head_dim), device=device, dtype=dtype
        )

    @property
    def num_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


class _Block(nn.Module):
    def __init__(self, c: TinyTransformerConfig) -> None:
        super().__init__()
        self.c = c
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.d_ff)
        self.fc2 = nn.Linear(c.d_ff, c.d_model)

    def forward(self, x: torch.Tensor, layer_cache: torch.Tensor, start: int) -> torch.Tensor:
        c = self.c
        t = x.shape[0]
        q, k, v = self.qkv(self.ln1(x)).view(t, 3, c.n_heads, c.head_dim).permute(1, 2, 0, 3)  # 3 x [H, T, Dh]
        layer_cache[0, :, start : start + t] = k
        layer_cache[1, :, start : start + t] = v
        keys = layer_cache[0, :, : start + t]
        values = layer_cache[1, :, : start + t]
        query_pos = torch.arange(start, start + t, device=x.device)[:, None]
        key_pos = torch.arange(start + t, device=x.device)[None, :]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_pos <= query_pos)  # [H, T, Dh]
        x = x + self.proj(attn.transpose(0, 1).reshape(t, c.d_model))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Decoder-only transformer over one sequence (no batch dimension). Built on the CPU, seeded."""

    def __init__(self, config: TinyTransformerConfig) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
            self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
            self.ln_f = nn.LayerNorm(config.d_model)
            for name, p in self.named_parameters():
                if name.endswith("weight") and p.dim() == 2:
                    nn.init.normal_(p, std=1.0 / math.sqrt(config.d_model))

    def forward(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Hidden states ``[T, d_model]`` of ``ids`` at positions ``start .. start+T-1``; writes their keys
        and values into ``cache`` (positions before ``start`` must already be there)."""
        t = ids.shape[0]
        if start + t > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(start, start + t, device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.buffer[i], start)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.tok_emb.weight.T  # tied output embedding
