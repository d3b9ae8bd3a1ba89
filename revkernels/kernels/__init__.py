"""Raw ``@triton.jit`` kernels, one file per family. Launchers live in ``revkernels.ops``."""
