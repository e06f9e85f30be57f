#!/usr/bin/env python3
"""`melora export` of every model family, loaded back by Hugging Face
transformers: each tiny family fixture (melora-llama/tests/fixtures/families)
with the LoRA adapter PEFT wrote for it, merged by melora into a Hugging Face
folder, must load with `AutoModelForCausalLM` as its own class and give the
logits PEFT gave with the adapter (`logits_lora.npy`).

    python3 experiments/export/check_families.py [MELORA]

Needs torch, transformers and numpy (not in CI: PyTorch is 5 GB); MELORA
defaults to target/release/melora. Exits non-zero when one disagrees.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ROOT / "melora-llama/tests/fixtures/families"
CLASSES = {"llama3": "LlamaForCausalLM", "llama-bias": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mistral": "MistralForCausalLM"}
TOLERANCE = 1e-4

melora = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/release/melora")
print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}")
failed = []
with tempfile.TemporaryDirectory() as tmp:
    for name, expected_class in CLASSES.items():
        fixture = FAMILIES / name
        out = Path(tmp) / name
        subprocess.run([melora, "export", "--model", str(fixture), "--adapter", str(fixture / "lora"),
                        "--out", str(out)], check=True, capture_output=True, text=True,
                       env={"MELORA_HOME": tmp, "PATH": "/usr/bin:/bin"})
        config = json.loads((out / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = torch.tensor(np.load(fixture / "input_ids.npy"))
        with torch.no_grad():
            logits = model(input_ids=ids).logits.numpy()
        diff = float(np.abs(logits - np.load(fixture / "logits_lora.npy")).max())
        ok = type(model).__name__ == expected_class and diff < TOLERANCE
        print(f"{name}: model_type {config['model_type']!r}, loaded as {type(model).__name__}; "
              f"max |logit - PEFT's| {diff:.2e} {'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(name)
sys.exit(1 if failed else 0)
