"""Byte-level text corpora for the quality benchmark: the running Python's standard library, or a file.

Tokens are bytes (vocabulary 256), so no tokenizer is needed and any text file works.

- `stdlib_corpus()`: every `*.py` file under `sysconfig.get_paths()["stdlib"]` (site-packages and
  dist-packages excluded), in sorted path order; every 10th file (index 9, 19, ...) is validation,
  so the split is by file and no function body is in both halves.
- `file_corpus(path)`: the file's bytes; the last 10% are validation.

`describe()` names the source, its size and the sha256 of its bytes (train then validation), so a run
can be matched to its data. `Batches` draws training windows and a fixed validation set from seeds,
the same for every model trained on the corpus.
"""
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VAL_EVERY_N_FILES = 10
VAL_FRACTION = 0.1


@dataclass
class Corpus:
    name: str
    train: torch.Tensor          # uint8
    val: torch.Tensor            # uint8
    n_files: int
    sha256: str

    def describe(self) -> str:
        return (f"{self.name}: {self.n_files} file(s), {len(self.train) + len(self.val):,} bytes "
                f"({len(self.train):,} train, {len(self.val):,} validation), sha256 {self.sha256}")


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    if not files:
        raise RuntimeError(f"no .py files under the standard library directory {root}")
    train, val = [], []
    for i, path in enumerate(files):
        (val if i % VAL_EVERY_N_FILES == VAL_EVERY_N_FILES - 1 else train).append(path.read_bytes() + b"\n")
    train_b, val_b = b"".join(train), b"".join(val)
    return Corpus(f"Python {sysconfig.get_python_version()} standard library sources ({root})",
                  _tensor(train_b), _tensor(val_b), len(files), hashlib.sha256(train_b + val_b).hexdigest())


def file_corpus(path) -> Corpus:
    """The bytes of `path`, the last 10% held out (ValueError if it is too short to split)."""
    path = Path(path)
    data = path.read_bytes()
    cut = int(len(data) * (1 - VAL_FRACTION))
    return Corpus(str(path), _tensor(data[:cut]), _tensor(data[cut:]), 1, hashlib.sha256(data).hexdigest())


class Batches:
    """Training batch i (deterministic in `seed` and i) and a fixed validation set of windows.

    A batch is (x, y): `batch` windows of seq_len + 1 bytes at random offsets, y = x shifted by one."""

    def __init__(self, corpus: Corpus, seq_len: int, batch: int, steps: int, eval_batches: int, seed: int,
                 device):
        for name, split in (("training", corpus.train), ("validation", corpus.val)):
            if len(split) < seq_len + 2:
                raise ValueError(f"the {name} split of {corpus.name} has {len(split)} bytes, fewer than "
                                 f"seq_len + 2 = {seq_len + 2}")
        self.corpus, self.T, self.device = corpus, seq_len, device
        gen = torch.Generator().manual_seed(seed)
        self.train_offsets = torch.randint(len(corpus.train) - seq_len - 1, (steps, batch), generator=gen)
        val_offsets = torch.randint(len(corpus.val) - seq_len - 1, (eval_batches, batch), generator=gen)
        self.val = [self._windows(corpus.val, o) for o in val_offsets]

    def _windows(self, data, offsets):
        w = torch.stack([data[o:o + self.T + 1] for o in offsets.tolist()]).long().to(self.device)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def train(self, i: int):
        return self._windows(self.corpus.train, self.train_offsets[i % len(self.train_offsets)])
