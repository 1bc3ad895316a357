#!/usr/bin/env bash
# Everything a machine with an NVIDIA GPU should check, in one go (about 10 minutes on one H200):
#
#   bash bench/gpu_check.sh [OUT]        # OUT: where runs and logs go (default: $OUT, else ./gpu-check)
#
# 1. the machine: nvidia-smi, torch's CUDA build and devices;
# 2. the test suite on CUDA (models load with device_map "auto", so onto the GPU);
# 3. a short demo run in bfloat16, then in bitsandbytes 4-bit (8 trials each, headless, with
#    an export and a held-out evaluation), printing each phase's seconds, peak RSS and peak
#    GPU memory from the run's phases.json.
#
# Needs a Python with a CUDA build of torch and apostate installed with the `test` and `demo`
# extras (pip install -e '.[test,demo]'); it installs nothing, so it also runs offline.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
python="${PYTHON:-python}"
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || status=1
"$python" - <<'EOF' || status=1
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
for index in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(index)
    print(f"  cuda:{index} {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}")
assert torch.cuda.is_available(), "no CUDA device: this script is for a machine with a GPU"
EOF

echo "== test suite on CUDA"
start=$(date +%s)
"$python" -m pytest -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -25
test_status=${PIPESTATUS[0]}
echo "tests: exit $test_status in $(( $(date +%s) - start )) s"
[ "$test_status" -eq 0 ] || status=1

demo_run() {  # name, extra flags...
    local name="$1"; shift
    echo "== demo run: $name"
    local start; start=$(date +%s)
    "$python" -m apostate demo --config examples/demo-quick.toml --n-trials 8 --n-startup-trials 4 \
        --run-dir "$out/$name" --headless --actions save --actions evaluate "$@" >"$out/$name.log" 2>&1
    local code=$?
    tail -4 "$out/$name.log"
    echo "$name: exit $code in $(( $(date +%s) - start )) s"
    [ "$code" -eq 0 ] || status=1
    "$python" - "$out/$name/phases.json" <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no phases.json")
print(f"{'phase':42} {'seconds':>8} {'peak RSS GiB':>13} {'peak GPU GiB':>13}")
for phase in data["phases"]:
    gpu = phase.get("peak_gpu")
    gpu_text = f"{gpu / 2**30:13.2f}" if gpu is not None else f"{'-':>13}"
    print(f"{phase['name'][:42]:42} {phase['seconds']:8.1f} {phase['peak_rss'] / 2**30:13.2f} {gpu_text}")
print("median trial phases:", {k: round(v, 2) for k, v in data.get("trial_medians", {}).items()})
EOF
}

demo_run bfloat16 --dtypes '["bfloat16"]'
demo_run 4bit --dtypes '["bfloat16"]' --quantization bnb_4bit

echo "== done: exit $status (logs and runs in $out)"
exit $status
