#!/usr/bin/env bash
# GPU benchmark: takes a melora-bench binary built elsewhere with
# `cargo build --release -p melora-bench --features cuda` (this script builds
# nothing), and on a machine with one NVIDIA GPU times a Llama-2-7B-shaped
# model (random weights) at batch 4, seq 300, r = 8 for LoRA, BLoB and
# Me-LoRA, then PyTorch + PEFT LoRA on the same shape, and prints one table.
# Usage: melora-bench/gpu/run.sh path/to/melora-bench [python]
set -euo pipefail
bin=${1:?usage: run.sh path/to/melora-bench [python]}
python=${2:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
args=(--model llama2-7b --batch 4 --seq 300 --rank 8 --steps 5 --warmup 2)
echo "| implementation | method | s/step | tokens/s |"
echo "|---|---|---:|---:|"
for method in lora blob melora; do
  "$bin" step "${args[@]}" --method "$method" --json > /tmp/melora-gpu-$method.json
  "$python" -c "import json,sys; r=json.load(open('/tmp/melora-gpu-$method.json')); print(f\"| melora ({r['backend']}) | $method | {r['median_seconds']:.3f} | {r['tokens_per_second']:.0f} |\")"
done
"$python" "$here/peers/peft_step.py" "${args[@]}" --dtype bfloat16 > /tmp/melora-gpu-peft.json
"$python" -c "import json; r=json.load(open('/tmp/melora-gpu-peft.json')); print(f\"| {r['backend']} | lora (PEFT) | {r['median_seconds']:.3f} | {r['tokens_per_second']:.0f} |\")"
