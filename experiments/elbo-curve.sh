#!/usr/bin/env bash
# The objective a Bayesian run trains, at each validation: the training NLL
# (the mean over the steps since the previous validation, one sample each),
# the KL times its weight, and their sum, from the run's metrics.jsonl (a
# run folder's, or a study's kept record of it). The weight is the one the
# run logged at that step (1 / N under melora's default, which makes the sum
# the negative ELBO per training example); given N, the number of training
# examples, it is 1 / N whatever the run's schedule: the per-example ELBO of
# a run whose weight changes from step to step (BLoB's code's, whose weight
# at a validation step says nothing of its cycle).
#
#   experiments/elbo-curve.sh experiments/results/study-5000/runs/wg-s/melora-seed0/metrics.jsonl
#   experiments/elbo-curve.sh experiments/results/study-5000/runs/wg-s/blob-official-seed0/metrics.jsonl 640
set -euo pipefail
usage() { echo "usage: $0 RUN/metrics.jsonl [N]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] && [ -f "$1" ] || usage
n=${2:-}
[ -z "$n" ] || [[ $n =~ ^[1-9][0-9]*$ ]] || usage
printf 'step\ttrain_nll\tkl_weighted\tneg_elbo\tval_acc\tstd\n'
jq -r --arg n "$n" 'select(.posterior)
  | (if $n == "" then .posterior.kl_weight else 1 / ($n | tonumber) end) as $w
  | [.step, .train_nll, .posterior.kl * $w, .train_nll + .posterior.kl * $w, .metrics.accuracy,
     .posterior.stats.all.mean] | map(. * 10000 | round / 10000) | @tsv' "$1"
