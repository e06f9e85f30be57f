#!/usr/bin/env bash
# The calibration study at CPU scale (issue 15): the paper's Tables 2 and 3
# on SmolLM2-135M with answer scoring, three seeds, plus the uncertainty
# decomposition and OOD detection. Resumable: every training run, Laplace
# fit and evaluation whose output exists is skipped, an interrupted training
# run continues from its last checkpoint, and the tables are regenerated
# from the run folders at the end (and by `melora study-report` at any time).
#
#   cargo build --release -p melora-llama
#   mkdir -p runs/bin && cp target/release/melora runs/bin/melora   # a copy the build cannot change
#   git rev-parse --short HEAD > runs/bin/COMMIT
#   MELORA=runs/bin/melora nohup experiments/study.sh > runs/study.log 2>&1 &
#
# Protocol (see experiments/results/study/README.md): r = 8 on q_proj and
# v_proj, batch 4, STEPS steps at LR for every method (from the LoRA pilot on
# the validation split, experiments/results/study/pilot.md), the checkpoint
# with the best validation accuracy (mean weights, all 570 questions, every
# EVAL_EVERY steps); evaluation on a fixed seeded subset of N questions of
# the ARC-Easy test split (in distribution) and of the ARC-Challenge test
# split, and all of MMLU college chemistry, physics and mathematics (out of
# distribution), in one `melora eval --ood` per run.
set -euo pipefail
cd "$(dirname "$0")/.."
MELORA=${MELORA:-target/release/melora}
# The binary that writes the tables (`study-report` only reads the kept
# evaluations): the study's own unless a newer report is wanted.
REPORT=${REPORT:-$MELORA}
RUNS=${RUNS:-runs/study}
OUT=${OUT:-experiments/results/study}
SEEDS=${SEEDS:-0 1 2}
# The methods, in the order they run for each seed; a subset (say
# METHODS="mcd") packs a session's hours with runs that finish in them.
# LAP trains its MAP run when that is missing.
ALL_METHODS="map lap melora melora-paper blob mcd"
METHODS=${METHODS:-$ALL_METHODS}
for m in $METHODS; do
  case " $ALL_METHODS " in *" $m "*) ;; *) echo "unknown method '$m' in METHODS (known: $ALL_METHODS)" >&2; exit 2;; esac
done
STEPS=${STEPS:-600}
LR=${LR:-0.001}
EVAL_EVERY=${EVAL_EVERY:-100}
N=${N:-1000}
CFG=experiments/smollm2-135m
OOD=arc-c,mmlu-chem,mmlu-phys,mmlu-math
mkdir -p "$RUNS/evals" "$OUT/evals"
# The commit of the binary's code: a COMMIT file beside it (written when it
# was copied), else the checkout's.
commit=$(cat "$(dirname "$MELORA")/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
times="$RUNS/times.tsv"

# Finished evaluations (their results and gzipped sample probabilities) and
# the phase times are kept in $OUT/evals and $OUT/times.tsv, which are
# committed: a new machine, with no run folders, restores them here and
# redoes only what is missing. ood.json, the mark of a finished
# evaluation, is restored last.
[ -f "$times" ] || { [ -f "$OUT/times.tsv" ] && cp "$OUT/times.tsv" "$times"; } || true
[ -f "$times" ] || printf 'run\tphase\tseconds\tpeak_rss_mib\tcommit\n' > "$times"
for kept in "$OUT"/evals/*/; do
  [ -f "$kept/ood.json" ] || continue
  name=$(basename "$kept"); dir="$RUNS/evals/$name"
  [ -f "$dir/ood.json" ] && continue
  mkdir -p "$dir"
  cp "$kept"/results.json "$kept"/results.md "$dir"/
  for gz in "$kept"/predictions-*.json.gz; do gzip -dc "$gz" > "$dir/$(basename "$gz" .gz)"; done
  cp "$kept/ood.json" "$dir/ood.json"
  echo "== restored the evaluation $name from $OUT/evals"
done

# Copies a finished evaluation into $OUT/evals (and the times).
keep() { # name
  local dir="$RUNS/evals/$1" kept="$OUT/evals/$1"
  mkdir -p "$kept"
  cp "$dir"/results.json "$dir"/results.md "$kept"/
  for p in "$dir"/predictions-*.json; do gzip -9 -n -c "$p" > "$kept/$(basename "$p").gz"; done
  cp "$dir/ood.json" "$kept/ood.json"
  cp "$times" "$OUT/times.tsv"
  "$REPORT" study-report --runs "$RUNS" --out "$OUT" > /dev/null
}
evaluated() { [ -f "$RUNS/evals/$1/ood.json" ]; }
# Keeps, beside a kept evaluation, the record of the run it evaluated: its
# resolved settings (config.json), its validation curve (metrics.jsonl:
# the checkpoint chosen is the best accuracy there), the Laplace fit's
# laplace.json, and its log (every step's loss and time), gzipped; small
# files, committed (the run folder itself is not).
keep_run() { # name run-folder
  local kept="$OUT/evals/$1/run" dir=$2 f
  evaluated "$1" && [ -d "$dir" ] || return 0
  mkdir -p "$kept"
  for f in config.json metrics.jsonl laplace.json; do [ -f "$dir/$f" ] && cp "$dir/$f" "$kept/$f"; done
  [ -f "$dir/log.txt" ] && gzip -9 -n -c "$dir/log.txt" > "$kept/log.txt.gz"
  return 0
}
# Evaluates a training run, once its training has finished (a run that did
# not start has nothing to evaluate).
evaluate_run() { # name run-folder [args...]
  local name=$1 dir=$2; shift 2
  if ! evaluated "$name"; then
    if [ ! -f "$dir/done" ]; then echo "!! $name: its training has not finished; not evaluated"; return; fi
    evaluate "$name" --run "$dir" "$@"
  fi
  keep_run "$name" "$dir"
}

# Runs a phase, appending its wall time and peak memory to times.tsv;
# returns the command's exit status.
timed() { # run phase command...
  local run=$1 phase=$2; shift 2
  # The peak-memory file is the phase's own: two studies may run at once
  # on one machine (different methods or seeds, one $RUNS).
  local t0 rss=- status=0 rss_file="$RUNS/.rss-$run-$phase"; t0=$(date +%s)
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f '%M' -o "$rss_file" "$@" || status=$?
    # A command killed by a signal leaves no peak in the file: then "-".
    local kib; kib=$(tail -n 1 "$rss_file" 2>/dev/null || true)
    [[ $kib =~ ^[0-9]+$ ]] && rss=$(( kib / 1024 ))
  else
    "$@" || status=$?
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$run" "$phase" "$(( $(date +%s) - t0 ))" "$rss" "$commit" >> "$times"
  return "$status"
}

common=(--scoring answer --steps "$STEPS" --set lr="$LR" --set eval_every="$EVAL_EVERY"
        --set max_validation=null --set checkpoint_every=50)

train() { # name config seed [overrides...]
  local name=$1 cfg=$2 seed=$3; shift 3
  local dir="$RUNS/$name-seed$seed"
  [ -f "$dir/done" ] && return
  local resume=(); [ -f "$dir/config.json" ] && resume=(--resume)
  echo "== train $name seed $seed"
  if timed "$name-seed$seed" train "$MELORA" train --config "$cfg" --seed "$seed" "${common[@]}" "$@" --out "$dir" "${resume[@]}"; then
    touch "$dir/done"
  else
    # A run that stops (a non-finite loss: divergence) is a result, not the
    # end of the study: it is marked, its best checkpoint so far (if any) is
    # still evaluated, and the report says so.
    if [ -f "$dir/config.json" ]; then
      echo "!! training $name seed $seed failed (see $dir/log.txt)"
      printf '%s	%s	%s	%s	%s
' "$name-seed$seed" train-failed 0 - "$commit" >> "$times"
      touch "$dir/failed" "$dir/done"
    else
      # It never started (a settings error, a missing model): not a result;
      # nothing is marked, so a rerun tries again.
      echo "!! training $name seed $seed did not start (see the message above)"
      sed -i "/^$name-seed$seed	train	/d" "$times"
    fi
  fi
}

evaluate() { # name subject-args...
  local name=$1; shift
  local out="$RUNS/evals/$name"
  [ -f "$out/ood.json" ] && return
  echo "== eval $name"
  if ! timed "$name" eval "$MELORA" eval "$@" --task arc-e --split test --max-examples "$N" --ood "$OOD" --out "$out"; then
    echo "!! evaluation $name failed"
    printf '%s	%s	%s	%s	%s
' "$name" eval-failed 0 - "$commit" >> "$times"
    return
  fi
  keep "$name"
}

evaluate zero-shot --zero-shot --scoring answer
for seed in $SEEDS; do
  for method in $METHODS; do
    case $method in
      map)
        # A training run whose evaluations are kept is not redone; LAP
        # (next) retrains its MAP run where the run folder was lost.
        evaluated "map-seed$seed" || train map "$CFG/arc-e-map.json" "$seed"
        evaluate_run "map-seed$seed" "$RUNS/map-seed$seed" ;;
      lap)
        # Laplace-LoRA on the MAP run: KFAC over 1000 training questions,
        # prior precision by marginal likelihood, 10 draws of the
        # linearised logits.
        evaluated "lap-seed$seed" || train map "$CFG/arc-e-map.json" "$seed"
        if ! evaluated "lap-seed$seed" && [ -f "$RUNS/map-seed$seed/done" ] && [ ! -f "$RUNS/map-seed$seed/laplace/laplace.json" ]; then
          echo "== laplace seed $seed"
          timed "lap-seed$seed" fit "$MELORA" laplace --run "$RUNS/map-seed$seed" --config "$CFG/laplace.json" --set max_examples=1000 ||
            printf '%s\t%s\t%s\t%s\t%s\n' "lap-seed$seed" fit-failed 0 - "$commit" >> "$times"
        fi
        if [ -f "$RUNS/map-seed$seed/laplace/laplace.json" ]; then
          evaluate "lap-seed$seed" --run "$RUNS/map-seed$seed/laplace" --samples 10
          keep_run "lap-seed$seed" "$RUNS/map-seed$seed/laplace"
        fi ;;
      melora)
        evaluated "melora-seed$seed" || train melora "$CFG/arc-e-melora.json" "$seed"
        evaluate_run "melora-seed$seed" "$RUNS/melora-seed$seed" ;;
      melora-paper)
        # The paper's Me-LoRA: Eq. 8's KL with prior noise, one C per batch, BLoB's std initialisation.
        evaluated "melora-paper-seed$seed" || train melora-paper "$CFG/arc-e-melora.json" "$seed" --set kl=Paper --set prior.noise=true \
          --set train_sampling=PerBatch --set std_init=Blob
        evaluate_run "melora-paper-seed$seed" "$RUNS/melora-paper-seed$seed" ;;
      blob)
        evaluated "blob-seed$seed" || train blob "$CFG/arc-e-blob.json" "$seed"
        evaluate_run "blob-seed$seed" "$RUNS/blob-seed$seed" ;;
      mcd)
        evaluated "mcd-seed$seed" || train mcd "$CFG/arc-e-mcd.json" "$seed"
        evaluate_run "mcd-seed$seed" "$RUNS/mcd-seed$seed" ;;
    esac
  done
done
# ENS: the three MAP seeds as the members of one ensemble (no training of its own).
"$REPORT" study-report --runs "$RUNS" --out "$OUT"
