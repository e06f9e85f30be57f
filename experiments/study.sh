#!/usr/bin/env bash
# Runs a study: a study file (experiments/study-*.json) names its tasks,
# methods, seeds, checkpoints and the arguments of every command; `melora
# study-plan` turns it into the phases that remain (training runs, Laplace
# fits, evaluations), in order, and this script runs them. Resumable: a
# finished phase is skipped, an interrupted training run continues from its
# last checkpoint (--resume), and the evaluations kept in the results folder
# (committed) are restored into a new machine's run folder so that only
# what is missing is redone. After each evaluation the tables are
# regenerated (`melora study-report --study FILE`, which is also the command
# that regenerates them at any time from the kept files).
#
#   cargo build --release -p melora-cli
#   mkdir -p runs/bin && cp target/release/melora runs/bin/melora   # a copy the build cannot change
#   git rev-parse --short HEAD > runs/bin/COMMIT
#   STUDY=experiments/study-5000.json MELORA=runs/bin/melora nohup experiments/study.sh > runs/study-5000.log 2>&1 &
#
# TASKS, METHODS and SEEDS (comma-separated) restrict a runner, so that two
# share a machine's cores (say TASKS=arc-e and TASKS=wg-s); the runs and
# fits an evaluation needs come with it.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${STUDY:?set STUDY to a study file, e.g. experiments/study-5000.json}
MELORA=${MELORA:-target/release/melora}
# The binary that writes the tables (study-report only reads the kept
# evaluations): the study's own unless a newer report is wanted.
REPORT=${REPORT:-$MELORA}
RUNS=$(jq -r .runs "$STUDY")
OUT=$(jq -r .results "$STUDY")
mkdir -p "$RUNS" "$OUT"
# The commit of the binary's code: a COMMIT file beside it (written when it
# was copied), else the checkout's.
commit=$(cat "$(dirname "$MELORA")/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
times="$RUNS/times.tsv"
# Two runners started together on a new machine would both create the
# times file and restore the same evaluations: one does it under a lock,
# the other waits and then finds it done.
exec 9> "$RUNS/.setup.lock"
flock 9
[ -f "$times" ] || { [ -f "$OUT/times.tsv" ] && cp "$OUT/times.tsv" "$times"; } || true
[ -f "$times" ] || printf 'run\tphase\tseconds\tpeak_rss_mib\tcommit\tcpu_seconds\n' > "$times"

# Restores the kept evaluations (results, gzipped sample probabilities)
# into the run folder; their mark, done, last.
while IFS= read -r marker; do
  kept=$(dirname "$marker"); rel=${kept#"$OUT"/}; dir="$RUNS/$rel"
  [ -f "$dir/done" ] && continue
  mkdir -p "$dir"
  cp "$kept"/results.json "$kept"/results.md "$dir"/
  for gz in "$kept"/predictions-*.json.gz; do gzip -dc "$gz" > "$dir/$(basename "$gz" .gz)"; done
  if [ -f "$kept/ood.json" ]; then cp "$kept/ood.json" "$dir/"; fi
  cp "$marker" "$dir/"
  echo "== restored the evaluation $rel"
done < <(find "$OUT/evals" -name done 2>/dev/null | sort)
flock -u 9
exec 9>&-

# Runs a phase, appending its wall time, peak memory and CPU time (user +
# system seconds) to times.tsv; returns the command's exit status.
timed() { # name phase command...
  local name=$1 phase=$2; shift 2
  # The measurements' file is the phase's own: two runners may share $RUNS.
  local t0 rss=- cpu=- status=0 rss_file; rss_file="$RUNS/.rss-${name//\//_}-$phase"; t0=$(date +%s)
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f '%M %U %S' -o "$rss_file" "$@" < /dev/null || status=$?
    # A command killed by a signal leaves no measurements in the file: then "-".
    local kib user sys
    read -r kib user sys < <(tail -n 1 "$rss_file" 2>/dev/null || true) || true
    [[ $kib =~ ^[0-9]+$ ]] && rss=$(( kib / 1024 ))
    [[ $user =~ ^[0-9.]+$ && $sys =~ ^[0-9.]+$ ]] && cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.0f", u + s }')
  else
    "$@" < /dev/null || status=$?
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$phase" "$(( $(date +%s) - t0 ))" "$rss" "$commit" "$cpu" >> "$times"
  return "$status"
}

# Keeps what a finished phase leaves, in the results folder (committed):
# an evaluation's results and gzipped sample probabilities; a training
# run's record (its resolved settings, validation curve, verdict on its
# posterior and gzipped log); a Laplace fit's laplace.json and settings.
keep() { # kind out keep
  local kind=$1 dir=$2 kept="$OUT/$3" f
  mkdir -p "$kept"
  case $kind in
    eval)
      cp "$dir"/results.json "$dir"/results.md "$kept"/
      for p in "$dir"/predictions-*.json; do gzip -9 -n -c "$p" > "$kept/$(basename "$p").gz"; done
      if [ -f "$dir/ood.json" ]; then cp "$dir/ood.json" "$kept/"; fi
      cp "$dir/done" "$kept/done" ;;
    train)
      for f in config.json metrics.jsonl failed; do [ -f "$dir/$f" ] && cp "$dir/$f" "$kept/$f"; done
      grep '^posterior: ' "$dir/log.txt" > "$kept/verdict.txt" 2>/dev/null || rm -f "$kept/verdict.txt"
      gzip -9 -n -c "$dir/log.txt" > "$kept/log.txt.gz" ;;
    laplace)
      for f in config.json laplace.json; do [ -f "$dir/$f" ] && cp "$dir/$f" "$kept/$f"; done ;;
  esac
  cp "$times" "$OUT/times.tsv"
}

plan=$(mktemp)
trap 'rm -f "$plan"' EXIT
filters=()
[ -n "${TASKS:-}" ] && filters+=(--tasks "$TASKS")
[ -n "${METHODS:-}" ] && filters+=(--methods "$METHODS")
[ -n "${SEEDS:-}" ] && filters+=(--seeds "$SEEDS")
"$MELORA" study-plan --study "$STUDY" "${filters[@]}" > "$plan"
echo "== $(wc -l < "$plan") phases to run ($(date -u +%H:%M), binary of $commit)"
while IFS= read -r line; do
  name=$(jq -r .name <<< "$line"); kind=$(jq -r .kind <<< "$line")
  out=$(jq -r .out <<< "$line"); marker=$(jq -r .marker <<< "$line")
  needs=$(jq -r '.needs // empty' <<< "$line"); rel=$(jq -r .keep <<< "$line")
  mapfile -t args < <(jq -r '.args[]' <<< "$line")
  # Done meanwhile (another runner), or what it needs did not happen.
  [ -e "$marker" ] && continue
  if [ -n "$needs" ] && [ ! -e "$needs" ]; then echo "!! $name ($kind): $needs is missing; skipped"; continue; fi
  echo "== $kind $name ($(date -u +%H:%M))"
  case $kind in
    train)
      [ -f "$out/config.json" ] && args+=(--resume)
      if timed "$name" train "$MELORA" "${args[@]}" --plain; then
        touch "$out/done"
      elif [ -f "$out/config.json" ]; then
        # A run that stops (a non-finite loss: divergence) is a result,
        # not the end of the study: it is marked, its checkpoints so far
        # are still evaluated, and the report says so.
        echo "!! training $name failed (see $out/log.txt)"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" train-failed 0 - "$commit" - >> "$times"
        touch "$out/failed" "$out/done"
      else
        # It never started (a settings error, a missing model): not a
        # result; nothing is marked, so a rerun tries again.
        echo "!! training $name did not start (see the message above)"
        continue
      fi
      keep train "$out" "$rel" ;;
    laplace)
      if timed "$name" fit "$MELORA" "${args[@]}"; then keep laplace "$out" "$rel"
      else printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" fit-failed 0 - "$commit" - >> "$times"; fi ;;
    eval)
      if timed "$name" eval "$MELORA" "${args[@]}"; then
        touch "$out/done"
        keep eval "$out" "$rel"
        "$REPORT" study-report --study "$STUDY" --runs "$RUNS" > /dev/null || echo "!! the report failed"
      else
        echo "!! evaluation $name failed"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" eval-failed 0 - "$commit" - >> "$times"
      fi ;;
  esac
done < "$plan"
"$REPORT" study-report --study "$STUDY" --runs "$RUNS"
