"""max-batch: the largest batch that completes a full training step (AdamW, bf16 autocast on a GPU)
under a memory budget, per arch (paper Table 3).

Search: from a start batch, guesses from a linear fit of measured memory against batch, with
doubling / halving / bisection as the fallback (search_max_batch); every probe is a fresh process
(revkernels.bench._probe; in-process only for the test suite's `tiny` preset), appended to the CSV
as soon as it finishes. A rerun reads the CSV and
re-uses every recorded probe (and what monotonicity implies: a batch below a fitting one fits, one
above a failing one fails), so an interrupted sweep resumes where it stopped.

GPU budgets of N GB are N GiB emulated on one large GPU with set_per_process_memory_fraction
(the CUDA context lies outside the cap); a budget at or above the device's memory runs on the
whole device, one more than 5% above it is skipped. CPU budgets are emulated (see _probe): saved
activations + parameters, gradients and AdamW state must fit.

On a GPU the analytic model of revkernels.bench.cost_model bounds each search: the first probe is at 90%
of the batch it predicts, the cap is 8x that batch (a capped answer is reported as ">= cap"), and
with a single measured probe the next guess uses the model's bytes per sample. Memory measured at a
batch that fitted under a smaller budget feeds the linear fit under the larger ones. Each answer is
recorded in NAME-results.csv, so a plan chunk that runs some budgets leaves the others to the next.
"""
from matplotlib.ticker import ScalarFormatter

from . import cost_model
from ._probe import run_probe
from .common import GIB, MIB, append_csv, figure, markdown_table, progress, read_csv, write_report

GPT2_SMALL = dict(vocab_size=50304, seq_len=1024, d_model=768, n_heads=12, n_layers=12)
PRESETS = {
    "gpu": dict(shape=GPT2_SMALL, archs=("baseline", "checkpoint", "midpoint"),
                budgets=tuple((f"{g} GB", g * GIB) for g in (24, 40, 48, 80)),
                loss_chunk_tokens=4096, start=4, cap=8192, isolate=True),
    "cpu": dict(shape=dict(vocab_size=128, seq_len=32, d_model=32, n_heads=2, n_layers=4),
                archs=("baseline", "checkpoint", "midpoint"),
                budgets=tuple((f"{m} MiB", m * MIB) for m in (2, 4)),
                loss_chunk_tokens=128, start=4, cap=4096, isolate=True),
    "tiny": dict(shape=dict(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=2),
                 archs=("baseline", "midpoint"), budgets=(("0.7 MiB", int(0.7 * MIB)),),
                 loss_chunk_tokens=16, start=2, cap=4, isolate=False),   # in-process: test speed
}
# Gal et al., Table 3: max batch of GPT-2 small (T=1024), baseline vs midpoint, by GPU memory (GB).
PAPER_TABLE3 = {"24 GB": (6, 58), "40 GB": (12, 119), "48 GB": (15, 140), "80 GB": (26, 257)}
LOG_COLUMNS = ("arch", "budget", "budget_bytes", "shape", "batch", "ok", "memory_bytes", "memory_kind",
               "state_bytes", "error", "device", "preset")
RESULT_COLUMNS = ("arch", "budget", "shape", "batch", "capped", "model_batch", "device", "preset")


def search_max_batch(fits, start=1, cap=None, tol=0.0, predict=None):
    """Largest batch b <= cap with fits(b), for a monotone `fits` (True up to the answer, False above).

    Keeps a bracket lo (largest batch known to fit) < hi (smallest known not to). Next batch: the
    guess of `predict()` (a batch, or None) clamped strictly inside the bracket; without a guess,
    or right after a guess that did not fit, double lo while hi is unknown, halve hi while lo is
    0, else bisect. Stops when hi - lo <= max(1, tol * lo). Returns (batch, capped): batch 0 if 1
    does not fit; capped when `cap` itself fits (the answer may be larger)."""
    lo, hi = 0, None
    b, guessed = (min(start, cap) if cap else start), False
    while True:
        ok = fits(b)
        lo, hi = (b, hi) if ok else (lo, b)
        if hi is None and cap and lo >= cap:
            return lo, True
        if hi is not None and hi - lo <= max(1, int(tol * lo)):
            return lo, False
        guess = predict() if predict and (ok or not guessed) else None
        if guess is not None:
            top = hi - 1 if hi is not None else (cap or max(guess, lo + 1))
            b = min(max(guess, lo + 1), top)
        elif hi is None:
            b = min(2 * lo, cap) if cap else 2 * lo
        else:
            b = hi // 2 if lo == 0 else (lo + hi) // 2
        guessed = guess is not None


def shape_key(cfg: dict) -> str:
    return "L{n_layers}-d{d_model}-h{n_heads}-T{seq_len}-V{vocab_size}-chunk{loss_chunk_tokens}".format(**cfg)


def _int_or_none(x):
    return None if x in (None, "", "None") else int(float(x))


class Prober:
    """fits(batch) for one (arch, budget, shape) on this device, answered from the probe log when it
    (or monotonicity) already knows, else by a fresh-process probe appended to the log.
    `fits_upto`: batches known to fit without a probe (the answer under a smaller budget).
    `isolate`: run each probe in a fresh process (every preset but the test suite's `tiny`).
    `predict()`: the batch where memory, linear in the batch through the two largest measured
    probes (of any budget: a fitting batch's memory does not depend on the budget), reaches the
    budget; with one measured probe, through it with slope `bytes_per_sample` (None: no guess)."""

    def __init__(self, ctx, log_path, cfg: dict, budget, fits_upto: int = 0, isolate: bool = True,
                 bytes_per_sample=None):
        self.ctx, self.log_path, self.cfg, self.fits_upto, self.isolate = ctx, log_path, cfg, fits_upto, isolate
        self.budget_label, self.budget_bytes = budget
        self.bytes_per_sample = bytes_per_sample
        self.key = dict(arch=cfg["arch"], budget=self.budget_label, shape=shape_key(cfg),
                        device=ctx.device_name, preset=ctx.preset)
        self.known = {}                                     # batch -> (ok, memory_bytes, state_bytes)
        self.measured = {}                                  # batch -> (memory_bytes, state_bytes), any budget
        for r in read_csv(log_path):
            if not all(r[k] == str(v) for k, v in self.key.items() if k != "budget"):
                continue
            ok, mem, st = r["ok"] == "True", _int_or_none(r["memory_bytes"]), _int_or_none(r["state_bytes"])
            if ok and mem is not None:
                self.measured[int(r["batch"])] = (mem, st)
            if r["budget"] == self.budget_label:
                self.known[int(r["batch"])] = (ok, mem, st)

    def _implied(self, batch):
        if batch <= self.fits_upto or any(ok and b >= batch for b, (ok, _, _) in self.known.items()):
            return True
        if any(not ok and b <= batch for b, (ok, _, _) in self.known.items()):
            return False
        return None

    def __call__(self, batch: int) -> bool:
        implied = self._implied(batch)
        if implied is not None:
            return implied
        gpu = self.ctx.device.type == "cuda"
        res = run_probe(dict(cfg=self.cfg, batch=batch, device=str(self.ctx.device), bf16=gpu,
                             budget_bytes=self.budget_bytes, warmup=int(gpu), steps=0), self.isolate, self.ctx)
        append_csv(self.log_path, dict(self.key, budget_bytes=self.budget_bytes, batch=batch, ok=res["ok"],
                                       memory_bytes=res["memory_bytes"], memory_kind=res["memory_kind"],
                                       state_bytes=res["state_bytes"], error=res["error"]), LOG_COLUMNS)
        self.known[batch] = (res["ok"], res["memory_bytes"], res["state_bytes"])
        if res["ok"] and res["memory_bytes"] is not None:
            self.measured[batch] = (res["memory_bytes"], res["state_bytes"])
        return res["ok"]

    def _limit(self, state):
        """The bytes `memory_bytes` may reach: CUDA peak up to the cap (or the device), CPU saved
        activations up to the budget minus the state."""
        if self.ctx.device.type == "cuda":
            import torch
            total = torch.cuda.get_device_properties(self.ctx.device).total_memory
            return min(self.budget_bytes or total, total)
        return self.budget_bytes - state if self.budget_bytes else None

    def predict(self):
        pts = sorted((b, m, st) for b, (m, st) in self.measured.items())[-2:]
        if not pts:
            return None
        b2, m2, st = pts[-1]
        limit = self._limit(st)
        if len(pts) == 2 and pts[1][1] > pts[0][1]:
            slope = (m2 - pts[0][1]) / (b2 - pts[0][0])
        else:
            slope = self.bytes_per_sample
        if limit is None or not slope:
            return None
        return max(1, int(b2 + (limit - m2) / slope))


def usable_budgets(ctx, budgets):
    """(kept budgets, notes): on a GPU, budgets more than 5% above the device's memory are skipped.
    A budget of None is the whole device."""
    if ctx.device.type != "cuda":
        return list(budgets), []
    import torch
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    kept = [(label, b) for label, b in budgets if b is None or b <= 1.05 * total]
    notes = [f"{label} skipped: the device has {total / GIB:.1f} GiB"
             for label, b in budgets if b is not None and b > 1.05 * total]
    notes += [f"{label} runs on the whole device ({total / GIB:.1f} GiB)"
              for label, b in kept if b is None or b >= total]
    return kept, notes


def search_bounds(ctx, cfg: dict, budget_bytes, start: int, cap: int):
    """(start, cap, bytes_per_sample, model_batch) of a search: on a GPU from the analytic model
    (start at 90% of its batch, cap at 8x it), elsewhere the preset's."""
    if ctx.device.type != "cuda":
        return start, cap, None, None
    import torch
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    model = cost_model.max_batch(cfg, min(budget_bytes or total, total))
    return max(1, int(0.9 * model)), min(cap, max(64, 8 * model)), cost_model.bytes_per_sample(cfg), model


def find_max_batches(ctx, archs, cfg_of, budgets, start, cap, isolate):
    """{(arch, budget label): (max batch, capped)} for every pair with an answer in NAME-results.csv
    after searching the pairs `ctx` selects that have none. Budgets are taken in increasing order so
    each answer is a known-fitting lower bound for the next."""
    log_path, results_path = ctx.path("csv"), ctx.path("csv", part="results")
    results = {}
    for r in read_csv(results_path):
        if (r["device"], r["preset"]) == (ctx.device_name, ctx.preset):
            results[(r["arch"], r["budget"], r["shape"])] = (int(r["batch"]), r["capped"] == "True")
    pairs = [(a, b) for a in archs for b in sorted(budgets, key=lambda b: b[1] or float("inf"))]
    fits_upto = {}
    for arch, budget in progress(pairs, "max-batch"):
        cfg = cfg_of(arch)
        key = (arch, budget[0], shape_key(cfg))
        if key not in results and ctx.selected(arch=arch, budget=budget[0]):
            lo, hi, slope, model = search_bounds(ctx, cfg, budget[1], start, cap)
            prober = Prober(ctx, log_path, cfg, budget, fits_upto.get(arch, 0), isolate, slope)
            results[key] = search_max_batch(prober, start=max(lo, fits_upto.get(arch, 0)), cap=hi,
                                            predict=prober.predict)
            append_csv(results_path, dict(arch=arch, budget=budget[0], shape=key[2], batch=results[key][0],
                                          capped=results[key][1], model_batch=model, device=ctx.device_name,
                                          preset=ctx.preset), RESULT_COLUMNS)
        if key in results:
            fits_upto[arch] = results[key][0]
    return {(a, b): v for (a, b, _), v in results.items()
            if a in archs and b in {label for label, _ in budgets}}


def run(ctx) -> str:
    p = PRESETS[ctx.preset]
    budgets, notes = usable_budgets(ctx, p["budgets"])

    def cfg_of(arch):
        return dict(p["shape"], arch=arch, loss_chunk_tokens=p["loss_chunk_tokens"])

    results = find_max_batches(ctx, p["archs"], cfg_of, budgets, p["start"], p["cap"], p["isolate"])
    return write_report(ctx, "Max batch by memory budget", _markdown(ctx, p, budgets, notes, results),
                        _plot(ctx, p, budgets, results))


def _cell(results, arch, label):
    if (arch, label) not in results:
        return "—"
    mb, capped = results[(arch, label)]
    return f">= {mb}" if capped else str(mb)


def _batch(results, arch, label):
    return results.get((arch, label), (0, False))[0]


def _markdown(ctx, p, budgets, notes, results) -> str:
    archs = p["archs"]
    rows = []
    for label, _ in budgets:
        base, mid = _batch(results, "baseline", label), _batch(results, "midpoint", label)
        ratio = f"{mid / base:.2f}x" if base and mid else "—"
        paper = PAPER_TABLE3.get(label) if ctx.device.type == "cuda" else None
        rows.append([label] + [_cell(results, a, label) for a in archs] + [ratio] +
                    ([str(paper[0]), str(paper[1]), f"{paper[1] / paper[0]:.2f}x"] if paper else ["—"] * 3))
    header = ["budget"] + list(archs) + ["midpoint / baseline", "paper baseline", "paper midpoint", "paper ratio"]
    shape = ", ".join(f"{k}={v}" for k, v in p["shape"].items())
    budget_text = ("N GB = N GiB cap of the caching allocator via torch.cuda.set_per_process_memory_fraction"
                   if ctx.device.type == "cuda" else
                   "emulated on the CPU: bytes saved for backward by forward + loss, plus parameters, gradients "
                   "and AdamW state, must fit (a CPU has no allocator cap)")
    paper = markdown_table(["GPU memory", "baseline", "midpoint", "ratio"],
                           [[k, b, m, f"{m / b:.2f}x"] for k, (b, m) in PAPER_TABLE3.items()])
    note_text = "".join(f"\n- {n}" for n in notes)
    gpu = ctx.device.type == "cuda"
    precision, steps = ("bf16 autocast", "two full training steps") if gpu else ("fp32", "one full training step")
    return f"""
Shape: {shape}, loss_chunk_tokens={p['loss_chunk_tokens']} for every arch; AdamW;
{precision}. Each probe runs {steps} {'in a fresh process' if p['isolate'] else 'in-process'}. The chunked
loss never holds the whole batch's logits, for every arch; a baseline that does (as nanoGPT's) fits fewer samples.
Budget: {budget_text}.{note_text}

{markdown_table(header, rows)}

Paper (Gal et al., Table 3, GPT-2 small, T=1024, one GPU of each size):

{paper}

Target: midpoint's max batch >= 10x baseline's on one 80 GB GPU (GPT-2 small, T=1024; the paper has 9.88x,
257 vs 26).
"""


def _plot(ctx, p, budgets, results):
    fig, (ax,) = figure(1, ctx, "Max batch by memory budget", width=7.5)
    labels = [label for label, _ in budgets]
    width = 0.8 / len(p["archs"])
    for i, arch in enumerate(p["archs"]):
        xs = [j + (i - (len(p["archs"]) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, [_batch(results, arch, lb) for lb in labels], width, label=arch)
        ax.bar_label(bars, fontsize=8)
    if ctx.device.type == "cuda":
        known = [(j, PAPER_TABLE3[lb]) for j, lb in enumerate(labels) if lb in PAPER_TABLE3]
        if known:
            ax.scatter([j for j, _ in known], [v[0] for _, v in known], marker="x", color="black",
                       zorder=3, label="paper baseline")
            ax.scatter([j for j, _ in known], [v[1] for _, v in known], marker="*", s=80, color="black",
                       zorder=3, label="paper midpoint")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("memory budget")
    ax.set_ylabel("max batch (log scale)")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig
