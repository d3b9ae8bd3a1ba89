"""Tile and warp choices for the elementwise kernels, and their launch.

On a GPU every kernel is wrapped in ``triton.autotune``: the first launch for a new (D, ALIGN, VEC,
op modes, operand dtypes) times a few candidate tiles on the real arguments and keeps the fastest.
In-place outputs are listed in ``restore_value``, so a tuning run restores them after every timed
launch and the update is applied exactly once (by the final launch with the chosen tile); the
coefficient-gradient partial sums need no reset (each launch writes every row it covers, and the
host reads only the rows of the chosen tile). Candidates do not depend on M, so one choice serves
every batch size of a width (the first call's M picks it).

Under Triton's interpreter (CPU) nothing is timed: one heuristic tile per (M, D), as large as
possible, since the interpreter's cost is per program. With ``REVKERNELS_AUTOTUNE=0`` (the test suite
sets it) a GPU launch takes the first candidate untimed: one compilation per specialisation instead of
one per candidate.

`chosen(op, D, dtype)` reports the tile the last launch of a public op used, for benchmarks to log.
"""
import os
import time

import triton

from .kernels.backward_step import backward_step_kernel
from .kernels.coupling import coupling_kernel
from .kernels.three_term import three_term_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Whether a GPU launch times the candidate tiles (else the first one, untimed).
AUTOTUNE = os.environ.get("REVKERNELS_AUTOTUNE", "1") != "0"
# Whether the interpreter goes through the autotuner too (set by the test of tuning on a CPU).
TUNE_UNDER_INTERPRETER = False
_TUNERS = {}   # family -> its autotuned kernel, built on first use
_CHOSEN = {}   # (public op, D, f / g dtype) -> the tile of its last launch

KERNELS = {"three_term": three_term_kernel, "coupling": coupling_kernel, "backward_step": backward_step_kernel}
# Buffers a launch writes in place (restored after each timed tuning launch). `out` may be an input
# (in-place step), so it is restored too; the coupling's gx placeholder is x when SCALE_GRAD is off.
IN_PLACE = {"three_term": ["out_ptr"], "coupling": ["out_ptr", "gx_ptr"],
            "backward_step": ["A_ptr", "gA_ptr", "gB_ptr"]}
MODES = {"three_term": ["A_MODE", "C_MODE", "INVERSE"], "coupling": ["ALPHA_MODE", "INVERSE", "SCALE_GRAD"],
         "backward_step": ["A_MODE", "C_MODE", "COEF_GRADS", "PENDING"]}

# Interpreter tiles: elements per program (the backward holds more operands) and the widest BLOCK_D.
INTERPRETER_TILE_ELEMS = {"three_term": 4096, "coupling": 4096, "backward_step": 2048}
MAX_BLOCK_D = 256

# Candidates on a GPU: BLOCK_D up to these widths, each thread holding this many VEC-wide vectors per operand
# (8 spills in the backward step: 255 registers, ptxas for sm_90). With coefficient gradients only 4, which
# keeps their per-tile partial sums (2 fp32 per BLOCK_M rows and channel) at half a state's bytes.
CANDIDATE_BLOCK_D = (256, 512, 1024)
CANDIDATE_VECTORS_PER_THREAD = (1, 2, 4)
COEF_GRADS_VECTORS_PER_THREAD = (4,)


def candidates(D: int, vec: int, coef_grads: bool = False) -> list:
    """Tiles worth timing for rows of D channels read VEC at a time. All warps lie along D (a warp
    covers 32 vectors of one row, rows repeat in registers), so the backward's column sums need no
    shared memory; when BLOCK_D is under 32 vectors, one warp's lanes also span rows."""
    out = []
    per_thread_choices = COEF_GRADS_VECTORS_PER_THREAD if coef_grads else CANDIDATE_VECTORS_PER_THREAD
    for block_d in sorted({max(vec, min(triton.next_power_of_2(D), cap)) for cap in CANDIDATE_BLOCK_D}):
        lanes = block_d // vec
        warps = max(1, min(8, lanes // 32))
        rows_per_pass = max(1, 32 * warps // lanes)
        for per_thread in per_thread_choices:
            out.append(triton.Config(dict(BLOCK_M=per_thread * rows_per_pass, BLOCK_D=block_d), num_warps=warps))
    return out


def interpreter_tile(family: str, M: int, D: int, vec: int) -> triton.Config:
    """The one tile used under the interpreter: BLOCK_D spans up to MAX_BLOCK_D channels, BLOCK_M fills
    INTERPRETER_TILE_ELEMS (fewer programs run faster there)."""
    block_d = max(vec, min(triton.next_power_of_2(D), MAX_BLOCK_D))
    block_m = max(1, min(INTERPRETER_TILE_ELEMS[family] // block_d, triton.next_power_of_2(M)))
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_D=block_d), num_warps=4)


def grid(M: int, D: int, meta) -> tuple:
    """Programs over an (M, D) problem: one per BLOCK_M x BLOCK_D tile."""
    return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"])


def max_row_tiles(family: str, M: int, D: int, vec: int, coef_grads: bool) -> int:
    """Most tiles along M any tile choice can launch (rows of the partial-sum buffers)."""
    if INTERPRET and not TUNE_UNDER_INTERPRETER:
        return grid(M, D, interpreter_tile(family, M, D, vec).kwargs)[0]
    return max(grid(M, D, c.kwargs)[0] for c in candidates(D, vec, coef_grads))


def _prune(configs, named_args, **kwargs):
    return candidates(named_args["D"] * kwargs["ALIGN"], kwargs["VEC"], kwargs.get("COEF_GRADS", False))


def _wall_clock_bench(kernel_call, quantiles):
    """Timer for tuning under the interpreter (tests of the tuning only): one run, in ms."""
    t0 = time.perf_counter()
    kernel_call()
    return [1e3 * (time.perf_counter() - t0)] * len(quantiles)


def autotuned(family: str):
    """`family`'s kernel under triton.autotune, keyed per width, modes and operand dtypes."""
    return triton.autotune(
        configs=candidates(1024, 4), key=["D", "ALIGN", "VEC", *MODES[family]],
        restore_value=IN_PLACE[family], prune_configs_by=dict(early_config_prune=_prune),
        do_bench=_wall_clock_bench if INTERPRET else None)(KERNELS[family])


def tunes() -> bool:
    """Whether launches go through triton.autotune (see AUTOTUNE, TUNE_UNDER_INTERPRETER)."""
    return TUNE_UNDER_INTERPRETER if INTERPRET else AUTOTUNE


def launch(family: str, op: str, dtype, M: int, D: int, args: list, consts: dict) -> triton.Config:
    """Launch `family`'s kernel over an (M, D) problem; record and return the tile it ran with.
    `op` (public op name) and `dtype` (of f or g) label the record for `chosen`."""
    if tunes():
        if family not in _TUNERS:
            _TUNERS[family] = autotuned(family)
        tuner = _TUNERS[family]
        tuner[lambda meta: grid(M, D, meta)](*args, **consts)
        cfg = tuner.best_config
    else:
        cfg = (interpreter_tile(family, M, D, consts["VEC"]) if INTERPRET
               else candidates(D, consts["VEC"], consts.get("COEF_GRADS", False))[0])
        KERNELS[family][grid(M, D, cfg.kwargs)](*args, **consts, **cfg.all_kwargs())
    _CHOSEN[(op, D, dtype)] = dict(cfg.kwargs, num_warps=cfg.num_warps, VEC=consts["VEC"], ALIGN=consts["ALIGN"],
                                   tuned=tunes())
    return cfg


def chosen(op: str, D: int, dtype):
    """The tile of the last Triton launch of public op `op` (e.g. "rev_step",
    "rev_backward_step+coef_grads") for width D and f / g dtype `dtype`, as a dict with BLOCK_M,
    BLOCK_D, num_warps, VEC, ALIGN and `tuned` (False: the interpreter's heuristic tile, or on a GPU the
    first candidate with REVKERNELS_AUTOTUNE=0); None if none ran."""
    return _CHOSEN.get((op, D, dtype))
