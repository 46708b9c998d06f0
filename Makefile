# The two set-up commands of the README. Both create or reuse .venv and install what they need.
.PHONY: install up test
install:
	@bash deploy/install.sh

up: install
	.venv/bin/baton up --port $(or $(PORT),8000)

test: install
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 tests
