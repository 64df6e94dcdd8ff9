#!/usr/bin/env bash
# Two release builds of snfc side by side: training-step time (mnist_fc2, mnist_cnn9,
# mnist_glow on the host; mnist_fc2 and mnist_cnn9 on wgpu, i.e. lavapipe on a CPU machine) and
# compile time (cifar_glow, a 512-layer FC flow), each measurement taken for
# BEFORE and AFTER in turn, ROUNDS times, so that background load on a shared machine hits
# both alike.
#
#   bench/before-after.sh BEFORE_BIN AFTER_BIN [OUT]
#
# Build each with `git worktree add DIR REV && cargo build --release --bin snfc` in DIR.
# OUT defaults to bench/results/before-after-<commit>.txt. ROUNDS (default 3), THREADS
# (default 2); BEFORE_REV and AFTER_REV name the builds' commits in the output.
set -uo pipefail
cd "$(dirname "$0")/.."

before=${1:?BEFORE binary}
after=${2:?AFTER binary}
rounds=${ROUNDS:-3}
threads=${THREADS:-2}
commit=$(git rev-parse --short HEAD)
out=${3:-bench/results/before-after-$commit.txt}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A self-normalizing stack of 512 linear layers with smooth leaky ReLUs between them.
python3 - "$tmp/fc512.json" <<'EOF'
import json, sys
layers = []
for i in range(512):
    if i:
        layers.append({"type": "smooth_leaky_relu", "alpha": 0.3})
    layers.append({"type": "linear", "bias": True})
spec = {"name": "fc512", "input": {"shape": [784], "preprocess": "dequantize_logit"},
        "layers": layers, "objective": {"gradient": "self_normalizing", "lambda": 1.0},
        "train": {"batch_size": 100}}
json.dump(spec, open(sys.argv[1], "w"))
EOF

# cifar_glow without its training augmentation (which no compiled graph depends on), so that a
# build from before an augmentation existed compiles the same spec.
python3 - specs/cifar_glow.json "$tmp/cifar_glow.json" <<'EOF'
import json, sys
spec = json.load(open(sys.argv[1]))
spec.get("train", {}).pop("augment", None)
json.dump(spec, open(sys.argv[2], "w"))
EOF

mkdir -p "$(dirname "$out")"
exec > >(tee "$out") 2>&1
echo "# snfc before/after, $(date -u +%Y-%m-%d), at commit $commit"
echo "# before: $before (${BEFORE_REV:-rev not given}), after: $after (${AFTER_REV:-rev not given})"
echo "# CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, RAYON_NUM_THREADS=$threads"

step_ms() { # BIN SPEC STEPS [FLAGS...]: the median ms per training step
    local bin=$1 spec=$2 steps=$3
    shift 3
    RAYON_NUM_THREADS=$threads "$bin" bench "$spec" --steps "$steps" --json "$@" 2>/dev/null |
        python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["median_step_ms"])'
}
compile_s() { # BIN SPEC: seconds of `snfc compile --emit stats`, wall clock
    local t0 t1
    t0=$(date +%s.%N)
    "$1" compile "$2" --emit stats >/dev/null 2>"$tmp/compile.err" ||
        { echo "compile failed: $(cat "$tmp/compile.err")" >&2; echo "failed"; return; }
    t1=$(date +%s.%N)
    python3 -c "print('%.2f' % ($t1 - $t0))"
}

printf '%-6s %-26s %10s %10s\n' round measurement before after
for round in $(seq "$rounds"); do
    for case in "mnist_fc2 specs/mnist_fc2.json 60" "mnist_cnn9 specs/mnist_cnn9.json 20" \
        "mnist_glow specs/mnist_glow.json 10"; do
        set -- $case
        b=$(step_ms "$before" "$2" "$3")
        a=$(step_ms "$after" "$2" "$3")
        printf '%-6s %-26s %10s %10s\n' "$round" "$1 step ms" "$b" "$a"
    done
    # The GPU kernels on the CPU's Vulkan driver (lavapipe), where one exists (WGPU=0: skip).
    if [ "${WGPU:-1}" = 1 ]; then
        for case in "mnist_fc2 specs/mnist_fc2.json 3" "mnist_cnn9 specs/mnist_cnn9.json 2"; do
            set -- $case
            b=$(step_ms "$before" "$2" "$3" --warmup 1 --device wgpu)
            a=$(step_ms "$after" "$2" "$3" --warmup 1 --device wgpu)
            printf '%-6s %-26s %10s %10s\n' "$round" "$1 wgpu step ms" "$b" "$a"
        done
    fi
    for case in "cifar_glow $tmp/cifar_glow.json" "fc512 $tmp/fc512.json"; do
        set -- $case
        b=$(compile_s "$before" "$2")
        a=$(compile_s "$after" "$2")
        printf '%-6s %-26s %10s %10s\n' "$round" "$1 compile s" "$b" "$a"
    done
done
