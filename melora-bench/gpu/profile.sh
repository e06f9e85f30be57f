#!/usr/bin/env bash
# The GPU speed investigation in one run on a lent machine (one NVIDIA GPU,
# no network), well under 10 minutes: every binary is built elsewhere
# (melora-bench/gpu/build.sh) and carried in BIN_DIR. Phases, each with its
# own timeout so that one stuck phase does not take the others:
#   1. products: the cuBLAS time of each matrix-product shape of the 7B step
#      in PyTorch on this card (product_shapes.py);
#   2. baseline: run.sh's table with the plain cuda binary (PyTorch + PEFT
#      LoRA, melora LoRA, Me-LoRA, BLoB; bf16, batch 4 x 300, r = 8 on q/v);
#   3. profile: LoRA and Me-LoRA steps with cubecl's profiling logger
#      ("basic": every kernel and its time) written to files;
#   4. fusion: LoRA and Me-LoRA with the cuda,fusion binary;
#   5. autotune: the cuda,autotune binary warms its cache on the 7B shapes cut
#      to 2 layers (autotune keys do not count layers), then times the full
#      model with that cache; the cache is kept in OUT/autotune-cache for the
#      repository (a cubecl.toml pointing at it).
# Usage: profile.sh BIN_DIR [python] [OUT]
#   BIN_DIR holds melora-bench-cuda, melora-bench-cuda-fusion and
#   melora-bench-cuda-autotune (plain or .xz).
set -uo pipefail
bins=$(readlink -f "${1:?usage: profile.sh BIN_DIR [python] [OUT]}")
python=${2:-python3}
out=$(mkdir -p "${3:-/tmp/melora-gpu-profile}" && readlink -f "${3:-/tmp/melora-gpu-profile}")
here=$(cd "$(dirname "$0")" && pwd)
for b in "$bins"/*.xz; do [ -e "$b" ] && xz -dkf "$b"; done
chmod +x "$bins"/melora-bench-cuda* 2>/dev/null
started=$SECONDS
phase() { echo "== $1 (at $((SECONDS - started)) s)" | tee -a "$out/phases.txt"; }
args=(--model llama2-7b --batch 4 --seq 300 --rank 8 --dtype bf16 --json)

phase "1. products in cuBLAS (PyTorch)"
timeout 120 "$python" "$here/product_shapes.py" --json "$out/products.json" | tee "$out/products.md"

phase "2. baseline (run.sh, plain cuda binary)"
STEPS=5 WARMUP=2 RUN_TIMEOUT=90 "$here/run.sh" "$bins/melora-bench-cuda" "$python" "$out/baseline"

# step NAME BINARY TIMEOUT [ARGS...]: one step benchmark run from a folder
# of its own (cubecl reads cubecl.toml from the working directory up).
step() {
  local name=$1 bin=$2 limit=$3; shift 3
  (cd "$out/$name" && timeout "$limit" "$bin" step "${args[@]}" "$@" > "$out/$name/report.json" 2> "$out/$name/log.txt")
  echo "$name: exit $? after $((SECONDS - started)) s" | tee -a "$out/phases.txt"
}

phase "3. per-kernel profile (cubecl profiling logger)"
for method in lora melora; do
  mkdir -p "$out/profile-$method"
  cat > "$out/profile-$method/cubecl.toml" <<TOML
[profiling.logger]
level = "basic"
file = "$out/profile-$method/kernels.log"
append = false
TOML
  step "profile-$method" "$bins/melora-bench-cuda" 90 --method "$method" --steps 2 --warmup 1
done

phase "4. fusion"
for method in lora melora; do
  mkdir -p "$out/fusion-$method"
  step "fusion-$method" "$bins/melora-bench-cuda-fusion" 120 --method "$method" --steps 5 --warmup 2
done

phase "5. autotune: warm on 2 layers, then the whole model with the cache"
mkdir -p "$out/autotune-warm" "$out/autotune-lora" "$out/autotune-melora" "$out/autotune-cache"
for d in autotune-warm autotune-lora autotune-melora; do
  cat > "$out/$d/cubecl.toml" <<TOML
[autotune]
level = "balanced"
cache = { file = "$out/autotune-cache" }

[autotune.logger]
level = "minimal"
file = "$out/$d/autotune.log"
TOML
done
step autotune-warm "$bins/melora-bench-cuda-autotune" 150 --method melora --layers 2 --steps 1 --warmup 1
for method in lora melora; do
  step "autotune-$method" "$bins/melora-bench-cuda-autotune" 90 --method "$method" --steps 5 --warmup 2
done

phase "summary"
"$python" - "$out" <<'PY' | tee "$out/summary.md"
import json, os, sys
out = sys.argv[1]
def report(path):
    try:
        return json.load(open(path))
    except Exception:
        return None
print(open(os.path.join(out, "baseline", "table.md")).read() if os.path.exists(os.path.join(out, "baseline", "table.md")) else "no baseline table")
print("| variant | method | s/step |")
print("|---|---|---:|")
for name in ["profile-lora", "profile-melora", "fusion-lora", "fusion-melora", "autotune-warm", "autotune-lora", "autotune-melora"]:
    r = report(os.path.join(out, name, "report.json"))
    print(f"| {name} | {r['method'] if r else '-'} | {r['median_seconds']:.3f} |" if r else f"| {name} | - | failed: see {name}/log.txt |")
products = report(os.path.join(out, "products.json"))
if products:
    print(f"\ncuBLAS, all products of a step: {products['total_ms']:.1f} ms ({products['device']})")
PY
echo "done in $((SECONDS - started)) s; results in $out"
