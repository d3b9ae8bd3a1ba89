"""python -m revkernels.retrofit: align a retrofitted Hugging Face causal LM to its teacher.

    python -m revkernels.retrofit --model DIR --out DIR [--a 0.5] [--iterations 1] [--steps 200]
        [--lr 3e-5] [--batch-size 8] [--seq-len 256] [--data FILE] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--seed 0] [--no-progress]

--model: a local directory that `AutoModelForCausalLM.from_pretrained` reads (local_files_only=True;
there is no download). It is the frozen teacher; the student is `retrofit(teacher, a, iterations)`.
--data: token ids, one flat stream, cut into random windows of --seq-len: a `.pt` tensor, a `.npy`
array, or a text file of whitespace-separated integers. Without --data the ids are uniform random
(a smoke test: alignment on random tokens says little about real text).
--out receives: the student (`student.save_pretrained`: `revkernels.retrofit.from_pretrained(out)` gives
it back; the plain transformers class loads the same weights as a residual model), `retrofit.json`
(a, iterations, KL before/after on held-out batches, the settings) and `kl_log.jsonl` (KL per step).
"""
import argparse
import json
import os
import sys

import torch

from .align import align, evaluate_kl
from .core import retrofit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokens(path):
    """A flat LongTensor of token ids from a .pt, .npy or whitespace-separated text file."""
    if path.endswith(".pt"):
        t = torch.load(path, map_location="cpu", weights_only=True)
    elif path.endswith(".npy"):
        import numpy as np
        t = torch.from_numpy(np.load(path))
    else:
        with open(path) as fh:
            t = torch.tensor([int(tok) for tok in fh.read().split()])
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{path}: expected integer token ids")
    return t.reshape(-1).long()


def make_batches(n, batch_size, seq_len, vocab_size, tokens=None, generator=None):
    """n batches (batch_size, seq_len): random windows of `tokens`, or uniform random ids."""
    if tokens is None:
        return [torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator) for _ in range(n)]
    if tokens.numel() < seq_len:
        raise ValueError(f"the data has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab_size}) for this model")
    out = []
    for _ in range(n):
        starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=generator)
        out.append(torch.stack([tokens[s:s + seq_len] for s in starts.tolist()]))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m revkernels.retrofit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local directory of the teacher (from_pretrained)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--a", type=float, nargs="+", default=[0.5], help="a, one value or one per layer")
    p.add_argument("--iterations", type=int, default=1, help="fixed-point iterations (eq. 4.7)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches for the KL before/after")
    p.add_argument("--data", default=None, help="token ids (.pt, .npy or text); default: random ids")
    p.add_argument("--reverse", action="store_true", help="train KL(student || teacher) instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model!r} is not a local directory (nothing is downloaded)")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    import transformers
    new_api = int(transformers.__version__.split(".")[0]) >= 5       # 4.x spells it torch_dtype
    teacher = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                   **{"dtype" if new_api else "torch_dtype": DTYPES[args.dtype]})
    teacher.to(args.device).eval().requires_grad_(False)
    a = args.a[0] if len(args.a) == 1 else args.a
    student = retrofit(teacher, a=a, iterations=args.iterations).requires_grad_(True).eval()
    seq_len = min(args.seq_len, getattr(teacher.config, "max_position_embeddings", args.seq_len))
    tokens = load_tokens(args.data) if args.data else None
    vocab = teacher.config.vocab_size
    held_out = make_batches(args.eval_batches, args.batch_size, seq_len, vocab, tokens, gen)
    train = make_batches(args.steps, args.batch_size, seq_len, vocab, tokens, gen)
    os.makedirs(args.out, exist_ok=True)
    kl_before = evaluate_kl(student, teacher, held_out, args.reverse, args.device)
    print(f"zero-shot KL(teacher || student) on {len(held_out)} held-out batches: {kl_before:.6g}")
    log = align(student, teacher, train, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                grad_clip=args.grad_clip or None, reverse=args.reverse, device=args.device,
                progress=not args.no_progress, log_path=os.path.join(args.out, "kl_log.jsonl"))
    kl_after = evaluate_kl(student, teacher, held_out, args.reverse, args.device)
    print(f"KL after {len(log)} steps: {kl_after:.6g}")
    student.save_pretrained(args.out)
    summary = {"a": a, "iterations": args.iterations, "kl_before": kl_before, "kl_after": kl_after,
               "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seq_len": seq_len,
               "data": args.data or "random", "reverse": args.reverse, "teacher": os.path.abspath(args.model)}
    with open(os.path.join(args.out, "retrofit.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
