#!/usr/bin/env bash
# A checkpoint that cannot be written, on a real full disk (issue 16): a
# small tmpfs holds one SmolLM2-135M Me-LoRA checkpoint (adapter and AdamW
# state, 5.7 MiB) but not a second one beside it, so the checkpoint at step
# 4 fails with ENOSPC. The run must stop with an error naming it, leave the
# step-2 checkpoint whole, and resume from it elsewhere. Needs root (mount)
# and the fetched assets (`melora fetch`).
#
#   experiments/reliability/disk-full.sh [path/to/melora]
set -euo pipefail
cd "$(dirname "$0")/../.."
MELORA=${1:-target/release/melora}
export RUST_BACKTRACE=0
if [ "$(id -u)" != 0 ]; then echo "skipped: mounting a tmpfs needs root"; exit 0; fi
mnt=$(mktemp -d)
trap 'umount "$mnt" 2>/dev/null || true; rm -rf "$mnt" "$mnt.moved"' EXIT
mount -t tmpfs -o size=8m tmpfs "$mnt"
args=(train --config experiments/smollm2-135m/quickstart.json --steps 6 --set checkpoint_every=2 --set eval_every=0
      --set max_validation=8)
echo "\$ melora ${args[*]} --out $mnt/run    # on an 8 MiB tmpfs"
set +e
"$MELORA" "${args[@]}" --out "$mnt/run" 2>&1 | grep -v '^step [0-9]*/'
status=${PIPESTATUS[0]}
set -e
echo "exit status $status"
df -h "$mnt" | tail -n 1
echo "checkpoints left: $(ls -A "$mnt/run/checkpoints" | tr '\n' ' ')"
echo "last/state.json: $(tr -d ' \n' < "$mnt/run/checkpoints/last/state.json")"
cp -r "$mnt/run" "$mnt.moved"
umount "$mnt"
echo "\$ melora ${args[*]} --out <the run copied to a disk with room> --resume"
"$MELORA" "${args[@]}" --out "$mnt.moved" --resume 2>&1 | grep -E "resumed|done in"
echo "last/state.json: $(tr -d ' \n' < "$mnt.moved/checkpoints/last/state.json")"
