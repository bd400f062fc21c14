#!/usr/bin/env bash
# One device call: install, GPU tests, benchmarks. Prints short tables at the end.
# Usage (on a CUDA machine, repo root): bash benchmarks/gpu_session.sh [OUTDIR]
# STEPS selects what runs (default: "tests calibration router decode compact";
# also: "traffic" (bench_decode --traffic), "deferred" (bench_deferred), "lossless" (bench_lossless),
# "tp" (bench_tp under torchrun on TP_NPROC GPUs, default 2; TP_ARGS e.g. "--unguarded")).
# GPU tests run in TEST_SHARDS parallel pytest processes (default 6), each under TEST_TIMEOUT
# (TEST_GPUS=N spreads the shards over N GPUs).
# Each step has a *_TIMEOUT; DECODE_ARGS / COMPACT_ARGS add script arguments
# (e.g. DECODE_ARGS="--rows exits --kernels triton --stack-kv off --breakdown").
set -u
OUT=${1:-${OUT:-/tmp/tide_out}}
STEPS=${STEPS:-"tests calibration router decode compact"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/tide_inductor_cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has tests; then
  # The GPU tests compile with Inductor per test: serially they ran past 300 s on a cold
  # cache (fourth session); TEST_SHARDS processes share the GPU (6 shards: 28 tests, 260 s).
  echo "== GPU tests (${TEST_SHARDS:-6} shards)"
  python3 -m pytest -q -m gpu ${TEST_FILES:-tests/test_gpu.py tests/test_kernels.py tests/test_lossless.py} --collect-only \
    ${TEST_K:+-k "$TEST_K"} -p no:cacheprovider 2>/dev/null | grep '::' >"$OUT/gpu_test_ids.txt"
  for i in $(seq 0 $((${TEST_SHARDS:-6} - 1))); do
    awk -v n=${TEST_SHARDS:-6} -v i=$i 'NR % n == i' "$OUT/gpu_test_ids.txt" >"$OUT/gpu_tests_$i.ids"
    # TEST_GPUS=N (a machine of N GPUs): shard i runs on GPU i % N.
    [ -s "$OUT/gpu_tests_$i.ids" ] && ([ -n "${TEST_GPUS:-}" ] && export CUDA_VISIBLE_DEVICES=$((i % TEST_GPUS)); timeout ${TEST_TIMEOUT:-240} xargs -a "$OUT/gpu_tests_$i.ids" \
      python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rfE \
      >"$OUT/gpu_tests_$i.log" 2>&1; echo "gpu tests shard $i rc=$?") &
  done
  wait
  grep -hE "^(FAILED|ERROR)|passed|failed|skipped" "$OUT"/gpu_tests_*.log | tail -20
fi
if has calibration; then
  echo "== calibration throughput"
  timeout ${CALIB_TIMEOUT:-130} python3 benchmarks/bench_calibration.py --json "$OUT/bench_calibration.json" \
    >"$OUT/bench_calibration.log" 2>&1; echo "calibration rc=$?"; tail -2 "$OUT/bench_calibration.log"
fi
if has router; then
  echo "== router cost"
  timeout ${ROUTER_TIMEOUT:-90} python3 benchmarks/bench_router.py --out "$OUT/bench_router.json" \
    >"$OUT/bench_router.log" 2>&1; echo "router rc=$?"; tail -12 "$OUT/bench_router.log"
fi
if has decode; then
  echo "== decode"
  timeout ${DECODE_TIMEOUT:-280} python3 benchmarks/bench_decode.py --out "$OUT/bench_decode.json" \
    --time-budget ${DECODE_BUDGET:-200} ${DECODE_ARGS:-} >"$OUT/bench_decode.log" 2>&1
  echo "decode rc=$?"; grep -E "^\|" "$OUT/bench_decode.log"
fi
if has compact; then
  echo "== compaction (prefill) and decode with exits"
  timeout ${COMPACT_TIMEOUT:-400} python3 benchmarks/bench_compact.py --out "$OUT/bench_compact.json" \
    --time-budget ${COMPACT_BUDGET:-360} ${COMPACT_ARGS:-} >"$OUT/bench_compact.log" 2>&1
  echo "compact rc=$?"; grep -E "^\||beats|within" "$OUT/bench_compact.log"
fi
if has traffic; then
  echo "== mixed traffic (bench_decode --traffic)"
  timeout ${TRAFFIC_TIMEOUT:-560} python3 benchmarks/bench_decode.py --traffic --out "$OUT/bench_traffic.json" \
    ${TRAFFIC_ARGS:-} >"$OUT/bench_traffic.log" 2>&1
  echo "traffic rc=$?"; grep -E "^\||ratio|tokens" "$OUT/bench_traffic.log" | tail -12
fi
if has deferred && [ -f benchmarks/bench_deferred.py ]; then
  echo "== deferred vs propagate (bench_deferred)"
  timeout ${DEFERRED_TIMEOUT:-560} python3 benchmarks/bench_deferred.py --out "$OUT/bench_deferred.json" \
    ${DEFERRED_ARGS:-} >"$OUT/bench_deferred.log" 2>&1
  echo "deferred rc=$?"; tail -30 "$OUT/bench_deferred.log"
fi
if has lossless && [ -f benchmarks/bench_lossless.py ]; then
  echo "== lossless (bench_lossless; LOSSLESS_ARGS e.g. '--rows ceiling --depths 16')"
  timeout ${LOSSLESS_TIMEOUT:-560} python3 benchmarks/bench_lossless.py --out "$OUT/bench_lossless.json" \
    ${LOSSLESS_ARGS:-} >"$OUT/bench_lossless.log" 2>&1
  echo "lossless rc=$?"; tail -30 "$OUT/bench_lossless.log"
fi
if has tp; then
  echo "== tensor parallel (bench_tp; TP_ARGS e.g. '--rows inductor,never,exits --depths 16 --unguarded')"
  NCCL_NVLS_ENABLE=0 timeout ${TP_TIMEOUT:-560} torchrun --standalone --nproc-per-node ${TP_NPROC:-2} \
    benchmarks/bench_tp.py --out "$OUT/bench_tp.json" ${TP_ARGS:-} >"$OUT/bench_tp.log" 2>&1
  echo "tp rc=$?"; grep -E "^\||done" "$OUT/bench_tp.log" | tail -12
fi
