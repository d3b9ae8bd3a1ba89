"""Benchmarks that reproduce the paper's tables and figures: `python -m revkernels.bench NAME`.

One module per benchmark (kernels, memory_depth, throughput_depth, max_batch, drift, stability),
each with a `run(ctx)` that writes CSV + PNG + markdown; `common` holds the shared helpers and
`_probe` the isolated training-step probe. See `revkernels.bench.__main__` for the command line.
"""
