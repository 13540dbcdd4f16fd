#!/usr/bin/env python3
"""A small full fine-tune of all-MiniLM-L6-v2 on the sentiment data (every weight trained),
the reference "fully tuned model" for `lora extract` and the classifier for `lora compress`.

    ${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}/bin/python bench/reference/full_finetune.py OUT_DIR \
        [--epochs 1] [--max-len 64] [--limit N]

transformers BertForSequenceClassification (pooler head, labels negative/positive), AdamW lr 5e-5,
batch 32, linear decay, seed 0. Writes a model folder (config.json, model.safetensors, tokenizer files)
that transformers and `lora eval --model OUT_DIR` load, and prints the test accuracy.
"""
import argparse
import csv
import os
import shutil
import time

import torch
from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup
from tokenizers import Tokenizer

CACHE = os.path.expanduser(os.environ.get("LORA_CACHE", "~/.cache/lora-rs"))
BASE = os.path.join(CACHE, "models", "all-MiniLM-L6-v2")
DATA = os.path.join(CACHE, "data", "sentiment")
LABELS = ["negative", "positive"]


def read(split, limit=None):
    with open(os.path.join(DATA, split + ".csv")) as f:
        rows = list(csv.DictReader(f))
    rows = rows[:limit] if limit else rows
    return [r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows]


def batches(tok, texts, labels, bs, max_len, shuffle, g):
    idx = torch.randperm(len(texts), generator=g).tolist() if shuffle else list(range(len(texts)))
    for i in range(0, len(idx), bs):
        sel = idx[i:i + bs]
        enc = [tok.encode(texts[j]).ids[:max_len] for j in sel]
        n = max(len(e) for e in enc)
        ids = torch.zeros(len(enc), n, dtype=torch.long)
        mask = torch.zeros(len(enc), n, dtype=torch.long)
        for k, e in enumerate(enc):
            ids[k, :len(e)] = torch.tensor(e)
            mask[k, :len(e)] = 1
        yield ids, mask, torch.tensor([labels[j] for j in sel])


def accuracy(model, tok, texts, labels, max_len):
    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, mask, y in batches(tok, texts, labels, 64, max_len, False, None):
            correct += (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).sum().item()
    return correct / len(texts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tok = Tokenizer.from_file(os.path.join(BASE, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    model = BertForSequenceClassification.from_pretrained(
        BASE, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    tx, ty = read("train", args.limit)
    ex, ey = read("test")
    steps = args.epochs * ((len(tx) + 31) // 32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    sched = get_linear_schedule_with_warmup(opt, steps // 10, steps)
    t0 = time.time()
    step = 0
    for _ in range(args.epochs):
        model.train()
        for ids, mask, y in batches(tok, tx, ty, 32, args.max_len, True, g):
            loss = model(input_ids=ids, attention_mask=mask, labels=y).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    acc = accuracy(model, tok, ex, ey, args.max_len)
    model.save_pretrained(args.out, safe_serialization=True)
    for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        if os.path.isfile(os.path.join(BASE, f)):
            shutil.copy(os.path.join(BASE, f), os.path.join(args.out, f))
    print(f"test accuracy {acc:.4f} ({len(ex)} examples); trained {steps} steps in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
