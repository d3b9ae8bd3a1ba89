"""Benchmark suite: the fused ops as pytest-benchmark tests (CI runs each once, untimed, as a
correctness smoke test), the max-batch search and its resumable log, and every benchmark's code
path end to end on the `tiny` preset."""
import csv
import os

import pytest
import torch

from revkernels.bench import kernels, max_batch
from revkernels.bench.__main__ import BENCHMARKS, main
from revkernels.bench._probe import measure, run_probe
from revkernels.bench.common import Context, markdown_table, read_csv

TINY_CFG = dict(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=2, arch="midpoint", loss_chunk_tokens=8)
# One thread: tiny shapes are dominated by OpenMP synchronisation, badly so on a loaded CI machine.
TINY = ["--preset", "tiny", "--threads", "1"]


@pytest.fixture
def restore_threads(monkeypatch):
    """`--threads` sets torch's thread count and OMP_NUM_THREADS: undo both after the test."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _clones(args):
    return [a.clone() for a in args]


def _flat(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.benchmark(group="fused-ops")
@pytest.mark.parametrize("op", kernels.OPS, ids=lambda op: op.name)
def test_fused_op_benchmark(benchmark, op):
    """The benchmarked callables: fused op == the eager math it is compared with, in-place
    writes included."""
    torch.manual_seed(0)
    args = op.inputs(16, 40, torch.device("cpu"))
    benchmark(op.fused, *_clones(args))
    fused_args, math_args = _clones(args), _clones(args)
    fused_out, math_out = _flat(op.fused(*fused_args)), _flat(op.math(*math_args))
    for got, want in zip(fused_out + fused_args, math_out + math_args):
        # bf16 outputs (gf): one bf16 ulp, as Triton's interpreter truncates fp32 -> bf16 on store
        # where PyTorch rounds to nearest; fp32 outputs: the same fp32 math up to operation order.
        tol = dict(rtol=2 ** -7, atol=0) if got.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("answer", [0, 1, 2, 3, 7, 100, 257])
@pytest.mark.parametrize("start", [1, 4, 64])
def test_search_max_batch_finds_the_largest_fitting_batch(answer, start):
    probed = []

    def fits(b):
        probed.append(b)
        return b <= answer

    memory = {}

    def fits_linear(b):       # memory 1000 + 37 b, budget between answer and answer + 1
        memory[b] = 1000 + 37 * b
        return fits(b)

    def predict():
        (b1, m1), (b2, m2) = sorted(memory.items())[-2:] if len(memory) > 1 else ((0, 0), (0, 0))
        return int(b2 + (1000 + 37 * answer + 20 - m2) * (b2 - b1) / (m2 - m1)) if m2 > m1 else None

    assert max_batch.search_max_batch(fits, start=start, cap=1024) == (answer, False)
    assert len(set(probed)) == len(probed)                  # no batch probed twice
    n_bisect, probed[:] = len(probed), []
    assert max_batch.search_max_batch(fits_linear, start=start, cap=1024, predict=predict) == (answer, False)
    assert len(probed) <= max(n_bisect, 4)


def test_search_max_batch_cap_and_tolerance():
    assert max_batch.search_max_batch(lambda b: b <= 5000, start=3, cap=64) == (64, True)
    mb, capped = max_batch.search_max_batch(lambda b: b <= 1000, start=1, tol=0.05)
    assert not capped and 950 <= mb <= 1000


def test_probe_runs_in_a_fresh_process_and_reports_budget_overflow():
    spec = dict(cfg=TINY_CFG, batch=2, device="cpu", warmup=0, steps=1)
    res = run_probe(spec, isolate=True)
    assert res["ok"] and res["memory_kind"] == "saved_activations" and res["memory_bytes"] > 0
    assert res["step_ms"] > 0 and res["state_bytes"] > 0
    over = measure(dict(spec, budget_bytes=res["state_bytes"]))   # no room left for activations
    assert not over["ok"] and over["oom"]


def test_device_tag_in_file_names(tmp_path):
    assert Context("kernels", "tiny", tmp_path, tag_device=True).path("csv").name == "kernels-cpu.csv"
    assert Context("kernels", "tiny", tmp_path).path("png", part="probes").name == "kernels-probes.png"


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_cli_writes_csv_png_md(name, tmp_path, capsys, restore_threads):
    assert main([name, *TINY, "--out", str(tmp_path)]) == 0
    md = (tmp_path / f"{name}.md").read_text()
    assert "preset `tiny`" in md and "CPU" in md
    assert md.strip() in capsys.readouterr().out
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    with open(tmp_path / f"{name}.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) > 0
    if name == "kernels":
        assert tuple(read_csv(tmp_path / "kernels.csv")[0]) == kernels.COLUMNS


def test_max_batch_resumes_from_its_log(tmp_path, monkeypatch, restore_threads):
    main(["max-batch", *TINY, "--out", str(tmp_path)])
    log = read_csv(tmp_path / "max-batch.csv")
    assert {r["arch"] for r in log} == {"baseline", "midpoint"}

    def no_probe(*args, **kwargs):
        raise AssertionError("a rerun must answer every probe from the log")

    monkeypatch.setattr(max_batch, "run_probe", no_probe)
    main(["max-batch", *TINY, "--out", str(tmp_path)])
    assert read_csv(tmp_path / "max-batch.csv") == log
