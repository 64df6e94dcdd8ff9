#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and the binaries built elsewhere (the GPU machine
# has no internet), run the CUDA backend test suite, time a training step of
# specs/mnist_fc2.json and specs/mnist_cnn9.json (SNF and exact) on cuda vs host, train one
# epoch of each on cuda, and write a short table.
#
# Build on a machine with the Rust toolchain (bind the CUDA driver API the GPU's driver has;
# 13000 = CUDA 13.0, driver 580):
#   CUDARC_CUDA_VERSION=13000 cargo build --release
#   CUDARC_CUDA_VERSION=13000 cargo test --release -p snfc-runtime --test backends --no-run
#   cp "$(ls -t target/release/deps/backends-* | grep -v '\.d$' | head -1)" target/release/backends-test
# then, on the GPU machine, from the repository root:
#   bench/gpu-check.sh [SNFC] [BACKENDS_TEST] [OUT.md]
set -uo pipefail
cd "$(dirname "$0")/.."

SNFC=${1:-target/release/snfc}
TESTS=${2:-target/release/backends-test}
OUT=${3:-bench/results/gpu-check-$(date +%F).md}
TMP=$(mktemp -d)
status=0

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${gpu:-none found by nvidia-smi}"

# 1. The backend suite on CUDA (every kernel kind and whole steps vs host f64). A CUDA test
#    that finds no device prints "skipped:"; here that is a failure.
"$TESTS" cuda:: --test-threads=1 --nocapture >"$TMP/tests.txt" 2>&1
tests_rc=$?
cat "$TMP/tests.txt"
if grep -q "skipped:" "$TMP/tests.txt"; then
    echo "FAIL: the CUDA tests were skipped (no CUDA device found)"
    tests_rc=1
fi
[ $tests_rc -eq 0 ] || status=1
tests_line=$(grep -E "^test result" "$TMP/tests.txt" | tail -1)

# 2. Step time, cuda vs host, same spec and batch.
bench() { # spec device steps
    "$SNFC" bench "specs/$1.json" --device "$2" --steps "$3" --warmup 5 --json 2>"$TMP/bench-$1-$2.err" | head -1
}
cuda_json=$(bench mnist_fc2 cuda 100) || status=1
host_json=$(bench mnist_fc2 host 20) || status=1
cnn_cuda_json=$(bench mnist_cnn9 cuda 50) || status=1
cnn_exact_cuda_json=$(bench mnist_cnn9_exact cuda 20) || status=1
cnn_host_json=$(bench mnist_cnn9 host 10) || status=1
field() { # json key
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d.get(sys.argv[2], "")) if d else print("")' "$1" "$2" 2>/dev/null
}

# 3. One epoch of training on cuda (validation NLL in nats).
"$SNFC" train specs/mnist_fc2.json --device cuda --epochs 1 --out "$TMP/run" --quiet >"$TMP/train.txt" 2>&1 || status=1
train_line=$(tail -1 "$TMP/train.txt")
"$SNFC" train specs/mnist_cnn9.json --device cuda --epochs 1 --out "$TMP/cnn" --quiet >"$TMP/cnn.txt" 2>&1 || status=1
cnn_line=$(tail -1 "$TMP/cnn.txt")

{
    echo "# GPU check, $(date +%F)"
    echo
    echo "GPU: ${gpu:-unknown}"
    echo
    echo "CUDA backend tests: ${tests_line:-did not run} (exit $tests_rc)"
    echo
    echo "| spec | device | median step (ms) | min step (ms) | examples/s | GFLOP/s | kernels | learned-inverse sample (ms/sample) | exact-inverse sample (ms/sample) |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for j in "$cuda_json" "$host_json" "$cnn_cuda_json" "$cnn_exact_cuda_json" "$cnn_host_json"; do
        [ -n "$j" ] || continue
        smp=$(python3 -c 'import json,sys
d = json.loads(sys.argv[1]).get("sampling") or {}
f = lambda k: "%.3f" % d[k] if isinstance(d.get(k), (int, float)) else "-"
print(f("learned_ms_per_sample") + " | " + f("exact_ms_per_sample"))' "$j" 2>/dev/null || echo "- | -")
        printf '| %s | %s | %.2f | %.2f | %.0f | %.1f | %s | %s |\n' \
            "$(field "$j" spec)" "$(field "$j" device)" "$(field "$j" median_step_ms)" "$(field "$j" min_step_ms)" \
            "$(field "$j" examples_per_sec)" "$(field "$j" gflops)" "$(field "$j" kernels)" "$smp"
    done
    echo
    echo "One epoch on cuda: ${train_line}"
    echo
    echo "One epoch of mnist_cnn9 on cuda: ${cnn_line}"
} | tee "$OUT"
echo "wrote $OUT"
exit $status
