#!/usr/bin/env bash
# Builds what melora-bench/gpu/profile.sh runs on a GPU machine, here (no GPU
# or CUDA toolkit needed): melora-bench with the cuda backend, plain, with
# fusion and with autotune, never with ndarray (whose CPU fast paths read
# tensors to the host), stripped and xz-compressed into OUT (default
# gpu-carry/, which git ignores), and checks that they fit the 64 MiB a
# device run carries.
# Usage: melora-bench/gpu/build.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-gpu-carry}
mkdir -p "$out"
for variant in cuda cuda,fusion cuda,autotune; do
  cargo build --release -p melora-bench --no-default-features --features "$variant"
  name=melora-bench-${variant//,/-}
  cp target/release/melora-bench "$out/$name"
  strip "$out/$name"
  xz -9 -T0 -f "$out/$name"
done
git rev-parse HEAD > "$out/commit.txt"
ls -l "$out"
total=$(du -cb "$out"/*.xz | tail -1 | cut -f1)
echo "binaries: $((total / 1024 / 1024)) MiB compressed (the carry limit is 64 MiB with the working tree)"
[ "$total" -lt $((60 * 1024 * 1024)) ] || { echo "too large to carry"; exit 1; }
