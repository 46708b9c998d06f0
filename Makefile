# The two set-up commands of the README. Both create or reuse .venv and install what they need.
.PHONY: install generate test
install:
	@bash deploy/install.sh

generate: install
	.venv/bin/baton generate "What is the capital of France?"

test: install
	.venv/bin/python -m pytest -q -p no:cacheprovider tests
