"""Benchmark suite: the fused ops as pytest-benchmark tests (CI runs each once, untimed, as a
correctness smoke test), the max-batch search and its resumable log, every benchmark's code path end
to end on the `tiny` preset, the quality benchmark's rows, the memory/time frontier, the GPU plan's chunk
estimates, gpu-check's budget and its CPU rehearsal, and the command line's help and input errors."""
import csv
import math
import os
from time import monotonic

import pytest
import torch

from revkernels import ops, tiles
from revkernels.bench import cost_model, drift, exact, frontier, gpu_check, kernels, max_batch, plan, quality, \
    throughput_depth
from revkernels.bench.__main__ import BENCHMARKS, build_parser, main
from revkernels.bench._probe import measure, run_probe
from revkernels.bench.common import ChunkTimeUp, Context, markdown_table, read_csv, write_csv
from revkernels.bench.corpus import Batches, file_corpus

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


def _check_cli_files(name, tmp_path, capsys):
    md = (tmp_path / f"{name}.md").read_text()
    assert "preset `tiny`" in md and "CPU" in md
    assert md.strip() in capsys.readouterr().out
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    with open(tmp_path / f"{name}.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) > 0


# quality, drift, exact, frontier, retrofit: their own tests below check these files too
@pytest.mark.parametrize("name", [n for n in BENCHMARKS if n not in ("quality", "drift", "exact", "frontier",
                                                                     "retrofit")])
def test_cli_writes_csv_png_md(name, tmp_path, capsys, restore_threads):
    assert main([name, *TINY, "--out", str(tmp_path)]) == 0
    _check_cli_files(name, tmp_path, capsys)
    if name == "kernels":
        assert tuple(read_csv(tmp_path / "kernels.csv")[0]) == kernels.COLUMNS
        _check_tile_log(tmp_path)


def _check_tile_log(tmp_path):
    """Every op that ran through Triton logged the tile it ran with (untimed in the tests: the
    interpreter's tile on a CPU, the first candidate on a GPU)."""
    if not (Context("kernels", "tiny", tmp_path).device.type == "cuda" or ops.uses_triton(torch.zeros(1))):
        assert not (tmp_path / "kernels-tiles.csv").exists()      # no Triton here: no tile to log
        return
    logged = read_csv(tmp_path / "kernels-tiles.csv")
    assert [r["op"] for r in logged] == [op.name for op in kernels.OPS]
    for r in logged:
        assert r["tuned"] == str(tiles.tunes()) and int(r["BLOCK_M"]) >= 1 and int(r["BLOCK_D"]) >= int(r["VEC"])
    assert "Tiles (" in (tmp_path / "kernels.md").read_text()


def test_max_batch_resumes_from_its_log(tmp_path, monkeypatch, restore_threads):
    main(["max-batch", *TINY, "--out", str(tmp_path)])
    log = read_csv(tmp_path / "max-batch.csv")
    assert {r["arch"] for r in log} == {"baseline", "midpoint"}

    def no_probe(*args, **kwargs):
        raise AssertionError("a rerun must answer every probe from the log")

    monkeypatch.setattr(max_batch, "run_probe", no_probe)
    main(["max-batch", *TINY, "--out", str(tmp_path)])
    assert read_csv(tmp_path / "max-batch.csv") == log


def test_max_batch_has_a_hybrid_row_with_tokens_per_s(tmp_path, restore_threads):
    """Every configuration of the tiny preset (baseline, midpoint, midpoint with stored_layers 1 and 2) gets a
    max batch and its tokens/s there; the report's hybrid row picks the fastest reversible one."""
    main(["max-batch", *TINY, "--out", str(tmp_path)])
    results = read_csv(tmp_path / "max-batch-results.csv")
    assert {r["arch"] for r in results} == {"baseline", "midpoint", "midpoint k=1", "midpoint k=2"}
    assert all(int(r["batch"]) >= 1 and float(r["tokens_per_s"]) > 0 for r in results)
    assert len({r["shape"] for r in results}) == 3               # the stored layers are part of the probe key
    fastest = max((r for r in results if r["arch"].startswith("midpoint")), key=lambda r: float(r["tokens_per_s"]))
    k = fastest["arch"].split("k=")[1] if "k=" in fastest["arch"] else "0"
    md = (tmp_path / "max-batch.md").read_text()
    assert "hybrid (best k)" in md and f"| k={k}: {_batch_text(fastest)}, {float(fastest['tokens_per_s']):.0f} |" in md


def _batch_text(r):
    return (">= " if r["capped"] == "True" else "") + r["batch"]


def test_max_batch_rewrites_an_older_log_to_the_new_columns(tmp_path):
    path = tmp_path / "log.csv"
    write_csv(path, [dict(arch="baseline", batch=2)], ("arch", "batch"))
    max_batch.upgrade_csv(path, max_batch.LOG_COLUMNS)
    rows = read_csv(path)
    assert tuple(rows[0]) == max_batch.LOG_COLUMNS and rows[0]["batch"] == "2" and rows[0]["step_ms"] == ""


def test_frontier_writes_every_configuration_with_its_memory(tmp_path, capsys, restore_threads):
    """Tiny frontier: a row per configuration; the reversible rows compute the same forward (same first loss);
    saved bytes grow with stored_layers and the policy store shrinks with it; selective AC's cache, counted
    by a dispatch mode, equals the reversible store policy's bytes (counted by the stack) at k=0, since both
    keep the same op outputs of the same blocks."""
    assert main(["frontier", *TINY, "--out", str(tmp_path)]) == 0
    _check_cli_files("frontier", tmp_path, capsys)
    rows = {r["config"]: r for r in read_csv(tmp_path / "frontier.csv")}
    p = frontier.PRESETS["tiny"]
    L = p["shape"]["n_layers"]
    assert list(rows) == [label for label, *_ in frontier.configurations(p)]
    assert {"baseline", "checkpoint", "selective AC"} <= set(rows)
    assert float(rows["baseline"]["vs_baseline"]) == 1.0 and all(float(r["step_ms"]) > 0 for r in rows.values())

    def col(name, policy=None, ks=range(L + 1)):
        suffix = f" +{policy}" if policy else ""
        return [int(rows[f"midpoint k={k}{suffix}"][name]) for k in ks]

    saved = col("saved_bytes")
    assert all(a < b for a, b in zip(saved, saved[1:])), saved      # each stored layer keeps its graph
    act = col("activation_bytes")
    assert act == sorted(act) and col("policy_bytes") == [0] * (L + 1)
    store = col("policy_bytes", "matmuls", range(L))
    assert all(a > b > 0 for a, b in zip(store, store[1:])), store   # fewer recomputed layers, less kept
    assert col("saved_bytes", "matmuls", range(L)) == saved[:L]
    sac = rows["selective AC"]
    assert int(sac["cache_bytes"]) == store[0] > 0
    assert int(sac["saved_bytes"]) == int(rows["checkpoint"]["saved_bytes"])   # both keep each layer's input
    assert int(rows["baseline"]["activation_bytes"]) > int(sac["activation_bytes"]) > int(rows["checkpoint"]
                                                                                          ["activation_bytes"])
    losses = [float(r["loss0"]) for r in rows.values() if r["method"] == "reversible"]
    assert max(losses) - min(losses) < 1e-5 * abs(losses[0])           # fp32, same forward: rounding only
    md = (tmp_path / "frontier.md").read_text()
    assert "Does the reversible hybrid dominate" in md and f"all stored (k={L}) / baseline" in md


def test_frontier_records_a_failing_configuration_and_measures_the_others(tmp_path, monkeypatch, restore_threads):
    torch.set_num_threads(1)
    build = frontier.build_step

    def build_or_fail(p, device, method, k=None, policy=None):
        if policy:
            raise NotImplementedError("no store policy on this torch")
        return build(p, device, method, k, policy)

    monkeypatch.setattr(frontier, "build_step", build_or_fail)
    p = dict(frontier.PRESETS["tiny"], fixed=("baseline",), stored=(0, 3), rounds=1)
    md = frontier.run(Context("frontier", "tiny", tmp_path), p)
    rows = {r["config"]: r for r in read_csv(tmp_path / "frontier.csv")}
    assert rows["midpoint k=0 +matmuls"]["error"] == "NotImplementedError: no store policy on this torch"
    assert rows["midpoint k=0 +matmuls"]["step_ms"] == ""
    assert all(float(rows[c]["step_ms"]) > 0 and not rows[c]["error"] for c in ("baseline", "midpoint k=0",
                                                                                 "midpoint k=3"))
    assert "failed: NotImplementedError" in md


def test_frontier_times_configurations_in_groups_with_their_own_baseline():
    assert frontier.groups(["baseline", "a", "b", "c"], 2) == [["baseline", "a", "b"], ["baseline", "c"]]
    assert frontier.groups(["a", "b"], 4) == [["a", "b"]] and frontier.groups(["baseline"], 4) == [["baseline"]]


def test_frontier_dominance_and_pareto():
    def row(config, method, mem, t, k=None):
        return dict(config=config, method=method, activation_bytes=mem, vs_baseline=t, stored_layers=k,
                    store_policy=None)
    rows = [row("baseline", "baseline", 100, 1.0), row("checkpoint", "checkpoint", 10, 1.3),
            row("selective AC", "selective-ac", 60, 1.1), row("k=0", "reversible", 5, 1.4, 0),
            row("k=1", "reversible", 9, 1.25, 1), row("k=2", "reversible", 50, 1.15, 2),
            row("k=3", "reversible", 95, 1.02, 3)]
    verdict = {ref["config"]: (best and best["config"], ok) for ref, best, ok in frontier.dominance(rows)}
    assert verdict == {"checkpoint": ("k=1", True), "selective AC": ("k=2", False)}
    assert [r["config"] for r in frontier.pareto(rows)] == ["k=0", "k=1", "k=2", "k=3"]
    assert frontier.ratios(dict(shape=dict(n_layers=3)), rows) == pytest.approx(
        dict(all_stored_vs_baseline=1.02, all_stored_vs_none_stored=1.02 / 1.4))


def test_gpu_check_dry_run_lists_steps_under_eight_minutes(capsys):
    """`make gpu-check DRY_RUN=1`: the steps in the issue's order with their estimated minutes, which with the
    install add up to under 8 (and Table 4's command to under 6); the caps keep every later step its reserve."""
    assert main(["gpu-check", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and line.split("|")[1].strip()
            .isdigit()]
    names = [r[2].strip() for r in rows]
    assert names == ["gpu-check-tests", "gpu-check-kernels", "gpu-check-steptime-L12", "gpu-check-steptime-L48",
                     "gpu-check-memory", "gpu-check-max-batch"]
    minutes = [float(r[-2]) for r in rows]
    assert all(m > 0 for m in minutes) and sum(minutes) + gpu_check.INSTALL_S / 60 < 8
    assert gpu_check.estimate_s("gpu-check") < gpu_check.WALL_LIMIT_S["gpu-check"] == 8 * 60
    assert gpu_check.estimate_s("gpu-table4") < gpu_check.WALL_LIMIT_S["gpu-table4"] == 6 * 60
    steps = gpu_check.steps("gpu-check")
    end = 400.0
    for i, deadline in enumerate(gpu_check.caps(steps, 0.0, end)):
        later = sum(s.chunk.estimate_s for s in steps[i + 1:])
        assert steps[i].chunk.estimate_s < deadline <= end - gpu_check.RESERVE * later
    assert main(["plan"]) == 0 and "`gpu-check`, one GPU command" in capsys.readouterr().out


def test_gpu_check_rehearsal_on_the_cpu(tmp_path, monkeypatch, restore_threads):
    """gpu-check's code end to end at tiny shapes on the CPU (what a GPU window will run blind): every step
    done, its files written, the summary and an archive of every file in $OUT."""
    import tarfile
    out = tmp_path / "device-out"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("REVKERNELS_AUTOTUNE", "1")     # the steps set it to 0 for their probes
    monkeypatch.setattr(tiles, "AUTOTUNE", tiles.AUTOTUNE)
    assert main(["gpu-check", "--preset", "tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    log = read_csv(tmp_path / "gpu-check-steps-cpu.csv")
    assert [r["status"] for r in log] == ["done"] * len(gpu_check.steps("gpu-check", "tiny"))
    assert "| 0 | 0 |" in (tmp_path / "gpu-check-tests-cpu.md").read_text()      # no failure, no error
    with tarfile.open(out / "gpu-check-cpu.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu-check-tests-cpu.xml", "gpu-check-kernels-cpu.csv", "gpu-check-steptime-L3-cpu.csv",
            "gpu-check-memory-cpu.csv", "gpu-check-max-batch-results-cpu.csv", "gpu-check-summary-cpu.md"} <= names
    assert (out / "gpu-check-summary-cpu.md").read_text().count("| done |") == len(log)
    assert main(["gpu-table4", "--preset", "tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert {r["arch"] for r in read_csv(tmp_path / "gpu-table4-cpu.csv")} == {"baseline", "midpoint"}
    assert (out / "gpu-table4-cpu.tar.gz").exists()


def test_quality_trains_every_arch_and_retrofits_the_baseline(tmp_path, capsys, restore_threads):
    """The tiny preset end to end on the default corpus (the standard library's sources): a row per
    arch and per retrofit iteration count, finite losses, every trained arch's validation loss falling."""
    assert main(["quality", *TINY, "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "quality.csv")
    assert set(quality.COLUMNS) <= set(rows[0]) and {"arch", "step", "train_loss", "val_loss", "tokens",
                                                      "seconds"} <= set(rows[0])
    retrofits = [f"retrofit-it{k}" for k in quality.RETROFIT_ITERATIONS]
    assert {r["arch"] for r in rows} == set(quality.ARCHS) | set(retrofits)
    for arch in quality.ARCHS:
        rs = [r for r in rows if r["arch"] == arch]
        losses = [float(r["val_loss"]) for r in rs]
        assert all(math.isfinite(x) for x in losses + [float(r["train_loss"]) for r in rs])
        assert losses[-1] < losses[0] - 0.5            # from ln(256) = 5.5 nats per byte at init
        assert int(rs[-1]["tokens"]) == quality.PRESETS["tiny"]["steps"] * 8 * 32
    for arch in retrofits:
        rs = [r for r in rows if r["arch"] == arch]
        assert len(rs) >= 2 and int(rs[0]["step"]) == 0
        for r in rs:
            assert math.isfinite(float(r["val_loss"])) and 0 <= float(r["val_kl"]) < 1
    md = (tmp_path / "quality.md").read_text()
    assert "Table 1" in md and "sha256" in md and "**retrofit-it2**" in md
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_corpus_from_a_file_splits_and_batches_deterministically(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 8)
    corpus = file_corpus(path)
    assert len(corpus.train) + len(corpus.val) == 2048 and len(corpus.val) == 205
    a, b = (Batches(corpus, 16, 4, 3, 2, seed=0, device="cpu") for _ in range(2))
    for i in range(3):
        (xa, ya), (xb, yb) = a.train(i), b.train(i)
        assert torch.equal(xa, xb) and torch.equal(ya[:, :-1], xa[:, 1:])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Batches(corpus, 300, 4, 3, 2, seed=0, device="cpu")


def test_gpu_plan_chunks_fit_the_gpu_window(capsys):
    chunks = plan.gpu_plan()
    assert [c.number for c in chunks] == list(range(1, len(chunks) + 1))
    assert all(0 < c.estimate_s < 9 * 60 for c in chunks) and plan.CHUNK_LIMIT_S < 9 * 60
    assert sum(c.estimate_s for c in chunks) < plan.TOTAL_LIMIT_S
    covered = {c.benchmark for c in chunks}
    assert {"kernels", "memory-depth", "max-batch", "throughput-depth", "drift"} <= covered
    assert main(["plan", "--preset", "gpu", "--dry-run"]) == 0
    out = capsys.readouterr().out.split("\nTotal:")[0]          # the plan's table (gpu-check's budgets follow)
    minutes = [float(line.split("|")[-2]) for line in out.splitlines() if line.startswith("| ") and
               line.split("|")[1].strip().isdigit()]
    assert len(minutes) == len(chunks) and all(m < 9 for m in minutes) and sum(minutes) < plan.TOTAL_LIMIT_S / 60


def test_cost_model_bounds_batches_sensibly():
    gpt2 = dict(max_batch.GPT2_SMALL, loss_chunk_tokens=4096)
    base, rev = (cost_model.max_batch(dict(gpt2, arch=a), 80e9) for a in ("baseline", "midpoint"))
    assert 0 < base < rev and cost_model.max_batch(dict(gpt2, arch="baseline"), 40e9) < base
    assert cost_model.step_s(dict(gpt2, arch="midpoint"), 8) > cost_model.step_s(dict(gpt2, arch="baseline"), 8)
    hybrid = [dict(gpt2, arch="midpoint", stored_layers=k) for k in (0, 6, 12)]
    batches = [cost_model.max_batch(c, 80e9) for c in hybrid]
    assert rev == batches[0] > batches[1] > batches[2] > 0      # k=L keeps the states and every layer: < baseline
    times = [cost_model.step_s(c, 8) for c in hybrid]
    assert times[0] > times[1] > times[2] == pytest.approx(cost_model.step_s(dict(gpt2, arch="baseline"), 8))


def test_chunk_stops_at_its_deadline_and_is_logged(tmp_path):
    ctx = Context("kernels", "tiny", tmp_path, deadline=monotonic() - 1)
    with pytest.raises(ChunkTimeUp):
        ctx.check_time("anything")
    assert Context("x", "tiny", tmp_path, only={"n_layers": (2,)}).selected(n_layers=2, arch="midpoint")
    assert not Context("x", "tiny", tmp_path, only={"n_layers": (2,)}).selected(n_layers=1)

    def run_benchmark(ctx):
        ctx.check_time("the first point")
        return "never"

    def make_context(name, only=None, deadline=None):
        return Context(name, "tiny", tmp_path, only=only, deadline=monotonic() - 1)

    chunk = plan.Chunk(1, "kernels", "test chunk", 1.0)
    log = tmp_path / "plan.csv"
    assert not plan.run_chunk(chunk, make_context, run_benchmark, log, deadline=True)
    assert read_csv(log)[0]["status"] == "stopped" and plan.done_chunks(log, make_context("x").device_name) == set()


def test_throughput_depth_runs_the_selected_depths_and_resumes(tmp_path, restore_threads):
    torch.set_num_threads(1)
    ctx = Context("throughput-depth", "tiny", tmp_path, only={"n_layers": (1,)})
    md = throughput_depth.run(ctx)
    assert "not run yet" in md
    assert {r["n_layers"] for r in read_csv(ctx.path("csv"))} == {"1"}
    md = throughput_depth.run(Context("throughput-depth", "tiny", tmp_path, only={"n_layers": (2,)}))
    rows = read_csv(ctx.path("csv"))
    assert "not run yet" not in md and {r["n_layers"] for r in rows} == {"1", "2"}
    common = [r for r in rows if r["batch_kind"] == throughput_depth.COMMON and r["arch"] == "baseline"]
    assert all(float(r["vs_baseline"]) == 1.0 for r in common)


def test_help_describes_every_option_with_its_default():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in formatter._get_help_string(action), action.dest
    assert "plan" in parser.format_help() and "quality" in parser.format_help()


@pytest.mark.parametrize("argv", [["nope"], ["quality", "--data", "/no/such/file"], ["kernels", "--threads", "0"],
                                  ["all", "--preset", "gpu", "--chunk", "99"], ["kernels", "--dry-run"],
                                  ["all", "--preset", "cpu", "--chunk", "1"], ["quality", "--data", "SHORT"]])
def test_cli_input_errors_exit_with_one_line(argv, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SystemExit) as exit_info:
        main([str(short) if a == "SHORT" else a for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_preset_without_cuda_is_an_input_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["kernels", "--preset", "gpu"])
    assert exit_info.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_gpu_max_batch_from_two_small_probes_steps_down_on_oom(tmp_path, monkeypatch):
    """throughput-depth's GPU max batch (exercised on the CPU with fake probes): probes at 1/8 and 1/4
    of the model's batch, the line through their memory meets the budget, an OOM at the timed run
    steps the batch down by `tol`."""
    probed = []

    def fake_probe(spec, isolate, ctx=None):
        probed.append(spec["batch"])
        return dict(ok=True, oom=False, memory_bytes=1000 + 10 * spec["batch"], memory_kind="fake", state_bytes=0,
                    error=None)

    def fake_timing(ctx, p, arch, L, budget, batch, capped):
        ok = batch <= 98
        return dict(arch=arch, n_layers=L, batch=batch, step_ms=1.0 if ok else None, error=None if ok else "OOM")

    monkeypatch.setattr(max_batch, "run_probe", fake_probe)
    monkeypatch.setattr(throughput_depth, "time_max_batch", fake_timing)
    ctx = Context("throughput-depth", "tiny", tmp_path)
    cfg = dict(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=1, arch="midpoint", loss_chunk_tokens=16)
    prober = max_batch.Prober(ctx, tmp_path / "probes.csv", cfg, ("2000 B", 2000), isolate=False)
    p = dict(throughput_depth.PRESETS["tiny"], tol=0.02)
    row = throughput_depth._extrapolated_row(ctx, p, "midpoint", 1, ("2000 B", 2000), prober, 100, cap=4096)
    assert probed == [12, 25] and row["batch"] == 98 and row["step_ms"] == 1.0


def test_drift_reports_the_meter_and_exact_mode(tmp_path, capsys, restore_threads):
    """Tiny drift: every point has the float meter (the stack's own measure of the reconstruction error the
    benchmark's round trip finds) and exact mode's columns: meter exactly 0.0, gradients at fp32 rounding level
    against the exact model's reversible=False (fp32 blocks), side bytes only for midpoint_a."""
    assert main(["drift", *TINY, "--out", str(tmp_path)]) == 0
    _check_cli_files("drift", tmp_path, capsys)
    rows = read_csv(tmp_path / "drift.csv")
    assert tuple(rows[0]) == drift.COLUMNS
    assert len(rows) == len(drift.SCHEMES) * len(drift.DTYPES) * len(drift.PRESETS["tiny"]["depths"])
    for r in rows:
        recon, meter = float(r["recon_rel"]), float(r["meter"])
        assert 0 < meter and 0.5 * recon <= meter <= 2 * recon, r
        assert float(r["exact_meter"]) == 0.0, r
        assert (int(r["exact_side_bytes"]) > 0) == (r["scheme"] == "midpoint_a"), r
        assert math.isnan(float(r["bf16_noise"])) == (r["block_dtype"] == "fp32"), r
        if r["block_dtype"] == "fp32":
            assert float(r["exact_grad_rel"]) < 1e-5, r
    md = (tmp_path / "drift.md").read_text()
    assert "exact mode's meter: 0.0 at every measured point" in md and "last_reconstruction_error" in md


def test_drift_remeasures_rows_of_a_csv_without_the_new_columns(tmp_path, restore_threads):
    torch.set_num_threads(1)
    ctx = Context("drift", "tiny", tmp_path, only={"n_layers": (1,)})
    old_columns = ("scheme", "n_layers", "block_dtype", "recon_abs", "recon_rel", "grad_rel", "device", "preset")
    old = dict(scheme="midpoint", n_layers=1, block_dtype="fp32", recon_abs=9.0, recon_rel=9.0, grad_rel=9.0,
               device=ctx.device_name, preset="tiny")
    write_csv(ctx.path("csv"), [old], old_columns)
    md = drift.run(ctx)
    rows = read_csv(ctx.path("csv"))
    assert tuple(rows[0]) == drift.COLUMNS and {r["n_layers"] for r in rows} == {"1"}
    point = [r for r in rows if (r["scheme"], r["block_dtype"]) == ("midpoint", "fp32")]
    assert len(point) == 1 and float(point[0]["recon_rel"]) < 1e-5 and float(point[0]["exact_meter"]) == 0.0
    assert "nan" in md                                  # depth 3 not measured yet


def test_exact_side_bytes_are_measured_and_match_k_bits_per_element_per_layer(tmp_path):
    """Per-layer a = 0.5, -0.75, 1, 129/256 store 1 + 2 + 0 + 8 bits per element: measured on the side
    tensors the forward kept, and reported by the stack."""
    ctx = Context("exact", "tiny", tmp_path)
    p = exact.PRESETS["tiny"]["side"]
    row = exact.measure_side(ctx, p, "mixed", (0.5, -0.75, 1.0, 129 / 256), 4)
    B, T, d = p["batch"], p["shape"]["seq_len"], p["shape"]["d_model"]
    assert row["side_bits"] == 11
    assert row["side_bytes_measured"] == row["side_bytes_reported"] == 11 * B * T * d // 8
    assert row["exact_saved_bytes"] == B * T * d * (8 + 8 + 4)       # two int64 states and the fp32 input
    assert row["autograd_saved_bytes"] > 4 * B * T * d * 4           # at least one fp32 tensor per layer


def test_exact_benchmark_times_both_modes_and_tabulates_side_bits(tmp_path, capsys, restore_threads):
    assert main(["exact", *TINY, "--out", str(tmp_path)]) == 0
    _check_cli_files("exact", tmp_path, capsys)
    md = (tmp_path / "exact.md").read_text()
    steps = read_csv(tmp_path / "exact.csv")
    assert {(r["arch"], r["mode"]) for r in steps} == {(a, m) for a in exact.ARCHS for m in exact.MODES}
    assert all(float(r["step_ms"]) > 0 for r in steps)
    assert all(float(r["exact_vs_float"]) == 1.0 for r in steps if r["mode"] == "float")
    sides = read_csv(tmp_path / "exact-side-bits.csv")
    assert len(sides) == len(exact.A_VALUES) * len(exact.PRESETS["tiny"]["side"]["depths"])
    for r in sides:
        n = int(r["batch"]) * int(r["seq_len"]) * int(r["d_model"])
        assert int(r["side_bytes_measured"]) == int(r["side_bytes_reported"]) == int(r["side_bits"]) * n // 8
        assert (int(r["side_bits"]) == 0) == (r["a"] in ("1", "-1"))
    assert "all three agree at every point" in md and "1.05x" in md


def test_retrofit_tiny_writes_every_row(tmp_path, capsys, restore_threads):
    """`bench retrofit` end to end on a random tiny Llama: a row per form and a, per a="auto" target,
    per timed model, per gradient mode, per alignment evaluation and per generation sample."""
    from revkernels.bench import retrofit
    assert main(["retrofit", *TINY, "--out", str(tmp_path)]) == 0
    _check_cli_files("retrofit", tmp_path, capsys)
    rows = read_csv(tmp_path / "retrofit.csv")
    p = retrofit.PRESETS["tiny"]
    assert tuple(rows[0]) == retrofit.COLUMNS
    by = lambda section: [r for r in rows if r["section"] == section]
    assert len(by("zero-shot")) == len(p["forms"]) * len(p["ks"])
    assert all(math.isfinite(float(r["kl"])) and float(r["kl"]) > -1e-6 for r in by("zero-shot"))   # fp32 rounding
    assert [(r["form"], float(r["target_kl"])) for r in by("auto")] == [
        (form, t) for form in ("compact", "linear") for t in p["targets"]]
    assert {r["model"] for r in by("step")} == {"teacher", "teacher+ckpt", "compact", "linear", "eq4.5-it0",
                                                "eq4.5-it1"}
    assert all(float(r["step_ms"]) > 0 and int(r["act_bytes"]) > 0 for r in by("step"))
    grad = {r["model"]: float(r["grad_err"]) for r in by("grad")}
    assert grad["compact-exact"] < 1e-4        # exact mode: the reversible backward's gradients are exact
    for form, objective in retrofit.ALIGN_RUNS:
        steps = [int(r["step"]) for r in by("align") if r["objective"] == objective and r["form"] == form]
        assert steps == list(range(0, p["align_steps"] + 1, p["eval_every"]))
    assert len(by("generate")) == 6
