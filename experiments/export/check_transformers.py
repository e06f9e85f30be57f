#!/usr/bin/env python3
"""Loads a folder written by `melora export` with Hugging Face transformers
and compares it with melora on the same folder: the perplexity of texts
(the whole forward pass, every position's log-softmax) and the greedy
continuation of a prompt.

    python3 experiments/export/check_transformers.py FOLDER [MELORA]

Needs torch and transformers (not in CI: PyTorch is 5 GB); MELORA defaults
to target/release/melora. Exits non-zero when they disagree.
"""
import math
import re
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

folder = sys.argv[1]
melora = sys.argv[2] if len(sys.argv) > 2 else "target/release/melora"

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and the Louvre.",
    "Question: Which gas do plants take in for photosynthesis?\nAnswer: carbon dioxide",
]
PROMPT = "The capital of France is"

DTYPE = getattr(torch, __import__("os").environ.get("DTYPE", "float32"))
model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE)
model.eval()
tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json")
print(f"{DTYPE}: transformers {__import__('transformers').__version__}, torch {torch.__version__}: "
      f"{type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters")


def hf_perplexity(text):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, ids[0, 1:, None]).mean().item()
    return math.exp(nll), ids.shape[1]


def melora_out(*args):
    return subprocess.run([melora, *args], check=True, capture_output=True, text=True).stdout


worst = 0.0
print("| text | tokens | transformers | melora | relative difference |")
print("|---|---|---|---|---|")
for text in TEXTS:
    hf, n = hf_perplexity(text)
    out = melora_out("perplexity", "--model", folder, "--text", text)
    ours = float(re.search(r"perplexity\D*([0-9.]+(?:e[-+]?\d+)?)", out).group(1))
    rel = abs(hf - ours) / hf
    worst = max(worst, rel)
    print(f"| {text[:40]!r}... | {n} | {hf:.6f} | {ours:.6f} | {rel:.1e} |")

ids = tokenizer(PROMPT, return_tensors="pt").input_ids
with torch.no_grad():
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
hf_text = tokenizer.decode(generated[0, ids.shape[1]:])
# melora prints the prompt and its continuation.
ours_text = melora_out("generate", "--model", folder, "--prompt", PROMPT, "--max-new-tokens", "8").rstrip("\n")
ours_text = ours_text[len(PROMPT):] if ours_text.startswith(PROMPT) else ours_text
print(f"greedy continuation of {PROMPT!r}: transformers {hf_text!r}; melora {ours_text!r}")
# Perplexities are printed to 4 decimals (relative 1e-5 at these values).
ok = worst < 1e-4 and ours_text == hf_text
print("agree" if ok else "DISAGREE")
sys.exit(0 if ok else 1)
