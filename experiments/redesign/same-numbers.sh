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
#
# A run's config.json changed spelling with the typed settings (targets a
# list; rank, alpha, dropout under low_rank; kl, std_init under melora): a
# pair of them counts as the same when every setting of the first, read
# the new way, has the same value in the second, whose further keys are
# the adapters' settings that were not reachable before (at their
# defaults; listed).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$1" = --compare ]; then
  a=$2 b=$3 differ=0 same=0 respelt=0
  while IFS= read -r f; do
    if cmp -s "$a/$f" "$b/$f"; then same=$((same + 1))
    elif [ "$(basename "$f")" = config.json ] && python3 - "$a/$f" "$b/$f" <<'PY'
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:])
if isinstance(old.get("targets"), str):
    old["targets"] = [t.strip() for t in old["targets"].split(",") if t.strip()]
for key, section in [("rank", "low_rank"), ("alpha", "low_rank"), ("dropout", "low_rank"), ("kl", "melora"), ("std_init", "melora")]:
    if key in old:
        old.setdefault(section, {})[key] = old.pop(key)
def same(o, n, path):
    if isinstance(o, dict) and isinstance(n, dict):
        extra = sorted(set(n) - set(o))
        if extra:
            print(f"  {sys.argv[2]}: new settings {path or '.'}: {', '.join(extra)}")
        return all(k in n and same(o[k], n[k], f"{path}.{k}" if path else k) for k in o)
    return o == n
sys.exit(0 if same(old, new, "") else 1)
PY
    then respelt=$((respelt + 1)); echo "same settings, new spelling: $f"
    else differ=$((differ + 1)); echo "differs: $f"; fi
  done < <(cd "$a" && find . -type f ! -name 'log.txt' ! -name '*.log' | sort)
  missing=$(comm -3 <(cd "$a" && find . -type f ! -name 'log.txt' ! -name '*.log' | sort) <(cd "$b" && find . -type f ! -name 'log.txt' ! -name '*.log' | sort) | wc -l)
  echo "$same files identical, $respelt the same settings spelt anew, $differ differ, $missing in one folder only"
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
