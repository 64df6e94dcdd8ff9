#!/usr/bin/env bash
# Data-parallel throughput on this machine: `mpirun -n 2` with one thread per rank against one
# process with two threads, the same specs and global batch, alternating, each run a few
# training steps (validation aside: examples/s counts the steps only).
#
#   bench/data-parallel.sh [OUT]     # default OUT: bench/results/data-parallel-<commit>.txt
#
# Needs `cargo build --release --features mpi` and Open MPI's mpirun. ROUNDS: repetitions of
# each pair (default 2). SPECS: the specs and their step counts (default below).
set -uo pipefail
cd "$(dirname "$0")/.."

snfc=target/release/snfc
rounds=${ROUNDS:-2}
specs=${SPECS:-"mnist_cnn9:40 mnist_glow_geco5x5:6"}
commit=$(git rev-parse --short HEAD)
out=${1:-bench/results/data-parallel-$commit.txt}
[ -x "$snfc" ] || { echo "build first: cargo build --release --features mpi" >&2; exit 2; }
command -v mpirun >/dev/null || { echo "mpirun not found (apt-get install openmpi-bin)" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

mkdir -p "$(dirname "$out")"
exec > >(tee "$out") 2>&1
echo "# snfc data-parallel throughput, commit $commit, $(date -u +%Y-%m-%d)"
echo "# CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(mpirun --version | head -1)"
echo "# spec, run, examples/s (training steps only), all-reduce share of the step time"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for entry in $specs; do
    spec=${entry%%:*}
    steps=${entry##*:}
    for round in $(seq "$rounds"); do
        rm -rf "$tmp/one" "$tmp/two"
        RAYON_NUM_THREADS=2 "$snfc" train "specs/$spec.json" --steps "$steps" -q --device host \
            --out "$tmp/one" >/dev/null 2>&1 || { echo "$spec: one process failed"; continue; }
        RAYON_NUM_THREADS=1 mpirun -n 2 --bind-to none "$snfc" train "specs/$spec.json" \
            --steps "$steps" -q --device host --out "$tmp/two" >/dev/null 2>&1 \
            || { echo "$spec: mpirun -n 2 failed"; continue; }
        python3 - "$spec" "$round" "$tmp/one/metrics.jsonl" "$tmp/two/metrics.jsonl" <<'PY'
import json, sys
spec, rnd, one, two = sys.argv[1:5]
last = lambda p: [json.loads(l) for l in open(p)][-1]
a, b = last(one), last(two)
batch = json.load(open(f"specs/{spec}.json"))["train"]["batch_size"]
step_secs = b["steps"] * batch / b["examples_per_sec"]
reduce = b.get("all_reduce_seconds", 0.0)
print(f"{spec} round {rnd}: 1 process x 2 threads {a['examples_per_sec']:.1f} ex/s; "
      f"mpirun -n 2 x 1 thread {b['examples_per_sec']:.1f} ex/s "
      f"({b['examples_per_sec'] / a['examples_per_sec']:.2f}x); "
      f"all-reduce {reduce:.3f} s = {100 * reduce / step_secs:.1f} % of the steps' {step_secs:.2f} s")
PY
    done
done
