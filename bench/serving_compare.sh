#!/usr/bin/env bash
# Runs `baton bench` against three local `baton up` clusters on the embedded SmolLM2 — tcp
# transfer, nixl transfer (both forced to disaggregate: --decode-only-threshold 0) and the
# decode-only path (--prefills 0) — with the same workload, writing JSON + PNGs to
# bench/results/<name>/. Usage: bash bench/serving_compare.sh [extra baton bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD=(--dataset shared-prefix --prefix-groups 4 --prefix-len 192 --questions-per-group 6 --output-len 24
          --request-rate 4 --max-concurrency 8 --seed 0 --warmup 2 --slo ttft=3000,tpot=300 "$@")
run() {
  local name=$1; shift
  local port; port=$(.venv/bin/python -c 'from services.common.server import free_port; print(free_port())')
  .venv/bin/baton up --port "$port" "$@" > "/tmp/baton-up-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do grep -q "Baton is up" "/tmp/baton-up-$name.log" && break; sleep 1; done
  mkdir -p "bench/results/$name"
  .venv/bin/baton bench --base-url "http://127.0.0.1:$port" "${WORKLOAD[@]}" --no-progress \
      --output "bench/results/$name/result.json" --plot "bench/results/$name" | tee "bench/results/$name/summary.txt"
  kill -INT "$pid"; wait "$pid" || true
}
run tcp --transfer tcp --decode-only-threshold 0
run nixl --transfer nixl --decode-only-threshold 0
run decode-only --prefills 0
