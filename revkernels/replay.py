"""Replaying a block's forward conditions in the backward recompute: RNG states, autocast and the
enabled SDPA backends."""
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


_SDP_BACKENDS = {  # torch.nn.attention.SDPBackend name -> whether it is enabled now
    "FLASH_ATTENTION": torch.backends.cuda.flash_sdp_enabled,
    "EFFICIENT_ATTENTION": torch.backends.cuda.mem_efficient_sdp_enabled,
    "MATH": torch.backends.cuda.math_sdp_enabled,
    "CUDNN_ATTENTION": torch.backends.cuda.cudnn_sdp_enabled,
}


def enabled_sdp_backends() -> tuple:
    """The scaled_dot_product_attention backends enabled now (what `torch.nn.attention.sdpa_kernel`
    restricts), by SDPBackend name."""
    return tuple(name for name, enabled in _SDP_BACKENDS.items() if enabled())


@dataclass(frozen=True)
class AmbientState:
    """The settings around a forward call that change a block's arithmetic: autocast (device type,
    enabled, dtype) and the enabled SDPA backends. A backward run outside the forward's
    `torch.autocast` / `sdpa_kernel` context recomputes under the forward's."""
    device_type: str
    enabled: bool
    dtype: torch.dtype
    sdp_backends: tuple

    @staticmethod
    def capture(device: torch.device) -> "AmbientState":
        dt = device.type
        # A traced forward (whole-model compile) cannot read the flags; its backward keeps the traced ones.
        backends = () if torch.compiler.is_compiling() else enabled_sdp_backends()
        return AmbientState(dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt), backends)

    def replay(self):
        """The forward's autocast, and its SDPA backends when they differ from the enabled ones (a backward
        outside the forward's sdpa_kernel). The common case enters autocast alone."""
        autocast = torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)
        if not self.sdp_backends or self.sdp_backends == enabled_sdp_backends():
            return autocast
        from torch.nn.attention import SDPBackend, sdpa_kernel
        stack = contextlib.ExitStack()
        stack.enter_context(autocast)
        stack.enter_context(sdpa_kernel([getattr(SDPBackend, name) for name in self.sdp_backends]))
        return stack
