"""English text available offline, for the retrofit benchmark and tests: the docstrings of the running
Python's standard library, split by file into calibration/training and held-out halves.

Every module, class and function docstring of every `*.py` file under `sysconfig.get_paths()["stdlib"]`
(site-packages, dist-packages and test directories excluded), in sorted path order; files whose index
is 4 mod 5 are held out (one file in five), so no docstring is on both sides. `token_windows` cuts a
tokenized split into (B, T) batches of consecutive windows, the same for every caller.
"""
import ast
import sysconfig
from pathlib import Path

import torch

HELD_OUT_EVERY = 5
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}


def _docstrings(source: str):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = (ast.get_docstring(n, clean=True) for n in nodes)
    return [d for d in docs if d and len(d) >= 80]   # short one-liners are mostly not prose


def stdlib_docstrings(min_chars: int = 400_000) -> tuple:
    """(train_text, held_out_text): the standard library's docstrings, split by file, reading files in
    order until the training side has min_chars characters and the held-out side a quarter of that
    (or the files run out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not _SKIP_PARTS & set(p.relative_to(root).parts))
    train, held, n_train, n_held = [], [], 0, 0
    for i, path in enumerate(files):
        if n_train >= min_chars and n_held >= min_chars // 4:
            break
        docs = _docstrings(path.read_text(encoding="utf-8", errors="replace"))
        if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1:
            held.extend(docs)
            n_held += sum(map(len, docs))
        else:
            train.extend(docs)
            n_train += sum(map(len, docs))
    if not train or not held:
        raise RuntimeError(f"no docstrings found under the standard library directory {root}")
    return "\n\n".join(train), "\n\n".join(held)


def token_windows(tokenizer, text: str, batch: int, seq_len: int, n_batches: int) -> list:
    """n_batches (batch, seq_len) int64 tensors of consecutive token windows of `text`
    (ValueError if the text is too short)."""
    need = batch * seq_len * n_batches
    ids = tokenizer(text[: need * 12], return_tensors="pt").input_ids[0]   # ~4 characters per token
    if ids.numel() < need:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the {need} asked for")
    return list(ids[:need].view(n_batches, batch, seq_len))
