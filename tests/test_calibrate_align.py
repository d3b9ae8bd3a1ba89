"""a="auto" (retrofit/calibrate.py) and align()'s objectives (retrofit/align.py), on the real checkpoint
(the session fixture `smollm2`, short sequences) and on a random tiny Llama."""
import math

import pytest
import torch

import revkernels as rk
from revkernels.bench.text import stdlib_docstrings, token_windows
from revkernels.retrofit import align, evaluate_kl, retrofit_stack
from revkernels.retrofit.calibrate import _layer_curve, calibrate_a, greedy_order

pytestmark = pytest.mark.usefixtures("fallback_ops")   # conftest: the model is the subject, not the kernels


@pytest.fixture(scope="module")
def text():
    return stdlib_docstrings(min_chars=20_000)


def _student(teacher, a):
    student = rk.retrofit(teacher, a=a)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _held_out_kl(student, teacher, batches):
    """KL through the student's own configured forward (exact, reversible), not calibrate's probe."""
    return evaluate_kl(student, teacher, batches)


def test_layer_curve_interpolates_log_linearly_and_falls_like_a_squared_outside():
    curve = _layer_curve({1: 1e-1, 3: 1e-3}, 5)
    assert curve[1] == pytest.approx(1e-1) and curve[3] == pytest.approx(1e-3)
    assert curve[2] == pytest.approx(1e-2)                 # log-linear between the probes
    assert curve[4] == pytest.approx(1e-3 / 4) and curve[5] == pytest.approx(1e-3 / 16)   # a^2 past the last
    assert curve[0] == pytest.approx(1.0)                   # the probes' slope (10x/bit >= 4x) before the first


def test_greedy_order_spends_bits_where_the_predicted_kl_falls_most():
    curves = [[0.0] * 4, [1.0, 0.25, 0.0625, 0.015625], [0.1, 0.025, 0.00625, 0.0015625]]
    order = greedy_order(curves, 3)
    assert order[:3] == [1, 1, 2]            # gains 0.75, 0.1875, then layer 2's 0.075 beats layer 1's 0.047
    assert sorted(order) == [0] * 3 + [1] * 3 + [2] * 3


def test_auto_meets_its_target_on_the_calibration_batch_and_records_a_per_layer(smollm2, text):
    teacher, tok = smollm2
    cal = token_windows(tok, text[0], 1, 32, 1)
    student = rk.retrofit(teacher, a=0.5)
    stack = retrofit_stack(student)
    target = 0.05
    r = calibrate_a(student, teacher, cal, target, probe_k=(2,))
    assert r["met"] and r["kl"] <= target
    # an independent measurement through the configured student (exact, reversible forward) agrees
    assert _held_out_kl(student, teacher, cal) <= target * (1 + 1e-3)   # exact grid rounding of the states
    assert len(r["a"]) == len(stack.updates) == 30
    assert stack.a.tolist() == r["a"] and stack.config_record()["a"] == r["a"]
    sign = r["sensitivity"]["sign"]
    assert sign in (1, -1) and all(a == sign * 2.0 ** -k for a, k in zip(r["a"], r["k"]))
    assert stack.mean_side_bits() == pytest.approx(r["mean_bits"])
    assert r["k"][0] == 0                   # p[-1] = p[0]: layer 0's a changes nothing, so it costs no bit
    assert len(set(r["k"])) > 1             # per layer, not uniform
    # a tighter target (the same sensitivities, so only verification forwards) needs more bits and meets it
    tight = calibrate_a(student, teacher, cal, target / 4, sensitivity=r["sensitivity"])
    assert tight["met"] and tight["kl"] <= target / 4 and tight["mean_bits"] > r["mean_bits"]
    assert tight["evals"] <= 12 and tight["sensitivity"]["sign"] == sign


def test_retrofit_auto_through_the_public_call_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    teacher = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    uniform = evaluate_kl(rk.retrofit(teacher, a=0.5), teacher, [ids])
    target = uniform / 10
    student = rk.retrofit(teacher, a="auto", calibration=ids, target_kl=target)
    stack = retrofit_stack(student)
    assert evaluate_kl(student, teacher, [ids]) <= target * (1 + 1e-3)
    assert stack.exact and stack.mean_side_bits() > 0
    assert stack.config_record()["a"] == stack.a.tolist()
    with pytest.raises(ValueError, match="target_kl"):
        calibrate_a(student, teacher, ids, 0.0)
    with pytest.raises(TypeError, match="calibration"):
        calibrate_a(student, teacher, ids.float(), 0.1)


@pytest.mark.parametrize("objective", ["state", "kl"])
def test_a_short_align_lowers_held_out_kl(smollm2, text, objective):
    teacher, tok = smollm2
    train = token_windows(tok, text[0], 1, 32, 3)
    held = token_windows(tok, text[1], 1, 32, 1)
    student = _student(teacher, 0.5)
    stack = retrofit_stack(student)
    before = _held_out_kl(student, teacher, held)
    log = align(student, teacher, train, steps=3, lr=1e-4, objective=objective, progress=False)
    after = _held_out_kl(student, teacher, held)
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["kl"]) for r in log)
    assert after < 0.9 * before, (before, after)
    assert stack.reversible                                  # switched back after the state objective
    assert all(not u._forward_pre_hooks for u in stack.updates)   # its hooks are removed


def test_align_refuses_an_unknown_objective(smollm2):
    teacher, _ = smollm2
    with pytest.raises(ValueError, match="objective"):
        align(teacher, teacher, [torch.zeros(1, 4, dtype=torch.long)], steps=1, objective="mse")
