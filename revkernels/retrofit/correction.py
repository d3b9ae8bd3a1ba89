"""Fit form="linear"'s corrections g_j(p) = W_j p + b_j to the teacher's states (ridge regression).

The linear form's step differs from the residual teacher's, on the teacher's states h, by

    a_j (g_j(h[j]) - (h[j] - h[j-1]))                                        (core.py, form="linear")

so each g_j is the least-squares predictor of the previous update u = h[j] - h[j-1] from h[j]: with the
rows x = [h[j], 1] and targets u over every calibration token,

    [W_j^T; b_j^T] = argmin_B |X B - U|^2 + lam |B|^2,   lam = ridge * mean(diag(X^T X))

solved in float64 from the accumulated X^T X and X^T U (one pass over the batches, memory d^2 per layer).
The ridge term is relative, so it does not depend on the states' scale. The states come from the student's
own weights run as the residual teacher (RetrofitStack.teacher_states), so a student that was aligned
since its retrofit gets a fit for its current blocks. The fit does not depend on a.

On SmolLM2-135M (fitted on 8,192 docstring tokens, ridge 1e-2, held-out KL at uniform a = 2^-k): k = 1 / 2
/ 3 / 4 give 0.25 / 0.086 / 0.027 / 0.0076, against 2.48 / 0.40 / 0.086 / 0.021 for the compact form; the
held-out residual |U - X B|^2 / |U|^2 is 0.08-0.46 per layer. A rank-128 truncation kept less than half the
gain (0.34 / 0.13 / 0.047 / 0.015), so W_j is full d x d.

The ridge, 1e-2, is the best of 1e-3 / 1e-2 / 3e-2 / 1e-1 (k = 1 on 4,096 tokens: 0.55 / 0.32 / 0.33 /
0.44); a smaller ridge lowers the in-sample residual and raises the KL, as does a per-feature ridge
(lam_i = ridge * (X^T X)_ii: 0.84 at 1e-2, 0.35 at 3e-1), which lets W_j amplify the student's small
channels. Richer inputs lowered the in-sample residual without lowering the held-out KL (k = 1 / 2 / 3 on
4,096 tokens, against 0.32 / 0.097 / 0.029 for [h, 1]): [h, f_j(h), 1], free since f_j(p) is computed anyway,
0.31 / 0.098 / 0.030; the attention and MLP outputs apart, 0.34 / 0.10 / 0.031; [h, the previous token's h,
1], 0.31 / 0.099 / 0.031; [h, the prefix mean of h, 1], 0.50 / 0.12 / 0.033. Only the previous block's update
helped: [h, f_{j-1}(h), 1], 0.23 / 0.067 / 0.020 (about 0.25 bit), at eq. 4.5's price of a second block call
per layer; f_{j-1}(h) alone, without h, diverged (3.6 at k = 1). So g_j stays one linear map of p.

Fitting on the student's own corrected states (layer by layer, g_1..g_{j-1} already fitted) instead of the
teacher's did not help: with the teacher's update h[j] - h[j-1] as target, 0.325 / 0.096 at k = 1 / 2; with
the target that returns p[j+1] to the teacher's h[j+1], 0.41 / 0.13 / 0.040 at k = 1 / 2 / 3, worse. The fit
is domain-specific: on licence text (GPL-3) the same fit gives 0.64 / 0.28 / 0.10 against compact's 3.27 /
0.63 / 0.19, a smaller lead than on held-out docstrings; calibrate on text like the text the model will see.

Why every per-token variant stops at the same place: u is not recoverable from h[j]. On 1,024 held-out
tokens the linear fit leaves |U - XB|^2 / |U|^2 = 0.4-0.7 in layers 4-8 and 13-24, mostly in the MLP part of
u (the attention part alone leaves 0.1-0.3). Adding the previous layer's own MLP evaluated at h[j] as an
input, the function that produced that part though at the state after it, lowers those to 0.25-0.6 only; a
second step of the fixed-point inversion x = h[j] - mlp(x) to 0.24-0.6: it does not converge.
"""
import math
from typing import Sequence

import torch

from .align import model_logits
from .core import retrofit_stack


@torch.no_grad()
def fit_correction(student, batches: Sequence[torch.Tensor], ridge: float = 1e-2) -> dict:
    """Fit every g_j of a form="linear" student by ridge regression on `batches` ((B, T) token ids or a
    list of such tensors; the more tokens beyond d the better: a few thousand for d = 576) and set
    them in place. Returns {'tokens', 'residual': [|U - X B|^2 / |U|^2 per layer j = 1..L-1]} (in-sample).
    ValueError for a student of another form, ridge <= 0 or no tokens."""
    stack = retrofit_stack(student)
    if stack.form != "linear":
        raise ValueError(f"fit_correction needs a form='linear' student, this one is form={stack.form!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a positive finite number, got {ridge!r}")
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    batches = list(batches)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() != 2 or b.is_floating_point() or
                          b.numel() == 0 for b in batches):
        raise ValueError("batches must be a non-empty list of (B, T) integer token id tensors")
    n_layers, d = len(stack.updates), stack.width
    xtx = torch.zeros(n_layers - 1, d + 1, d + 1, dtype=torch.float64)
    xtu = torch.zeros(n_layers - 1, d + 1, d, dtype=torch.float64)
    utu = torch.zeros(n_layers - 1, dtype=torch.float64)
    tokens = 0
    training = student.training
    student.eval()                       # dropout off: the fit sees the teacher's deterministic states
    try:
        with stack.teacher_states() as recorded:
            for ids in batches:
                recorded.clear()
                model_logits(student, ids.to(stack.a.device))
                states = recorded[-1]
                for j in range(1, n_layers):
                    x = states[j].reshape(-1, d).double().cpu()
                    u = (states[j] - states[j - 1]).reshape(-1, d).double().cpu()
                    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
                    xtx[j - 1] += xa.T @ xa
                    xtu[j - 1] += xa.T @ u
                    utu[j - 1] += (u * u).sum()
                tokens += states[0].reshape(-1, d).shape[0]
    finally:
        student.train(training)
    residual = []
    eye = torch.eye(d + 1, dtype=torch.float64)
    for j in range(1, n_layers):
        g = xtx[j - 1]
        coef = torch.linalg.solve(g + ridge * g.diagonal().mean() * eye, xtu[j - 1])      # (d + 1, d)
        # |U - XB|^2 = U^T U - 2 tr(B^T X^T U) + tr(B^T X^T X B)
        err = utu[j - 1] - 2 * (coef * xtu[j - 1]).sum() + (coef * (g @ coef)).sum()
        residual.append(float(err / utu[j - 1].clamp_min(1e-300)))
        lin = stack.corrections[j - 1]
        lin.weight.copy_(coef[:d].T.to(lin.weight.dtype))
        lin.bias.copy_(coef[d].to(lin.bias.dtype))
    return {"tokens": tokens, "residual": residual}
