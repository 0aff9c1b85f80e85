#!/usr/bin/env bash
# Every GPU measurement the project still owes, in one call, for a GPU machine lent for minutes
# (docs/benchmarks.md, "On a real GPU"). Most important first; each step has its own time limit
# and a failed step does not stop the next, so one call always brings back what it could measure.
#
#   # here, once per requirements change (the GPU machine has no network):
#   bash scripts/gpu-wheels.sh              # the wheels the GPU machine lacks, into .whl/
#   # there (the device tool's run, carrying .whl; $OUT is what comes back):
#   bash bench/gpu_session.sh
#
# Writes JSON and logs under $OUT (default bench/results/gpu-session-DATE); commit them under
# bench/results/. LIMIT_SCALE=0.5 halves every step's limit, for a rerun in the time left.
set -uo pipefail
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y-%m-%d-%H%M)
out="${OUT:-bench/results/gpu-session-$stamp}"
mkdir -p "$out"
scale="${LIMIT_SCALE:-1}"
py="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    >"$out/install.log" 2>&1 || echo "wheel install failed: see install.log" >&2
  export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; free -g; } \
  >"$out/machine.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run one measurement under its limit, log to $out/NAME.log
  local name=$1 limit secs start rc
  limit=$(awk -v s="$2" -v k="$scale" 'BEGIN { printf "%d", s * k }')
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  echo "$name: exit $rc after ${secs}s (limit ${limit}s)" | tee -a "$out/steps.txt"
  tail -n 40 "$out/$name.log"
}

# 1. The model alone: base in fp16 at 128..512 tokens (MFU at 256), eager against CUDA graphs by
#    shape (the table DEVICE=sim replays); CUDA graphs have never been captured on a real GPU.
step model-alone 150 "$py" -m bench.gpu --device cuda --archs base --dtypes float16 --shapes \
  --out "$out/gpu-model-alone.json"
# 2. The service against the model alone and the seed-style server, one engine with 1 and 2
#    feeders: W2 (64 clients), W3 (one document), W4 (a 200 000-pair job).
step service 270 "$py" -m bench.run --device cuda --only w2,w3,w4 --feeders 1,2 --no-before \
  --out "$out/gpu-service.json"
# 3. The LLM rerankers beside base (pairs/s, 1-document latency, MFU).
step families 100 "$py" -m bench.families --device cuda --pairs 1024 \
  --models bge-reranker-base qwen3-reranker-0.6b --out "$out/gpu-families.json"
ls -l "$out"
