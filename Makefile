# The two commands of the README. Both set up .venv themselves (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow test-all test-slurm compare reproduce gpu-check-wheels test-sglang-app bench-step bench-trl

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

# the trainer-step benchmark on issue 18's shape, per stage, with its plain HF generate / PyTorch references
bench-step: setup
	@OMP_NUM_THREADS=2 $(PY) tools/bench_step.py --warmup 2 --steps 5 actor.micro_batch_size=64 $(ARGS)

# the same with TRL's GRPOTrainer beside it, from a separate .venv-trl (TRL pulls `datasets`, which would change
# the dev venv's local-dataset loading); versions pinned here
TRL_PINS := trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 pandas==3.1.1
bench-trl:
	@VENV=.venv-trl bash tools/setup_env.sh
	@.venv-trl/bin/python -c "import trl" 2>/dev/null || .venv-trl/bin/pip install -q -c constraints.txt $(TRL_PINS)
	@OMP_NUM_THREADS=2 .venv-trl/bin/python tools/bench_step.py --warmup 2 --steps 5 --trl actor.micro_batch_size=64 $(ARGS)

test-slurm: setup
	@$(PY) -m pytest -q -m slurm tests/test_slurm_local.py

gpu-check-wheels:
	@bash tools/gpu_check_wheels.sh
