#!/usr/bin/env bash
# GPU benchmark: takes a melora-bench binary built elsewhere with
# `cargo build --release -p melora-bench --features cuda` (this script builds
# nothing), and on a machine with one NVIDIA GPU times a training step of a
# Llama-2-7B-shaped model (random weights, drawn on the GPU) at batch 4,
# seq 300, r = 8 on q/v, in bf16, for LoRA, BLoB and Me-LoRA, then PyTorch +
# PEFT LoRA on the same shape and dtype, and prints one table (also written to
# OUT/table.md, with every run's JSON and log beside it).
#
# Peak device memory is read the same way for both implementations: the most
# GPU memory in use (nvidia-smi, every 100 ms) while the run was alive, less
# what was in use before it started; it includes each framework's allocator
# cache and CUDA context.
#
# Usage: melora-bench/gpu/run.sh path/to/melora-bench [python] [OUT]
# Environment: DTYPE (bf16; f16 or f32), STEPS (5), WARMUP (2),
# RUN_TIMEOUT (seconds per run, 200), MODEL (llama2-7b; a preset or folder
# both sides can read, e.g. to try the script on a small model).
set -uo pipefail
bin=${1:?usage: run.sh path/to/melora-bench [python] [OUT]}
python=${2:-python3}
out=${3:-/tmp/melora-gpu}
dtype=${DTYPE:-bf16}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
bin=$(readlink -f "$bin")

# cubecl compiles its kernels at run time with NVRTC and the CUDA headers:
# find the toolkit (CUDA_PATH, /usr/local/cuda, or where nvcc lives).
if [ -z "${CUDA_PATH:-}" ]; then
  for dir in /usr/local/cuda /opt/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")"; do
    if [ -f "$dir/include/cuda.h" ]; then export CUDA_PATH=$dir; break; fi
  done
fi
nvrtc=$(ls "${CUDA_PATH:-/nonexistent}"/lib64/libnvrtc.so* "${CUDA_PATH:-/nonexistent}"/targets/x86_64-linux/lib/libnvrtc.so* 2>/dev/null | head -1)
if [ -z "$nvrtc" ]; then
  nvrtc=$("$python" - <<'EOF' 2>/dev/null
import glob, os, site
for root in site.getsitepackages():
    for hit in sorted(glob.glob(os.path.join(root, "nvidia", "**", "libnvrtc.so*"), recursive=True)):
        print(hit); raise SystemExit
EOF
)
fi
[ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "CUDA_PATH=${CUDA_PATH:-unset} NVRTC=${nvrtc:-not found}"
} | tee "$out/machine.txt"

used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }

# measure NAME CMD...: runs CMD (JSON on stdout) under a timeout while
# sampling GPU memory; adds "peak_device_mib" to NAME.json.
measure() {
  local name=$1; shift
  local idle; idle=$(used_mib)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/$name.mem" 2>/dev/null &
  local smi=$!
  local start=$SECONDS
  timeout "${RUN_TIMEOUT:-200}" "$@" > "$out/$name.json" 2> "$out/$name.log"
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/runs.txt"
  [ $rc -eq 0 ] || { tail -5 "$out/$name.log"; return $rc; }
  "$python" - "$out/$name.json" "$out/$name.mem" "$idle" <<'EOF'
import json, sys
path, mem, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])
report = json.load(open(path))
samples = [float(l) for l in open(mem) if l.strip()]
report["peak_device_mib"] = max(samples) - idle if samples else None
json.dump(report, open(path, "w"), indent=2)
EOF
}

args=(--model "${MODEL:-llama2-7b}" --batch 4 --seq 300 --rank 8 --steps "${STEPS:-5}" --warmup "${WARMUP:-2}")
case $dtype in bf16) torch_dtype=bfloat16;; f16) torch_dtype=float16;; *) torch_dtype=float32;; esac
measure peft "$python" "$here/peers/peft_step.py" "${args[@]}" --dtype "$torch_dtype" --json || true
ours=()
for method in lora melora blob; do
  if measure "melora-$method" "$bin" step "${args[@]}" --method "$method" --dtype "$dtype" --json; then
    ours+=("melora-$method")
  fi
done

"$python" - "$out" "${ours[@]}" <<'EOF' | tee "$out/table.md"
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
load = lambda n: json.load(open(os.path.join(out, n + ".json")))
peft = load("peft") if os.path.exists(os.path.join(out, "peft.json")) and os.path.getsize(os.path.join(out, "peft.json")) else None
lora = load("melora-lora") if "melora-lora" in names else None
print(open(os.path.join(out, "machine.txt")).readline().strip())
print()
print("| implementation | method | dtype | s/step | tokens/s | peak device MiB | time vs our LoRA | time vs PEFT LoRA |")
print("|---|---|---|---:|---:|---:|---:|---:|")
rows = [(load(n), "melora") for n in names] + ([(peft, "PyTorch + PEFT")] if peft else [])
for r, who in rows:
    t = r["median_seconds"]
    vs_lora = f"{t / lora['median_seconds']:.2f}x" if lora else "n/a"
    vs_peft = f"{t / peft['median_seconds']:.2f}x" if peft else "n/a"
    mem = f"{r['peak_device_mib']:.0f}" if r.get("peak_device_mib") is not None else "n/a"
    dtype = r.get("dtype", "")
    print(f"| {who} ({r['backend']}) | {r['method']} | {dtype} | {t:.3f} | {r['tokens_per_second']:.0f} | {mem} | {vs_lora} | {vs_peft} |")
EOF
