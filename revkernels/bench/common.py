"""Shared benchmark plumbing: presets and devices, timing, CSV / markdown / PNG output.

Every benchmark gets a `Context` naming its output files, writes a CSV with `write_csv` or
`append_csv` (resumable sweeps), and finishes with `write_report`, which saves the PNG, writes
the markdown (device and preset in its header) and returns the markdown for printing.
"""
import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from time import monotonic, perf_counter

import numpy as np
import torch
from tqdm import tqdm

PRESETS = ("cpu", "gpu", "tiny")   # tiny: seconds-long shapes for the test suite only
MIB, GIB = 2 ** 20, 2 ** 30


def default_preset() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def preset_device(preset: str) -> torch.device:
    """The gpu preset runs on the current CUDA device; cpu and tiny always run on the CPU, so
    their figures are CPU figures even on a GPU machine."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if preset != "gpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("preset 'gpu' needs a CUDA device; use --preset cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def device_name(device: torch.device) -> str:
    """Human-readable device, e.g. 'NVIDIA H100 80GB HBM3' or 'CPU: <model>, 2 threads'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU: {_cpu_model()}, {n} thread{'s' if n > 1 else ''}"


def device_tag(device: torch.device) -> str:
    """File-name tag: 'cpu', or the CUDA device name with runs of other characters as '_'
    ('NVIDIA_H100_80GB_HBM3')."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


@dataclass
class Context:
    """One benchmark run: its name, preset, device and where its files go."""
    name: str
    preset: str
    out: Path
    tag_device: bool = False
    data: Optional[str] = None      # quality: a text file to train on (None: the standard library's sources)
    only: Optional[dict] = None     # run only the tasks whose fields take these values (a GPU plan chunk)
    deadline: Optional[float] = None  # time.monotonic() by which a chunk must stop (None: no limit)

    def __post_init__(self):
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = preset_device(self.preset)
        self.device_name = device_name(self.device)
        self.device_tag = device_tag(self.device)

    def path(self, ext: str, part: str = "") -> Path:
        """out/NAME[-part][-devicetag].ext"""
        stem = self.name + (f"-{part}" if part else "") + (f"-{self.device_tag}" if self.tag_device else "")
        return self.out / f"{stem}.{ext}"

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def selected(self, **fields) -> bool:
        """Whether a task with these fields belongs to this run (every task without `only`)."""
        only = self.only or {}
        return all(v in only[k] for k, v in fields.items() if k in only)

    def remaining_s(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - monotonic()

    def check_time(self, what: str):
        """Raise ChunkTimeUp before starting `what` when the chunk's time is spent."""
        left = self.remaining_s()
        if left is not None and left <= 0:
            raise ChunkTimeUp(f"time limit reached before {what}")


class ChunkTimeUp(Exception):
    """A plan chunk ran out of its time; every finished row is on disk and a rerun resumes."""


def progress(iterable, desc: str, total=None):
    """tqdm progress bar on stderr for a sweep."""
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------- timing

def quantiles(ms) -> tuple:
    """(median, p20, p80) of a list of times."""
    med, p20, p80 = np.percentile(np.asarray(ms, dtype=np.float64), [50, 20, 80])
    return float(med), float(p20), float(p80)


def time_ms(fn, device: torch.device, warmup: int, reps: int) -> tuple:
    """(median, p20, p80) milliseconds of `fn()` over `reps` calls after `warmup` calls.

    CUDA: a pair of events around each call, read after one synchronize (GPU time of the
    stream, launch overhead included when the GPU waits for it). CPU: time.perf_counter."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return quantiles([start.elapsed_time(end) for start, end in events])
    ms = []
    for _ in range(reps):
        t0 = perf_counter()
        fn()
        ms.append((perf_counter() - t0) * 1e3)
    return quantiles(ms)


def interleaved_ms(fns: dict, device: torch.device, warmup: int, rounds: int, per_round: int) -> dict:
    """{name: [median ms of `per_round` calls, one per round]}: every callable warmed up, then timed
    round by round, the order reversed every other round, so a load change on a shared machine (or
    the allocator adapting) hits every callable alike instead of whichever ran first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, times = list(fns), {k: [] for k in fns}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(time_ms(fns[name], device, 0, per_round)[0])
    return times


# ---------------------------------------------------------------- CSV

def write_csv(path: Path, rows, columns):
    """Overwrite `path` with `rows` (dicts) in `columns` order."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def append_csv(path: Path, row: dict, columns):
    """Append one row (header first if the file is new) and flush it to disk at once, so an
    interrupted sweep keeps every finished row."""
    new = not Path(path).exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        fh.flush()
        os.fsync(fh.fileno())


def read_csv(path: Path) -> list:
    """Rows of `path` as dicts of strings; [] when it does not exist."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- markdown

def markdown_table(header, rows) -> str:
    """A GitHub markdown table from a header list and rows of already formatted cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def mib(n_bytes) -> str:
    return f"{round(float(n_bytes) / MIB, 2) + 0.0:.2f}"     # + 0.0: no "-0.00"


def sci(x) -> str:
    return f"{float(x):.2e}"


def fused_path(device: torch.device) -> str:
    """What runs revkernels' fused ops on `device` (see revkernels.ops dispatch)."""
    from .. import ops
    if device.type == "cuda":
        return "Triton"
    return "Triton interpreter" if ops.HAS_TRITON and ops.INTERPRET else "PyTorch fallback, revkernels.fallback"


def header(ctx: Context, title: str) -> str:
    """Title line plus the device / preset / versions line every report starts with."""
    lines = [f"# {title}", "",
             f"Device: **{ctx.device_name}** · preset `{ctx.preset}` · torch {torch.__version__}"]
    if ctx.is_cpu:
        lines.append("")
        lines.append(f"**CPU figures** (small shapes; fused ops run through the {fused_path(ctx.device)}): they "
                     "check the code paths and the memory accounting; do not read them as GPU figures.")
    return "\n".join(lines)


def write_report(ctx: Context, title: str, body: str, fig) -> str:
    """Save `fig` as NAME.png and header + body as NAME.md; returns the markdown."""
    save_figure(fig, ctx.path("png"))
    text = header(ctx, title) + "\n\n" + body.strip() + "\n"
    ctx.path("md").write_text(text)
    return text


# ---------------------------------------------------------------- plots

def figure(ncols: int, ctx: Context, title: str, nrows: int = 1, width: float = 5.5, height: float = 4.2):
    """A matplotlib Figure (Agg canvas, no pyplot state) with nrows x ncols axes (returned flat)
    and a title that names the device and preset."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    label = "CPU figures" if ctx.is_cpu else ctx.device_name
    fig.suptitle(f"{title}\n{label} · preset {ctx.preset}", fontsize=11)
    return fig, axes


def save_figure(fig, path: Path):
    fig.savefig(path, dpi=110)
