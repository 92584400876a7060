#!/usr/bin/env bash
# The GPU benchmarks in one run (the figures of BENCHMARKS.md's GPU section), at most 9 minutes
# (each step has its own time limit, scaled by LIMIT_SCALE, default 1):
#   1. bench/generate.py   paper-size sampler against the fair reference (its noise drawn on the
#                          GPU), fp32, batch 1; then bf16; then bf16 + torch.compile
#                          (reduce-overhead: CUDA graphs) with a batch-size sweep; then the Halton
#                          order at 8 steps (each run also times 18 steps)
#   2. bench/train_step.py paper-size tokenizer and generator training steps, fp32 vs bf16, batch 32
#   3. bench/quality.py    (only with QUALITY_MIN > 0, about 2 * QUALITY_MIN + 2 more minutes) demo
#                          sizes trained on the GPU for QUALITY_MIN minutes, then the same generator
#                          steps again without the ECG frame embedding (an ablation on the same
#                          tokenizer and clips)
#
#   bench/gpu.sh OUT_DIR [CLIPS.npz]
#
# CLIPS.npz is a phantom corpus cut by `bench/quality.py --clips FILE` on a machine with the whole
# stack (the GPU image may lack pydicom/wfdb); without it, step 3 builds the corpus itself.
# Each step runs (under its own time limit) even when an earlier one fails; the exit status is the
# number of failed steps.
set -u
out=${1:?usage: bench/gpu.sh OUT_DIR [CLIPS.npz]}
clips=${2:-$out/clips.npz}
py=${PYTHON:-python3}
quality_min=${QUALITY_MIN:-0}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
log="$out/gpu_log.txt"
scale=${LIMIT_SCALE:-1}
# step SECONDS CMD...: run CMD under its own limit (SECONDS x LIMIT_SCALE), logging it; count failures.
step() {
  local limit; limit=$(awk -v s="$1" -v k="$scale" 'BEGIN { printf "%d", s * k }'); shift
  echo "== (limit ${limit}s) $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { failed=$((failed + 1)); echo "== exit $rc" | tee -a "$log"; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
gen=("$py" bench/generate.py --size paper --device cuda --gpu-batch 0)
step 130 "${gen[@]}" --json "$out/generate_paper.json"
step 60 "${gen[@]}" --skip-reference --precision bf16 --json "$out/generate_paper_bf16.json"
step 150 "${gen[@]}" --skip-reference --precision bf16 --compile reduce-overhead --batch-sweep 1,8,32,128 \
    --json "$out/generate_paper_bf16_compiled.json"
step 90 "${gen[@]}" --skip-reference --precision bf16 --compile reduce-overhead --order halton --steps 8 \
    --batch-sweep 32 --json "$out/generate_paper_bf16_compiled_halton8.json"
step 100 "$py" bench/train_step.py --recipe paper --device cuda --batch 32 --json "$out/train_step_paper.json"
if [ "$quality_min" = 0 ]; then echo "failed steps: $failed" | tee -a "$log"; exit "$failed"; fi
qlimit=$((60 * quality_min + 240))
work=$(mktemp -d)
step "$qlimit" "$py" bench/quality.py --device cuda --batch 32 --clips "$clips" --tokenizer-steps 20000 \
    --generator-steps 40000 --budget-min "$quality_min" --log-every 500 --save --workdir "$work" \
    --json "$out/quality_gpu.json"
gen_steps=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['steps']['generator'])" \
    "$out/quality_gpu.json" 2>/dev/null || echo 2000)
step "$qlimit" "$py" bench/quality.py --device cuda --batch 32 --clips "$clips" --tokenizer "$work/tokenizer.safetensors" \
    --generator-steps "$gen_steps" --log-every 500 --no-ecg-frame-embedding --workdir "$work/ablation" \
    --json "$out/quality_gpu_no_frame_embedding.json"
echo "failed steps: $failed" | tee -a "$log"
exit "$failed"
