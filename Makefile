# `make test` and `make bench` do their own set-up (scripts/setup_env.sh) on a fresh machine.
PY := .venv/bin/python
PRESET ?=
OUT ?= bench-out

.PHONY: setup test bench clean

setup:
	bash scripts/setup_env.sh

# Kernels run through Triton's interpreter on CPU; on a GPU machine they run compiled.
test: setup
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
	  $(PY) -m pytest -q tests

bench: setup
	$(PY) -m revkernels.bench all $(if $(PRESET),--preset $(PRESET)) --out $(OUT)

clean:
	rm -rf .venv $(OUT) .pytest_cache
