#!/usr/bin/env bash
# Opt-in: a Python environment for the PyTorch + PEFT peer of
# `melora-bench compare`. Downloads PyTorch (several GB); never run by the
# tests or CI. Usage: melora-bench/peers/setup.sh [VENV_DIR]
set -euo pipefail
venv=${1:-.melora-cache/peer-venv}
python3 -m venv "$venv"
"$venv/bin/pip" install --upgrade pip
"$venv/bin/pip" install torch transformers peft gguf
echo "peer environment ready: $venv/bin/python melora-bench/peers/peft_step.py --help"
