"""Causal self-attention dispatch: FlashAttention when importable for CUDA fp16/bf16 tensors,
otherwise torch's scaled_dot_product_attention (which runs its own FlashAttention kernels on CUDA);
and the unmasked attention of a KV-cache decode step (revkernels.kv_cache) through SDPA."""
import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

_last_backend = None


def last_attention_backend():
    """Which backend the most recent causal_attention call ran: 'flash_attn' or 'sdpa'."""
    return _last_backend


def causal_attention(q, k, v, dropout_p=0.0):
    """softmax(q k^T / sqrt(hd) + causal mask) v for q, k, v of shape (B, H, T, hd)."""
    global _last_backend
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        _last_backend = "flash_attn"
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              dropout_p=dropout_p, causal=True)
        return out.transpose(1, 2)
    _last_backend = "sdpa"
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def unmasked_attention(q, k, v, dropout_p=0.0):
    """softmax(q k^T / sqrt(hd)) v with no mask, for queries that may see every key (a decode step:
    the newest position over all cached keys); q (B, H, Tq, hd), k and v (B, H, Tk, hd). Runs SDPA."""
    global _last_backend
    _last_backend = "sdpa"
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
