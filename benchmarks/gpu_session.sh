#!/usr/bin/env bash
# One device call: install, GPU tests, benchmarks. Prints short tables at the end.
# Usage (on a CUDA machine, repo root): bash benchmarks/gpu_session.sh [OUTDIR]
# STEPS selects what runs (default: all): "tests calibration router speculative decode compact".
# Each step has a *_TIMEOUT; DECODE_ARGS / COMPACT_ARGS add script arguments
# (e.g. DECODE_ARGS="--rows exits --kernels triton --stack-kv off --breakdown").
set -u
OUT=${1:-${OUT:-/tmp/tide_out}}
STEPS=${STEPS:-"tests calibration router speculative decode compact"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/tide_inductor_cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has tests; then
  echo "== GPU tests"
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu ${TEST_FILES:-tests/test_gpu.py tests/test_kernels.py} \
    ${TEST_K:+-k "$TEST_K"} -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"
  grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -8
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
if has speculative && [ -f benchmarks/bench_speculative.py ]; then
  echo "== speculative (demo model)"
  timeout ${SPEC_TIMEOUT:-150} python3 benchmarks/bench_speculative.py --out "$OUT/bench_speculative.json" ${SPEC_ARGS:-} \
    >"$OUT/bench_speculative.log" 2>&1; echo "speculative rc=$?"; tail -15 "$OUT/bench_speculative.log"
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
