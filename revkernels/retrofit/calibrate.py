"""a="auto": per-layer dyadic a_j = s 2^-k_j (a common sign s = +-1) with the fewest side bits that meet
a KL target.

Exact mode stores k_j bits per element per layer of side information for a_j = +-2^-k_j (a_j = +-1 costs
nothing), and the student converges to its teacher like a^2. Given calibration token ids, choose k_j in
0..max_k to minimise the mean side bits (1/L) sum_j k_j subject to

    KL(teacher || student) <= target_kl        (mean over the calibration tokens, eq. 4.6)

1. Teacher log-probabilities once.
2. Per-layer sensitivity: the KL with only layer j at a_j = 2^-k (k in probe_k), every other layer at
   the finest a = 2^-max_k, minus the KL with every layer at 2^-max_k. Between probes log KL_j(k) is
   interpolated linearly in k; past the last probe it falls like a^2 (x 1/4 per bit), and before the
   first it rises at least like a^2.
3. The additive model KL ~ sum_j KL_j(k_j) orders one-bit increments greedily (the largest predicted
   KL reduction per bit first); prefix n of that order is a configuration with n bits in all.
4. Verify with real forwards: search the smallest prefix n whose measured KL meets the target
   (start at the model's answer, bracket by doubling/halving the model's target, then bisect), so the
   result never rests on the model alone.
Steps 2-4 run once per sign s (probes at s 2^-k); the sign needing fewer bits is kept.

Every forward runs under no_grad with the stack's `reversible` switched off (ordinary autograd's
forward, no side information); the stack is left with the chosen a (and its own `reversible`).
"""
import math
import warnings
from typing import Iterable, Optional, Sequence

import torch

from .align import model_logits
from .core import retrofit_stack

_TINY = 1e-12


def _as_batches(batches) -> list:
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise ValueError("calibration is empty: pass (B, T) token ids or a list of such batches")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.is_floating_point():
            raise TypeError("calibration must be (B, T) integer token ids or a list of such tensors, got "
                            f"{type(b).__name__}{'' if not isinstance(b, torch.Tensor) else tuple(b.shape)}")
    return batches


class _KLProbe:
    """KL(teacher || student) on the calibration batches for a given per-layer a (teacher once)."""

    def __init__(self, student, teacher, batches, device):
        self.student, self.stack, self.device = student, retrofit_stack(student), device
        self.batches = [b.to(device) for b in batches]
        with torch.no_grad():
            self.teacher_logp = [torch.log_softmax(model_logits(teacher, b).float(), -1) for b in self.batches]
        self.n_evals = 0

    @torch.no_grad()
    def __call__(self, a: Sequence[float]) -> float:
        self.stack.set_a(list(a))
        total = 0.0
        for ids, log_t in zip(self.batches, self.teacher_logp):
            log_s = torch.log_softmax(model_logits(self.student, ids).float(), -1)
            total += float((log_t.exp() * (log_t - log_s)).sum(-1).mean())
        self.n_evals += 1
        return total / len(self.batches)


def layer_sensitivity(probe: _KLProbe, n_layers: int, probe_k: Sequence[int], max_k: int, sign: int = 1) -> dict:
    """{'baseline', 'sign', 'kl': {k: [KL_j(k) for each layer j]}} for k in probe_k: the KL with layer j at
    a_j = sign 2^-k and the others at sign 2^-max_k, the baseline (every layer at sign 2^-max_k) removed."""
    fine = [sign * 2.0 ** -max_k] * n_layers
    base = probe(fine)
    table = {}
    for k in probe_k:
        row = []
        for j in range(n_layers):
            a = list(fine)
            a[j] = sign * 2.0 ** -k
            row.append(max(probe(a) - base, 0.0))
        table[k] = row
    return {"baseline": base, "kl": table, "sign": sign}


def _layer_curve(points: dict, max_k: int) -> list:
    """KL_j(k) for k = 0..max_k from the probed {k: KL} (log-linear between probes, a^2 outside)."""
    ks = sorted(points)
    logs = {k: math.log(max(points[k], _TINY)) for k in ks}
    slope4 = math.log(4.0)
    first_slope = slope4
    if len(ks) > 1:
        first_slope = max(slope4, (logs[ks[0]] - logs[ks[1]]) / (ks[1] - ks[0]))
    curve = []
    for k in range(max_k + 1):
        if k <= ks[0]:
            v = logs[ks[0]] + first_slope * (ks[0] - k)
        elif k >= ks[-1]:
            v = logs[ks[-1]] - slope4 * (k - ks[-1])
        else:
            lo = max(p for p in ks if p <= k)
            hi = min(p for p in ks if p >= k)
            v = logs[lo] if hi == lo else logs[lo] + (logs[hi] - logs[lo]) * (k - lo) / (hi - lo)
        curve.append(math.exp(v) if math.exp(v) > _TINY else 0.0)
    return curve


def greedy_order(curves: list, max_k: int) -> list:
    """Layer indices in the order their bits are added: each step raises k_j of the layer with the
    largest predicted KL reduction curves[j][k_j] - curves[j][k_j + 1] (ties: the lower layer)."""
    k = [0] * len(curves)
    order = []
    for _ in range(len(curves) * max_k):
        gains = [(curves[j][k[j]] - curves[j][k[j] + 1]) if k[j] < max_k else -math.inf
                 for j in range(len(curves))]
        j = max(range(len(curves)), key=lambda i: (gains[i], -i))
        order.append(j)
        k[j] += 1
    return order


def _prefix_k(order, n, n_layers):
    k = [0] * n_layers
    for j in order[:n]:
        k[j] += 1
    return k


def _search(probe: _KLProbe, sensitivity: dict, n_layers: int, max_k: int, target_kl: float, max_evals: int):
    """(k per layer, measured KL, met) for one sign: steps 3 and 4 of the module docstring."""
    sign = sensitivity.get("sign", 1)
    curves = [_layer_curve({k: sensitivity["kl"][k][j] for k in sensitivity["kl"]}, max_k)
              for j in range(n_layers)]
    order = greedy_order(curves, max_k)
    predicted = [sum(c[0] for c in curves)]
    for j, kk in zip(order, _running_k(order, n_layers)):
        predicted.append(predicted[-1] - (curves[j][kk] - curves[j][kk + 1]))
    base = sensitivity["baseline"]

    def n_for(target):          # fewest bits the model predicts meet `target`
        goal = target - base
        return next((n for n, p in enumerate(predicted) if p <= goal), len(order))

    measured = {}

    def kl_at(n):
        if n not in measured:
            measured[n] = probe([sign * 2.0 ** -k for k in _prefix_k(order, n, n_layers)])
        return measured[n]

    n_top, step = len(order), max(1, n_layers // 2)      # step: half a mean bit
    lo, hi = -1, None     # lo: the largest n measured to miss the target; hi: the smallest to meet it
    n, scale = n_for(target_kl), 1.0
    while len(measured) < max_evals:
        if kl_at(n) <= target_kl:
            hi = n
        else:
            lo = n
        if (hi is not None and hi - lo <= 1) or (hi is None and lo == n_top):
            break
        if hi is None:        # every measured n misses: the model's answer for a tighter target
            scale /= 2.0
            n = min(n_top, max(n_for(target_kl * scale), lo + step))
        elif lo < 0:          # every measured n meets it: the model's answer for a looser target
            scale *= 2.0
            n = max(0, min(n_for(target_kl * scale), hi - step))
        else:                 # bracketed: bisect
            n = (lo + hi) // 2
    n = n_top if hi is None else hi
    kl = kl_at(n)
    return _prefix_k(order, n, n_layers), kl, kl <= target_kl


def calibrate_a(student, teacher, batches, target_kl: float = 0.01, *, probe_k: Sequence[int] = (1, 3),
                max_k: int = 8, signs: Sequence[int] = (1, -1), sensitivity: Optional[dict] = None,
                max_evals: int = 12) -> dict:
    """Choose a_j = s 2^-k_j per layer (fewest mean side bits with KL <= target_kl on `batches`) and set it.

    student: a retrofitted model (its RetrofitStack gets `set_a`); teacher: the residual model it was
    retrofitted from; batches: (B, T) token ids or a list of such tensors (the calibration data).
    probe_k: the k at which each layer's sensitivity is measured (len(probe_k) * L + 1 forwards per
    sign). signs: the common sign s of every a_j is tried in turn and the one needing fewer bits kept
    (then the lower KL): beyond the leading a^2 term the sign matters, on SmolLM2 uniform a = -2^-k gave
    KL 0.18 / 0.052 / 0.014 at k = 2 / 3 / 4 against 0.45 / 0.081 / 0.018 for +2^-k (per-layer signs from
    single-layer probes measured worse than either). `sensitivity` (the 'sensitivity' entry of an
    earlier result on the same student, teacher and batches) skips the probes and fixes the sign.
    max_evals: verification forwards at most, per sign.

    Returns {'a': per-layer list, 'k': per-layer bits, 'mean_bits', 'kl' (measured on `batches` with
    the chosen a), 'target_kl', 'met' (False, with a warning, when even k_j = max_k everywhere misses
    the target: a is then s 2^-max_k everywhere), 'evals' (forwards), 'sensitivity'}.
    """
    if isinstance(target_kl, bool) or not isinstance(target_kl, (int, float)) or not (
            math.isfinite(target_kl) and target_kl > 0):
        raise ValueError(f"target_kl must be a positive finite number, got {target_kl!r}")
    if isinstance(max_k, bool) or not isinstance(max_k, int) or not 1 <= max_k <= 8:
        raise ValueError(f"max_k must be an int in 1..8 (exact mode's a = 2^-k has k <= 8), got {max_k!r}")
    probe_k = sorted(set(probe_k))
    if not probe_k or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < max_k for k in probe_k):
        raise ValueError(f"probe_k must be ints in 0..max_k-1 = 0..{max_k - 1}, got {probe_k!r}")
    if not signs or any(sg not in (1, -1) for sg in signs):
        raise ValueError(f"signs must be a non-empty sequence of 1 and -1, got {signs!r}")
    batches = _as_batches(batches)
    stack = retrofit_stack(student)
    n_layers = len(stack.updates)
    device = stack.a.device
    was_reversible = stack.reversible
    stack.reversible = False
    try:
        probe = _KLProbe(student, teacher, batches, device)
        tables = [sensitivity] if sensitivity is not None else \
            [layer_sensitivity(probe, n_layers, probe_k, max_k, sg) for sg in signs]
        found = [(_search(probe, t, n_layers, max_k, target_kl, max_evals), t) for t in tables]
        (k, kl, met), sensitivity = min(found, key=lambda r: (not r[0][2], sum(r[0][0]), r[0][1]))
        sign = sensitivity.get("sign", 1)
        a = [sign * 2.0 ** -kk for kk in k]
        if not met:
            warnings.warn(f"a='auto': target_kl={target_kl} is not met even with |a| = 2^-{max_k} in every "
                          f"layer (KL {kl:.3g} on the calibration data); |a| = 2^-{max_k} everywhere is used",
                          UserWarning, stacklevel=2)
        stack.set_a(a)
    finally:
        stack.reversible = was_reversible
    return {"a": a, "k": k, "mean_bits": sum(k) / n_layers, "kl": kl, "target_kl": float(target_kl), "met": met,
            "evals": probe.n_evals, "sensitivity": sensitivity}


def _running_k(order, n_layers):
    """k_j of the layer being raised, before each step of `order`."""
    k = [0] * n_layers
    for j in order:
        yield k[j]
        k[j] += 1
