"""Reversible-backward autograd Functions: O(1) activation memory in depth.

Forward runs the blocks under no_grad and keeps two state buffers updated in place. Backward
walks the layers in reverse: recompute the block on the rebuilt state with grad enabled (same
RNG states and autocast as the forward), rebuild the previous state in place and update the
gradient buffers with one fused pass, then run the block's vjp. Nothing per layer survives the
forward but O(1) scalars: the coefficients and, when randomness is replayed, one RNG state.

Parameter gradients are returned as gradients of the Function's inputs, so autograd (and DDP's
hooks) see each parameter used once per step, as in an ordinary graph.

Memory for speed (StackRun.stored, StackRun.store_policy): a stored block runs with grad in the forward
and keeps its autograd graph (a detached copy of its input as the leaf, and its output f_j); the
backward uses that graph instead of a recompute, and the inverse step uses the stored f_j. A recomputed
block may keep the outputs of its matmuls and attention (revkernels.store), which its recompute then
returns instead of running those ops.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .ops import backward_step_, coupling_, three_term_
from .replay import AmbientState, ForwardContext
from .store import BlockStore


@dataclass
class StackRun:
    """The non-tensor arguments of one call: the blocks, their parameters, options, and which blocks hold
    FSDP2 modules (found once per forward, so the backward's recomputes need no module scan).
    stored: indices of the blocks whose forward graph is kept (no recompute); store_policy: what the
    other blocks keep of their forward (None: nothing; see revkernels.store)."""
    blocks: Sequence[nn.Module]
    state_dtype: torch.dtype
    preserve_rng: bool
    report_reconstruction: Optional[Callable[[torch.Tensor], None]] = None
    stored: frozenset = frozenset()
    store_policy: Optional[str] = None
    policy_bytes: int = field(default=0, init=False)     # what the store policy kept in the forward
    params: List[List[torch.Tensor]] = field(init=False)
    names: List[List[str]] = field(init=False)
    fsdp2: List[bool] = field(init=False)

    def __post_init__(self):
        self.fsdp2 = _fsdp2_blocks(self.blocks)
        named = [list(b.named_parameters()) for b in self.blocks]
        self.params = [[p for _, p in ps] for ps in named]
        self.names = [[n for n, _ in ps] for ps in named]

    def flat_params(self):
        return [p for ps in self.params for p in ps]


class BlockForward:
    """What the forward of one block leaves for the backward: the RNG replay and the store policy's
    outputs of a recomputed block, or the input leaf of a stored one (whose output the Function saves)."""
    __slots__ = ("replay", "store", "leaf")

    def __init__(self, replay=None, store=None, leaf=None):
        self.replay, self.store, self.leaf = replay, store, leaf


def kept_bytes(fwds):
    """Bytes the store policy kept in a forward (over the BlockForwards of its blocks)."""
    return sum(f.store.bytes for f in fwds if f.store is not None)


def block_forward(run, j, state, fresh=False):
    """(BlockForward, f_j(state)) of block j under the run's options. A stored block runs with grad on a
    copy of `state` (the caller overwrites its state buffers in place; `fresh` says `state` is already a
    tensor of its own) and its output carries the graph; other outputs have none."""
    block = run.blocks[j]
    if j in run.stored:
        leaf = (state.detach() if fresh else state.detach().clone()).requires_grad_(True)
        with torch.enable_grad():
            return BlockForward(leaf=leaf), checked_update(block, j, leaf)
    replay = ForwardContext.capture(state.device, run.preserve_rng)
    if run.store_policy is None:
        return BlockForward(replay), checked_update(block, j, state)
    store = BlockStore(run.store_policy)
    return BlockForward(replay, store), store.record(lambda t: checked_update(block, j, t), state)


def block_graph(run, j, state, fwd: BlockForward, ambient, stored_out=None):
    """(input leaf, output) of block j at `state` with grad: the stored graph (`stored_out`, the output
    the forward saved; the leaf is dropped here), or a recompute returning the outputs the store policy
    kept (each released as the replay consumes it). A recompute mutates nothing: a whole-model
    torch.compile traces it."""
    if fwd.leaf is not None:
        leaf, fwd.leaf = fwd.leaf, None
        return leaf, stored_out
    return _recompute(run, j, state, fwd.replay, ambient, fwd.store)


def _fsdp2_blocks(blocks):
    """Per block, whether FSDP2 modules sit inside it. Refuses FSDP1, which flattens a wrapped block's
    parameters into one FlatParameter whose gradient its hooks route back; those hooks do not survive the
    reversible backward's recompute. Refuses FSDP2 under a whole-model torch.compile, whose traced
    backward cannot follow FSDP2's unsharded parameters."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    found = []
    for j, block in enumerate(blocks):
        modules = list(block.modules())
        if any(isinstance(m, FullyShardedDataParallel) for m in modules):
            raise RuntimeError(
                f"block {j} is wrapped by FSDP1 (FullyShardedDataParallel), which reversible stacks do "
                "not support. Use FSDP2: `fully_shard(block)` on each block, then `fully_shard(model)`")
        found.append(any(isinstance(m, FSDPModule) for m in modules))
    if any(found) and torch.compiler.is_compiling():
        raise RuntimeError("a reversible stack with per-block FSDP2 cannot run under a whole-model "
                           "torch.compile: compile the blocks instead (torch.compile(block) before fully_shard)")
    return found


def checked_update(block, j, state):
    """block(state), refused unless it keeps the state's shape."""
    f = block(state)
    if not isinstance(f, torch.Tensor) or f.shape != state.shape:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"block {j} maps shape {tuple(state.shape)} to {got}: "
                         "blocks must map (B, T, d) to the same shape")
    return f


def _fsdp2_rearm(block):
    """Lets FSDP2 modules inside `block` that already finished their backward in this pass run a
    fresh forward/backward cycle for this recompute.

    A module can serve two stack blocks (a retrofit's f_{j-1} is called by F_{j-1} and F_j). After the
    first block's vjp its FSDP2 group has reduce-scattered (POST_BACKWARD) while its state stays
    PRE_BACKWARD, which FSDP2 reads as an activation-checkpoint recompute covered by a running backward:
    it would register no post-backward hook and the second contribution would be lost. Returning both
    to IDLE makes the recompute register its hooks again; the second reduce-scatter adds into the
    sharded gradient. (FSDP2 internals: torch.distributed.fsdp._fully_shard, checked by tests/test_fsdp.py.)
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    for m in block.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        groups = state._fsdp_param_groups
        if groups and all(g._training_state == TrainingState.POST_BACKWARD for g in groups):
            for g in groups:
                g._training_state = TrainingState.IDLE
            state._training_state = TrainingState.IDLE


def _recompute(run, j, state, fwd_ctx, ambient, store=None):
    """(input leaf, output) of block j's update at `state` with grad, under the forward's RNG, autocast
    and SDPA backends, and with the op outputs `store` (a BlockStore or None) kept in the forward."""
    block = run.blocks[j]
    if run.fsdp2[j]:
        _fsdp2_rearm(block)
    inp = state.detach().requires_grad_(True)
    with torch.enable_grad(), fwd_ctx.replay(), ambient.replay(), \
            (store.replay() if store is not None else contextlib.nullcontext()):
        out = block(inp)
    return inp, out


def graph_leaves(out, j):
    """The leaf tensors that block j's output `out` accumulates into (its graph's AccumulateGrad nodes).
    Refuses a reentrant checkpoint inside the block: it only runs under a plain .backward()."""
    leaves, seen, todo = [], set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            raise RuntimeError(
                f"block {j} runs torch.utils.checkpoint(..., use_reentrant=True), which cannot be "
                "differentiated inside a reversible stack's backward. Use use_reentrant=False, or drop "
                "the checkpoint: the reversible backward already recomputes each block")
        variable = getattr(node, "variable", None)      # only AccumulateGrad nodes have one
        if variable is not None:
            leaves.append(variable)
        else:
            todo.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _fsdp2_managed(p):
    """True when `p` is a DTensor, the sharded parameter of an FSDP2 module inside the block (the caller
    checks the block holds one). Its recompute runs on the unsharded tensor FSDP2 registers at that
    forward, whose .grad FSDP2's post-backward hook reduce-scatters back onto `p`."""
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor)


def _fsdp1_hint(swapped):
    if any(type(t).__name__ == "FlatParameter" for t in swapped):
        return " (FSDP1's FlatParameter: use FSDP2, `fully_shard` on each block and then the model)"
    return ""


def block_vjp(run, j, out, inp, cotangent, param_grads):
    """dL/dinp = J_j^T cotangent; appends one gradient (or None) per recorded parameter to param_grads.

    The block's parameters recorded at the forward are run.params[j] (names run.names[j]). When the
    recompute used exactly those tensors, their gradients are taken with autograd.grad and returned as the Function's input
    gradients (one AccumulateGrad per parameter per step, as DDP expects). A wrapper that swaps
    parameters under the block (per-block FSDP2 unshards into new tensors at each forward) makes the
    recompute use other leaves; then the vjp runs as an ordinary backward into those leaves' .grad, so
    the wrapper's hooks fire (FSDP2 reduce-scatters from the unsharded parameters' .grad), and a
    recorded parameter that requires grad but is reached by no gradient raises: never a silent None.
    """
    block, params, names = run.blocks[j], run.params[j], run.names[j]
    if not out.requires_grad:                  # an update with no graph (e.g. zeros): J = 0
        param_grads.extend(None for _ in params)
        return None
    wanted = [p for p in params if p.requires_grad]
    recorded = {id(p) for p in params}
    # Dynamo (torch.compile of the whole model) traces this backward once, with the module's own
    # parameters; it cannot walk a graph, so a parameter left without a gradient raises there.
    compiling = torch.compiler.is_compiling()
    leaves = [] if compiling else [t for t in graph_leaves(out, j) if t is not inp]
    swapped = [t for t in leaves if id(t) not in recorded]
    if not swapped:
        grads = iter(torch.autograd.grad(out, [inp, *wanted], cotangent, allow_unused=True))
        g_inp = next(grads)
        for name, p in zip(names, params):
            g = next(grads) if p.requires_grad else None
            if compiling and p.requires_grad and g is None:
                raise RuntimeError(
                    f"reversible backward under torch.compile: parameter {name!r} of block {j} "
                    f"({type(block).__name__}) requires grad but gets none. A compiled backward cannot tell an "
                    "unused parameter from one a wrapper swapped out; freeze it (requires_grad_(False)) or "
                    "compile the blocks instead of the whole model")
            param_grads.append(g)
        return g_inp
    used = {id(t) for t in leaves}
    for name, p in zip(names, params):
        if p.requires_grad and id(p) not in used and not (run.fsdp2[j] and _fsdp2_managed(p)):
            raise RuntimeError(
                f"reversible backward: parameter {name!r} of block {j} "
                f"({type(block).__name__}) requires grad but its recompute used other tensors "
                f"({len(swapped)} swapped-in leaves) that nothing routes back to it, so it would get no "
                f"gradient. A wrapper replaces parameters under the block{_fsdp1_hint(swapped)}; supported "
                "are per-block FSDP2 (fully_shard) and wrappers that keep the module's own parameters")
    torch.autograd.backward(out, cotangent, inputs=[inp, *leaves] if leaves else [inp])
    param_grads.extend(None for _ in params)   # accumulated in place into the leaves' .grad
    return inp.grad


def _add_(acc, g):
    if g is not None:
        acc.add_(g.to(acc.dtype))


def _state_copy(x, state_dtype):
    """A contiguous state buffer of x in state_dtype, in one pass."""
    return x.detach().to(state_dtype, memory_format=torch.contiguous_format, copy=True)


def _initial_states(x, state_dtype):
    first = _state_copy(x, state_dtype)
    return first, first.clone()


def reconstruction_error(rebuilt, originals):
    """max over pairs of max|rebuilt - original| / max|original| (0-d fp32 tensor, no host sync)."""
    errs = [(r - o.to(r.dtype)).abs().amax().float() / o.abs().amax().float().clamp_min(torch.finfo(torch.float32).tiny)
            for r, o in zip(rebuilt, originals)]
    return torch.stack(errs).amax()


def _report(run, rebuilt, originals):
    """Hands the meter its value; a backward traced by torch.compile (whole-model compile) has no meter:
    Dynamo cannot trace the module state it writes."""
    if run.report_reconstruction is not None and not torch.compiler.is_compiling():
        run.report_reconstruction(reconstruction_error(rebuilt, originals))


def _output(state, x_dtype):
    return state if state.dtype == x_dtype else state.to(x_dtype)


def _refuse_second_backward(ctx):
    """The backward rebuilds states in the saved buffers: a second pass would read overwritten ones."""
    if getattr(ctx, "done", False):
        raise RuntimeError("a reversible stack's backward runs once per forward (retain_graph is not supported)")
    ctx.done = True


def _ordered_param_grads(per_block_reversed):
    return [g for grads in reversed(per_block_reversed) for g in grads]


class ThreeTermFunction(torch.autograd.Function):
    """p[j+1] = a_j*p[j-1] + (1-a_j)*p[j] + c_j*f_j(p[j]) with p[-1] = p[0] = x; returns p[L].

    a, c: tensors of L rows (scalars, or per-channel rows of size d), either may require grad."""

    @staticmethod
    def forward(ctx, x, a, c, run: StackRun, *params):
        ambient = AmbientState.capture(x.device)
        prev, cur = _initial_states(x, run.state_dtype)                # p[-1], p[0]
        fwds, stored_outs = [], []
        with torch.no_grad():
            for j in range(len(run.blocks)):
                fwd, f = block_forward(run, j, cur)
                fwds.append(fwd)
                if fwd.leaf is not None:
                    stored_outs.append(f)
                three_term_(prev, prev, cur, f.detach(), a[j], c[j])   # prev <- p[j+1]
                prev, cur = cur, prev
        run.policy_bytes = kept_bytes(fwds)
        ctx.run, ctx.fwds, ctx.ambient, ctx.x_dtype = run, fwds, ambient, x.dtype
        ctx.save_for_backward(prev, cur, a, c, x, *stored_outs)        # p[L-1], p[L]; x for the meter
        return _output(cur, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        _refuse_second_backward(ctx)
        prev, last, a, c, x, *stored_outs = ctx.saved_tensors
        run = ctx.run
        stored_outs = dict(zip(sorted(run.stored), stored_outs))
        A, B = last.clone(), prev                          # A = p[j+1], B = p[j]; B is ours to overwrite
        gA = grad_out.to(run.state_dtype).contiguous().clone()
        gB = torch.zeros_like(gA)
        coef_grads = a.requires_grad or c.requires_grad
        da, dc, param_grads = [], [], []
        pending = None              # J_{j+1}^T gf of the layer above: the part of gA not yet added
        for j in reversed(range(len(run.blocks))):
            inp, f = block_graph(run, j, B, ctx.fwds[j], ctx.ambient, stored_outs.pop(j, None))
            gf, da_j, dc_j = backward_step_(A, B, f.detach(), gA, gB, a[j], c[j], coef_grads, g_pending=pending)
            grads_j = []
            pending = block_vjp(run, j, f, inp, gf, grads_j)
            if pending is not None:
                pending = pending.to(gB.dtype).contiguous()   # belongs to dL/dp[j] = gB, the next gA
            param_grads.append(grads_j)
            da.append(da_j), dc.append(dc_j)
            A, B, gA, gB = B, A, gB, gA
        _report(run, (A, B), (x, x))                       # rebuilt p[0] and p[-1] against x
        g_x = gA + gB if pending is None else gA + gB + pending   # p[0] and p[-1] are both x
        g_x = g_x.to(ctx.x_dtype)
        g_a = torch.stack(da[::-1]).to(a.dtype) if a.requires_grad else None
        g_c = torch.stack(dc[::-1]).to(c.dtype) if c.requires_grad else None
        return (g_x, g_a, g_c, None, *_ordered_param_grads(param_grads))


class HamiltonianFunction(torch.autograd.Function):
    """q[l] = a*q[l-1] + G_l(p[l-1]);  p[l] = b*p[l-1] + M_l(q[l]);  returns (q[L], p[L]) from (p[0], q[0]).

    run.blocks alternates G_1, M_1, G_2, M_2, ...; a, b: Python floats or 0-d tensors (no grad).
    p0 and q0 may be the same tensor (q[0] = p[0] = x): autograd then sums their gradients."""

    @staticmethod
    def forward(ctx, p0, q0, a, b, run: StackRun, *params):
        ambient = AmbientState.capture(p0.device)
        q, p = _state_copy(q0, run.state_dtype), _state_copy(p0, run.state_dtype)
        fwds, stored_outs = [], []
        with torch.no_grad():
            for j in range(len(run.blocks)):      # G_l (j even) updates q from p; M_l (j odd) p from q
                src, coef = (p, a) if j % 2 == 0 else (q, b)
                fwd, f = block_forward(run, j, src)
                fwds.append(fwd)
                if fwd.leaf is not None:
                    stored_outs.append(f)
                y = q if j % 2 == 0 else p
                coupling_(y, y, f.detach(), coef)                  # q <- a*q + G(p);  p <- b*p + M(q)
        run.policy_bytes = kept_bytes(fwds)
        ctx.run, ctx.fwds, ctx.ambient, ctx.a, ctx.b = run, fwds, ambient, a, b
        ctx.dtypes = (p0.dtype, q0.dtype)
        ctx.save_for_backward(q, p, p0, q0, *stored_outs)
        return _output(q, q0.dtype), _output(p, p0.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_p):
        _refuse_second_backward(ctx)
        q_saved, p_saved, p0, q0, *stored_outs = ctx.saved_tensors
        run, a, b = ctx.run, ctx.a, ctx.b
        stored_outs = dict(zip(sorted(run.stored), stored_outs))
        q, p = q_saved.clone(), p_saved.clone()            # q[L], p[L] are the caller's outputs
        gp = grad_p.to(run.state_dtype).contiguous().clone()
        gq = grad_q.to(run.state_dtype).contiguous().clone()
        param_grads = []
        for l in reversed(range(0, len(run.blocks), 2)):
            grads_m, grads_g = [], []
            inp, m = block_graph(run, l + 1, q, ctx.fwds[l + 1], ctx.ambient, stored_outs.pop(l + 1, None))
            _add_(gq, block_vjp(run, l + 1, m, inp, gp.to(m.dtype), grads_m))    # dL/dq[l] complete
            coupling_(p, p, m.detach(), b, inverse=True, gx=gp)              # p <- p[l-1], gp <- b*gp
            inp, g = block_graph(run, l, p, ctx.fwds[l], ctx.ambient, stored_outs.pop(l, None))
            _add_(gp, block_vjp(run, l, g, inp, gq.to(g.dtype), grads_g))            # dL/dp[l-1] complete
            coupling_(q, q, g.detach(), a, inverse=True, gx=gq)              # q <- q[l-1], gq <- a*gq
            param_grads += [grads_m, grads_g]
        _report(run, (p, q), (p0, q0))
        g_p0, g_q0 = gp.to(ctx.dtypes[0]), gq.to(ctx.dtypes[1])
        return (g_p0, g_q0, None, None, None, *_ordered_param_grads(param_grads))
