#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and the binaries built elsewhere (the GPU machine
# has no internet), run the CUDA backend test suite, time a training step of
# specs/mnist_fc2.json, specs/mnist_cnn9.json and specs/mnist_glow.json (SNF and exact; TF32
# and full-f32 products) on cuda vs host with the products' rate against the device's FP32 and
# TF32 peaks, time the exact steps' inverses alone (gpu_inverse_speed), train one epoch of FC2
# and CNN9 on cuda, and write a table.
#
# Build on a machine with the Rust toolchain (bind the CUDA driver API the GPU's driver has;
# 13000 = CUDA 13.0, driver 580):
#   CUDARC_CUDA_VERSION=13000 cargo build --release
#   CUDARC_CUDA_VERSION=13000 cargo test --release -p snfc-runtime --test backends --no-run
#   cp "$(ls -t target/release/deps/backends-* | grep -v '\.d$' | head -1)" target/release/backends-test
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p snfc-runtime --example gpu_inverse_speed
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

# 2. Step time, cuda vs host, same spec and batch: FC2, CNN9 and mnist_glow, self-normalizing
#    and exact (--compare-exact prints both), profiled separately for the products' rate; on
#    cuda with TF32 tensor cores allowed (the default) and with full f32 products.
bench() { # spec device steps [extra flags...]: one JSON line per gradient mode
    local spec=$1 device=$2 steps=$3
    shift 3
    "$SNFC" bench "specs/$spec.json" --device "$device" --steps "$steps" --warmup 5 --compare-exact --json "$@" \
        2>>"$TMP/bench-$spec-$device.err"
}
field() { # json key
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); v=d.get(sys.argv[2], ""); print("%.4g" % v if isinstance(v, float) else v)' "$1" "$2" 2>/dev/null
}
rows=()
for spec_steps in "mnist_fc2 100" "mnist_cnn9 50" "mnist_glow 10"; do
    set -- $spec_steps
    for matmul in tf32 f32; do
        while IFS= read -r j; do rows+=("$matmul|$j"); done < <(bench "$1" cuda "$2" --matmul "$matmul" || status=1)
        while IFS= read -r j; do rows+=("$matmul profiled|$j"); done < <(bench "$1" cuda 5 --matmul "$matmul" --profile || status=1)
    done
    host_steps=$(( $2 / 5 > 2 ? $2 / 5 : 2 ))
    while IFS= read -r j; do rows+=("host|$j"); done < <(bench "$1" host "$host_steps" || status=1)
done

# The device's peak rates (dense, no sparsity; NVIDIA data sheets) for the products' share.
peaks() { # GPU name -> "FP32 TF32" TFLOP/s
    case "$1" in
        *H200*|*"H100 80GB HBM3"*|*H100*SXM*) echo "67 495" ;;
        *H100*PCIe*|*"H100 PCIe"*) echo "51 378" ;;
        *H100*NVL*) echo "60 418" ;;
        *A100*) echo "19.5 156" ;;
        *L40S*) echo "91.6 183" ;;
        *) echo "" ;;
    esac
}
read -r peak_fp32 peak_tf32 <<<"$(peaks "$gpu")"

# 3. The exact steps' inverses alone: the device's blocked Gauss-Jordan elimination at the
#    sizes of FC2 and Fig. 4, with its launches and its error against the host's f64 LU.
INVERSE=target/release/examples/gpu_inverse_speed
if [ -x "$INVERSE" ]; then
    "$INVERSE" cuda 784 3072 >"$TMP/inverse.txt" 2>&1 || status=1
else
    echo "$INVERSE not built" >"$TMP/inverse.txt"
fi
cat "$TMP/inverse.txt"

# 4. One epoch of training on cuda (validation NLL in nats).
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
    echo "Peaks used for the products' share: FP32 ${peak_fp32:-?} TFLOP/s, TF32 ${peak_tf32:-?} TFLOP/s (dense)."
    echo
    echo "| spec | gradient | device | products | median step (ms) | examples/s | GFLOP/s | products' GFLOP/s | of FP32 peak | of TF32 peak | reads/step | uploads/step | launches/step |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for row in "${rows[@]}"; do
        mode=${row%%|*}
        j=${row#*|}
        [ -n "$j" ] || continue
        rate=$(field "$j" gemm_rate_gflops)
        share() { # peak TFLOP/s
            [ -n "$rate" ] && [ -n "$1" ] && python3 -c "print('%.1f %%' % (100 * $rate / ($1 * 1000)))" || echo "-"
        }
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
            "$(field "$j" spec)" "$(field "$j" gradient)" "$(field "$j" device)" "$mode" \
            "$(field "$j" median_step_ms)" "$(field "$j" examples_per_sec)" "$(field "$j" gflops)" \
            "${rate:--}" "$(share "$peak_fp32")" "$(share "$peak_tf32")" \
            "$(field "$j" host_reads_per_step)" "$(field "$j" uploads_per_step)" "$(field "$j" launches_per_step)"
    done
    echo
    echo "Inverses by the device's elimination (\`gpu_inverse_speed cuda 784 3072\`):"
    echo
    echo '```'
    cat "$TMP/inverse.txt"
    echo '```'
    echo
    echo "One epoch on cuda: ${train_line}"
    echo
    echo "One epoch of mnist_cnn9 on cuda: ${cnn_line}"
} | tee "$OUT"
echo "wrote $OUT"
exit $status
