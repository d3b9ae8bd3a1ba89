"""quality: do the reversible archs train as well as the baseline on real text, and how well does a
trained residual model retrofit (Gal et al., Table 1 / Fig. 2 and section 4 / Fig. 4)?

Part 1. baseline, midpoint, leapfrog, midpoint_a and hamiltonian GPTs (rk.GPT, byte vocabulary 256)
are trained on the same corpus (revkernels.bench.corpus: the standard library's sources by default,
`--data FILE` for any text file) with the same initial seed, the same batches in the same order,
the same hyper-parameters and token count: AdamW, linear warm-up then cosine decay to 10%, gradient
clipping at 1, no dropout. Every `eval_every` steps: mean training loss since the last row, loss on
a fixed validation set, tokens seen, training seconds.

Part 2 (paper section 4). The trained baseline is the teacher: rk.retrofit(teacher, a=0.5, iterations=k,
form="eq4.5") (exact mode)
for k = 0, 1, 2 gives a reversible midpoint(a) student with the teacher's weights (eq. 4.5, p[j-1]
estimated by k fixed-point steps, eq. 4.7). Its zero-shot validation loss and KL(teacher || student)
(eq. 4.6, mean per token) are measured, then it is aligned by minimising that KL on the training
batches (revkernels.retrofit.align, AdamW) for `align_steps` steps; rows `retrofit-it<k>` log the
validation loss and KL along the way.

Each trained model (and each aligned student) then writes a short sample from a prompt taken from
the validation split (GPT.generate when the model has it, else the same sampling loop here).
"""
import math
from time import perf_counter

import torch

from ..models import GPT, GPTConfig
from ..retrofit import align, evaluate_kl, retrofit
from .common import figure, markdown_table, progress, write_csv, write_report
from .corpus import Batches, file_corpus, stdlib_corpus

ARCHS = ("baseline", "midpoint", "leapfrog", "midpoint_a", "hamiltonian")
RETROFIT_A, RETROFIT_ITERATIONS = 0.5, (0, 1, 2)
PRESETS = {
    # GPT-2-small-like body (d=768, 12 heads, 12 layers) on bytes, bf16 autocast: ~9.8M tokens per arch.
    "gpu": dict(model=dict(d_model=768, n_heads=12, n_layers=12, seq_len=512), batch=32, steps=600, lr=6e-4,
                warmup=60, eval_every=50, eval_batches=16, align_steps=200, align_eval_every=25, align_lr=1e-4,
                sample_tokens=240, prompt_tokens=48),
    # about 2 minutes on an idle 2-core CPU (one intra-op thread): ~0.3M tokens per arch
    "cpu": dict(model=dict(d_model=64, n_heads=4, n_layers=4, seq_len=64), batch=16, steps=300, lr=3e-3,
                warmup=30, eval_every=30, eval_batches=6, align_steps=60, align_eval_every=10, align_lr=1e-3,
                sample_tokens=120, prompt_tokens=32),
    # seconds: the test suite's end-to-end run
    "tiny": dict(model=dict(d_model=32, n_heads=2, n_layers=2, seq_len=32), batch=8, steps=30, lr=3e-3,
                 warmup=5, eval_every=15, eval_batches=2, align_steps=10, align_eval_every=5, align_lr=1e-3,
                 sample_tokens=16, prompt_tokens=8),
}
SEED = 0
COLUMNS = ("arch", "step", "train_loss", "val_loss", "train_kl", "val_kl", "tokens", "seconds", "lr",
           "device", "preset")


def load_corpus(data_file=None):
    return file_corpus(data_file) if data_file else stdlib_corpus()


def lr_at(p, step: int) -> float:
    """Learning rate of (1-based) `step`: linear warm-up over `warmup` steps, cosine decay to 10% at `steps`."""
    if step <= p["warmup"]:
        return p["lr"] * step / p["warmup"]
    t = (step - p["warmup"]) / max(1, p["steps"] - p["warmup"])
    return p["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def val_loss(model, data: Batches) -> float:
    was_training = model.training
    model.eval()
    with _autocast(data.device):
        losses = [float(model(x, y)[1]) for x, y in data.val]
    model.train(was_training)
    return sum(losses) / len(losses)


def _row(ctx, arch, step, tokens, seconds, **values):
    return dict(dict(train_loss=None, val_loss=None, train_kl=None, val_kl=None, lr=None), **values, arch=arch,
                step=step, tokens=tokens, seconds=seconds, device=ctx.device_name, preset=ctx.preset)


def train_arch(ctx, p, arch, data: Batches):
    """Train one arch from seed SEED; returns (model, rows)."""
    torch.manual_seed(SEED)
    cfg = GPTConfig(vocab_size=256, arch=arch, **p["model"])
    model = GPT(cfg).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    tokens_per_step = p["batch"] * cfg.seq_len
    x, y = data.train(0)
    with torch.no_grad(), _autocast(ctx.device):
        first = float(model(x, y)[1])
    rows = [_row(ctx, arch, 0, 0, 0.0, train_loss=first, val_loss=val_loss(model, data))]
    seconds, window = 0.0, []
    for step in progress(range(1, p["steps"] + 1), f"quality {arch}"):
        for group in opt.param_groups:
            group["lr"] = lr_at(p, step)
        x, y = data.train(step - 1)
        t0 = perf_counter()
        with _autocast(ctx.device):
            loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if step % p["eval_every"] == 0 or step == p["steps"]:
            _sync(ctx.device)
            seconds += perf_counter() - t0
            train = float(torch.stack(window).float().mean())
            if not math.isfinite(train):
                raise FloatingPointError(f"{arch}: training loss is {train} at step {step}")
            rows.append(_row(ctx, arch, step, step * tokens_per_step, seconds, train_loss=train,
                             val_loss=val_loss(model, data), lr=lr_at(p, step)))
            window = []
        else:
            seconds += perf_counter() - t0
    return model, rows


def retrofit_arch(ctx, p, teacher, iterations: int, data: Batches):
    """Retrofit the trained `teacher` (a=0.5, `iterations`), then KL-align it; returns (student, rows)."""
    teacher.eval()
    student = retrofit(teacher, a=RETROFIT_A, iterations=iterations, form="eq4.5")   # exact mode
    student.eval()                                   # no dropout during alignment (the usual choice)
    arch = f"retrofit-it{iterations}"
    val_ids = [x for x, _ in data.val]
    tokens_per_step = p["batch"] * data.T

    def measure():
        with _autocast(ctx.device):
            return val_loss(student, data), evaluate_kl(student, teacher, val_ids)

    loss0, kl0 = measure()
    rows = [_row(ctx, arch, 0, 0, 0.0, val_loss=loss0, val_kl=kl0)]
    opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=p["align_lr"],
                            weight_decay=0.0)
    seconds, done = 0.0, 0
    while done < p["align_steps"]:
        n = min(p["align_eval_every"], p["align_steps"] - done)
        batches = [data.train(p["steps"] + done + i)[0] for i in range(n)]     # batches the teachers never saw
        t0 = perf_counter()
        with _autocast(ctx.device):
            log = align(student, teacher, batches, steps=n, optimizer=opt, progress=False)
        _sync(ctx.device)
        seconds += perf_counter() - t0
        done += n
        loss, kl = measure()
        rows.append(_row(ctx, arch, done, done * tokens_per_step, seconds, val_loss=loss, val_kl=kl,
                         train_kl=sum(r["kl"] for r in log) / len(log), lr=p["align_lr"]))
    return student, rows


@torch.no_grad()
def _sample_loop(model, idx, n, temperature, top_k):
    T = model.cfg.seq_len
    for _ in range(n):
        logits = model(idx[:, -T:])[0][:, -1].float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        idx = torch.cat([idx, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
    return idx


def sample(model, prompt: torch.Tensor, n: int, temperature=0.8, top_k=None) -> str:
    """`n` sampled bytes after `prompt` (1-d byte tensor), seeded; GPT.generate when the model has it."""
    was_training = model.training
    model.eval()
    torch.manual_seed(SEED)
    idx = prompt.long().view(1, -1).to(next(model.parameters()).device)
    generate = getattr(model, "generate", None)
    out = (generate(idx, n, temperature=temperature, top_k=top_k) if callable(generate)
           else _sample_loop(model, idx, n, temperature, top_k))
    model.train(was_training)
    return bytes(out[0, idx.shape[1]:].tolist()).decode("utf-8", errors="replace")


def run(ctx) -> str:
    p = PRESETS[ctx.preset]
    corpus = load_corpus(ctx.data)
    data = Batches(corpus, p["model"]["seq_len"], p["batch"], p["steps"] + p["align_steps"], p["eval_batches"],
                   SEED, ctx.device)
    prompt = corpus.val[:p["prompt_tokens"]]
    rows, samples, models = [], {}, {}
    for arch in ARCHS:
        models[arch], arch_rows = train_arch(ctx, p, arch, data)
        rows += arch_rows
        samples[arch] = sample(models[arch], prompt, p["sample_tokens"])
    teacher = models["baseline"]
    for k in progress(RETROFIT_ITERATIONS, "quality retrofit"):
        student, arch_rows = retrofit_arch(ctx, p, teacher, k, data)
        rows += arch_rows
        samples[f"retrofit-it{k}"] = sample(student, prompt, p["sample_tokens"])
    write_csv(ctx.path("csv"), rows, COLUMNS)
    prompt_text = bytes(prompt.tolist()).decode("utf-8", errors="replace")
    return write_report(ctx, "Training quality on real text, and the retrofit of a trained model",
                        _markdown(ctx, p, corpus, rows, samples, prompt_text), _plot(ctx, p, rows))


# ------------------------------------------------------------------ report

def _final(rows, arch):
    return [r for r in rows if r["arch"] == arch][-1]


def _first(rows, arch):
    return [r for r in rows if r["arch"] == arch][0]


def _fence(text: str) -> str:
    return "````text\n" + text.replace("````", "'''") + "\n````"


def _markdown(ctx, p, corpus, rows, samples, prompt_text) -> str:
    m = p["model"]
    base = _final(rows, "baseline")
    table = []
    for arch in ARCHS:
        r = _final(rows, arch)
        rel = 100 * (r["val_loss"] / base["val_loss"] - 1)
        table.append([arch, f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}", f"{rel:+.2f}%",
                      f"{r['seconds']:.1f}", f"{r['seconds'] / base['seconds']:.2f}x"])
    retro = []
    for k in RETROFIT_ITERATIONS:
        arch = f"retrofit-it{k}"
        r0, r1 = _first(rows, arch), _final(rows, arch)
        retro.append([k, f"{r0['val_loss']:.4f}", f"{r0['val_kl']:.4f}", f"{r1['val_loss']:.4f}", f"{r1['val_kl']:.4f}",
                      f"{100 * (r1['val_loss'] / base['val_loss'] - 1):+.2f}%", f"{r1['seconds']:.1f}"])
    sample_text = "\n\n".join(f"**{arch}**\n\n{_fence(prompt_text + s)}" for arch, s in samples.items())
    tokens = p["steps"] * p["batch"] * m["seq_len"]
    return f"""
Data: {corpus.describe()}. Byte tokens (vocabulary 256).

Model: d_model={m['d_model']}, n_heads={m['n_heads']}, n_layers={m['n_layers']}, seq_len={m['seq_len']}. Every arch
starts from seed {SEED} and trains on the same {p['steps']} batches of {p['batch']} in the same order ({tokens:,}
tokens): AdamW (lr {p['lr']:g}, betas 0.9/0.95, no weight decay), {p['warmup']} warm-up steps then cosine decay
to 10%, gradient clipping at 1, no dropout, {'bf16 autocast' if ctx.device.type == 'cuda' else 'fp32'}.
Validation: the same {p['eval_batches']} x {p['batch']} windows of the held-out split for every arch.

Final losses (train: mean over the last {p['eval_every']} steps; vs baseline: validation loss relative to
baseline's; time: training wall-clock seconds, evaluation excluded, archs run one after another -- on a
shared machine a load change shows up here; throughput-depth times the archs interleaved):

{markdown_table(["arch", "train loss", "validation loss", "vs baseline", "seconds", "time vs baseline"], table)}

Paper (Gal, Eliasof, Turek, Ascher, Treister, Haber, *Reversing Large Language Models for Efficient
Training and Fine-Tuning*, Table 1 and Fig. 2): the reversible models trained from scratch reach
validation losses comparable to, or better than, the baseline's at the same token count. Target here:
each reversible arch within a few percent of the baseline's validation loss (the archs are different
networks with different initial weights, so small differences either way are expected).

Retrofit of the trained baseline (paper section 4): rk.retrofit(baseline, a={RETROFIT_A}, iterations=k,
form="eq4.5") in exact mode, zero shot, then {p['align_steps']} steps of KL alignment (eq. 4.6, AdamW lr {p['align_lr']:g}) on batches the
teacher never trained on. KL = mean per token of KL(teacher || student) on the validation windows.
Teacher validation loss: {base['val_loss']:.4f}.

{markdown_table(["iterations", "zero-shot val loss", "zero-shot KL", "aligned val loss", "aligned KL",
                 "aligned vs teacher", "align seconds"], retro)}

Paper (section 4, Fig. 4): the retrofitted model is fine-tuned towards the teacher with the KL loss of
eq. 4.6; the curves in quality.png are that experiment at this scale (validation KL and loss against
alignment steps, one curve per iteration count). Target here: the aligned student within a few percent of
the teacher's validation loss.

Samples ({p['sample_tokens']} bytes after a {p['prompt_tokens']}-byte prompt from the validation split,
temperature 0.8, seed {SEED}):

{sample_text}
"""


def _plot(ctx, p, rows):
    fig, (ax_loss, ax_kl, ax_rl) = figure(3, ctx, "Training quality and retrofit of the trained baseline",
                                          width=5.0)
    for arch in ARCHS:
        rs = [r for r in rows if r["arch"] == arch]
        line, = ax_loss.plot([r["tokens"] / 1e6 for r in rs], [r["val_loss"] for r in rs], marker=".", label=arch)
        ax_loss.plot([r["tokens"] / 1e6 for r in rs[1:]], [r["train_loss"] for r in rs[1:]], ls=":",
                     color=line.get_color())
    ax_loss.set_xlabel("tokens (M)")
    ax_loss.set_ylabel("loss (nats per byte)")
    ax_loss.set_title("validation (solid) and training (dotted) loss", fontsize=10)
    base = _final(rows, "baseline")["val_loss"]
    finals = [_final(rows, a)["val_loss"] for a in ARCHS]
    second = [[r for r in rows if r["arch"] == a][1]["val_loss"] for a in ARCHS]
    ax_loss.set_ylim(min(finals) - 0.25 * (max(second) - min(finals)), max(second) * 1.02)   # init point off-scale
    for k in RETROFIT_ITERATIONS:
        rs = [r for r in rows if r["arch"] == f"retrofit-it{k}"]
        steps = [r["step"] for r in rs]
        ax_kl.plot(steps, [r["val_kl"] for r in rs], marker="o", label=f"iterations={k}")
        ax_rl.plot(steps, [r["val_loss"] for r in rs], marker="o", label=f"iterations={k}")
    ax_rl.axhline(base, color="black", ls=":", label="teacher (baseline)")
    ax_kl.set_yscale("log")
    ax_kl.set_title(f"retrofit (a={RETROFIT_A}): validation KL to the teacher", fontsize=10)
    ax_rl.set_title("retrofit: validation loss", fontsize=10)
    for ax in (ax_kl, ax_rl):
        ax.set_xlabel("KL-alignment steps")
    for ax in (ax_loss, ax_kl, ax_rl):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return fig
