#!/usr/bin/env bash
# SmolLM2-135M on a CUDA machine: the shipped routers' calibration, bench_quality, and the
# demo (speed against plain generate). One device call; prints short tables at the end.
# Usage (repo root): TIDE_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf \
#                    bash benchmarks/gpu_smollm2.sh OUTDIR
# STEPS selects what runs (default: all): "routers quality demo".
set -u
OUT=${1:-${OUT:-/tmp/tide_out}}
STEPS=${STEPS:-"routers quality demo"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/tide_inductor_cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has routers; then
  echo "== shipped SmolLM2 routers (cli_demo.CALIBRATION_RECIPES['smollm2'])"
  /usr/bin/time -f "routers wall %e s" timeout ${ROUTERS_TIMEOUT:-240} python3 -m tide_compile demo --model smollm2 \
    --device cuda --calibrate --save-routers "$OUT/routers.tide" --repeats 1 --max-new-tokens 16 \
    >"$OUT/routers.log" 2>&1; echo "routers rc=$?"; grep -E "^routers|wall|wrote|error" "$OUT/routers.log" | tail -4
fi
if has quality; then
  echo "== bench_quality (SmolLM2, held-out code and prose)"
  /usr/bin/time -f "quality wall %e s" timeout ${QUALITY_TIMEOUT:-420} python3 benchmarks/bench_quality.py --model smollm2 \
    --device cuda --out "$OUT/quality" --no-progress ${QUALITY_ARGS:-} >"$OUT/quality.log" 2>&1
  echo "quality rc=$?"; tail -40 "$OUT/quality.log"
fi
if has demo; then
  echo "== demo --model smollm2 (cuda, Inductor)"
  ROUT=""; [ -f "$OUT/routers.tide" ] && ROUT="--routers $OUT/routers.tide"
  timeout ${DEMO_TIMEOUT:-300} python3 -m tide_compile demo --model smollm2 --device cuda --inductor \
    --compare-never-exit $ROUT >"$OUT/demo.log" 2>&1; echo "demo rc=$?"; tail -25 "$OUT/demo.log"
fi
