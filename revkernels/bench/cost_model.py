"""Analytic memory and time model of a GPT training step on an H100, for bounding batch searches and
estimating the GPU plan's minutes before any GPU is touched.

Every number is written here, with what it stands for; the estimates are only as good as these.

Memory of one AdamW step under bf16 autocast (fp32 parameters), per token of the batch:
- baseline: BYTES_PER_TOKEN_LAYER * d per layer (what one TransformerBlock saves for backward: fp32
  block input and mid-block residual, bf16 LayerNorm outputs, q/k/v, attention output, MLP input,
  GELU input and output; SDPA keeps no T x T matrix) + HEAD_BYTES * d (embedding, final norm, loss chunk);
- checkpoint: the fp32 block input per layer (4 d) + one layer's activations during its recompute;
- reversible (midpoint, leapfrog, midpoint_a, hamiltonian): REV_STATE_BYTES * d (fp32 states, gradient
  buffers and the bf16 f of the fused backward) + one layer's activations during its recompute; each of
  `stored_layers` k layers keeps a baseline layer's activations instead (and is not recomputed).
Fixed: STATE_BYTES_PER_PARAM per parameter (fp32 weight, gradient, two AdamW moments, bf16 weight
cache) + WORKSPACE_BYTES (cuBLAS / allocator slack) + the chunked loss's logits
(loss_chunk_tokens * vocab * 6 bytes: bf16 logits and their fp32 softmax).

Time of one step: FLOPs / (H100_BF16_FLOPS * MFU). FLOPs per token: 6 * matmul parameters (lm head
included) + 8 * L * T * d for causal attention (forward, and a backward that recomputes it), plus
the recompute of the body's forward (2 * body parameters + 2 * L * T * d) for the archs that recompute
(for a reversible arch, only of its L - k recomputed layers).
"""
import math

H100_BF16_FLOPS = 989e12        # H100 SXM dense bf16 tensor-core peak, FLOP/s
H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3 bandwidth, B/s
MFU = 0.35                      # assumed achieved fraction of the peak in a training step
H100_MEMORY_BYTES = 80e9
BYTES_PER_TOKEN_LAYER = 38      # x d: activations one baseline block saves per token (bf16 autocast)
HEAD_BYTES = 14                 # x d: embedding output, final LayerNorm in/out per token
REV_STATE_BYTES = 22            # x d: two fp32 states, two fp32 gradient buffers, bf16 f, per token
STATE_BYTES_PER_PARAM = 18      # fp32 weight + grad + AdamW exp_avg + exp_avg_sq, bf16 autocast copy
WORKSPACE_BYTES = 1.5 * 2 ** 30
PROCESS_START_S = 6.0           # fresh probe process: interpreter, import torch + triton, CUDA context
CPU_INIT_PARAMS_PER_S = 150e6   # GPT built on the CPU (default inits, then GPT's normal init), then moved
COMPILE_S = 8.0                 # torch.compile of one small elementwise graph (kernels benchmark)
TRITON_JIT_S = 3.0              # Triton JIT of one specialisation of an elementwise kernel (incl. ptxas)
EXACT_STEP_FACTOR = 1.1         # exact-mode step vs float step: int64 states (8 B per element), extra passes
REVERSIBLE = ("midpoint", "leapfrog", "midpoint_a", "hamiltonian")
GPT2_SMALL = dict(vocab_size=50304, seq_len=1024, d_model=768, n_heads=12, n_layers=12)


def n_params(cfg: dict) -> dict:
    """{'body': block parameters, 'embed': token + position embeddings (lm head tied)}."""
    d, L = cfg["d_model"], cfg["n_layers"]
    per_layer = 12 * d * d + 13 * d          # qkv, proj, fc, fc-proj weights and biases, two LayerNorms
    return dict(body=L * per_layer, embed=(cfg["vocab_size"] + cfg["seq_len"]) * d)


def bytes_per_sample(cfg: dict) -> float:
    """Activation bytes one sample adds to a training step's peak (see the module docstring)."""
    d, L, T = cfg["d_model"], cfg["n_layers"], cfg["seq_len"]
    layer = BYTES_PER_TOKEN_LAYER * d
    if cfg["arch"] == "baseline":
        per_token = L * layer
    elif cfg["arch"] == "checkpoint":
        per_token = L * 4 * d + layer
    else:
        per_token = REV_STATE_BYTES * d + layer + _stored(cfg) * layer
    return T * (per_token + HEAD_BYTES * d)


def _stored(cfg: dict) -> int:
    """How many layers a reversible cfg stores (`stored_layers`: a count, or explicit indices)."""
    k = cfg.get("stored_layers") or 0
    return k if isinstance(k, int) else len(k)


def fixed_bytes(cfg: dict) -> float:
    p = n_params(cfg)
    chunk = cfg.get("loss_chunk_tokens") or cfg["seq_len"]
    return STATE_BYTES_PER_PARAM * (p["body"] + p["embed"]) + WORKSPACE_BYTES + 6 * chunk * cfg["vocab_size"]


def max_batch(cfg: dict, budget_bytes: float) -> int:
    """The batch the model says fits in `budget_bytes` (0 if not even one sample)."""
    return max(0, int((budget_bytes - fixed_bytes(cfg)) // bytes_per_sample(cfg)))


def step_flops(cfg: dict, batch: int) -> float:
    d, L, T, V = cfg["d_model"], cfg["n_layers"], cfg["seq_len"], cfg["vocab_size"]
    body = n_params(cfg)["body"]
    per_token = 6 * (body + V * d) + 8 * L * T * d
    if cfg["arch"] == "checkpoint":
        per_token += 2 * body + 2 * L * T * d
    elif cfg["arch"] in REVERSIBLE:
        per_token += (2 * body + 2 * L * T * d) * (L - _stored(cfg)) / L
    return per_token * batch * T


def step_s(cfg: dict, batch: int) -> float:
    return step_flops(cfg, batch) / (H100_BF16_FLOPS * MFU)


def probe_s(cfg: dict, batch: int, steps: int) -> float:
    """A fresh-process probe: start-up, building the model on the CPU, `steps` training steps."""
    p = n_params(cfg)
    return PROCESS_START_S + (p["body"] + p["embed"]) / CPU_INIT_PARAMS_PER_S + steps * step_s(cfg, batch)


def search_probes(first: bool) -> int:
    """Probes a max-batch search takes when it starts at the model's answer: about three for the first
    search of a shape (one at the guess, then the linear fit of measured memory), one or two after."""
    return 3 if first else 2


def copy_s(n_bytes: float) -> float:
    return n_bytes / H100_HBM_BYTES_PER_S


def minutes(seconds: float) -> float:
    return math.ceil(seconds / 6) / 10          # rounded up to 0.1 min
