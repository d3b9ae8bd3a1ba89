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

Speed at the max batch: every probe that fits also times `time_steps` more steps, so each configuration's
tokens/s at its own max batch comes from the probe of that batch (a log row without a time, from an
older log, gets a timing probe). The hybrid row: the preset's reversible arch with each `stored_layers` k of
`hybrid` (and k = 0, the plain reversible arch) searched like the others; per budget it reports the
(batch, k) pair with the most tokens/s -- at equal memory, which configuration trains fastest.
"""
from matplotlib.ticker import ScalarFormatter

from . import cost_model
from ._probe import run_probe
from .common import GIB, MIB, append_csv, figure, markdown_table, progress, read_csv, write_csv, write_report
from .frontier import hybrid_supported

GPT2_SMALL = cost_model.GPT2_SMALL
PRESETS = {
    "gpu": dict(shape=GPT2_SMALL, archs=("baseline", "checkpoint", "midpoint"),
                budgets=tuple((f"{g} GB", g * GIB) for g in (24, 40, 48, 80)),
                loss_chunk_tokens=4096, start=4, cap=8192, isolate=True, time_steps=1,
                hybrid=dict(arch="midpoint", stored=(6,))),
    "cpu": dict(shape=dict(vocab_size=128, seq_len=32, d_model=32, n_heads=2, n_layers=4),
                archs=("baseline", "checkpoint", "midpoint"),
                budgets=tuple((f"{m} MiB", m * MIB) for m in (2, 4)),
                # in-process: on a CPU the memory is the count of bytes saved for backward (no allocator state
                # to leak between probes, no real OOM under an emulated budget), and a fresh process per
                # probe cost 2-3 s of imports each, a minute of `make bench`
                loss_chunk_tokens=128, start=4, cap=4096, isolate=False, time_steps=3,
                hybrid=dict(arch="midpoint", stored=(2,))),
    "tiny": dict(shape=dict(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=2),
                 archs=("baseline", "midpoint"), budgets=(("0.7 MiB", int(0.7 * MIB)),),
                 loss_chunk_tokens=16, start=2, cap=4, isolate=False, time_steps=1,   # in-process: test speed
                 hybrid=dict(arch="midpoint", stored=(1, 2))),
}
# Gal et al., Table 3: max batch of GPT-2 small (T=1024), baseline vs midpoint, by GPU memory (GB).
PAPER_TABLE3 = {"24 GB": (6, 58), "40 GB": (12, 119), "48 GB": (15, 140), "80 GB": (26, 257)}
LOG_COLUMNS = ("arch", "budget", "budget_bytes", "shape", "batch", "ok", "memory_bytes", "memory_kind",
               "state_bytes", "step_ms", "error", "device", "preset")
RESULT_COLUMNS = ("arch", "budget", "shape", "batch", "capped", "model_batch", "step_ms", "tokens_per_s", "device",
                  "preset")


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
    key = "L{n_layers}-d{d_model}-h{n_heads}-T{seq_len}-V{vocab_size}-chunk{loss_chunk_tokens}".format(**cfg)
    return key + (f"-stored{cfg['stored_layers']}" if cfg.get("stored_layers") else "")


def configs(p) -> list:
    """(label, GPTConfig kwargs) of every configuration the preset searches: its archs, then the hybrid's
    reversible arch with each stored_layers k (when this GPTConfig has stored_layers)."""
    def cfg(arch, **extra):
        return dict(p["shape"], arch=arch, loss_chunk_tokens=p["loss_chunk_tokens"], **extra)
    out = [(arch, cfg(arch)) for arch in p["archs"]]
    hybrid = p.get("hybrid")
    if hybrid and hybrid_supported():
        out += [(f"{hybrid['arch']} k={k}", cfg(hybrid["arch"], stored_layers=k)) for k in hybrid["stored"]]
    return out


def upgrade_csv(path, columns):
    """Rewrite `path` with `columns` (new ones empty) when an older version of this module wrote it with
    others, so rows appended from now on line up with the header."""
    rows = read_csv(path)
    if rows and tuple(rows[0]) != tuple(columns):
        write_csv(path, rows, columns)


def _int_or_none(x):
    return None if x in (None, "", "None") else int(float(x))


class Prober:
    """fits(batch) for one (arch, budget, shape) on this device, answered from the probe log when it
    (or monotonicity) already knows, else by a probe appended to the log.
    `fits_upto`: batches known to fit without a probe (the answer under a smaller budget).
    `isolate`: run each probe in a fresh process (the GPU preset: CUDA peaks and OOMs stay per probe).
    `predict()`: the batch where memory, linear in the batch through the two largest measured
    probes (of any budget: a fitting batch's memory does not depend on the budget), reaches the
    budget; with one measured probe, through it with slope `bytes_per_sample` (None: no guess)."""

    def __init__(self, ctx, log_path, cfg: dict, budget, fits_upto: int = 0, isolate: bool = True,
                 bytes_per_sample=None, time_steps: int = 0):
        self.ctx, self.log_path, self.cfg, self.fits_upto, self.isolate = ctx, log_path, cfg, fits_upto, isolate
        self.time_steps = time_steps
        self.budget_label, self.budget_bytes = budget
        self.bytes_per_sample = bytes_per_sample
        self.key = dict(arch=cfg["arch"], budget=self.budget_label, shape=shape_key(cfg),
                        device=ctx.device_name, preset=ctx.preset)
        self.known = {}                                     # batch -> (ok, memory_bytes, state_bytes)
        self.measured = {}                                  # batch -> (memory_bytes, state_bytes), any budget
        self.timed = {}                                     # batch -> step ms of a fitting probe, any budget
        for r in read_csv(log_path):
            if not all(r[k] == str(v) for k, v in self.key.items() if k != "budget"):
                continue
            ok, mem, st = r["ok"] == "True", _int_or_none(r["memory_bytes"]), _int_or_none(r["state_bytes"])
            if ok and mem is not None:
                self.measured[int(r["batch"])] = (mem, st)
            if ok and r.get("step_ms"):
                self.timed[int(r["batch"])] = float(r["step_ms"])
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
        return self._probe(batch)["ok"]

    def _probe(self, batch: int) -> dict:
        gpu = self.ctx.device.type == "cuda"
        res = run_probe(dict(cfg=self.cfg, batch=batch, device=str(self.ctx.device), bf16=gpu,
                             budget_bytes=self.budget_bytes, warmup=int(gpu), steps=self.time_steps),
                        self.isolate, self.ctx)
        append_csv(self.log_path, dict(self.key, budget_bytes=self.budget_bytes, batch=batch, ok=res["ok"],
                                       memory_bytes=res["memory_bytes"], memory_kind=res["memory_kind"],
                                       state_bytes=res["state_bytes"], step_ms=res.get("step_ms"), error=res["error"]),
                   LOG_COLUMNS)
        self.known[batch] = (res["ok"], res["memory_bytes"], res["state_bytes"])
        if res["ok"] and res["memory_bytes"] is not None:
            self.measured[batch] = (res["memory_bytes"], res["state_bytes"])
        if res["ok"] and res.get("step_ms") is not None:
            self.timed[batch] = res["step_ms"]
        return res

    def step_ms(self, batch: int):
        """Median step time at `batch` (a fitting batch): from a logged probe, else a timing probe now
        (None if it does not fit after all)."""
        if batch not in self.timed and self.time_steps:
            self._probe(batch)
        return self.timed.get(batch)

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


def find_max_batches(ctx, configs, budgets, start, cap, isolate, time_steps=0):
    """{(label, budget label): result row} for every pair with an answer in NAME-results.csv after searching
    the pairs `ctx` selects that have none; `configs`: (label, GPTConfig kwargs) pairs. Budgets are taken in
    increasing order so each answer is a known-fitting lower bound for the next. With `time_steps`, each
    row has the step time and tokens/s at its max batch."""
    log_path, results_path = ctx.path("csv"), ctx.path("csv", part="results")
    upgrade_csv(log_path, LOG_COLUMNS)
    upgrade_csv(results_path, RESULT_COLUMNS)
    rows = {}
    for r in read_csv(results_path):
        if (r["device"], r["preset"]) == (ctx.device_name, ctx.preset):
            rows[(r["arch"], r["budget"], r["shape"])] = r
    pairs = [(c, b) for c in configs for b in sorted(budgets, key=lambda b: b[1] or float("inf"))]
    fits_upto = {}
    changed = False
    for (label, cfg), budget in progress(pairs, "max-batch"):
        key = (label, budget[0], shape_key(cfg))
        selected = ctx.selected(arch=label, budget=budget[0])
        if selected and (key not in rows or (time_steps and not rows[key].get("step_ms") and
                                             int(rows[key]["batch"]) > 0)):
            lo, hi, slope, model = search_bounds(ctx, cfg, budget[1], start, cap)
            prober = Prober(ctx, log_path, cfg, budget, fits_upto.get(label, 0), isolate, slope, time_steps)
            if key in rows:                        # an answer from an older log without a time: time it
                mb, capped, model = int(rows[key]["batch"]), rows[key]["capped"] == "True", rows[key]["model_batch"]
            else:
                mb, capped = search_max_batch(prober, start=max(lo, fits_upto.get(label, 0)), cap=hi,
                                              predict=prober.predict)
            ms = prober.step_ms(mb) if mb and time_steps else None
            rows[key] = dict(arch=label, budget=budget[0], shape=key[2], batch=mb, capped=capped, model_batch=model,
                             step_ms=ms, tokens_per_s=mb * cfg["seq_len"] / (ms / 1e3) if ms else None,
                             device=ctx.device_name, preset=ctx.preset)
            append_csv(results_path, rows[key], RESULT_COLUMNS)
            changed = True
        if key in rows:
            fits_upto[label] = int(rows[key]["batch"])
    if changed:                                    # one row per pair: the latest
        write_csv(results_path, list(rows.values()), RESULT_COLUMNS)
    labels, budget_labels = {label for label, _ in configs}, {label for label, _ in budgets}
    return {(a, b): _typed_result(r) for (a, b, s), r in rows.items()
            if a in labels and b in budget_labels and s == shape_key(dict(configs)[a])}


def _typed_result(r: dict) -> dict:
    def num(x):
        return None if x in (None, "", "None") else float(x)
    return dict(batch=int(r["batch"]), capped=str(r["capped"]) == "True", step_ms=num(r.get("step_ms")),
                tokens_per_s=num(r.get("tokens_per_s")))


def run(ctx, p=None) -> str:
    p = p or PRESETS[ctx.preset]
    budgets, notes = usable_budgets(ctx, p["budgets"])
    cfgs = configs(p)
    results = find_max_batches(ctx, cfgs, budgets, p["start"], p["cap"], p["isolate"], p.get("time_steps", 0))
    return write_report(ctx, "Max batch by memory budget", _markdown(ctx, p, cfgs, budgets, notes, results),
                        _plot(ctx, p, cfgs, budgets, results))


HYBRID = "hybrid (best k)"


def best_hybrid(p, cfgs, results, budget):
    """(label, result) of the reversible configuration (the hybrid's arch at k = 0 or a stored_layers k of
    the preset) with the most tokens/s at its own max batch under `budget`; None when none was timed."""
    hybrid = p.get("hybrid")
    if not hybrid:
        return None
    labels = [label for label, cfg in cfgs if cfg["arch"] == hybrid["arch"]]
    timed = [(label, results[(label, budget)]) for label in labels
             if (label, budget) in results and results[(label, budget)]["tokens_per_s"]]
    return max(timed, key=lambda lr: lr[1]["tokens_per_s"], default=None)


def _batch_cell(res):
    if res is None:
        return "—"
    return (">= " if res["capped"] else "") + str(res["batch"])


def _speed_cell(res):
    if res is None or not res["tokens_per_s"]:
        return "—"
    return f"{_batch_cell(res)}, {res['tokens_per_s']:.0f}"


def _batch(results, arch, label):
    return results.get((arch, label), {"batch": 0})["batch"]


def _hybrid_k(label):
    return label.split("k=")[1] if "k=" in label else "0"


def _markdown(ctx, p, cfgs, budgets, notes, results) -> str:
    archs = p["archs"]
    rows = []
    for label, _ in budgets:
        base, mid = _batch(results, "baseline", label), _batch(results, "midpoint", label)
        ratio = f"{mid / base:.2f}x" if base and mid else "—"
        paper = PAPER_TABLE3.get(label) if ctx.device.type == "cuda" else None
        rows.append([label] + [_batch_cell(results.get((a, label))) for a in archs] + [ratio] +
                    ([str(paper[0]), str(paper[1]), f"{paper[1] / paper[0]:.2f}x"] if paper else ["—"] * 3))
    header = ["budget"] + list(archs) + ["midpoint / baseline", "paper baseline", "paper midpoint", "paper ratio"]
    speed_rows = []
    for label, _ in budgets:
        cells = [label] + [_speed_cell(results.get((a, label))) for a in archs]
        best = best_hybrid(p, cfgs, results, label)
        base = results.get(("baseline", label))
        if best:
            gain = (f"{best[1]['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and base["tokens_per_s"]
                    else "—")
            cells += [f"k={_hybrid_k(best[0])}: {_speed_cell(best[1])}", gain]
        else:
            cells += ["—", "—"]
        speed_rows.append(cells)
    hybrid = p.get("hybrid")
    hybrid_text = ""
    if hybrid:
        ks = ", ".join(["0"] + [str(k) for k in hybrid["stored"]])
        hybrid_text = (f"\n\nTraining speed at each configuration's own max batch (cell: max batch, tokens/s; "
                       f"median of {p.get('time_steps', 0)} timed steps in the probe of that batch). The hybrid is "
                       f"`{hybrid['arch']}` with stored_layers k in {{{ks}}}: the (batch, k) pair with the most "
                       f"tokens/s under each budget"
                       + ("" if hybrid_supported() else " (this GPTConfig has no stored_layers: k = 0 only)")
                       + ".\n\n" + markdown_table(["budget"] + list(archs) + [HYBRID, "hybrid / baseline tokens/s"],
                                                   speed_rows))
        every = [[label, _hybrid_k(c)] + [_speed_cell(results.get((c, label)))]
                 for label, _ in budgets for c, cfg in cfgs if cfg["arch"] == hybrid["arch"]]
        hybrid_text += "\n\nEvery hybrid configuration searched:\n\n" + markdown_table(
            ["budget", "stored_layers", "max batch, tokens/s"], every)
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
{precision}. Each probe runs {steps} {'in a fresh process' if p['isolate'] else 'in-process'}, then the timed
steps. The chunked loss never holds the whole batch's logits, for every arch; a baseline that does (as
nanoGPT's) fits fewer samples.
Budget: {budget_text}.{note_text}

{markdown_table(header, rows)}{hybrid_text}

Paper (Gal et al., Table 3, GPT-2 small, T=1024, one GPU of each size):

{paper}

Target: midpoint's max batch >= 10x baseline's on one 80 GB GPU (GPT-2 small, T=1024; the paper has 9.88x,
257 vs 26).
"""


def _plot(ctx, p, cfgs, budgets, results):
    fig, (ax, ax_speed) = figure(2, ctx, "Max batch by memory budget", width=6.5)
    labels = [label for label, _ in budgets]
    series = list(p["archs"]) + ([HYBRID] if p.get("hybrid") else [])

    def result(name, budget):
        if name == HYBRID:
            best = best_hybrid(p, cfgs, results, budget)
            return best[1] if best else None
        return results.get((name, budget))

    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        res = [result(name, lb) for lb in labels]
        bars = ax.bar(xs, [r["batch"] if r else 0 for r in res], width, label=name)
        ax.bar_label(bars, fontsize=7)
        ax_speed.bar(xs, [(r or {}).get("tokens_per_s") or 0 for r in res], width, label=name)
    if ctx.device.type == "cuda":
        known = [(j, PAPER_TABLE3[lb]) for j, lb in enumerate(labels) if lb in PAPER_TABLE3]
        if known:
            ax.scatter([j for j, _ in known], [v[0] for _, v in known], marker="x", color="black",
                       zorder=3, label="paper baseline")
            ax.scatter([j for j, _ in known], [v[1] for _, v in known], marker="*", s=80, color="black",
                       zorder=3, label="paper midpoint")
    ax.set_ylabel("max batch (log scale)")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax_speed.set_ylabel("tokens/s at the max batch")
    for a in (ax, ax_speed):
        a.set_xticks(range(len(labels)), labels)
        a.set_xlabel("memory budget")
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=7)
    return fig
