"""Cross-entropy of a tied LM head without keeping the (batch, seq, vocab) logits alive.

    loss = mean_t CE(h_t W^T, y_t)   over tokens with y_t != ignore_index

computed in chunks of `chunk_tokens` tokens; each chunk is checkpointed, so backward recomputes
one chunk's logits at a time and peak logits memory is chunk_tokens x vocab.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(h, weight, targets, ignore_index):
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden, weight, targets, chunk_tokens, ignore_index=-1):
    """Mean token cross-entropy of logits = hidden @ weight^T, chunk_tokens tokens at a time."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss_sum, h[sl], weight, y[sl], ignore_index, use_reentrant=False)
    return total / (y != ignore_index).sum().clamp(min=1)
