#!/usr/bin/env bash
# Runs `baton bench --dataset images` against two local `baton up` clusters on a tiny random-weight
# LLaVA-1.5 (built by tests/helpers/tiny_models.py): E/P/D (one encoder, one prefill, one decode,
# forced to disaggregate) and the colocated baseline (--encoders 0 --prefills 0: the decode
# worker runs the vision tower itself), with the same workload, writing JSON to
# bench/results/images-<name>/. Usage: bash bench/serving_images.sh [extra baton bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-/tmp/baton-bench-llava}
[ -f "$MODEL/config.json" ] || .venv/bin/python -c "from pathlib import Path; from tests.helpers.tiny_models import make_tiny_vlm; make_tiny_vlm('llava', Path('$MODEL'))"
WORKLOAD=(--dataset images --num-prompts 32 --input-len 16 --output-len 16 --image-size 224 --images-per-request 1
          --image-repeat-share 0.5 --request-rate 4 --max-concurrency 8 --seed 0 --warmup 2 --tokenizer "$MODEL" "$@")
run() {
  local name=$1; shift
  local port; port=$(.venv/bin/python -c 'from services.common.server import free_port; print(free_port())')
  .venv/bin/python -m baton.deploy.cli up --model "$MODEL" --port "$port" --page-size 4 "$@" > "/tmp/baton-up-images-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do grep -q "Baton is up" "/tmp/baton-up-images-$name.log" && break; sleep 1; done
  mkdir -p "bench/results/images-$name"
  .venv/bin/python -m baton.deploy.cli bench --base-url "http://127.0.0.1:$port" "${WORKLOAD[@]}" --no-progress \
      --output "bench/results/images-$name/result.json" | tee "bench/results/images-$name/summary.txt"
  local metrics; metrics=$(grep -o 'encoder-0=[0-9.:]*' "/tmp/baton-up-images-$name.log" | cut -d= -f2 || true)
  if [ -n "$metrics" ]; then  # the encoder's own figures: tower images and batches, cache hits and misses
    curl -s "http://$metrics/metrics" | grep -E '^baton_encoder_(tower|embedding_cache|transfer)' \
      | tee -a "bench/results/images-$name/summary.txt"
  fi
  kill -INT "$pid"; wait "$pid" || true
}
run epd --encoders 1 --prefills 1 --decodes 1 --decode-only-threshold 0
run colocated --encoders 0 --prefills 0
