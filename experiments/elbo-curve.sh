#!/usr/bin/env bash
# The objective a Bayesian run trains, at each validation: the training NLL
# (the mean over the steps since the previous validation, one sample each),
# the KL times its weight (1 / N under melora's default), and their sum, the
# negative ELBO per training example; from the run's metrics.jsonl (a run
# folder's, or a study's kept record of it).
#
#   experiments/elbo-curve.sh experiments/results/study-5000/runs/wg-s/melora-seed0/metrics.jsonl
set -euo pipefail
[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: $0 RUN/metrics.jsonl" >&2; exit 2; }
printf 'step\ttrain_nll\tkl_weighted\tneg_elbo\tval_acc\tstd\n'
jq -r 'select(.posterior) | [.step, .train_nll, .posterior.kl * .posterior.kl_weight,
        .train_nll + .posterior.kl * .posterior.kl_weight, .metrics.accuracy,
        .posterior.stats.all.mean] | map(. * 10000 | round / 10000) | @tsv' "$1"
