# The two commands of the README. Both set everything up first (scripts/setup.sh is idempotent).
export RAY_AUTH_MODE ?= token
export PYTHONUNBUFFERED = 1

.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python jobs/demo.py

test: setup
	.venv/bin/python -m pytest -q tests

bench:
	XMR_SETUP_BENCH=1 bash scripts/setup.sh
	for b in bench/[!_]*.py; do .venv/bin/python $$b || exit 1; done
