"""One training-step probe: build a GPT, run AdamW steps on random tokens, measure memory and time.

    python -m revkernels.bench._probe '<spec as JSON>'     # prints the result as one JSON line

spec: cfg (GPTConfig keyword arguments), batch, device ('cpu' / 'cuda:0'), bf16 (autocast),
budget_bytes (None or a memory cap), warmup (full steps before the measured one), steps (timed
steps after it). Result: ok, oom, memory_bytes, memory_kind, state_bytes, n_params, step_ms,
step_ms_p20, step_ms_p80, error.

memory_kind 'cuda_peak': torch.cuda.max_memory_allocated over the measured forward + backward +
AdamW step, after reset_peak_memory_stats; a budget caps the caching allocator with
set_per_process_memory_fraction, and hitting it is an OOM. 'saved_activations' (CPU): bytes saved
for backward by the forward + loss (revkernels.memory); a CPU has no allocator cap, so a budget
is emulated: the probe fails when saved activations + state_bytes exceed it. state_bytes =
parameters + gradients + AdamW state.

`run_probe(spec, isolate=True)` runs it in a fresh interpreter, so an OOM (or an allocator
fragmented by earlier runs) cannot affect the next probe.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ..memory import saved_tensor_bytes
from ..models import GPT, GPTConfig
from .common import ChunkTimeUp, time_ms

# A probe never outlives a GPU plan chunk (< 9 minutes); within a chunk the chunk's remaining time caps it.
PROBE_TIMEOUT_S = 480


class TrainStep:
    """One AdamW training step of a GPT on a fixed random batch; bf16 autocast when asked."""

    def __init__(self, cfg: GPTConfig, batch: int, device: torch.device, bf16: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.device, self.bf16 = device, bf16
        self.model = GPT(cfg).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.idx = torch.randint(cfg.vocab_size, (batch, cfg.seq_len), device=device)
        self.targets = torch.randint(cfg.vocab_size, (batch, cfg.seq_len), device=device)

    def loss(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(self.idx, self.targets)[1]

    def finish(self, loss):
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self):
        self.finish(self.loss())

    def state_bytes(self) -> int:
        """Parameters + their gradients (alive at the end of backward) + AdamW state."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        opt = sum(t.numel() * t.element_size() for s in self.opt.state.values()
                  for t in s.values() if isinstance(t, torch.Tensor))
        return 2 * params + opt


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "ALLOC_FAILED" in msg
                                              or "can't allocate memory" in msg)


def _measured_step(step: TrainStep):
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
        torch.cuda.reset_peak_memory_stats(step.device)
        step()
        torch.cuda.synchronize(step.device)
        return torch.cuda.max_memory_allocated(step.device), "cuda_peak"
    loss, saved = saved_tensor_bytes(step.loss)
    step.finish(loss)
    return saved, "saved_activations"


def measure(spec: dict) -> dict:
    """Run the probe described by `spec` in this process (see the module docstring)."""
    device = torch.device(spec["device"])
    budget = spec.get("budget_bytes")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if budget:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    result = dict(ok=False, oom=False, memory_bytes=None, memory_kind=None, state_bytes=None, n_params=None,
                  step_ms=None, step_ms_p20=None, step_ms_p80=None, error=None)
    try:
        step = TrainStep(GPTConfig(**spec["cfg"]), spec["batch"], device, spec.get("bf16", False))
        for _ in range(spec.get("warmup", 1)):
            step()
        result["memory_bytes"], result["memory_kind"] = _measured_step(step)
        result["state_bytes"] = step.state_bytes()
        result["n_params"] = sum(p.numel() for p in step.model.parameters())
        if device.type == "cpu" and budget and result["memory_bytes"] + result["state_bytes"] > budget:
            result.update(oom=True, error="over the emulated CPU budget")
            return result
        if spec.get("steps", 0):
            result["step_ms"], result["step_ms_p20"], result["step_ms_p80"] = time_ms(step, device, 0, spec["steps"])
    except Exception as err:  # noqa: BLE001 - only OOMs are results; anything else is re-raised
        if not _is_oom(err):
            raise
        result.update(oom=True, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return result
    result["ok"] = True
    return result


def run_probe(spec: dict, isolate: bool, ctx=None) -> dict:
    """measure(spec), in a fresh `python -m revkernels.bench._probe` process when `isolate`, killed after
    PROBE_TIMEOUT_S or the time left to `ctx`'s chunk (ChunkTimeUp: the rerun resumes)."""
    if ctx is not None:
        ctx.check_time(f"probe {spec['cfg'].get('arch')} L={spec['cfg'].get('n_layers')} batch {spec['batch']}")
    if not isolate:
        return measure(spec)
    left = ctx.remaining_s() if ctx is not None else None
    timeout = PROBE_TIMEOUT_S if left is None else max(1.0, min(PROBE_TIMEOUT_S, left))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])      # the directory holding `revkernels`
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "revkernels.bench._probe", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChunkTimeUp(f"probe {spec['cfg'].get('arch')} batch {spec['batch']} ran past {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == -9:                            # SIGKILL: the kernel's OOM killer, most likely
        return dict(ok=False, oom=True, error="probe killed by SIGKILL (host out of memory?)")
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe {spec} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None):
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    print(json.dumps(measure(spec)), flush=True)


if __name__ == "__main__":
    main()
