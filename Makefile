# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first (idempotent).
.PHONY: setup demo test lint bench-model

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/sorter --log-format console demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check .

bench-model: setup
	.venv/bin/python benchmarks/model_quality.py
