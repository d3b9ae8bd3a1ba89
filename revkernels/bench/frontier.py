"""frontier: activation memory against step time at one shape, for every way of trading one for the other.

Configurations (GPT with AdamW; fp32 on a CPU, bf16 autocast on a GPU):
- baseline: p[j+1] = p[j] + f_j(p[j]), every activation saved;
- checkpoint: each f_j under torch.utils.checkpoint (use_reentrant=False), its layer input saved;
- selective AC: each f_j under torch.utils.checkpoint with the contexts of
  torch.utils.checkpoint.create_selective_checkpoint_contexts and a policy that saves the outputs of
  SAVE_OPS (matmuls and scaled-dot-product attention: revkernels.store.MATMUL_OPS, the ops the reversible
  store policy keeps) and recomputes the rest (torchtitan's "op" mode);
- reversible (the preset's scheme) with stored_layers = each k of the preset, with and without
  store_policy="matmuls" (the recomputed layers keep their matmul and attention outputs; at k = L
  nothing is recomputed, so that row is the plain one).

Activation memory of one step = bytes saved for backward by forward + loss (saved_tensors_hooks,
parameters excluded) + bytes kept outside those hooks: selective AC's cache (the outputs its policy
saves, added up by a TorchDispatchMode entered with its forward context) and a reversible stack's
policy store (`last_policy_bytes`). On CUDA also the peak of torch.cuda.max_memory_allocated over
forward + backward + AdamW above the memory allocated before the step (activations, gradients,
transients).

Step time: forward + backward + AdamW step; every configuration warmed up (the memory step above, then
`warmup` more steps), then timed interleaved in groups of GROUP configurations with a baseline of their own
(`rounds` rounds of `per_round` steps, the order reversed every other round), reporting the median
(p20, p80) over rounds and the median (p20, p80) of the time ratio to baseline's in the same round and group.

The hybrid dominates a checkpoint / selective-AC point when some reversible configuration is at least
as fast (median ratio to baseline) at no more activation memory.
"""
import dataclasses
import gc
import traceback
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..memory import SavedTensorBytes
from ..models import GPTConfig
from ..store import MATMUL_OPS
from ._probe import TrainStep
from .common import MIB, figure, interleaved_ms, markdown_table, mib, progress, quantiles, write_csv, write_report
from .cost_model import GPT2_SMALL

PRESETS = {
    # the issue's table: GPT d=256, L=8, B=8, T=128, one intra-op thread
    "cpu": dict(shape=dict(vocab_size=256, seq_len=128, d_model=256, n_heads=4, n_layers=8), batch=8,
                loss_chunk_tokens=0, scheme="midpoint", stored=tuple(range(9)), warmup=1, rounds=4, per_round=1),
    "gpu": dict(shape=GPT2_SMALL, batch=8, loss_chunk_tokens=4096, scheme="midpoint", stored=(0, 3, 6, 9, 12),
                warmup=2, rounds=6, per_round=2),
    "tiny": dict(shape=dict(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=3), batch=2,
                 loss_chunk_tokens=0, scheme="midpoint", stored=(0, 1, 2, 3), warmup=1, rounds=2, per_round=1),
}
POLICY = "matmuls"
GROUP = 4           # configurations timed interleaved with one baseline (see time_rows)
COLUMNS = ("config", "method", "stored_layers", "store_policy", "n_layers", "batch", "step_ms", "step_ms_p20",
           "step_ms_p80", "vs_baseline", "vs_baseline_p20", "vs_baseline_p80", "saved_bytes", "cache_bytes",
           "policy_bytes", "activation_bytes", "peak_bytes", "loss0", "error", "device", "preset")
FIXED = ("baseline", "checkpoint", "selective-ac")
FIXED_LABELS = {"baseline": "baseline", "checkpoint": "checkpoint", "selective-ac": "selective AC"}


# The same ops as the reversible stack's store_policy="matmuls": matmuls and every scaled-dot-product-attention
# kernel (flash / efficient / cuDNN on CUDA, flash-for-CPU on a CPU).
SAVE_OPS = MATMUL_OPS


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _OutputBytes(TorchDispatchMode):
    """Adds to `tally[0]` the bytes of the distinct storages that SAVE_OPS return while it is active."""

    def __init__(self, tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAVE_OPS:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.tally[0] += t.untyped_storage().nbytes()
        return out


class SelectiveCheckpointStack(nn.Module):
    """p[j+1] = p[j] + f_j(p[j]) with each f_j under non-reentrant torch.utils.checkpoint and selective AC:
    the outputs of SAVE_OPS are kept in the forward and replayed by the recompute, the rest is recomputed.
    `last_cache_bytes`: bytes of the outputs the policy kept in the last forward."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)
        self._tally = [0]

    @property
    def last_cache_bytes(self) -> int:
        return self._tally[0]

    def _contexts(self):
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_policy)

        @contextmanager
        def counted():
            with forward_ctx, _OutputBytes(self._tally):
                yield
        return counted(), recompute_ctx

    def forward(self, x):
        self._tally[0] = 0
        for block in self.blocks:
            if torch.is_grad_enabled():
                x = x + checkpoint(block, x, use_reentrant=False, context_fn=self._contexts)
            else:
                x = x + block(x)
        return x


def hybrid_supported() -> bool:
    """Whether GPTConfig has stored_layers / store_policy (the reversible hybrid)."""
    return "stored_layers" in {f.name for f in dataclasses.fields(GPTConfig)}


def configurations(p) -> list:
    """(label, method, stored_layers, store_policy) of every row the preset measures: its `fixed` methods
    (default FIXED), then the reversible scheme at each k of `stored` for each of `policies` (default: none
    and POLICY)."""
    L = p["shape"]["n_layers"]
    rows = [(FIXED_LABELS[m], m, None, None) for m in p.get("fixed", FIXED)]
    for policy in p.get("policies", (None, POLICY)):
        for k in p["stored"]:
            if policy and k == L:
                continue                    # nothing is recomputed: the same as the plain row
            if (k or policy) and not hybrid_supported():
                continue
            label = f"{p['scheme']} k={k}" + (f" +{policy}" if policy else "")
            rows.append((label, "reversible", k, policy))
    return rows


def build_config(p, method, k=None, policy=None) -> dict:
    """GPTConfig keyword arguments of one configuration (selective AC: baseline's, its body swapped later)."""
    arch = {"baseline": "baseline", "checkpoint": "checkpoint", "selective-ac": "baseline"}.get(method, p["scheme"])
    extra = dict(stored_layers=k, store_policy=policy) if (k or policy) else {}
    return dict(p["shape"], arch=arch, loss_chunk_tokens=p["loss_chunk_tokens"], **extra)


def build_step(p, device, method, k=None, policy=None) -> TrainStep:
    """A TrainStep (same seed, so the same initial weights and batch for every configuration)."""
    step = TrainStep(GPTConfig(**build_config(p, method, k, policy)), p["batch"], device, bf16=device.type == "cuda")
    if method == "selective-ac":
        step.model.body = SelectiveCheckpointStack(step.model.body.blocks)   # the same parameters
    return step


def measure_memory(step: TrainStep) -> dict:
    """One full step; its activation memory (see the module docstring) and loss."""
    device = step.device
    params = list(step.model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with SavedTensorBytes(exclude=params) as saved:
        loss = step.loss()
    body = step.model.body
    cache = getattr(body, "last_cache_bytes", 0)
    policy = getattr(body, "last_policy_bytes", None) or 0
    row = dict(saved_bytes=saved.bytes, cache_bytes=cache, policy_bytes=policy,
               activation_bytes=saved.bytes + cache + policy, loss0=loss.detach().item())
    step.finish(loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    return row


def measure_memory_rows(ctx, p, configs) -> tuple:
    """({label: TrainStep}, {label: row}): every configuration built and its memory measured (one step each).
    A configuration that raises (out of memory, or an API this torch lacks) gets its error in its row, the
    traceback on stderr, and no timing: on a GPU window run blind, the others still get measured."""
    steps, rows = {}, {}
    for label, method, k, policy in progress(configs, "frontier: build + memory"):
        ctx.check_time(f"frontier {label}")
        rows[label] = dict(config=label, method=method, stored_layers=k, store_policy=policy,
                           n_layers=p["shape"]["n_layers"], batch=p["batch"], device=ctx.device_name,
                           preset=ctx.preset, error=None)
        try:
            step = build_step(p, ctx.device, method, k, policy)
            rows[label].update(measure_memory(step))
            steps[label] = step
        except Exception as err:  # noqa: BLE001 - recorded in the row and the report, never dropped
            traceback.print_exc()
            rows[label]["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            step = None                     # drop what the failed configuration built
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    return steps, rows


def groups(labels, size) -> list:
    """The configurations other than baseline in groups of `size`, each with baseline first (when present)."""
    others = [label for label in labels if label != "baseline"]
    head = ["baseline"] if "baseline" in labels else []
    return [head + others[i:i + size] for i in range(0, len(others), size)] or [head]


def time_rows(ctx, p, steps, rows):
    """Add step times and ratios to baseline's to `rows`: the configurations are timed in groups of `group`
    (default GROUP), each group interleaved with a baseline of its own (common.interleaved_ms), so a ratio
    compares steps at most one group's round apart, whatever the number of configurations (on a shared
    machine the load drifts within a long round). Ratio = median (p20, p80) over rounds of the time over
    baseline's in the same round and group; baseline's step time pools its rounds of every group."""
    base_ms = []
    for names in groups(list(steps), p.get("group", GROUP)):
        ctx.check_time("frontier timing")
        times = interleaved_ms({n: steps[n] for n in names}, ctx.device, p["warmup"], p["rounds"], p["per_round"])
        base = times.get("baseline")
        base_ms += base or []
        for label, ms in times.items():
            r = rows[label]
            if label != "baseline":
                r["step_ms"], r["step_ms_p20"], r["step_ms_p80"] = quantiles(ms)
            if base:
                r["vs_baseline"], r["vs_baseline_p20"], r["vs_baseline_p80"] = quantiles(
                    [t / b for t, b in zip(ms, base)])
    if base_ms:
        rows["baseline"]["step_ms"], rows["baseline"]["step_ms_p20"], rows["baseline"]["step_ms_p80"] = \
            quantiles(base_ms)


def run(ctx, p=None) -> str:
    """`p`: the preset's settings (default PRESETS[ctx.preset]; gpu-check passes its own). The memory rows
    are written before the timing starts, so a run stopped at a time limit keeps them."""
    p = p or PRESETS[ctx.preset]
    configs = configurations(p)
    steps, by_label = measure_memory_rows(ctx, p, configs)
    rows = [by_label[label] for label, *_ in configs]
    write_csv(ctx.path("csv"), rows, COLUMNS)
    time_rows(ctx, p, steps, by_label)
    del steps
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    write_csv(ctx.path("csv"), rows, COLUMNS)
    return write_report(ctx, "Memory/time frontier: checkpointing, selective AC and the reversible hybrid",
                        _markdown(ctx, p, rows), _plot(ctx, p, rows))


# ------------------------------------------------------------------ analysis

def _find(rows, method, k=None, policy=None):
    return next((r for r in rows if r["method"] == method and (method != "reversible" or
                 (r["stored_layers"] == k and r["store_policy"] == policy))), None)


def dominance(rows) -> list:
    """For each checkpoint / selective-AC row: (row, the fastest reversible row at no more activation memory
    (None if there is none), whether that row is at least as fast)."""
    hybrids = [r for r in rows if r["method"] == "reversible" and r.get("vs_baseline") is not None]
    out = []
    for ref in rows:
        if ref["method"] not in ("checkpoint", "selective-ac") or ref.get("vs_baseline") is None:
            continue
        cheaper = [h for h in hybrids if h["activation_bytes"] <= ref["activation_bytes"]]
        best = min(cheaper, key=lambda h: h["vs_baseline"], default=None)
        out.append((ref, best, best is not None and best["vs_baseline"] <= ref["vs_baseline"]))
    return out


def pareto(rows) -> list:
    """The reversible rows no other reversible row beats on both memory and time, by increasing memory."""
    hybrids = sorted((r for r in rows if r["method"] == "reversible" and r.get("vs_baseline") is not None),
                     key=lambda r: (r["activation_bytes"], r["vs_baseline"]))
    front, best = [], float("inf")
    for r in hybrids:
        if r["vs_baseline"] < best:
            front.append(r)
            best = r["vs_baseline"]
    return front


def ratios(p, rows) -> dict:
    """all-stored / baseline and all-stored / none-stored step-time ratios (medians of same-round ratios)."""
    L = p["shape"]["n_layers"]
    full, none = _find(rows, "reversible", L), _find(rows, "reversible", 0)
    out = {}
    if full and full.get("vs_baseline") is not None:
        out["all_stored_vs_baseline"] = full["vs_baseline"]
        if none and none.get("vs_baseline"):
            out["all_stored_vs_none_stored"] = full["vs_baseline"] / none["vs_baseline"]
    return out


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def _markdown(ctx, p, rows) -> str:
    gpu = ctx.device.type == "cuda"
    header = ["configuration", "activation MiB", "saved (hooks)", "SAC cache", "policy store", "step ms (p20-p80)",
              "vs baseline (p20-p80)"] + (["peak MiB"] if gpu else [])
    table = []
    for r in rows:
        if r.get("error"):
            table.append([r["config"], f"failed: {r['error']}"] + [""] * (len(header) - 2))
            continue
        cells = [r["config"], mib(r["activation_bytes"]), mib(r["saved_bytes"]), mib(r["cache_bytes"]),
                 mib(r["policy_bytes"]),
                 f"{_fmt(r.get('step_ms'), '.1f')} ({_fmt(r.get('step_ms_p20'), '.1f')}-"
                 f"{_fmt(r.get('step_ms_p80'), '.1f')})",
                 f"{_fmt(r.get('vs_baseline'))}x ({_fmt(r.get('vs_baseline_p20'))}-{_fmt(r.get('vs_baseline_p80'))})"]
        if gpu:
            cells.append(mib(r["peak_bytes"]))
        table.append(cells)
    dom = dominance(rows)
    verdicts = []
    for ref, best, ok in dom:
        if best is None:
            verdicts.append(f"- {ref['config']} ({mib(ref['activation_bytes'])} MiB, {ref['vs_baseline']:.2f}x): "
                            "no reversible configuration at no more memory.")
        else:
            verdicts.append(f"- {ref['config']} ({mib(ref['activation_bytes'])} MiB, {ref['vs_baseline']:.2f}x): "
                            f"{'**dominated**' if ok else '**not dominated**'}: the fastest reversible configuration "
                            f"at no more memory is {best['config']} ({mib(best['activation_bytes'])} MiB, "
                            f"{best['vs_baseline']:.2f}x).")
    all_ok = bool(dom) and all(ok for *_, ok in dom)
    rat = ratios(p, rows)
    L = p["shape"]["n_layers"]
    ratio_lines = []
    if "all_stored_vs_baseline" in rat:
        ratio_lines.append(f"- all stored (k={L}) / baseline: **{rat['all_stored_vs_baseline']:.2f}x** "
                           "(target <= 1.05x)")
    if "all_stored_vs_none_stored" in rat:
        ratio_lines.append(f"- all stored (k={L}) / none stored (k=0): **{rat['all_stored_vs_none_stored']:.2f}x**")
    if not hybrid_supported():
        ratio_lines.append("- stored_layers / store_policy are not in this GPTConfig: only the k=0 reversible row ran.")
    front = ", ".join(r["config"] for r in pareto(rows))
    shape = ", ".join(f"{k}={v}" for k, v in p["shape"].items())
    loss_spread = [r["loss0"] for r in rows if r["method"] == "reversible" and not r.get("error")] or [float("nan")]
    return f"""
Shape: {shape}, batch {p['batch']}, loss_chunk_tokens={p['loss_chunk_tokens']}; AdamW;
{'bf16 autocast' if gpu else 'fp32'}; reversible scheme `{p['scheme']}`; stored_layers k (the stack's placement)
with and without store_policy="{POLICY}". Step = forward + backward + AdamW; the configurations timed
interleaved in groups of {p.get('group', GROUP)}, each with its own baseline, {p['rounds']} rounds of
{p['per_round']} step(s) after {p['warmup']} warm-up step(s) (vs baseline: median of the same-round ratios)
{'' if gpu else '(a shared CPU: read the ratios, measured side by side, rather than the absolute times)'}.
Activation memory = bytes saved for backward by forward + loss (saved_tensors_hooks, parameters excluded)
+ selective AC's cache (outputs its policy keeps, counted by a TorchDispatchMode) + the reversible stack's
policy store (`last_policy_bytes`){'; peak MiB: CUDA peak above the allocation before the step' if gpu else ''}.
Selective AC saves the outputs of aten mm, addmm, bmm and the scaled-dot-product-attention kernels.

{markdown_table(header, table)}

Does the reversible hybrid dominate (for each point, some reversible configuration at least as fast at no
more activation memory)? **{'yes' if all_ok else 'no'}**

{chr(10).join(verdicts)}

Reversible Pareto frontier (increasing memory): {front or '—'}.

{chr(10).join(ratio_lines)}

Every reversible configuration computes the same forward: first-step losses {min(loss_spread):.6f} to
{max(loss_spread):.6f}.
"""


def _plot(ctx, p, rows):
    fig, (ax,) = figure(1, ctx, "Activation memory vs step time", width=7.5, height=5.0)
    for policy, style in ((None, "-o"), (POLICY, "--s")):
        line = sorted((r for r in rows if r["method"] == "reversible" and r["store_policy"] == policy
                       and r.get("vs_baseline") is not None), key=lambda r: r["stored_layers"])
        if not line:
            continue
        xs, ys = [r["vs_baseline"] for r in line], [r["activation_bytes"] / MIB for r in line]
        ax.plot(xs, ys, style, label=f"{p['scheme']}, stored_layers {line[0]['stored_layers']}.."
                f"{line[-1]['stored_layers']}" + (f", store_policy={policy}" if policy else ""))
        for r, x, y in zip(line, xs, ys):
            ax.annotate(f"k={r['stored_layers']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for method, marker in zip(FIXED, ("*", "X", "D")):
        r = _find(rows, method)
        if r and r.get("vs_baseline") is not None:
            ax.scatter([r["vs_baseline"]], [r["activation_bytes"] / MIB], marker=marker, s=90, zorder=3,
                       color="black" if method == "baseline" else None, label=r["config"])
    ax.set_xlabel("step time / baseline's (median of same-round ratios)")
    ax.set_ylabel("activation MiB (saved + SAC cache + policy store)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
