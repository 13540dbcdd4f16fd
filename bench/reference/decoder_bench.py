#!/usr/bin/env python3
"""Decoder LoRA training step in PyTorch + PEFT: the reference for `lora bench --mode decoder`.

    VENV=${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}
    $VENV/bin/python bench/reference/decoder_bench.py [--gguf FILE] [--threads 2] [--batch 4]
        [--seq-len 128] [--warmup 2] [--steps 10] [--attn sdpa|eager]

Model: the GGUF file (default SmolLM2-135M-Instruct.Q4_1.gguf in the asset cache) loaded by
transformers (AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32)): every
tensor is dequantized to float32, so this side trains over an f32 base while `lora` keeps the
4-bit weights (QLoRA). LoRA r=16 alpha=32 dropout 0.05 on q,k,v,o,gate,up,down (PEFT), AdamW
lr 3e-4 weight decay 0.01 over the LoRA parameters, gradient-norm clipping at 1.0, as
`lora train --task causal-lm` does. Input: random token ids (seeded) B x T, labels = ids (the
model shifts them). torch.manual_seed(0); model.train() (dropout on).

One step = forward + loss + backward + clip_grad_norm_ + optimizer step + zero_grad.
--warmup untimed steps, then the median of --steps timed ones. Prints ONE JSON object on
stdout (progress on stderr): decoder_step_s, decoder_tokens_per_s, peak_rss_mb_decoder
(ru_maxrss of this process, MB = 2^20 bytes), load_s, trainable_params, and the settings.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    cache = os.environ.get("LORA_CACHE", os.path.expanduser("~/.cache/lora-rs"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=os.path.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa is its default)")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(args.gguf):
        raise SystemExit(f"{args.gguf} not found (scripts/fetch_assets.sh smollm2)")
    d, name = os.path.split(os.path.abspath(args.gguf))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=args.attn)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.rank, lora_alpha=args.alpha,
                     lora_dropout=args.dropout, target_modules=TARGETS)
    model = get_peft_model(model, cfg)
    load_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(16, vocab, (args.batch, args.seq_len), generator=g, dtype=torch.int64)
    model.train()
    times, cpu, losses = [], [], []
    for step in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(out.loss.item())
        if step >= args.warmup:
            times.append(dt)
            cpu.append(dc)
        log(f"decoder step {step}{' (warm-up)' if step < args.warmup else ''}: {dt:.3f}s "
            f"(cpu {dc:.3f}s) loss {losses[-1]:.4f}")
    med = statistics.median(times)
    c = model.config
    import peft
    import transformers
    print(json.dumps({
        "tool": "pytorch+peft", "mode": "decoder", "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "threads": args.threads, "model": args.gguf, "dtype": "float32 (dequantized)",
        "attn_implementation": c._attn_implementation,
        "layers": c.num_hidden_layers, "hidden": c.hidden_size, "vocab": vocab,
        "batch_size": args.batch, "seq_len": args.seq_len, "rank": args.rank,
        "alpha": args.alpha, "dropout": args.dropout, "targets": ",".join(TARGETS), "lr": args.lr,
        "trainable_params": n_train, "load_s": load_s, "warmup": args.warmup, "steps": args.steps,
        "decoder_step_s": med, "decoder_step_s_all": times,
        "decoder_step_cpu_s_median": statistics.median(cpu),
        "decoder_tokens_per_s": args.batch * args.seq_len / med,
        "decoder_losses": losses,
        "peak_rss_mb_decoder": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }))


if __name__ == "__main__":
    main()
