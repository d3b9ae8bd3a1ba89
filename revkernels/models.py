"""A nanoGPT-like GPT whose block stack is residual, checkpointed or reversible.

arch: 'baseline'    p[j+1] = p[j] + f_j(p[j])                       (eq. 2.2)
      'checkpoint'  the same with torch.utils.checkpoint per layer (use_reentrant=False)
      'midpoint' | 'leapfrog' | 'midpoint_a'   ReversibleStack (eq. 3.6)
      'hamiltonian' HamiltonianStack (eqs. 2.8-2.9)
f_j is TransformerBlock (eq. 2.5). Token + position embeddings, final LayerNorm, tied LM head.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import AttentionBlock, HamiltonianStack, MLPBlock, ReversibleStack, TransformerBlock
from .loss import chunked_cross_entropy

ARCHS = ("baseline", "checkpoint", "midpoint", "leapfrog", "midpoint_a", "hamiltonian")
# Step size per scheme when cfg.h is None: the one that makes the coefficient of f equal to 1
# (midpoint c = 2h, leapfrog c = h^2, midpoint_a c = h).
DEFAULT_H = {"midpoint": 0.5, "leapfrog": 1.0, "midpoint_a": 1.0}


@dataclass
class GPTConfig:
    """Model shape and body. loss_chunk_tokens > 0 computes the loss without materialising all
    logits (every arch honours it, so memory comparisons stay fair); forward then returns
    logits=None when targets are given."""
    vocab_size: int = 50304
    seq_len: int = 1024
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    arch: str = "baseline"
    dropout: float = 0.0
    bias: bool = True
    h: Optional[float] = None
    a: Union[None, float, Sequence[float]] = None      # midpoint_a: None draws eq. 3.7 with `seed`
    learnable_a: bool = False
    ham_a: float = 1.0
    ham_b: float = 1.0
    seed: int = 0
    loss_chunk_tokens: int = 0
    exact: bool = False                                 # bit-exact reversible body (reversible archs only)
    max_reconstruction_error: Optional[float] = None    # reversible archs: a backward whose rebuilt input
                                                        # strays further (relative) raises
    stored_layers: Union[int, Sequence[int]] = 0         # reversible archs: layers that keep their graph
                                                        # (an int k: the last k; or indices)
    store_policy: Optional[str] = None                  # reversible archs: 'matmuls' keeps the matmul and
                                                        # attention outputs of the recomputed layers

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.exact and self.arch in ("baseline", "checkpoint"):
            raise ValueError(f"exact=True needs a reversible arch, got arch={self.arch!r}")
        if self.max_reconstruction_error is not None and self.arch in ("baseline", "checkpoint"):
            raise ValueError(f"max_reconstruction_error needs a reversible arch, got arch={self.arch!r}")
        if self.arch in ("baseline", "checkpoint") and (
                self.store_policy is not None or isinstance(self.stored_layers, bool)
                or not (isinstance(self.stored_layers, int) and self.stored_layers == 0)):
            raise ValueError(f"stored_layers and store_policy need a reversible arch, got arch={self.arch!r} "
                             "(arch='checkpoint' recomputes every layer; 'baseline' stores every layer)")


class ResidualStack(nn.Module):
    """p[j+1] = p[j] + f_j(p[j]), optionally checkpointing each layer."""

    def __init__(self, blocks, use_checkpoint=False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = x + checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return x


def build_body(cfg: GPTConfig) -> nn.Module:
    """The block stack of `cfg.arch`."""
    d, H, p, bias, L = cfg.d_model, cfg.n_heads, cfg.dropout, cfg.bias, cfg.n_layers
    if cfg.arch == "hamiltonian":
        return HamiltonianStack([AttentionBlock(d, H, p, bias) for _ in range(L)],
                                [MLPBlock(d, p, bias) for _ in range(L)], a=cfg.ham_a, b=cfg.ham_b,
                                exact=cfg.exact, max_reconstruction_error=cfg.max_reconstruction_error,
                                stored_layers=cfg.stored_layers, store_policy=cfg.store_policy)
    blocks = [TransformerBlock(d, H, p, bias) for _ in range(L)]
    if cfg.arch in ("baseline", "checkpoint"):
        return ResidualStack(blocks, use_checkpoint=cfg.arch == "checkpoint")
    h = DEFAULT_H[cfg.arch] if cfg.h is None else cfg.h
    gen = torch.Generator().manual_seed(cfg.seed)
    return ReversibleStack(blocks, cfg.arch, h=h, a=cfg.a if cfg.arch == "midpoint_a" else None,
                           learnable_a=cfg.learnable_a, generator=gen, exact=cfg.exact,
                           max_reconstruction_error=cfg.max_reconstruction_error,
                           stored_layers=cfg.stored_layers, store_policy=cfg.store_policy)


class GPT(nn.Module):
    """logits, loss = model(idx, targets): idx (B, T) token ids, T <= cfg.seq_len."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.body = build_body(cfg)
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():          # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds cfg.seq_len={self.cfg.seq_len}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(idx.shape)} like idx")
        pos = torch.arange(T, device=idx.device)
        x = self.ln_f(self.body(self.drop(self.wte(idx) + self.wpe(pos))))
        if targets is None:
            return self.lm_head(x), None
        if self.cfg.loss_chunk_tokens > 0:
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets, self.cfg.loss_chunk_tokens)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, *, generator=None):
        """idx (B, T) extended by max_new_tokens sampled tokens: returns (B, T + max_new_tokens).

        Each step feeds the last cfg.seq_len tokens (the context is cropped, there is no KV cache, so
        every arch, reversible ones included, runs its ordinary forward) and samples the next token
        from softmax(logits[:, -1] / temperature), restricted to the top_k most likely tokens when
        top_k is given (top_k=1 is greedy decoding). Runs under no_grad and in eval mode (dropout off);
        the model's training flag is restored afterwards. generator: a torch.Generator on idx's device
        for the sampling (default: the global RNG).
        """
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long:
            raise TypeError(f"idx must be a torch.long tensor of token ids, got "
                            f"{idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (batch, T) with T >= 1, got {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise ValueError(f"idx holds token ids outside [0, vocab_size={self.cfg.vocab_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.cfg.seq_len:])[0][:, -1, :].float() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
                idx = torch.cat([idx, nxt], dim=1)
        finally:
            self.train(was_training)
        return idx
