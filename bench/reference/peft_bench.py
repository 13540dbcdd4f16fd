#!/usr/bin/env python3
"""Fixed-shape LoRA fine-tuning / inference benchmark in PyTorch + PEFT (the reference
numbers the Rust `lora` benchmarks are compared with).

Run (with the reference venv made by scripts/reference/setup_venv.sh):

    VENV=${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}
    $VENV/bin/python bench/reference/peft_bench.py                # random MiniLM-L6-shaped BERT
    $VENV/bin/python bench/reference/peft_bench.py --model ~/.cache/lora-rs/models/all-MiniLM-L6-v2
    options: --threads 2 --steps 10 --batch 32 --seq-len 128 --infer-reps 10 [--bf16] [--device cuda]

Workload: BertForSequenceClassification with the all-MiniLM-L6-v2 shape (hidden 384,
6 layers, 12 heads, FFN 1536, vocab 30522, 512 positions), 4 labels, random init
(torch.manual_seed(0)) or the real weights with --model (head random). LoRA r=8, alpha=16,
dropout 0.1 on query,value; classifier head trainable (PEFT modules_to_save); AdamW lr 5e-4
over the trainable parameters. Inputs: random token ids, batch 32 x 128 tokens, attention
mask all ones, random labels (fixed seed).

Measures (medians of wall-clock times, samples/s = batch / median seconds):
  train_samples_per_s            forward + backward + optimizer step (+ zero_grad), model.train();
                                 2 warm-up steps, then the median of --steps steps
  infer_samples_per_s_base       model.eval() + torch.inference_mode() forward, bare base model
  infer_samples_per_s_unmerged   same with the LoRA adapter attached (not merged)
  infer_samples_per_s_merged     same after merge_and_unload()
                                 (1 warm-up round, then --infer-reps rounds; each round runs
                                 the three variants in turn, so load drift hits all alike;
                                 medians per variant)
  peak_rss_mb                    ru_maxrss of the training process (MB = 2^20 bytes)
  *_cpu_s_median                 process CPU seconds (all threads) per step / pass. A contention
                                 indicator: on an idle machine CPU s ~ threads x wall s; when
                                 other processes compete for the cores, wall time inflates a lot
                                 (threads wait on each other) and CPU s approaches wall s.
                                 Benchmark on an otherwise idle machine.
  peak_rss_mb_train / _infer     ru_maxrss of each measuring process (the infer one holds
                                 base, adapter and merged copies: 3 x ~90 MB of weights)
  peak_gpu_mb_train / _infer     --device cuda: torch.cuda.max_memory_allocated (tensors only,
                                 without the CUDA context and the caching allocator's slack)
On --device cuda every timed step ends with torch.cuda.synchronize(), and --bf16 is
torch.autocast('cuda', dtype=torch.bfloat16).
Training and inference run in separate subprocesses (--mode train / --mode infer) so each
peak RSS is its own; without --mode this script runs both and prints ONE JSON object on
stdout (progress goes to stderr).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LABELS = 4


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def peak_rss_mb():
    # Linux: ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def autocast(args):
    import contextlib
    import torch
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def sync(args):
    import torch
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_peak(args, key):
    import torch
    if not args.device.startswith("cuda"):
        return {}
    return {key: torch.cuda.max_memory_allocated() / 2**20}


def build(args):
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if args.model:
        model = BertForSequenceClassification.from_pretrained(
            args.model, num_labels=LABELS, dtype=torch.float32)
    else:
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                            num_attention_heads=12, intermediate_size=1536,
                            max_position_embeddings=512, type_vocab_size=2,
                            hidden_act="gelu", layer_norm_eps=1e-12, num_labels=LABELS)
        model = BertForSequenceClassification(config)
    model = model.float().to(args.device)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                      target_modules=["query", "value"])  # classifier -> modules_to_save
    return model, lora, get_peft_model


def inputs(args, vocab):
    import torch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g, dtype=torch.int64)
    mask = torch.ones(args.batch, args.seq_len, dtype=torch.int64)
    types = torch.zeros(args.batch, args.seq_len, dtype=torch.int64)
    labels = torch.randint(0, LABELS, (args.batch,), generator=g, dtype=torch.int64)
    d = args.device
    return {"input_ids": ids.to(d), "attention_mask": mask.to(d), "token_type_ids": types.to(d)}, labels.to(d)


def mode_train(args):
    import torch
    model, lora, get_peft_model = build(args)
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    batch, labels = inputs(args, model.config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    times, cpu = [], []
    for step in range(2 + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(args):
            out = model(**batch, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if step >= 2:
            times.append(dt)
            cpu.append(dc)
        log(f"train step {step}{' (warm-up)' if step < 2 else ''}: {dt:.3f}s "
            f"(cpu {dc:.3f}s) loss {out.loss.item():.4f}")
    med = statistics.median(times)
    return {"train_step_s_median": med, "train_samples_per_s": args.batch / med,
            "train_step_cpu_s_median": statistics.median(cpu),
            "trainable_params": trainable, "total_params": total,
            "attn_implementation": model.config._attn_implementation,
            "peak_rss_mb_train": peak_rss_mb(), **gpu_peak(args, "peak_gpu_mb_train")}


def mode_infer(args):
    import copy
    import torch
    model, lora, get_peft_model = build(args)
    batch, _ = inputs(args, model.config.vocab_size)
    base = copy.deepcopy(model)
    unmerged = get_peft_model(model, lora)
    merged = copy.deepcopy(unmerged).merge_and_unload()
    models = {"base": base, "unmerged": unmerged, "merged": merged}
    times = {k: [] for k in models}
    cpu = {k: [] for k in models}
    for m in models.values():
        m.eval()
    # Round-robin over the three variants so that drift in machine load hits all alike.
    with torch.inference_mode():
        for i in range(1 + args.infer_reps):
            rnd = {}
            for name, m in models.items():
                t0, c0 = time.perf_counter(), time.process_time()
                with autocast(args):
                    m(**batch)
                sync(args)
                rnd[name] = time.perf_counter() - t0
                if i >= 1:
                    times[name].append(rnd[name])
                    cpu[name].append(time.process_time() - c0)
            log(f"infer round {i}{' (warm-up)' if i < 1 else ''}: "
                + " ".join(f"{k} {v:.3f}s" for k, v in rnd.items()))
    b = args.batch
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(a, c):
        # median over rounds of the time ratio within each round
        return statistics.median(x / y for x, y in zip(times[a], times[c]))
    return {"infer_unmerged_over_merged_time": paired("unmerged", "merged"),
            "infer_merged_over_base_time": paired("merged", "base"),
            "infer_samples_per_s_unmerged": b / med["unmerged"],
            "infer_samples_per_s_merged": b / med["merged"],
            "infer_samples_per_s_base": b / med["base"],
            **{f"infer_cpu_s_median_{k}": statistics.median(v) for k, v in cpu.items()},
            "peak_rss_mb_infer": peak_rss_mb(), **gpu_peak(args, "peak_gpu_mb_infer")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["train", "infer"], help="(internal) one measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--infer-reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--model", help="HF BERT folder (e.g. all-MiniLM-L6-v2) instead of random init")
    ap.add_argument("--bf16", action="store_true",
                    help="run forward passes under torch.autocast('cpu', dtype=torch.bfloat16), as "
                         "Trainer(bf16=True) does: linears and attention matmuls in bf16 (oneDNN/AMX), weights f32")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = ap.parse_args()

    if args.mode:
        import torch
        torch.set_num_threads(args.threads)
        res = mode_train(args) if args.mode == "train" else mode_infer(args)
        print(json.dumps(res))
        return 0

    import peft
    import torch
    import transformers
    result = {"tool": "pytorch+peft", "torch": torch.__version__,
              "loadavg_1m_at_start": os.getloadavg()[0], "cpus": os.cpu_count(),
              "transformers": transformers.__version__, "peft": peft.__version__,
              "threads": args.threads, "model": args.model or "random-init MiniLM-L6 shape",
              "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "bf16": args.bf16,
              "device": args.device,
              "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targets": ["query", "value"],
                       "modules_to_save": ["classifier"], "optimizer": "AdamW lr 5e-4"}}
    for mode in ("train", "infer"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode,
               "--threads", str(args.threads), "--steps", str(args.steps),
               "--infer-reps", str(args.infer_reps), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len)] + (["--model", args.model] if args.model else []) \
            + (["--bf16"] if args.bf16 else []) + ["--device", args.device]
        log(f"== {mode}")
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            log(f"{mode} subprocess failed with exit status {p.returncode}")
            return 1
        result.update(json.loads(p.stdout.strip().splitlines()[-1]))
    result["peak_rss_mb"] = result["peak_rss_mb_train"]
    order = ["tool", "torch", "threads", "train_samples_per_s", "infer_samples_per_s_unmerged",
             "infer_samples_per_s_merged", "infer_samples_per_s_base", "peak_rss_mb"]
    out = {k: result[k] for k in order}
    out.update({k: v for k, v in result.items() if k not in out})
    for k, v in out.items():
        if isinstance(v, float):
            out[k] = round(v, 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
