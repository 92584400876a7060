#!/usr/bin/env bash
# The archive-scale figures that need more cores than the 2-core development machine (issue #15),
# in one run of at most ~9 minutes (each step under its own limit, scaled by LIMIT_SCALE):
#   1. bench/scale.py --actors-scan   tokenize clips/s with 1 and 2 actors (CPU encoders)
#   2. bench/scale.py                 the one pass at 1,000 and 4,000 inputs and ingest-then-tokenize
#                                     at 1,000, all cores, CPU encoders (no S3 server: moto is not
#                                     needed on such a machine)
#   3. the one pass again at the CLI's default of 512 inputs per task (fewer, larger groups)
#
#   bench/cores.sh OUT_DIR
#
# CPUS (default: all cores) is the Ray cluster's size. WHEELS=DIR first installs the wheels in DIR
# into a private folder (for a machine that has torch and pyarrow but not Ray or pydicom, e.g. the
# GPU image); PYTHON picks the interpreter. The exit status is the number of failed steps.
set -u
out=${1:?usage: bench/cores.sh OUT_DIR}
py=${PYTHON:-python3}
cpus=${CPUS:-$(nproc)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/cores_log.txt"
scale=${LIMIT_SCALE:-1}
failed=0
if [ -n "${WHEELS:-}" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl 2>&1 | tail -3 | tee -a "$log"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
# step SECONDS CMD...: run CMD under its own limit (SECONDS x LIMIT_SCALE), logging it; count failures.
step() {
  local limit; limit=$(awk -v s="$1" -v k="$scale" 'BEGIN { printf "%d", s * k }'); shift
  echo "== (limit ${limit}s) $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { failed=$((failed + 1)); echo "== exit $rc" | tee -a "$log"; }
}

echo "cores: $(nproc), Ray CPUs: $cpus, $(uname -m)" | tee -a "$log"
"$py" -c "import ray, pydicom, wfdb, torch; print('ray', ray.__version__, 'torch', torch.__version__)" 2>&1 \
  | tee -a "$log"
scale_py=("$py" bench/scale.py --cpus "$cpus" --no-s3)
step 200 "${scale_py[@]}" --actors-scan 1000 --json "$out/actors.json"
step 200 "${scale_py[@]}" --inputs-per-task 128 --repeats 1 --json "$out/scale.json" --workdir "$out/work"
step 150 "${scale_py[@]}" --no-two-stage --json "$out/scale_512.json" --workdir "$out/work512"
rm -rf "$out/work" "$out/work512"
echo "failed steps: $failed" | tee -a "$log"
exit "$failed"
