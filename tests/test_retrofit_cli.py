"""`python -m revkernels.retrofit`: --help states every option's default, bad input is one line and a
non-zero exit (no traceback), a shortened --seq-len is announced. Models are tiny and random."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from revkernels.retrofit.__main__ import build_parser, main

V = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 2-layer GPT-2 (64 positions, vocab 128) saved where from_pretrained reads it."""
    tr = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    return path


def tokens_file(tmp_path, n=300, vocab=V):
    path = tmp_path / "ids.txt"
    path.write_text(" ".join(str(i % vocab) for i in range(n)))
    return path


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "revkernels.retrofit", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_states_every_default():
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help"
        assert "default" in action.help or action.required, f"{action.option_strings}: no default stated"
    text = parser.format_help()
    for option in ("--model", "--out", "--a", "--iterations", "--steps", "--lr", "--data", "--seq-len", "--device"):
        assert option in text
    assert "(default: 200)" in " ".join(text.split())          # %(default)s is filled in


def test_help_runs_as_a_command():
    res = run_cli("--help")
    assert res.returncode == 0 and "--seq-len" in res.stdout and res.stderr == ""


@pytest.mark.parametrize("make_args, status, match", [
    (lambda d, tmp: ["--a", "abc"], 2, "argument --a: expected a number"),
    (lambda d, tmp: ["--data", tmp / "missing.txt"], 1, "no such file"),
])
def test_bad_input_is_one_line_without_traceback(teacher_dir, tmp_path, make_args, status, match):
    res = run_cli("--model", teacher_dir, "--out", tmp_path / "out", "--steps", "1", "--no-progress",
                  *make_args(teacher_dir, tmp_path))
    assert res.returncode == status
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and match in lines[0], res.stderr
    assert not (tmp_path / "out").exists()                    # refused before anything is written


def _bad_npy(tmp):
    np.save(tmp / "ids.npy", np.linspace(0, 1, 50))
    return tmp / "ids.npy"


def _bad_pt(tmp):
    (tmp / "ids.pt").write_bytes(b"not a tensor")
    return tmp / "ids.pt"


@pytest.mark.parametrize("make_args, match", [
    (lambda d, tmp: ["--data", tokens_file(tmp).with_name("nope.txt")], "no such file"),
    (lambda d, tmp: ["--data", (tmp / "w.txt", (tmp / "w.txt").write_text("1 2 three"))[0]], "'three'"),
    (lambda d, tmp: ["--data", _bad_npy(tmp)], "integer token ids"),
    (lambda d, tmp: ["--data", _bad_pt(tmp)], "ids.pt"),
    (lambda d, tmp: ["--data", tokens_file(tmp, n=5), "--seq-len", "16"], "fewer than seq_len"),
    (lambda d, tmp: ["--data", tokens_file(tmp, vocab=1000)], r"\[0, 128\)"),
    (lambda d, tmp: ["--a", "0.5", "0.5", "0.5"], "per-layer"),
    (lambda d, tmp: ["--iterations", "1"], "form='compact'"),                 # compact has no iterations
    (lambda d, tmp: ["--a", "0.3"], "nearest allowed value is 0.30078125"),   # exact mode: dyadic a
    (lambda d, tmp: ["--a", "0.01", "--float"], "exact=True"),               # 100^2 > 1e3: refused
    (lambda d, tmp: ["--model", tmp], "cannot load"),
    (lambda d, tmp: ["--model", tmp / "nowhere"], "not a local directory"),
    (lambda d, tmp: ["--out", tokens_file(tmp)], "not a directory"),
])
def test_input_errors_exit_with_one_line(teacher_dir, tmp_path, make_args, match):
    args = ["--model", teacher_dir, "--out", tmp_path / "out", "--steps", "1", "--seq-len", "8", "--no-progress"]
    args += make_args(teacher_dir, tmp_path)                    # later options override earlier ones
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    msg = info.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg
    assert re.search(match, msg), msg


def test_shortened_seq_len_is_announced(teacher_dir, tmp_path, capsys):
    out = tmp_path / "out"
    summary = main(["--model", str(teacher_dir), "--out", str(out), "--steps", "1", "--batch-size", "1",
                    "--eval-batches", "1", "--seq-len", "100", "--data", str(tokens_file(tmp_path)),
                    "--no-progress"])
    err = capsys.readouterr().err
    assert "--seq-len 100 exceeds the model's max_position_embeddings=64; using --seq-len 64" in err
    assert summary["seq_len"] == 64 and json.loads((out / "retrofit.json").read_text())["seq_len"] == 64


def test_linear_form_fits_on_the_training_batches_and_reloads(teacher_dir, tmp_path):
    """--form linear fits its corrections on the first training batches (nonzero afterwards), aligns,
    and saves a checkpoint that from_pretrained rebuilds with the same corrections."""
    import revkernels as rk
    from revkernels.retrofit import retrofit_stack
    out = tmp_path / "out"
    summary = main(["--model", str(teacher_dir), "--out", str(out), "--form", "linear", "--a", "0.25", "--steps",
                    "2", "--batch-size", "4", "--seq-len", "16", "--eval-batches", "1", "--no-progress"])
    assert summary["form"] == "linear" and summary["kl_after"] >= 0
    stack = retrofit_stack(rk.retrofit.from_pretrained(out))
    assert stack.form == "linear" and all(float(g.weight.detach().abs().max()) > 0 for g in stack.corrections)
