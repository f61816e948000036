# Two commands a user needs (see README.md): `make train` and `make test`.
PY := .venv/bin/python

.PHONY: install train lint test bazel-test clean

install:
	scripts/install.sh

train: install
	$(PY) -m tff_programs.train $(ARGS)

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -n 2 --dist=loadfile --durations=30 tests $(ARGS)

clean:
	rm -rf .venv .pytest_cache
