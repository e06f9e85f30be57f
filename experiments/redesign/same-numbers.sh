#!/usr/bin/env bash
# Issue 17's check that the redesign changed no number: a 10-step SmolLM2
# training of each of LoRA, BLoB and Me-LoRA (validation and a checkpoint
# every 5 steps) and a zero-shot evaluation, run by the given binary into a
# folder; run it with the binaries of the commits before and after, then
# compare the two folders file by file (every file but the logs, whose
# lines carry times):
#
#   experiments/redesign/same-numbers.sh BEFORE_BINARY runs/same-before
#   experiments/redesign/same-numbers.sh AFTER_BINARY runs/same-after
#   experiments/redesign/same-numbers.sh --compare runs/same-before runs/same-after
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$1" = --compare ]; then
  a=$2 b=$3 differ=0 same=0
  while IFS= read -r f; do
    if cmp -s "$a/$f" "$b/$f"; then same=$((same + 1)); else differ=$((differ + 1)); echo "differs: $f"; fi
  done < <(cd "$a" && find . -type f ! -name 'log.txt' ! -name '*.log' | sort)
  missing=$(comm -3 <(cd "$a" && find . -type f ! -name 'log.txt' ! -name '*.log' | sort) <(cd "$b" && find . -type f ! -name 'log.txt' ! -name '*.log' | sort) | wc -l)
  echo "$same files identical, $differ differ, $missing in one folder only"
  [ "$differ" = 0 ] && [ "$missing" = 0 ]
  exit
fi
bin=$1 out=$2
mkdir -p "$out"
for method in lora blob melora; do
  rm -rf "$out/$method"
  "$bin" train --config "experiments/smollm2-135m/arc-e-$method.json" --steps 10 \
    --set eval_every=5 --set max_validation=20 --set checkpoint_every=5 --out "$out/$method" > "$out/$method.log" 2>&1
done
rm -rf "$out/zero-shot"
"$bin" eval --zero-shot --scoring answer --task arc-e --split test --max-examples 50 --out "$out/zero-shot" > "$out/zero-shot.log" 2>&1
echo "done: $out"
