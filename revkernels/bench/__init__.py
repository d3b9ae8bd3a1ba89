"""Benchmarks that reproduce the paper's tables and figures: `python -m revkernels.bench NAME`.

One module per benchmark (kernels, memory_depth, throughput_depth, max_batch, drift, exact, stability,
quality), each with a `run(ctx)` that writes CSV + PNG + markdown; `common` holds the shared helpers,
`_probe` the isolated training-step probe, `corpus` the byte-level text data of `quality`,
`cost_model` the analytic H100 memory / time model and `plan` the GPU plan's resumable chunks.
See `python -m revkernels.bench --help`.
"""
