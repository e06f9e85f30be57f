#!/usr/bin/env bash
# Readies a machine for a study's runners and starts them: the study's own
# binary (built from the commit the study keeps, in a worktree beside the
# checkout, unless runs/bin-<study>/ holds it already), the model and data
# (`melora fetch`), then one background runner of experiments/study.sh per
# argument, each TASKS:METHODS:SEEDS (an empty part: all of them).
#
#   STUDY=experiments/study-5000.json COMMIT=0aaf49d experiments/study-machine.sh wg-s:melora:0 wg-s:mcd:0
#
# On the machine that ran them before, the same command resumes the runners
# (the binary is kept, finished phases are skipped, an interrupted training
# run continues from its last checkpoint); on a new one it rebuilds the
# binary first (some 6-10 minutes on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${STUDY:?set STUDY to a study file, e.g. experiments/study-5000.json}
COMMIT=${COMMIT:?set COMMIT to the commit of the study binary (its README says which)}
[ $# -gt 0 ] || { echo "name at least one runner, as TASKS:METHODS:SEEDS (e.g. wg-s:melora:0)" >&2; exit 2; }
name=$(basename "$STUDY" .json)
bin=runs/bin-$name
if [ ! -x "$bin/melora" ]; then
  src=../$name-src
  [ -d "$src" ] || git worktree add --detach "$src" "$COMMIT"
  [ "$(git -C "$src" rev-parse --short=7 HEAD)" = "${COMMIT:0:7}" ] \
    || { echo "$src holds $(git -C "$src" rev-parse --short HEAD), not $COMMIT" >&2; exit 1; }
  # The binary moved from melora-llama to its own crate after early studies.
  if [ -d "$src/melora-cli" ]; then package=melora-cli; else package=melora-llama; fi
  (cd "$src" && cargo build --release -p "$package" --bin melora)
  mkdir -p "$bin"
  cp "$src/target/release/melora" "$bin/melora"
  echo "${COMMIT:0:7}" > "$bin/COMMIT"
fi
kept=$(cat "$bin/COMMIT")
[ "${kept:0:7}" = "${COMMIT:0:7}" ] || { echo "$bin/melora is of $kept, not $COMMIT: a study keeps one binary" >&2; exit 1; }
"$bin/melora" fetch
for runner in "$@"; do
  IFS=: read -r tasks methods seeds <<< "$runner"
  log="runs/$name-${tasks:-all}-${methods:-all}-${seeds:-all}.log"
  STUDY=$STUDY MELORA=$bin/melora TASKS=$tasks METHODS=$methods SEEDS=$seeds \
    nohup nice -n 10 experiments/study.sh >> "${log//,/+}" 2>&1 &
  echo "runner $runner started (pid $!), its log: ${log//,/+}"
done
