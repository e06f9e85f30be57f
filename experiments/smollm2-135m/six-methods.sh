#!/usr/bin/env bash
# The six methods of the paper (MAP, MCD, ENS, LAP, BLoB, Me-LoRA) on
# SmolLM2-135M / ARC-Easy, sized for a 2-core CPU: each adapter trained for
# STEPS steps of batch 4 (lr 1e-3), evaluated on the same seeded subset of
# 100 validation examples, with the configs' answer scoring. Writes one
# folder per method and table.md to experiments/results/six-methods/answer/,
# runs to runs/six-answer/. (SCORING=label OUT=... RUNS=... gives the
# label-scored table of experiments/results/six-methods/.)
#
#   MELORA=target/release/melora experiments/smollm2-135m/six-methods.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MELORA=${MELORA:-target/debug/melora}
STEPS=${STEPS:-100}
N=${N:-100}
SCORING=${SCORING:-answer}
RUNS=${RUNS:-runs/six-$SCORING}
OUT=${OUT:-experiments/results/six-methods/$SCORING}
CFG=experiments/smollm2-135m
mkdir -p "$RUNS" "$OUT"
common=(--steps "$STEPS" --scoring "$SCORING" --set lr=0.001 --set eval_every=0 --set max_validation=20 --set checkpoint_every=25)
times="$OUT/times.tsv"
[ -f "$times" ] || printf 'method\tphase\tseconds\n' > "$times"

timed() { # method phase command...
  local m=$1 p=$2; shift 2
  local t0; t0=$(date +%s)
  "$@"
  printf '%s\t%s\t%s\n' "$m" "$p" "$(( $(date +%s) - t0 ))" >> "$times"
}

train() { # method config
  local m=$1 cfg=$2
  if [ -f "$RUNS/$m/done" ]; then return; fi
  local resume=(); [ -f "$RUNS/$m/config.json" ] && resume=(--resume)
  timed "$m" train "$MELORA" train --config "$cfg" "${common[@]}" --out "$RUNS/$m" "${resume[@]}"
  touch "$RUNS/$m/done"
}

evaluate() { # method run-folder [eval args...]
  local m=$1 dir=$2; shift 2
  if [ -f "$OUT/$m/results.json" ]; then return; fi
  timed "$m" eval "$MELORA" eval --run "$dir" --task arc-e --split validation --max-examples "$N" --out "$OUT/$m" "$@"
}

train map "$CFG/arc-e-map.json";      evaluate map "$RUNS/map"
if [ ! -f "$RUNS/map/laplace/laplace.json" ]; then
  timed lap fit "$MELORA" laplace --run "$RUNS/map" --config "$CFG/laplace.json" --set max_examples=100
fi
evaluate lap "$RUNS/map/laplace"
train melora "$CFG/arc-e-melora.json"; evaluate melora "$RUNS/melora"
train blob "$CFG/arc-e-blob.json";     evaluate blob "$RUNS/blob"
train mcd "$CFG/arc-e-mcd.json";       evaluate mcd "$RUNS/mcd"
train ens "$CFG/arc-e-ens.json";       evaluate ens "$RUNS/ens"

# One table from the six results.json files.
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
names = [("map", "MAP"), ("mcd", "MCD"), ("ens", "ENS"), ("lap", "LAP"), ("blob", "BLoB"), ("melora", "Me-LoRA")]
secs = {}
for line in open(os.path.join(out, "times.tsv")).read().split("\n")[1:]:
    if line:
        m, p, s = line.split("\t")
        secs.setdefault(m, {})[p] = secs.setdefault(m, {}).get(p, 0) + int(s)
rows = ["| method | n | S | ACC (%) | ECE (%) | NLL | Brier | posterior std | std of p(gold) | epistemic (nats) | train (s) | post hoc / eval (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for key, label in names:
    r = json.load(open(os.path.join(out, key, "results.json")))[0]
    m = r["metrics"]
    t = secs.get(key, {})
    train = t.get("train", secs.get("map", {}).get("train", 0) if key == "lap" else 0)
    post = t.get("fit", 0) + t.get("eval", 0)
    sp = r.get("spread") or {}
    ps = "-" if sp.get("posterior_std") is None else f"{sp['posterior_std']:.4f}"
    gs = "-" if not sp else f"{sp['gold_std']:.4f}"
    ep = "-" if not sp else f"{sp['epistemic']:.4f}"
    rows.append(f"| {label} | {m['count']} | {r['samples']} | {100*m['accuracy']:.2f} | {100*m['ece']:.2f} | {m['nll']:.4f} | {m['brier']:.4f} | {ps} | {gs} | {ep} | {train} | {post} |")
open(os.path.join(out, "table.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
