#!/usr/bin/env bash
# The posterior pilot: does the posterior leave its initialisation?
# SmolLM2-135M on ARC-Easy, answer scoring, r = 8 on q_proj and v_proj,
# batch 4, 600 steps, seed 0, for BLoB and Me-LoRA (melora's: subspace KL,
# per-example C) under three recipes:
#   study     the calibration study's (two optimisers, SGD at a constant
#             0.01 on the ELBO's KL, lr 1e-3)
#   official  BLoB's code (`--recipe blob-official`: SGD on AdamW's
#             schedule, BLoB's KL weighting, Flipout, dropout 0, lr 1e-4,
#             an adapter on lm_head too)
#   default   melora's default (the std parameters' own Adam at kl_lr 0.01
#             on the ELBO's KL, lr 1e-3)
# Validation (all 570 questions) every 100 steps with the posterior
# diagnostics; every run is evaluated at its last step (no checkpoint
# selection on the split it is evaluated on) with S = 10 per-example draws.
# Resumable: a finished evaluation is skipped, a training run continues
# from its last checkpoint.
#
#   cargo build --release -p melora-cli
#   mkdir -p runs/bin-posterior && cp target/release/melora runs/bin-posterior/melora
#   git rev-parse --short HEAD > runs/bin-posterior/COMMIT
#   MELORA=runs/bin-posterior/melora nohup experiments/posterior/pilot.sh > runs/posterior.log 2>&1 &
#
# RUNS_ONLY="blob-default melora-default" runs a subset.
set -euo pipefail
cd "$(dirname "$0")/../.."
MELORA=${MELORA:-target/release/melora}
RUNS=${RUNS:-runs/posterior}
OUT=${OUT:-experiments/results/posterior}
CFG=experiments/smollm2-135m
ALL="blob-study melora-study blob-official melora-official blob-default melora-default"
RUNS_ONLY=${RUNS_ONLY:-$ALL}
mkdir -p "$RUNS" "$OUT"
commit=$(cat "$(dirname "$MELORA")/COMMIT" 2>/dev/null || git rev-parse --short HEAD)
common=(--scoring answer --steps 600 --seed 0 --plain --set eval_every=100 --set max_validation=null
        --set checkpoint_every=50 --set select_best=false)

for name in $RUNS_ONLY; do
  method=${name%%-*}
  recipe=${name#*-}
  case $recipe in
    study) extra=(--recipe study --set lr=0.001) ;;
    official) extra=(--recipe blob-official) ;;
    default) extra=(--set elbo.optimizer=StdAdam --set kl_lr=0.01 --set lr=0.001) ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
  esac
  dir="$RUNS/$name"
  kept="$OUT/runs/$name"
  if [ -f "$kept/results.json" ]; then echo "== $name: kept"; continue; fi
  resume=(); [ -f "$dir/config.json" ] && resume=(--resume)
  if [ ! -f "$dir/done" ]; then
    echo "== train $name ($(date -u +%H:%M))"
    "$MELORA" train --config "$CFG/arc-e-$method.json" "${common[@]}" "${extra[@]}" --out "$dir" "${resume[@]}"
    touch "$dir/done"
  fi
  echo "== eval $name ($(date -u +%H:%M))"
  "$MELORA" eval --run "$dir" --task arc-e --split validation --out "$dir/eval"
  mkdir -p "$kept"
  cp "$dir/config.json" "$dir/metrics.jsonl" "$dir/eval/results.json" "$dir/eval/results.md" "$kept/"
  grep -E "^step [0-9]+ nll" "$dir/log.txt" | awk '{ for (i = 1; i <= NF; i++) if ($i == "std") print $2, $(i + 1) }' > "$kept/std.tsv"
  grep -E "^posterior" "$dir/log.txt" > "$kept/verdict.txt" || true
  echo "$commit" > "$kept/COMMIT"
done
echo "== done ($(date -u +%H:%M))"
