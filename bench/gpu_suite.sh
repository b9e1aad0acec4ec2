#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU machine (see bench/README.md):
#   bash bench/gpu_suite.sh [OUT_DIR] [PART]   (2+ GPUs: also the tensor-parallel tests and bench)
# PART: all (default) | single (one-GPU tests and benches) | tp (tensor-parallel tests and bench) |
# roofline (engine tests, bench_offline vs transformers, the prefix cache, bench_serving at three rates, a batch-1 trace) |
# serving (the same without bench_offline and the trace) | structured (structured-output GPU tests and bench) |
# spec-ab (bench_spec_decode of build/before, made by `make bench-before REV=...`, against this tree: carry build/before),
# so that each set fits in a call of at most 10 minutes.
# The machine needs python3 with torch + transformers; `make gpu-wheels` puts pytest etc. in build/gpu-wheels
# (installed into /tmp/site). Each step has its own time limit so one hang cannot eat the session;
# logs, JSON results and profiles land in OUT_DIR (default $OUT, else /tmp/infergrid-gpu).
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/infergrid-gpu}}
part=${2:-all}
mkdir -p "$out"
if ls build/gpu-wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site build/gpu-wheels/*.whl
fi
export PYTHONPATH=common/src:worker/src:operator/src:testbed/src:/tmp/site PYTHONUNBUFFERED=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/env.txt"
step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, print its summary lines
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? (log: $out/$name.log)"
  grep -E "^\||passed|failed|->|TP=|^E " "$out/$name.log" | grep -v collective | tail -30
}
export INFERGRID_COMMIT=${INFERGRID_COMMIT:-$(git rev-parse HEAD 2>/dev/null || cat COMMIT 2>/dev/null || echo unknown)}
if [ "$part" = structured ]; then
  step structured_tests 200 python3 -m pytest -p no:cacheprovider -m gpu tests/worker/test_structured_output_gpu.py \
    -q --timeout 150
  step structured 300 python3 bench/bench_structured_output.py --out "$out/structured.json" --profile-dir "$out"
  gzip -f "$out"/trace_*constrained.json 2>/dev/null
  exit 0
fi
if [ "$part" = spec-ab ]; then
  step spec_ab 570 python3 bench/compare_revisions.py --before build/before --rounds 2 --run-timeout 280 \
    --out "$out/spec_ab.json" -- --max-tokens 128
  exit 0
fi
if [ "$part" = roofline ] || [ "$part" = serving ]; then
  step gpu_tests 200 python3 -m pytest -p no:cacheprovider -m gpu tests/worker/test_gpu_engine.py \
    tests/worker/test_host_staging.py -q --timeout 120
  [ "$part" = roofline ] && step offline 240 python3 bench/bench_offline.py --out "$out/offline.json"
  step prefix_cache 170 python3 bench/bench_prefix_cache.py --repeats 3 --out "$out/prefix_cache.json"
  step serving 200 python3 bench/bench_serving.py --launch-shape 1b --request-rate 10 40 inf --repeats 2 \
    --num-prompts 256 --input-len 512 --output-len 128 --worker-log "$out/serving_worker.log" --out "$out/serving.json"
  [ "$part" = roofline ] && step trace_b1 100 python3 bench/trace_spec_step.py --out-dir "$out" --tokens 128 -- --modes off --batch-sizes 1
  exit 0
fi
if [ "$part" != tp ]; then
  step gpu_tests 300 python3 -m pytest -p no:cacheprovider -m gpu tests/worker/test_gpu_engine.py \
    tests/worker/test_spec_decode_gpu.py tests/worker/test_host_staging.py -q --timeout 150
  step spec_decode 300 python3 bench/bench_spec_decode.py --max-tokens 128 --repeats 5 --out "$out/spec_decode.json"
fi
if [ "$part" != single ] && [ "$gpus" -ge 2 ]; then
  step tensor_parallel 400 python3 bench/bench_tensor_parallel.py --child-timeout 150 --decode-tokens 64 \
    --sync-baseline --profile-dir "$out" --out "$out/tensor_parallel.json"
  gzip -f "$out"/trace_tp*.json 2>/dev/null
  step tp_tests 180 python3 -m pytest -p no:cacheprovider -m gpu tests/worker/test_tensor_parallel_gpu.py -q --timeout 120
fi
[ "$part" = all ] && step prefix_cache 400 python3 bench/bench_prefix_cache.py --out "$out/prefix_cache.json"
