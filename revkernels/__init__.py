"""revkernels: fused Triton kernels and a reversible backward for reversible transformer LLMs."""
from .attention import causal_attention, last_attention_backend
from .layers import (AttentionBlock, HamiltonianStack, MLPBlock, ReversibleStack, TransformerBlock,
                     draw_midpoint_a)
from .models import GPT, GPTConfig
from .ops import (coupling_backward_step, coupling_inverse, coupling_step, rev_backward_step,
                  rev_inverse, rev_step)
from . import retrofit  # the package, callable: rk.retrofit(model) is retrofit.api.retrofit
from .retrofit import retrofit_kl

__all__ = [
    "rev_step", "rev_inverse", "rev_backward_step", "coupling_step", "coupling_inverse",
    "coupling_backward_step", "ReversibleStack", "HamiltonianStack", "TransformerBlock",
    "AttentionBlock", "MLPBlock", "draw_midpoint_a", "causal_attention", "last_attention_backend",
    "GPTConfig", "GPT", "retrofit", "retrofit_kl",
]
