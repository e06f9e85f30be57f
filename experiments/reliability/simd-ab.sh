#!/usr/bin/env bash
# Did turning off burn-ndarray's `simd` feature (issue 16: its approximate
# f32 reciprocal broke cross-process determinism) cost speed? Same-run A/B
# of `melora-bench step` built without it (the workspace as it is) and with
# it (a checkout whose Cargo.toml adds "simd" to burn-ndarray's features),
# alternating, on SmolLM2-135M.
#
#   experiments/reliability/simd-ab.sh NOSIMD_BENCH SIMD_BENCH [ROUNDS]
set -euo pipefail
a=$1; b=$2; rounds=${3:-3}
printf '| round | method | build | median step (s) | tokens / s |\n|---:|---|---|---:|---:|\n'
for round in $(seq 1 "$rounds"); do
  for method in lora melora; do
    for build in without with; do
      bin=$a; [ "$build" = with ] && bin=$b
      json=$("$bin" step --model smollm2-135m --method "$method" --batch 4 --seq 128 --steps 6 --warmup 2 --json 2>/dev/null)
      python3 - "$round" "$method" "$build" "$json" <<'PY'
import json, sys
r = json.loads(sys.argv[4])
print(f"| {sys.argv[1]} | {sys.argv[2]} | {sys.argv[3]} simd | {r['median_seconds']:.3f} | {r['tokens_per_second']:.0f} |")
PY
    done
  done
done
