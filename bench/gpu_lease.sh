#!/usr/bin/env bash
# One GPU lease's steps, each a word: bash bench/gpu_lease.sh STEP [STEP ...]   (from the repo root)
#
#   setup     install the carried wheels (.whl/, .whlnixl/ when carried) into /tmp/site and
#             build the random-weight Llama-3.1-8B-shaped model in /tmp/m8b (skipped if there)
#   vllm      unpack vLLM (.peer/ part00 in /tmp/p00 from an earlier call + part01 carried) and
#             measure `vllm serve` under the serving load
#   colocated measure `baton up --prefills 0` (one decode worker on the GPU) under the same load
#   1p1d      measure `baton up --prefills 1 --decodes 1` (both on the one GPU; auto transfer = cuda_ipc) likewise
#   1p1d-tcp  the same with `--transfer tcp` (host staging, the portable fallback)
#   probe     TTFT layer by layer at no load (bench/ttft_probe.py): decode worker gRPC, router gRPC, gateway
#             HTTP, and `vllm serve` HTTP, each server at 0.4 of the GPU (baton first, then vLLM)
#   probe-gil the decode-worker layer of the probe with Python's 5 ms switch interval and with the workers' 0.5 ms
#   profile   `colocated` with py-spy (carried in .whl/) recording the decode worker and the router for PROFILE_S
#             seconds (default 10), PROFILE_DELAY_S (default 25) after the cluster is up, into $OUT/pyspy_*.txt
#   pack      tar every file under $OUT into $OUT/results.tgz and keep only it and tables.md (every server's table):
#             at most 8 files come back from a call, and three servers already write 10 (put it last)
#   gputests  pytest tests/gpu
#   long      issue 17's long-context figures: vLLM's 32k-token prefill (bench/vllm_long_prefill.py), then Baton's
#             (gpu_engine sections ceil,l,p: decode attention at 8k / 32k contexts vs the KV-read limit, 32k prefill)
#   transfer  nixl VRAM vs a device-to-device copy (bench/kv_transfer.py --device cuda)
#   mixed     issue 17's mixed steps by kernel kind: the linear layers' share of the matmul rate per mix of prefill
#             chunks and decode rows (bench/mixed_step_profile.py)
#
# Results go to $OUT (summary.md, NAME.json/.md per server). Files outside $OUT survive only
# while the machine stays warm (30 s after a call): send the next call at once.
# Environment: RATES (default 4,8,16,24), PROMPTS (requests per rate, default 160), WORKLOADS (default: both),
# BATON_ARGS (extra `baton up` flags for colocated / 1p1d, e.g. "--prefill-backlog-limit 4096") and TAG (a suffix
# for those servers' names, so two settings in one lease keep separate files); BATON_ENGINE (EngineConfig options as
# JSON for `long`, e.g. {"chunked_prefill_size":16384}).
set -uo pipefail
OUT=${OUT:-/tmp/out}
RATES=${RATES:-4,8,16,24}
PROMPTS=${PROMPTS:-160}
MODEL=/tmp/m8b
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

serve() {  # NAME COMMAND
  python3 -m baton.bench.gpu_serving --tokenizer "$MODEL" --out "$OUT" --rates "$RATES" \
    --num-prompts "$PROMPTS" --warmup 8 --ready-timeout 420 ${WORKLOADS:+--workloads "$WORKLOADS"} --server "$1=$2"
  cat "$OUT/$1.md" 2>/dev/null; tail -30 "$OUT/$1.log" 2>/dev/null | grep -iE "error|warn|refus|retry" | tail -8
}

unpack_vllm() {
  if [ ! -d /tmp/vsite/vllm ]; then
    cat /tmp/p00 .peer/vllm026-carry.part01 > /tmp/v.tar.xz && mkdir -p /tmp/vsite \
      && tar -xJf /tmp/v.tar.xz -C /tmp/vsite
  fi
}

wait_http() {  # URL SECONDS
  for _ in $(seq 1 "$2"); do curl -sf "$1" >/dev/null && return 0; sleep 1; done
  echo "not ready: $1"; return 1
}

for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    setup)
      for dir in .whl .whlnixl; do  # each carried wheel folder once per machine
        if ls $dir/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.done$dir ]; then
          python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            $dir/*.whl && touch /tmp/site/.done$dir || exit 1
        fi
      done
      python3 -c "import grpc, fastapi, zmq; print('grpcio', grpc.__version__)" || exit 1
      [ -f $MODEL/config.json ] || python3 -m baton.bench.gpu_engine --make-model $MODEL || exit 1
      [ -f .peer/vllm026-carry.part00 ] && cp .peer/vllm026-carry.part00 /tmp/p00
      nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv ;;
    vllm)
      unpack_vllm || exit 1
      serve vllm "env PYTHONPATH=/tmp/vsite VLLM_USE_FLASHINFER_SAMPLER=0 python3 -m vllm.entrypoints.cli.main serve $MODEL --attention-backend FLASH_ATTN --gpu-memory-utilization 0.85 --port {port}" ;;
    colocated)
      serve baton-colocated${TAG:-} "python3 -m baton.deploy.cli up --model $MODEL --prefills 0 ${BATON_ARGS:-} --port {port}" ;;
    profile)
      ( for _ in $(seq 1 400); do grep -q "Baton is up" "$OUT"/baton-colocated${TAG:-}.log 2>/dev/null && break; sleep 1; done
        sleep "${PROFILE_DELAY_S:-25}"
        for name in "serve decode" "deploy.cli router"; do
          pid=$(pgrep -f "$name" | head -1); tag=${name##* }
          [ -n "$pid" ] && /tmp/site/bin/py-spy record -p "$pid" -d "${PROFILE_S:-10}" -r 100 --threads --nonblocking \
            -f raw -o "$OUT/pyspy_$tag.txt" >/dev/null 2>&1 &
        done; wait ) &
      serve baton-colocated${TAG:-} "python3 -m baton.deploy.cli up --model $MODEL --prefills 0 ${BATON_ARGS:-} --port {port}"
      wait ;;
    1p1d)
      serve baton-1p1d${TAG:-} "python3 -m baton.deploy.cli up --model $MODEL --prefills 1 --decodes 1 ${BATON_ARGS:-} --port {port}" ;;
    1p1d-tcp)
      serve baton-1p1d-tcp "python3 -m baton.deploy.cli up --model $MODEL --prefills 1 --decodes 1 --transfer tcp --port {port}" ;;
    probe)
      unpack_vllm || exit 1
      python3 -m baton.deploy.cli up --model $MODEL --prefills 0 --mem-fraction-static 0.4 --port 18100 \
        --grpc-port 18101 --open-cluster > "$OUT/probe_baton.log" 2>&1 &  # the probe calls the worker directly
      BATON=$!
      wait_http http://127.0.0.1:18100/health 300
      env PYTHONPATH=/tmp/vsite VLLM_USE_FLASHINFER_SAMPLER=0 python3 -m vllm.entrypoints.cli.main serve $MODEL \
        --attention-backend FLASH_ATTN --gpu-memory-utilization 0.4 --port 18200 > "$OUT/probe_vllm.log" 2>&1 &
      VLLM=$!
      wait_http http://127.0.0.1:18200/health 300
      DECODE=$(curl -s http://127.0.0.1:18100/workers | python3 -c \
        "import json,sys; print([w['address'] for w in json.load(sys.stdin) if w['role'] == 'decode'][0])")
      python3 -m baton.bench.ttft_probe --decode "$DECODE" --router 127.0.0.1:18101 --http http://127.0.0.1:18100 \
        --peer http://127.0.0.1:18200 --prompt-tokens 128,1024 --vocab 128000 --json "$OUT/ttft_probe.json" \
        | tee "$OUT/ttft_probe.md"
      kill -INT $BATON $VLLM; sleep 8; kill -9 $BATON $VLLM 2>/dev/null ;;
    probe-gil)  # one decode worker at a time, Python's 5 ms switch interval vs the workers' default
      for gil in 0 0.0005; do
        python3 -m baton.deploy.cli serve decode --model $MODEL --port 18300 --mem-fraction-static 0.4 \
          --gil-switch-interval-s $gil > "$OUT/probe_gil_$gil.log" 2>&1 &
        WORKER=$!
        for _ in $(seq 1 300); do grep -q "serving on" "$OUT/probe_gil_$gil.log" && break; sleep 1; done
        echo "--- decode worker, --gil-switch-interval-s $gil"
        python3 -m baton.bench.ttft_probe --decode 127.0.0.1:18300 --prompt-tokens 128,1024 --vocab 128000 \
          --json "$OUT/ttft_probe_gil_$gil.json" | tee "$OUT/ttft_probe_gil_$gil.md"
        kill -INT $WORKER; sleep 6; kill -9 $WORKER 2>/dev/null
      done ;;
    long)
      unpack_vllm || exit 1
      env PYTHONPATH=/tmp/vsite VLLM_USE_FLASHINFER_SAMPLER=0 python3 bench/vllm_long_prefill.py $MODEL 2>&1 | tail -3
      python3 -m baton.bench.gpu_engine --model $MODEL --sections ceil,l,p --json "$OUT/gpu_long.json" \
        ${BATON_ENGINE:+--engine "$BATON_ENGINE"} 2>&1 | tail -24 ;;
    pack)
      cat "$OUT"/*.md > /tmp/tables.md 2>/dev/null
      tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz /tmp/tables.md "$OUT"/
      ls -la "$OUT" ;;
    gputests)
      python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gputests.log" | tail -25 ;;
    transfer)
      UCX_NET_DEVICES=lo python3 -m baton.bench.kv_transfer --device cuda --backends "${BACKENDS:-tcp,nixl,cuda_ipc}" \
        --json "$OUT/kv_transfer_cuda.json" \
        --results "$OUT/kv_transfer_cuda.md" 2>&1 | grep -v "NIXL INFO" | tail -30 ;;
    mixed)
      python3 -m baton.bench.mixed_step_profile --model $MODEL --json "$OUT/mixed_step.json" 2>&1 | grep -v "^mixed" | tail -14 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
