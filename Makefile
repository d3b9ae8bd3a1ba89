# `make test` and `make bench` do their own set-up (scripts/setup_env.sh) on a fresh machine.
PY := .venv/bin/python
PRESET ?=
OUT ?=

.PHONY: setup test test-latest bench bench-plan gpu-check gpu-table4 clean

setup:
	bash scripts/setup_env.sh

# Kernels run through Triton's interpreter on CPU; on a GPU machine they run compiled.
test: setup
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
	  $(PY) -m pytest -q tests

# The scheduled "latest" job (.ci/latest): the same tests on the newest releases of every dependency
# (torch stays the CPU build 2.13.0 on a machine without a GPU), in .venv-latest. Finds breakage early;
# `make test` keeps testing the pinned set of constraints.txt.
test-latest:
	bash scripts/setup_env.sh .venv-latest none
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$(.venv-latest/bin/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
	  .venv-latest/bin/python -m pytest -q tests

# CPU (the default without CUDA): every benchmark at small shapes, one intra-op thread (two in retrofit), about
# 7 minutes on an idle 2-core machine plus a minute of set-up on a fresh one, into bench-out/.
# With CUDA (or PRESET=gpu): the GPU plan's chunks not yet done, device-tagged files in plots/
# (see `make bench-plan`). OUT=DIR writes elsewhere.
bench: setup
	$(PY) -m revkernels.bench all $(if $(PRESET),--preset $(PRESET)) $(if $(OUT),--out $(OUT))

# The GPU plan's chunks and their estimated GPU minutes (no GPU needed); run one with
# `.venv/bin/python -m revkernels.bench all --preset gpu --chunk N`. Also the budgets of gpu-check and gpu-table4.
bench-plan: setup
	$(PY) -m revkernels.bench plan

# The GPU verdict in ONE command of at most 8 minutes on a bare H100, install and Triton JIT included: CUDA
# tests, kernel bandwidth, step times (baseline, checkpoint, selective AC, reversible, hybrid), memory, max
# batch; device-tagged files in plots/ (packed into $$OUT/gpu-check-<device>.tar.gz when OUT is set). No
# set-up: the GPU machine's own python3 has torch and triton and no network. gpu-table4: the paper's Table 4
# in a second command of at most 6 minutes. DRY_RUN=1 lists the steps and their estimated minutes (no GPU).
# A rerun resumes from the CSVs in plots/; delete plots/gpu-check*-<device>.* to measure again.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
DRY_RUN ?=

gpu-check gpu-table4:
ifeq ($(DRY_RUN),)
	export GPU_CHECK_T0=$$(date +%s) PYTHONUNBUFFERED=1 && \
	  $(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e . && \
	  $(GPU_PY) -m revkernels.bench $@
else
	$(GPU_PY) -m revkernels.bench $@ --dry-run
endif

clean:
	rm -rf .venv .venv-latest bench-out $(OUT) .pytest_cache
