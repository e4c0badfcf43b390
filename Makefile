VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is only for the parity tests ([dev]/[torch] extras): take the CPU-only wheel (about 0.2 GB)
# from PyTorch's CPU index, not PyPI's Linux default (the CUDA build, several GB). If that index
# cannot be reached, the plain pin from setup.cfg is installed by the next step.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell sed -n 's/^ *\(torch==[0-9.]*\).*/\1/p' setup.cfg | head -n 1)

.PHONY: setup demo test bench docs clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" --index-url $(TORCH_CPU_INDEX) --no-deps --retries 0 --timeout 30 \
	  || echo "note: $(TORCH_CPU_INDEX) not reachable; installing $(TORCH_PIN) from the default index"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) tools/demo.py --config configs/demo.yaml

# Two pytest workers, one test file each at a time (module fixtures built once): 11.6 min instead of
# 19.9 min on the 2-core Xeon VM (2026-11-28). On 2026-12-08 a fresh clone ran 728 tests in 9.9 min, 11.7 min
# with setup. The two workers peaked at 12 GB of RSS together (7 GB the larger); TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

bench: setup
	$(PY) benchmarks/run_all.py

docs: setup  # regenerate docs/cli.md (click commands) and docs/architecture.md (package tree); tests/test_docs.py checks both
	$(PY) tools/gen_cli_reference.py
	$(PY) tools/gen_architecture.py

clean:
	rm -rf $(VENV) demo_out
