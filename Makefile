# The README's quick start: `make demo` runs the main job, `make test` the whole test suite.
# Each sets up .venv on first use and reinstalls only when pyproject.toml or constraints.txt
# is newer than the last install (make's own dependency check; no extra tool to install).
#
#   make test ARGS='-m "not slow"'      extra pytest arguments
#   make test JOBS=1                    tests in one process (default: two pytest-xdist workers)
#   make demo TORCH='torch --index-url https://download.pytorch.org/whl/cu124'
#                                       what pip installs when .venv has no torch yet
#
# A torch already in .venv is never replaced: on a GPU machine, put your CUDA build there
# first (python3 -m venv .venv && .venv/bin/pip install torch ...), then run make.

PYTHON ?= python3
# The CPU wheel on the CI machine's disk; a bare "torch" would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
ARGS ?=
# Two workers: much of the suite's time is waiting (signals, notices, S3 round trips, child
# processes starting), so two share a 2-core machine well (measured here: 456 tests took
# 21.5 min serially, 556 took 14-17 min with two; 966 take 12.5-14.5 after shared reference runs and
# folded end-to-end tests; 1059 about 16 with the recovery runs, 1090 about 19, 1117 about 16 with the single-process
# signal and kill tests forked from one warm interpreter and the files dealt into two halves, 1134 about 16 with
# the halves dealt by measured seconds, tests/durations.json; 1155 16.4 with the lease, EC2 and
# recovery trainers forked warm and the EC2 tests' one-AMI set-up; 1166 14.8-15.7 with check-resume's
# runs forked warm; 1167 7.2 at load 1-2, 10.9 beside two other suites, 1185 7.9 on a fresh clone, 1189 8.2 with warm workers on by default, 1204 8.1 at f77dc9a, with torchrun's launcher and
# ranks and the HF/Lightning examples forked warm); more would starve the
# timing-bounded tests. worksteal keeps the long
# torchrun tests from queueing behind each other on one worker.
JOBS ?= 2

VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv

demo: $(STAMP)
	$(VENV)/bin/spotrun launch --local --interruptions 3 -- $(VENV)/bin/python examples/train.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(JOBS) --dist worksteal $(ARGS)

venv: $(STAMP)

# The stamp is touched only after every step succeeded, so a failed install is retried.
# torch goes in first and only if missing (keeps a user's own build). constraints.txt holds
# botocore inside aiobotocore's range; without it pip backtracks for many minutes. The
# trainer extras (hf, lightning, accelerate) are installed so their tests run.
$(STAMP): pyproject.toml constraints.txt
	@echo "Setting up $(VENV) (first use, or pyproject.toml/constraints.txt changed)"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c 'import importlib.metadata as m; print("keeping torch", m.version("torch"))' 2>/dev/null \
		|| $(VENV)/bin/pip install -q $(TORCH) -c constraints.txt
	$(VENV)/bin/pip install -q -e '.[test,hf,lightning,accelerate]' -c constraints.txt
	touch $@
