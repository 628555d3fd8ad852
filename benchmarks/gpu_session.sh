#!/usr/bin/env bash
# Every CUDA check of the project in one bounded session (a lent GPU machine, or your own):
#   1. the machine (nvidia-smi, torch, CUDA capability)
#   2. the full-size synthetic checkpoint (make_fullsize.py, 9.12 GB), unless $CKPT already holds one
#   3. gpu_check.py on it: packed routes vs dequant, eager vs compiled decode, INT4 TTS VRAM, codec dtypes
#   4. bench_quantize.py --device cuda: phase 1b with metrics on the GPU vs the read + write floor
#   5. the CUDA cases of the test suite (pytest -k cuda; they need ../shared, like every golden test)
#
#   bash benchmarks/gpu_session.sh OUTDIR [SECONDS]
#
# Each step gets the smaller of its own limit and what is left of SECONDS (default 500); a step with under 20 s
# left is skipped and says so. Logs and gpu_check.json land in OUTDIR as each step goes (gpu_check rewrites its
# JSON after every row), so a session cut short still leaves what it measured. PYTHON picks the interpreter
# (default python3: on a CUDA image, the one that holds torch); CKPT the checkpoint folder (default: in /dev/shm
# when it has room, else /tmp).
set -u
OUTDIR=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR [SECONDS]}
BUDGET=${2:-500}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR"
if [ -z "${CKPT:-}" ]; then
    shm_free=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)
    if [ "${shm_free:-0}" -gt $((20 * 1024 * 1024)) ]; then CKPT=/dev/shm/s2pro-synthetic; else CKPT=/tmp/s2pro-synthetic; fi
fi
START=$(date +%s)
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S CMD...: runs CMD under the smaller of LIMIT_S and the time left, log in OUTDIR/NAME.log
    local name=$1 limit=$2 left
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped, ${left} s left of ${BUDGET}" | tee "$OUTDIR/$name.log"
        return
    fi
    echo "== $name (limit ${limit} s, at $(($(date +%s) - START)) s)"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} at $(($(date +%s) - START)) s"
}

step machine 30 bash -c "nvidia-smi; df -h /dev/shm /tmp; nproc; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), torch.cuda.is_available() and torch.cuda.get_device_capability())'"
if [ -f "$CKPT/config.json" ]; then
    echo "== checkpoint: using $CKPT"
else
    step make_fullsize 150 "$PY" "$ROOT/benchmarks/make_fullsize.py" --out "$CKPT"
fi
step gpu_check 330 "$PY" "$ROOT/benchmarks/gpu_check.py" --checkpoint "$CKPT" --variants int4,bf16,int8 \
    --budget 180 --json "$OUTDIR/gpu_check.json"
step bench_quantize 100 "$PY" "$ROOT/benchmarks/bench_quantize.py" --checkpoint "$CKPT" --phase 1b --device cuda \
    --warm --out "$(dirname "$CKPT")/bench-quantize-scratch"
step pytest_cuda 80 "$PY" -m pytest -q -p no:cacheprovider -k cuda "$ROOT/tests/test_qlinear.py" \
    "$ROOT/tests/test_quantize.py" "$ROOT/tests/test_golden_transformer.py" "$ROOT/tests/test_golden_codec.py"
echo "== done at $(($(date +%s) - START)) s of ${BUDGET}"
