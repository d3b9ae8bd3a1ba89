"""python -m revkernels.retrofit: align a retrofitted Hugging Face causal LM to its teacher.

    python -m revkernels.retrofit --model DIR --out DIR [--a 0.0625] [--form compact|linear|eq4.5] [--iterations 0]
        [--float] [--steps 200]
        [--lr 3e-5] [--batch-size 8] [--seq-len 256] [--data FILE] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--seed 0] [--no-progress]

--model: a local directory that `AutoModelForCausalLM.from_pretrained` reads (local_files_only=True;
there is no download). It is the frozen teacher; the student is `retrofit(teacher, a, iterations,
form=..., exact=not --float)`
(Gal et al., "Reversing Large Language Models for Efficient Training and Fine-Tuning", section 4).
--data: token ids, one flat stream, cut into random windows of --seq-len: a `.pt` tensor, a `.npy`
array, or a text file of whitespace-separated integers. Without --data the ids are uniform random
(a smoke test: alignment on random tokens says little about real text).
--seq-len longer than the model's max_position_embeddings is shortened to it, with a note on stderr.
--out receives: the student (`student.save_pretrained`: `revkernels.retrofit.from_pretrained(out)` gives
it back; the plain transformers class loads the same weights as a residual model), `retrofit.json`
(a, form, iterations, exact, side bits, KL before/after on held-out batches, the settings) and
`kl_log.jsonl` (KL per step).
Bad input (a missing file, a = 0, ...) prints one line `error: ...` and exits with status 1
(2 for a malformed option).
"""
import argparse
import json
import math
import os
import pickle
import sys

import torch

from .align import align, evaluate_kl
from .api import retrofit
from .core import retrofit_stack

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LINEAR_FIT_BATCHES = 16       # --form linear: its corrections are fitted on the first 16 training batches


def load_tokens(path):
    """A flat LongTensor of token ids from a .pt, .npy or whitespace-separated text file.

    ValueError (naming the file) when it is missing, unreadable or holds anything but integers."""
    if not os.path.isfile(path):
        raise ValueError(f"--data {path!r}: no such file")
    try:
        if path.endswith(".pt"):
            t = torch.load(path, map_location="cpu", weights_only=True)
        elif path.endswith(".npy"):
            import numpy as np
            t = torch.from_numpy(np.load(path))
        else:
            with open(path) as fh:
                words = fh.read().split()
            bad = next((w for w in words if not w.lstrip("-").isdigit()), None)
            if bad is not None:
                raise ValueError(f"expected whitespace-separated integer token ids, found {bad[:20]!r}")
            t = torch.tensor([int(w) for w in words], dtype=torch.long)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"--data {path!r}: {_one_line(e)}") from None
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"--data {path!r}: expected integer token ids, got "
                         f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t.reshape(-1).long()


def make_batches(n, batch_size, seq_len, vocab_size, tokens=None, generator=None):
    """n batches (batch_size, seq_len): random windows of `tokens`, or uniform random ids."""
    if tokens is None:
        return [torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator) for _ in range(n)]
    if tokens.numel() < seq_len:
        raise ValueError(f"the data has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab_size}) for this model, the data holds "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    out = []
    for _ in range(n):
        starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=generator)
        out.append(torch.stack([tokens[s:s + seq_len] for s in starts.tolist()]))
    return out


def _one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `prog: error: message (see --help)`, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, low, inclusive=True, nonzero=False):
    """An argparse type: `kind` (int or float), finite, >= low (> low when not inclusive), maybe != 0."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if low is not None and (x < low if inclusive else x <= low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        if nonzero and x == 0:
            raise argparse.ArgumentTypeError("a = 0 is not invertible (the inverse divides by a)")
        return x
    return parse


def _device(text):
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    return text


def build_parser():
    """The CLI's parser; every option's help states its default."""
    summary, _usage, details = __doc__.split("\n\n", 2)
    p = _Parser(prog="python -m revkernels.retrofit", description=summary, epilog=details,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="local directory of the teacher, read by AutoModelForCausalLM.from_pretrained "
                        "(required; nothing is downloaded)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory for the student checkpoint, retrofit.json and kl_log.jsonl "
                        "(required; created if missing)")
    p.add_argument("--a", type=_number(float, None, nonzero=True), nargs="+", default=[2 ** -4], metavar="A",
                   help="coefficient a of the midpoint(a) step: one value, or one per layer; 0 is refused; "
                        "exact mode needs dyadic values m/2^k (k side bits per element per layer) "
                        "(default: 0.0625 = 2^-4)")
    p.add_argument("--form", choices=("compact", "linear", "eq4.5"), default="compact",
                   help="the student: compact (F_j = f_j, one block call per layer), linear (F_j = f_j + "
                        f"a (W_j p + b_j), fitted on the first {LINEAR_FIT_BATCHES} training batches) or eq4.5 "
                        "(F_j = f_j + a f_(j-1)(p_hat)) (default: %(default)s)")
    p.add_argument("--iterations", type=_number(int, 0), default=0,
                   help="eq4.5 only: fixed-point iterations estimating p[j-1] (eq. 4.7), >= 0 "
                        "(default: %(default)s)")
    p.add_argument("--float", action="store_true",
                   help="float mode instead of the bit-exact reversible backward; refused where its "
                        "gradients cannot be trusted (default: exact mode)")
    p.add_argument("--steps", type=_number(int, 1), default=200,
                   help="alignment steps, one batch each, with align()'s default objective (eq. 4.6 for "
                        "--form linear, state matching plus eq. 4.6 otherwise) (default: %(default)s)")
    p.add_argument("--lr", type=_number(float, 0, inclusive=False), default=3e-5,
                   help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=_number(float, 0), default=0.0,
                   help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--grad-clip", type=_number(float, 0), default=1.0,
                   help="clip the gradient norm to this value, 0 = no clipping (default: %(default)s)")
    p.add_argument("--batch-size", type=_number(int, 1), default=8,
                   help="sequences per batch (default: %(default)s)")
    p.add_argument("--seq-len", type=_number(int, 1), default=256,
                   help="tokens per sequence; shortened, with a note, to the model's "
                        "max_position_embeddings when longer (default: %(default)s)")
    p.add_argument("--eval-batches", type=_number(int, 1), default=4,
                   help="held-out batches for the KL before and after alignment (default: %(default)s)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="token ids: a .pt tensor, a .npy array or a text file of whitespace-separated integers "
                        "(default: uniform random ids, a smoke test)")
    p.add_argument("--reverse", action="store_true",
                   help="train KL(student || teacher) instead of KL(teacher || student) (default: off)")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu; here %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the weights (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the batches and of torch's global RNG (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars, alignment's and transformers' weight loading (default: shown)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _prepare(args):
    """Everything that reads user input: teacher, student, batches, output directory (ValueError/OSError)."""
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a local directory (nothing is downloaded)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    tokens = load_tokens(args.data) if args.data else None
    import transformers
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()             # its "Loading weights" bar
    new_api = int(transformers.__version__.split(".")[0]) >= 5       # 4.x spells it torch_dtype
    try:
        teacher = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, local_files_only=True, **{"dtype" if new_api else "torch_dtype": DTYPES[args.dtype]})
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {args.model!r}: cannot load a causal LM from it: {_one_line(e)}") from None
    teacher.to(args.device).eval().requires_grad_(False)
    max_len = getattr(teacher.config, "max_position_embeddings", None)
    seq_len = args.seq_len
    if max_len is not None and seq_len > max_len:
        print(f"note: --seq-len {seq_len} exceeds the model's max_position_embeddings={max_len}; "
              f"using --seq-len {max_len}", file=sys.stderr)
        seq_len = max_len
    gen = torch.Generator().manual_seed(args.seed)
    vocab = teacher.config.vocab_size
    try:
        held_out = make_batches(args.eval_batches, args.batch_size, seq_len, vocab, tokens, gen)
        train = make_batches(args.steps, args.batch_size, seq_len, vocab, tokens, gen)
    except ValueError as e:
        raise ValueError(f"--data {args.data!r}: {e}") from None
    a = args.a[0] if len(args.a) == 1 else args.a
    try:
        student = retrofit(teacher, a=a, iterations=args.iterations, form=args.form, exact=not args.float,
                           calibration=train[:LINEAR_FIT_BATCHES] if args.form == "linear" else None
                           ).requires_grad_(True).eval()
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot retrofit {type(teacher).__name__} (--a {' '.join(map(str, args.a))}): "
                         f"{_one_line(e)}") from None
    os.makedirs(args.out, exist_ok=True)
    return teacher, student, a, seq_len, held_out, train


def main(argv=None):
    """Run the CLI; returns the summary written to retrofit.json. Input errors exit with one line."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        teacher, student, a, seq_len, held_out, train = _prepare(args)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {_one_line(e)}")
    kl_before = evaluate_kl(student, teacher, held_out, args.reverse, args.device)
    print(f"zero-shot KL(teacher || student) on {len(held_out)} held-out batches: {kl_before:.6g}")
    log = align(student, teacher, train, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                grad_clip=args.grad_clip or None, reverse=args.reverse, device=args.device,
                progress=not args.no_progress, log_path=os.path.join(args.out, "kl_log.jsonl"))
    kl_after = evaluate_kl(student, teacher, held_out, args.reverse, args.device)
    print(f"KL after {len(log)} steps: {kl_after:.6g}")
    student.save_pretrained(args.out)
    summary = {"a": a, "form": args.form, "iterations": args.iterations, "exact": not args.float,
               "mean_side_bits": retrofit_stack(student).mean_side_bits(), "kl_before": kl_before, "kl_after": kl_after,
               "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seq_len": seq_len,
               "data": args.data or "random", "reverse": args.reverse, "teacher": os.path.abspath(args.model)}
    with open(os.path.join(args.out, "retrofit.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
