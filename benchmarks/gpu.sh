#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one script, sized for 10 minutes on one H100 or H200.
#
#   bash benchmarks/gpu.sh            # from the repository root, on a machine with one GPU
#
# Engine vs the reference loop on the real architectures (random weights): the CIFAR-10 UNet
# (52.5M parameters) and the 256x256 guided ImageNet UNet (552.8M), plus early majority at K = 40
# (engine with and without it, same run). The engine runs bf16
# autocast (the reference: fp32 for CIFAR-10, fp16 torso for ImageNet, as its own configs), with
# channels_last on and off and torch.compile off and on; K=4, b=2. Every step has its own
# timeout and a failed step does not stop the others. Each result is one JSON line, printed and
# appended to "$OUT/gpu_results.jsonl" when OUT is set (else ./gpu_results.jsonl); the log goes
# to "$OUT/gpu_log.txt".
#
# Environment: PYTHON (default python3), DEVICE (default cuda), QUICK=1 (tiny workloads: a
# plumbing check of this script, e.g. DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DEST=${OUT:-.}
mkdir -p "$DEST"
RESULTS="$DEST/gpu_results.jsonl"
LOG="$DEST/gpu_log.txt"
: >"$RESULTS"
: >"$LOG"
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${BUDGET:-570}  # seconds for the whole script: the device tool allows 600 per command
FAILED=0

if [[ "${QUICK:-0}" == 1 ]]; then
  CIFAR_WORK=(--draws 8 --reference-batch 4 --repeats 1 --warmup 0 --batch-size 16)
  IMAGENET_WORK=(--draws 1 --reference-batch 1 --repeats 1 --warmup 0 --votes 2 --steps 1 --batch-size 2)
else
  # CIFAR-10: 1000 draws = 10 reference batches of 100. ImageNet: 64 draws = 4 reference batches
  # of 16. Fixed engine batch sizes for the compiled runs, so every chunk has the same shape
  # (one compilation per shape: draws per chunk and draws x votes).
  CIFAR_WORK=(--draws 1000)
  IMAGENET_WORK=(--draws 64)
fi
CIFAR_COMPILED=(--batch-size 1000)    # 250 draws x 4 votes: 4 full chunks of 1000 draws
IMAGENET_COMPILED=(--batch-size 64)   # 16 draws x 4 votes: 4 full chunks of 64 draws
[[ "${QUICK:-0}" == 1 ]] && CIFAR_COMPILED=() && IMAGENET_COMPILED=()

log() { echo "[gpu.sh +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS ARGS...: one bench_engine.py run with a timeout (cut to what is left of
# BUDGET seconds for the whole script); its JSON line, tagged with the step name, goes to RESULTS.
step() {
  local name=$1 seconds=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 45)); then
    log "step $name skipped: ${left}s left of the ${BUDGET}s budget"
    FAILED=$((FAILED + 1))
    return 0
  fi
  ((seconds > left)) && seconds=$left
  log "step $name (timeout ${seconds}s): bench_engine.py $*"
  local line status=0
  line=$(timeout --kill-after=10 "$seconds" "$PY" benchmarks/bench_engine.py --device "$DEVICE" --json "$@" 2>>"$LOG") || status=$?
  if ((status != 0)); then
    log "step $name FAILED or timed out (exit $status); see $LOG"
    FAILED=$((FAILED + 1))
    return 0
  fi
  LINE=$(printf '%s\n' "$line" | tail -n 1) "$PY" - "$name" "$RESULTS" <<'EOF' | tee -a "$LOG"
import json, os, sys
d = json.loads(os.environ["LINE"])
d["step"] = sys.argv[1]
with open(sys.argv[2], "a") as fh:
    fh.write(json.dumps(d, sort_keys=True) + "\n")
def pct(key):
    return "-" if d.get(key) is None else "%.1f%%" % (100 * d[key])
ref = d.get("reference_draws_per_s")
print("  %s: engine %.3f draws/s (MFU %s, batch %s), reference %s draws/s (MFU %s), ratio %s, early majority %s" % (
    sys.argv[1], d["engine_draws_per_s"], pct("engine_mfu"), d["engine"]["batch_size_images"],
    "-" if ref is None else "%.3f" % ref, pct("reference_mfu"),
    "-" if d.get("ratio") is None else "%.2fx" % d["ratio"],
    "-" if d.get("early_majority_ratio") is None else "%.2fx (%.0f%% of votes)" % (d["early_majority_ratio"], 100 * d["votes_computed_share"])))
EOF
}

log "device facts"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} 2>&1 | tee -a "$LOG"

if [[ "${QUICK:-0}" == 1 ]]; then
  K40_WORK=(--draws 8 --repeats 1 --warmup 0 --batch-size 64)
else
  K40_WORK=(--draws 200 --repeats 3)
fi
NOEM=(--no-early-majority-comparison)

# Most important first: the eager comparisons, the K = 40 early-majority comparison (same run,
# same seeds: engine with and without early majority), then channels_last off, then compiled.
step cifar10_eager_cl      150 --model cifar10 "${CIFAR_WORK[@]}" --channels-last on "${NOEM[@]}"
step imagenet_eager_cl     200 --model imagenet "${IMAGENET_WORK[@]}" --channels-last on "${NOEM[@]}"
step cifar10_k40_early     120 --model cifar10 --votes 40 "${K40_WORK[@]}" --channels-last on --no-reference
step digits_k40_early       60 --model digits --votes 40 "${K40_WORK[@]}" --no-reference
step cifar10_eager_nocl    100 --model cifar10 "${CIFAR_WORK[@]}" --channels-last off "${NOEM[@]}"
step cifar10_compiled_cl   180 --model cifar10 "${CIFAR_WORK[@]}" "${CIFAR_COMPILED[@]}" --channels-last on --compile "${NOEM[@]}"
step imagenet_compiled_cl  300 --model imagenet "${IMAGENET_WORK[@]}" "${IMAGENET_COMPILED[@]}" --channels-last on --compile "${NOEM[@]}"

log "done: $(wc -l <"$RESULTS") result line(s), $FAILED failed step(s); results in $RESULTS"
