"""A small decoder-only transformer in pure PyTorch, built from a config with seeded weights (no download).

The default config holds about 117 M float32 parameters (~470 MB), enough for GPU memory deltas to be
plainly visible. The forward pass writes each layer's keys and values into a caller-owned KV buffer and
attends over that buffer, so the KV cache is real memory the computation reads back. Used by the GPU
suite (tests/gpu) and the allocation benchmark (benchmarks/bench_alloc.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyGPTConfig:
    vocab_size: int = 8192
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 8
    d_ff: int = 4096
    max_seq: int = 256
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor, kv_slot: torch.Tensor) -> torch.Tensor:
        """``kv_slot``: [2, batch_capacity, heads, max_seq, head_dim]; rows [:B, :, :S] are written."""
        b, s, d = x.shape
        h, hd = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, h, hd).permute(2, 0, 3, 1, 4)
        kv_slot[0, :b, :, :s].copy_(k)
        kv_slot[1, :b, :, :s].copy_(v)
        attn = F.scaled_dot_product_attention(q, kv_slot[0, :b, :, :s], kv_slot[1, :b, :, :s], is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_cache[layer])
        return self.head(self.ln_f(x))


def build_cpu(cfg: TinyGPTConfig = TinyGPTConfig()) -> TinyGPT:
    """The model on the CPU with weights drawn from ``cfg.seed``, in eval mode."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        return TinyGPT(cfg).eval()
    finally:
        torch.random.set_rng_state(generator_state)


def kv_cache_shape(cfg: TinyGPTConfig, batch_capacity: int) -> tuple[int, ...]:
    return (cfg.n_layers, 2, batch_capacity, cfg.n_heads, cfg.max_seq, cfg.head_dim)


def example_tokens(cfg: TinyGPTConfig, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Token ids on the CPU, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)


def parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
