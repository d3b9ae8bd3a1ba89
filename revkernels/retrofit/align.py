"""Aligning a retrofitted student to its frozen teacher: the KL loss of eq. 4.6 and a fine-tuning loop."""
import itertools
import json
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


def align(student: nn.Module, teacher: nn.Module, batches: Iterable, steps: Optional[int] = None,
          lr: float = 3e-5, *, optimizer: Optional[torch.optim.Optimizer] = None, weight_decay: float = 0.0,
          grad_clip: Optional[float] = 1.0, reverse: bool = False, device=None, progress: bool = True,
          log_every: int = 1, log_path: Optional[str] = None) -> List[dict]:
    """Fine-tune `student` to match the frozen `teacher` with the retrofit KL (eq. 4.6).

    batches: an iterable of token-id tensors (B, T), (ids, attention_mask) pairs or dicts with
    'input_ids' (and 'attention_mask'); it is cycled when `steps` exceeds its length (steps=None: one
    pass). The teacher runs under no_grad; the student's parameters that require grad are trained with
    AdamW(lr, weight_decay) unless `optimizer` is given. Train/eval modes are left as the caller set them
    (eval disables dropout, the usual choice for alignment). Returns the log, one dict per logged step
    {'step', 'kl', 'grad_norm'}; `log_path` also writes it as JSON lines; `progress` shows a tqdm bar.
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("student has no parameter that requires grad")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if steps is None:
        try:
            steps = len(batches)
        except TypeError:
            raise ValueError("steps is required when batches has no len()") from None
        source = iter(batches)
    else:
        source = itertools.cycle(batches) if isinstance(batches, (list, tuple)) else iter(batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="align", unit="step")
    log, sink = [], open(log_path, "w") if log_path else None
    try:
        for step in range(1, steps + 1):
            try:
                ids, mask = _split(next(source))
            except StopIteration:
                break
            if device is not None:
                ids = ids.to(device)
                mask = mask.to(device) if mask is not None else None
            with torch.no_grad():
                t_logits = model_logits(teacher, ids, mask)
            loss = retrofit_kl(model_logits(student, ids, mask), t_logits, reverse,
                               None if mask is None else mask.bool())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"KL is {float(loss)} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip
                     else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
            optimizer.step()
            kl = loss.item()
            if step % log_every == 0 or step == steps:
                rec = {"step": step, "kl": kl, "grad_norm": float(gnorm)}
                log.append(rec)
                if sink:
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{kl:.4g}")
    finally:
        if bar is not None:
            bar.close()
        if sink:
            sink.close()
    return log
