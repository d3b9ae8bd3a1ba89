"""Replaying a block's forward conditions in the backward recompute: RNG states and autocast."""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ForwardContext:
    """What a recompute needs to reproduce one forward call bit for bit: the RNG states at the
    call (CPU, and the device's when on CUDA) and the autocast state around it."""
    device: torch.device
    cpu_rng: Optional[torch.Tensor]
    cuda_rng: Optional[torch.Tensor]

    @staticmethod
    def capture(device: torch.device, preserve_rng: bool) -> "ForwardContext":
        if not preserve_rng:
            return ForwardContext(device, None, None)
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return ForwardContext(device, torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replay(self):
        """Runs the body with the captured RNG states, restoring the outer ones afterwards."""
        if self.cpu_rng is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            yield


@dataclass(frozen=True)
class AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype

    @staticmethod
    def capture(device: torch.device) -> "AutocastState":
        dt = device.type
        return AutocastState(dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))

    def replay(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)
