# The two commands of the README. Both set up .venv themselves (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow test-all test-slurm compare reproduce gpu-check-wheels test-sglang-app

setup:
	@bash tools/setup_env.sh

demo: setup
	@bash examples/tiny_cpu/run_demo.sh

test: setup
	@$(PY) -m pytest -q --durations=25 -m "not slow and not slurm and not gpu"

test-slow: setup
	@$(PY) -m pytest -q -m "slow"

# SGLang's whole FastAPI app on CPU (separate ~2.5 GB venv, .cache/sglang-app-venv) against the client's bodies
test-sglang-app: setup
	@bash tools/sglang_app_env.sh
	@$(PY) -m pytest -q -m slow tests/test_rollout_sglang_app.py

test-all: setup
	@$(PY) -m pytest -q -m "not gpu"

compare: setup
	@$(PY) examples/tiny_cpu/prepare.py
	@$(PY) examples/tiny_cpu/compare.py

# re-derive docs/benchmarks.md's CPU numbers (tools/reproduce.py --list: targets and time); TARGETS="warmstart --full"
reproduce: setup
	@$(PY) tools/reproduce.py $(TARGETS)

test-slurm: setup
	@$(PY) -m pytest -q -m slurm tests/test_slurm_local.py

gpu-check-wheels:
	@bash tools/gpu_check_wheels.sh
