#!/usr/bin/env bash
# A check that a change of the code changed no number: a 10-step SmolLM2
# training of each of LoRA, BLoB and Me-LoRA (validation and a checkpoint
# every 5 steps) and a zero-shot evaluation, run by the given binary into a
# folder; run it with the binaries of the commits before and after, then
# compare the two folders file by file (every file but the logs, whose
# lines carry times):
#
#   experiments/redesign/same-numbers.sh BEFORE_BINARY runs/same-before
#   experiments/redesign/same-numbers.sh AFTER_BINARY runs/same-after
#   experiments/redesign/same-numbers.sh --compare runs/same-before runs/same-after AFTER_BINARY
#
# A run's config.json changes spelling when the settings do (targets a
# list; rank, alpha, dropout under low_rank; kl, std_init under melora;
# the optimisers' settings under elbo, the evaluation's under predict, an
# ensemble's under ensemble): a pair of them counts as the same settings
# when the after binary reads both to the same settings (`melora train
# --config FILE --print-config`, every setting as today's spelling). A
# checkpoint's adapter_config.json likewise: BLoB's and Me-LoRA's own
# settings moved into a "posterior" object of its "melora" section.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$1" = --compare ]; then
  a=$2 b=$3 bin=${4:-} differ=0 same=0 respelt=0
  resolved() { "$bin" train --config "$1" --print-config; }
  while IFS= read -r f; do
    if cmp -s "$a/$f" "$b/$f"; then same=$((same + 1))
    elif [ "$(basename "$f")" = config.json ] && [ -n "$bin" ] && [ -f "$b/$f" ] \
         && diff <(resolved "$a/$f") <(resolved "$b/$f"); then
      respelt=$((respelt + 1)); echo "same settings, new spelling: $f"
    elif [ "$(basename "$f")" = adapter_config.json ] && [ -f "$b/$f" ] && python3 - "$a/$f" "$b/$f" <<'PY'
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:])
for config in old.get("melora", {}).values():
    own = {k: config.pop(k) for k in list(config) if k not in ("low_rank", "posterior")}
    if own:
        config["posterior"] = own
sys.exit(0 if old == new else 1)
PY
    then
      respelt=$((respelt + 1)); echo "same settings, new spelling: $f"
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
