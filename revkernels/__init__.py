"""revkernels: fused Triton kernels and a reversible backward for reversible transformer LLMs."""
from .ops import (coupling_backward_step, coupling_inverse, coupling_step, rev_backward_step,
                  rev_inverse, rev_step)
