#!/usr/bin/env bash
# One GPU check, about 8 minutes on one GPU: the CUDA tests (fused kernels in fp32/fp16/bf16 against float64, fp16
# and bf16 training that resumes, SDPA, torch.compile), the one-step bench at 512 px in bf16 and fp32 (every
# variant, eager and compiled), and the real training loop on the SD1.5 architecture at 512 px, batch 1 and 4,
# gradient checkpointing off and on. Writes OUT/report.md and OUT/report.json (and each step's raw output).
#
#   bash scripts/gpu_check.sh [--out DIR]     # on a CUDA machine (DIR defaults to gpu-check/)
#   bash scripts/gpu_check.sh --dry [--out DIR]  # the same steps on the CPU at tiny sizes (CI runs this)
#
# A failing step is recorded in the report and the others still run; the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
dry=0
out=gpu-check
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) dry=1 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
: > "$out/steps.tsv"

if [ "$dry" = 1 ]; then
  export LOHA_TRAIN_TEST_DEVICE=cpu ACCELERATE_USE_CPU=1
  device=cpu precision=no
  bench=(--model tiny --latent 8 --steps 1 --warmup 1 --threads 2)
  loop=(--model tiny --resolution 64 --steps 4 --warmup 1)
  loops=("--batch 1" "--batch 2 --gradient-checkpointing")
  compile_limit=600 compile_backend=aot_eager  # inductor's code generation takes ~10 min on 2 cores
else
  device=cuda precision=bf16
  bench=(--model sd15 --latent 64 --steps 5 --warmup 2)
  loop=(--model sd15 --resolution 512 --steps 8 --warmup 2)
  loops=("--batch 1" "--batch 1 --gradient-checkpointing" "--batch 4" "--batch 4 --gradient-checkpointing")
  compile_limit=180 compile_backend=inductor
fi

step() {  # step NAME TIMEOUT COMMAND...: run, keep its output, record name, status and seconds
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "[gpu_check] $name" >&2
  timeout "$limit" "$@" > "$out/$name.out" 2> "$out/$name.log"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$out/steps.tsv"
}

step tests 900 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml "$out/tests.xml"
step bench-bf16 600 "$PY" scripts/bench.py --device "$device" --dtype bf16 "${bench[@]}" \
  --variants base,loha_train,peft_lora,peft,lycoris --json "$out/bench-bf16.json"
step bench-fp32 600 "$PY" scripts/bench.py --device "$device" --dtype fp32 "${bench[@]}" \
  --variants base,loha_train,peft_lora --json "$out/bench-fp32.json"
i=0
for extra in "${loops[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086  # $extra holds several flags
  step "loop-$i" 900 "$PY" scripts/bench_loop.py --device "$device" --mixed-precision "$precision" "${loop[@]}" \
    $extra --json "$out/loop-$i.json"
done
step bench-compiled "$compile_limit" "$PY" scripts/bench.py --device "$device" --dtype "${precision/no/fp32}" \
  "${bench[@]}" --variants loha_train --compile --compile-backend "$compile_backend" --json "$out/bench-compiled.json"
"$PY" scripts/gpu_report.py "$out" --dry "$dry"
