"""Worker side of tests/test_fsdp.py: per-block FSDP2 / FSDP1 over two gloo processes on CPU.

Each case builds the same model on every rank, shards it per block and then at the root (the standard
FSDP2 recipe for LLMs), runs two optimizer steps on this rank's half of a global batch and records the
full (unsharded) gradients of every parameter at both steps. The parent process computes the same
steps on the global batch in one process and compares.
"""
import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard

import revkernels as rk
from revkernels.memory import SavedTensorBytes
from revkernels.retrofit.core import retrofit_stack

CFG = dict(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=3)
BATCH = 4
EXACT_ARCHS = ("midpoint-exact", "hamiltonian-exact")
# Hybrids: the last two layers keep their graph (built in the forward with FSDP2's unsharded
# parameters), the first is recomputed keeping its matmul/attention outputs.
HYBRID_ARCHS = ("midpoint-stored", "hamiltonian-stored")
# Retrofitted Hugging Face Llamas (default exact mode, a = 2^-2): their layers stay in place and are the
# blocks the recipe shards (model.model.layers); eq4.5 calls each f_(j-1) in two blocks; linear's fitted
# corrections g_j are root parameters, called inside the blocks' recompute.
HF_ARCHS = ("hf-compact", "hf-eq4.5", "hf-linear")
LR = 0.1


def batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, CFG["vocab_size"], (BATCH, CFG["seq_len"]), generator=g),
            torch.randint(0, CFG["vocab_size"], (BATCH, CFG["seq_len"]), generator=g))


def build(arch, n_layers=None):
    """A tiny GPT of `arch`; 'retrofit' is a retrofitted baseline GPT (midpoint(a=0.5), 1 iteration);
    'ARCH-exact' is ARCH in exact mode, 'ARCH-stored' ARCH with stored_layers=2, store_policy='matmuls'."""
    torch.manual_seed(0)
    cfg = dict(CFG, n_layers=n_layers or CFG["n_layers"])
    if arch == "retrofit":
        return rk.retrofit(rk.GPT(rk.GPTConfig(arch="baseline", **cfg)), a=0.5, iterations=1, form="eq4.5",
                           exact=False)     # f_(j-1) serves two blocks: the case FSDP2 must re-arm
    if arch in HF_ARCHS:
        from transformers import LlamaConfig, LlamaForCausalLM
        teacher = LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], intermediate_size=2 * cfg["d_model"],
            num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"], num_key_value_heads=1,
            max_position_embeddings=cfg["seq_len"], initializer_range=0.2))
        form = arch.removeprefix("hf-")
        if form == "linear":
            g = torch.Generator().manual_seed(2)
            calibration = torch.randint(0, cfg["vocab_size"], (4, cfg["seq_len"]), generator=g)
            return rk.retrofit(teacher, a=2 ** -2, form=form, calibration=calibration)
        return rk.retrofit(teacher, a=2 ** -2, form=form, iterations=1 if form == "eq4.5" else 0)
    if arch.endswith("-exact"):
        return rk.GPT(rk.GPTConfig(arch=arch.removesuffix("-exact"), exact=True, **cfg))
    if arch.endswith("-stored"):
        return rk.GPT(rk.GPTConfig(arch=arch.removesuffix("-stored"), stored_layers=2, store_policy="matmuls", **cfg))
    return rk.GPT(rk.GPTConfig(arch=arch, **cfg))


def shardable_blocks(model):
    """The modules the per-block recipe shards: each block of the stack (both streams for Hamiltonian,
    the residual updates f_j of a retrofit)."""
    if not _is_gpt(model):
        return list(model.model.layers)              # a Hugging Face student: its layers, in place
    body = model.body
    if isinstance(body, rk.HamiltonianStack):
        return [*body.attn_blocks, *body.mlp_blocks]
    if isinstance(body, rk.ReversibleStack):
        return list(body.blocks)
    return list(retrofit_stack(model).updates)


def set_reversible(model, reversible):
    body = model.body
    (retrofit_stack(model) if not isinstance(body, (rk.ReversibleStack, rk.HamiltonianStack)) else body
     ).reversible = reversible


def full_grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        g = None if g is None else (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
        out[name.removeprefix("_orig_mod.")] = g          # torch.compile's wrapper prefixes the names
    return out


def train_two_steps(model, rank, world, micro_batches=1):
    """Two SGD steps on this rank's share of the global batch; the full gradients after each step's
    backward. With micro_batches > 1, gradients accumulate without sync before the last micro-batch."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    idx, targets = batch()
    share = BATCH // world
    rows = range(rank * share, (rank + 1) * share)
    per_micro = share // micro_batches
    grads = []
    for _ in range(2):
        opt.zero_grad()
        for m in range(micro_batches):
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(m == micro_batches - 1)
            sel = list(rows)[m * per_micro:(m + 1) * per_micro]
            loss = _loss(model, idx[sel], targets[sel]) / micro_batches
            loss.backward()
        grads.append(full_grads(model))
        opt.step()
    return grads


def _is_gpt(model):
    """A revkernels GPT, possibly inside a wrapper (FSDP1, torch.compile) that forwards attributes."""
    return hasattr(model, "cfg")


def _loss(model, idx, targets):
    if _is_gpt(model):
        return model(idx, targets)[1]
    return model(idx, labels=targets).loss


def fsdp2(model, reshard, mp=None):
    kw = dict(reshard_after_forward=reshard)
    if mp is not None:
        kw["mp_policy"] = mp
    for block in shardable_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def run_cases(rank, world):
    """{case name: [grads at step 1, grads at step 2]} (or a memory figure / an error message)."""
    results = {}
    for arch in ("midpoint", "leapfrog", "midpoint_a", "hamiltonian", "retrofit"):
        for reshard in (True, False):
            results[f"{arch}-reshard{reshard}"] = train_two_steps(fsdp2(build(arch), reshard), rank, world)
    for arch in EXACT_ARCHS:
        results[f"{arch}-reshardTrue"] = train_two_steps(fsdp2(build(arch), True), rank, world)
    for arch in HYBRID_ARCHS:
        for reshard in (True, False):
            results[f"{arch}-reshard{reshard}"] = train_two_steps(fsdp2(build(arch), reshard), rank, world)
    for arch in HF_ARCHS:
        results[f"{arch}-reshardTrue"] = train_two_steps(fsdp2(build(arch), True), rank, world)
    results["midpoint-accumulate"] = train_two_steps(fsdp2(build("midpoint"), True), rank, world, 2)
    results["hamiltonian-accumulate"] = train_two_steps(fsdp2(build("hamiltonian"), True), rank, world, 2)
    results["retrofit-accumulate"] = train_two_steps(fsdp2(build("retrofit"), True), rank, world, 2)
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for arch in ("midpoint", "hamiltonian"):
        for reversible in (True, False):
            model = fsdp2(build(arch), True, bf16)
            set_reversible(model, reversible)
            results[f"{arch}-bf16-reversible{reversible}"] = train_two_steps(model, rank, world)
    results["memory"] = {n: activation_bytes(n, rank, world) for n in (2, 6)}
    results["fsdp1-per-block"] = fsdp1_outcome(rank, world, per_block=True)
    results["fsdp1-root"] = fsdp1_outcome(rank, world, per_block=False)
    results["midpoint-compiled"] = compiled_outcome(rank, world, fullgraph=False)
    results["compiled-fullgraph"] = compiled_outcome(rank, world, fullgraph=True)
    return results


def compiled_outcome(rank, world, fullgraph):
    """A per-block FSDP2 midpoint GPT under whole-model torch.compile (aot_eager): the error's message,
    or the two steps' gradients if it ran."""
    model = torch.compile(fsdp2(build("midpoint"), True), fullgraph=fullgraph, backend="aot_eager")
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return train_two_steps(model, rank, world)
    except Exception as e:              # Dynamo reports the stack's RuntimeError inside its own error
        return str(e)
    finally:
        torch._dynamo.reset()


def activation_bytes(n_layers, rank, world):
    """Bytes saved for backward by a per-block FSDP2 midpoint GPT's forward, parameters excluded."""
    model = fsdp2(build("midpoint", n_layers), True)
    idx, targets = batch()
    share = BATCH // world
    with SavedTensorBytes(exclude=[p.to_local() for p in model.parameters()]) as m:
        loss = model(idx[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share])[1]
    loss.backward()
    return m.bytes


def fsdp1_outcome(rank, world, per_block):
    """FSDP1 (use_orig_params=True), with a per-block auto-wrap policy or around the whole model:
    the error's message, or the two steps' gradients if it ran."""
    model = build("midpoint")
    wrap_blocks = lambda module, recurse, nonwrapped_numel: recurse or isinstance(module, rk.TransformerBlock)  # noqa: E731
    model = FullyShardedDataParallel(model, auto_wrap_policy=wrap_blocks if per_block else None,
                                     use_orig_params=True, device_id=torch.device("cpu"))
    try:
        return train_two_steps(model, rank, world)
    except RuntimeError as e:
        return str(e)


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = run_cases(rank, world)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "fsdp.pt"))
    gc.collect()     # the wrapped models (and any gloo work they hold) go before the group
    dist.barrier()   # both ranks leave together: gloo aborts a process torn down while its peer still talks
    dist.destroy_process_group()
