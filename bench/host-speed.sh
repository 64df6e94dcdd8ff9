#!/usr/bin/env bash
# The host speed figures of docs/host-speed.md, side by side with PyTorch in one run:
# each snfc step is timed right after (or before) the PyTorch step it is compared with, so
# that background load on a shared machine hits both alike.
#
#   bench/host-speed.sh [OUT]        # default OUT: bench/results/host-speed-<commit>.txt
#
# Needs a release build (`cargo build --release`) and, for the PyTorch rows, a Python with
# torch: PYTHON=/path/to/python (default python3); without torch those rows are skipped.
# ANCHORS: the folder with bench_torch.py, bench_torch_compiled.py and bench_torch_conv.py
# (default ../shared/anchors). ROUNDS: how many times each pair is repeated (default 2).
set -uo pipefail
cd "$(dirname "$0")/.."

snfc=target/release/snfc
python=${PYTHON:-python3}
anchors=${ANCHORS:-../shared/anchors}
rounds=${ROUNDS:-2}
commit=$(git rev-parse --short HEAD)
out=${1:-bench/results/host-speed-$commit.txt}
[ -x "$snfc" ] || { echo "build first: cargo build --release" >&2; exit 2; }
have_torch=0
"$python" -c 'import torch' 2>/dev/null && [ -d "$anchors" ] && have_torch=1

mkdir -p "$(dirname "$out")"
exec > >(tee "$out") 2>&1

echo "# snfc host speed, commit $commit, $(date -u +%Y-%m-%d)"
echo "# CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores;" \
    "flags: $(grep -o -w -E 'avx512f|avx2|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
[ "$have_torch" = 1 ] && echo "# PyTorch $("$python" -c 'import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())')"

step() { # LABEL THREADS ARGS...: one snfc bench line
    local label=$1 threads=$2
    shift 2
    echo "## snfc $label, $threads thread(s)"
    RAYON_NUM_THREADS=$threads "$snfc" bench "$@" 2>&1 | grep -v '^Device'
}

for round in $(seq "$rounds"); do
    echo "# round $round"
    for threads in 1 2; do
        step "mnist_fc2" "$threads" specs/mnist_fc2.json --steps 60 --profile
        if [ "$have_torch" = 1 ]; then
            echo "## PyTorch fc2 step (paper's code, eager), $threads thread(s)"
            "$python" "$anchors/bench_torch.py" --threads "$threads" --dims 784 --steps 40
            echo "## PyTorch fc2 step (one backward, fused Adam; eager and torch.compile), $threads thread(s)"
            "$python" "$anchors/bench_torch_compiled.py" --threads "$threads" --dim 784 --steps 40 2>&1 | grep -v -i warn
        fi
    done
    step "mnist_cnn9" 2 specs/mnist_cnn9.json --steps 20 --profile
    if [ "$have_torch" = 1 ]; then
        echo "## PyTorch cnn9 step, 2 threads"
        "$python" "$anchors/bench_torch_conv.py" --threads 2 --steps 10 --model cnn9
    fi
    step "mnist_cnn9_exact f32" 2 specs/mnist_cnn9_exact.json --steps 5 --profile
    step "mnist_cnn9_exact f64" 2 specs/mnist_cnn9_exact.json --steps 5 --dtype f64
done
echo "## snfc Fig. 4 scaling (fc), 2 threads"
RAYON_NUM_THREADS=2 "$snfc" bench --scaling fc --dims 784,3072 --steps 10 --out "$(dirname "$out")/scaling-$commit" 2>&1 | grep -v '^Device'
