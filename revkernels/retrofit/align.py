"""Aligning a retrofitted student to its frozen teacher: the KL loss of eq. 4.6 and a fine-tuning loop."""
import itertools
import json
import time
from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


def retrofit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reverse: bool = False,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 4.6: mean over tokens of KL(teacher || student), from logits (..., V), computed in fp32.

    reverse=True gives KL(student || teacher). mask (...,), optional: average only over tokens where
    it is true (e.g. the attention mask of a padded batch). Gradients flow to whichever logits
    require them (the teacher's are normally computed under no_grad).
    """
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("student_logits and teacher_logits must be tensors")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has "
                         f"shape {tuple(teacher_logits.shape)}")
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise TypeError("logits must be floating point")
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if reverse:
        log_s, log_t = log_t, log_s
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)          # per token
    if mask is None:
        return kl.mean()
    if mask.shape != kl.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(kl.shape)}")
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def model_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """Logits of a Hugging Face causal LM (`.logits`) or of a revkernels GPT ((logits, loss))."""
    if attention_mask is not None:
        out = model(input_ids, attention_mask=attention_mask)
    else:
        out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple):
        return out[0]
    return out


def _split(batch):
    if isinstance(batch, dict):
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


@torch.no_grad()
def evaluate_kl(student, teacher, batches: Iterable, reverse: bool = False, device=None) -> float:
    """Mean retrofit_kl over `batches` (token-id tensors, (ids, mask) pairs or dicts)."""
    total, n = 0.0, 0
    for batch in batches:
        ids, mask = _split(batch)
        ids = ids.to(device) if device is not None else ids
        mask = mask.to(device) if (mask is not None and device is not None) else mask
        kl = retrofit_kl(model_logits(student, ids, mask), model_logits(teacher, ids, mask), reverse,
                         None if mask is None else mask.bool())
        total, n = total + float(kl), n + 1
    return total / max(n, 1)


OBJECTIVES = ("auto", "state", "kl")


def default_objective(student: nn.Module) -> str:
    """align()'s objective='auto': 'kl' for a form="linear" student or a model that is not retrofitted,
    'state' for the other forms."""
    from .core import find_retrofit_stack
    stack = find_retrofit_stack(student)
    return "kl" if stack is None or stack.form == "linear" else "state"


class _StudentStates:
    """Forward pre-hooks on the stack's updates recording p[j], the input of f_j's first call in each
    forward (in both forms f_j(p[j]) is the first call of update j; eq. 4.5 calls it again inside
    F_{j+1})."""

    def __init__(self, stack):
        self.states = {}
        self.handles = [u.register_forward_pre_hook(self._hook(j)) for j, u in enumerate(stack.updates)]

    def _hook(self, j):
        def hook(module, args):
            self.states.setdefault(j, args[0])
        return hook

    def take(self):
        states, self.states = self.states, {}
        return [states[j] for j in sorted(states)]

    def remove(self):
        for h in self.handles:
            h.remove()


def teacher_states(teacher, ids, mask, n_layers):
    """(logits, [h[0], ..., h[L-1]]): the teacher's logits and the inputs of its L layers.

    Hugging Face models: `output_hidden_states` (entry j < L is layer j's input); revkernels GPTs with
    a ResidualStack body: forward pre-hooks on its blocks. Other teachers: ValueError."""
    if hasattr(teacher, "config") and hasattr(teacher.config, "output_hidden_states"):
        kwargs = {"attention_mask": mask} if mask is not None else {}
        out = teacher(ids, output_hidden_states=True, **kwargs)
        states = list(out.hidden_states[:n_layers])
        return out.logits, states
    body = getattr(teacher, "body", None)
    blocks = getattr(body, "blocks", None)
    if blocks is None or len(blocks) != n_layers:
        raise ValueError(f"objective='state' needs the teacher's per-layer inputs: {type(teacher).__name__} is "
                         "neither a Hugging Face model nor a revkernels GPT with a residual body of "
                         f"{n_layers} blocks; use objective='kl'")
    states = {}
    handles = [b.register_forward_pre_hook(lambda m, args, j=j: states.setdefault(j, args[0]))
               for j, b in enumerate(blocks)]
    try:
        logits = model_logits(teacher, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return logits, [states[j] for j in range(n_layers)]


def state_loss(student_states, teacher_states, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over layers j >= 1 of the relative squared error sum (p[j] - h[j])^2 / sum h[j]^2 (fp32;
    layer 0's input is the embedding in both models); mask (B, T) restricts the sums to its tokens."""
    terms = []
    for p, h in list(zip(student_states, teacher_states))[1:]:
        err, ref = (p.float() - h.float()).pow(2).sum(-1), h.float().pow(2).sum(-1)
        if mask is not None:
            err, ref = err * mask, ref * mask
        terms.append(err.sum() / ref.sum().clamp_min(1e-30))
    if not terms:
        return torch.zeros((), device=teacher_states[0].device)
    return torch.stack(terms).mean()


def align(student: nn.Module, teacher: nn.Module, batches: Iterable, steps: Optional[int] = None,
          lr: float = 1e-4, *, objective: str = "auto", state_weight: float = 1.0,
          optimizer: Optional[torch.optim.Optimizer] = None, weight_decay: float = 0.0,
          grad_clip: Optional[float] = 1.0, reverse: bool = False, device=None, progress: bool = True,
          log_every: int = 1, log_path: Optional[str] = None) -> List[dict]:
    """Fine-tune `student` to match the frozen `teacher`.

    objective='state': layer-wise state matching plus eq. 4.6,

        loss = KL(teacher || student) + state_weight * mean_{j>=1} |p[j] - h[j]|^2 / |h[j]|^2,

    where p[j] is the student's state entering update j and h[j] the teacher's hidden state entering
    layer j (see `teacher_states`): every layer gets a direct target instead of only the final
    logits. The student states are read by forward pre-hooks, so the stack runs with `reversible`
    switched off while aligning (restored afterwards): this objective stores activations like
    ordinary training. objective='kl': eq. 4.6 alone, through the student's own (reversible)
    backward. The returned log's 'kl' is the KL term in both cases. objective='auto' (the default) takes
    the one measured best for the student (README, SmolLM2 from a = 0.5, 100 steps of 2 x 128 tokens):
    'kl' for a form="linear" student (0.234, where state matching raised its KL) and for a model that is
    not retrofitted, 'state' otherwise (compact: 0.360 against eq. 4.6's 0.378, with cheaper steps;
    eq4.5 after 30 steps: 0.413 against 0.450).

    batches: an iterable of token-id tensors (B, T), (ids, attention_mask) pairs or dicts with
    'input_ids' (and 'attention_mask'); it is cycled when `steps` exceeds its length (steps=None: one
    pass). The teacher runs under no_grad; the student's parameters that require grad are trained with
    AdamW(lr, weight_decay) unless `optimizer` is given. Train/eval modes are left as the caller set them
    (eval disables dropout, the usual choice for alignment). Returns the log, one dict per logged step
    {'step', 'kl', 'loss', 'grad_norm', 'seconds'}; `log_path` also writes it as JSON lines; `progress`
    shows a tqdm bar.
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "auto":
        objective = default_objective(student)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("student has no parameter that requires grad")
    if steps is None:
        try:
            steps = len(batches)
        except TypeError:
            raise ValueError("steps is required when batches has no len()") from None
        source = iter(batches)
    else:
        source = itertools.cycle(batches) if isinstance(batches, (list, tuple)) else iter(batches)
    stack = recorder = None
    if objective == "state":
        from .core import retrofit_stack
        stack = retrofit_stack(student)
        was_reversible, stack.reversible = stack.reversible, False
        recorder = _StudentStates(stack)
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="align", unit="step")
    log, sink = [], open(log_path, "w") if log_path else None
    t0 = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            try:
                ids, mask = _split(next(source))
            except StopIteration:
                break
            if device is not None:
                ids = ids.to(device)
                mask = mask.to(device) if mask is not None else None
            bmask = None if mask is None else mask.bool()
            with torch.no_grad():
                if recorder is None:
                    t_logits = model_logits(teacher, ids, mask)
                else:
                    t_logits, t_states = teacher_states(teacher, ids, mask, len(stack.updates))
            kl_loss = retrofit_kl(model_logits(student, ids, mask), t_logits, reverse, bmask)
            loss = kl_loss
            if recorder is not None:
                loss = loss + state_weight * state_loss(recorder.take(), t_states,
                                                        None if mask is None else mask.float())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the alignment loss is {float(loss)} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip
                     else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
            optimizer.step()
            kl = kl_loss.item()
            if step % log_every == 0 or step == steps:
                rec = {"step": step, "kl": kl, "loss": loss.item(), "grad_norm": float(gnorm),
                       "seconds": time.perf_counter() - t0}
                log.append(rec)
                if sink:
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{kl:.4g}")
    finally:
        if recorder is not None:
            recorder.remove()
            stack.reversible = was_reversible
        if bar is not None:
            bar.close()
        if sink:
            sink.close()
    return log
