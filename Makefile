# Two commands a user needs (see README.md): `make train` and `make test`.
PY := .venv/bin/python

.PHONY: install train test bazel-test clean

install:
	scripts/install.sh

train: install
	$(PY) -m tff_programs.train $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf .venv .pytest_cache
