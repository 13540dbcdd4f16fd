#!/usr/bin/env python3
"""End-to-end LoRA fine-tuning of a BERT encoder with the transformers Trainer + PEFT, then
test accuracy: the reference for `lora train` + `lora eval` in `bench/run_all.py --parts e2e`.

    VENV=${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}
    $VENV/bin/python bench/reference/e2e_trainer.py [--model DIR] [--data DIR] [--threads 2]
        [--epochs 3] [--lr 5e-4] [--batch-size 32] [--max-len 128] [--max-steps N] [--out DIR]

Data: DIR/{train,valid,test}.csv with columns text,label (the files `lora train` reads in
scripts/demo.sh; default ~/.cache/lora-rs/data/sentiment). Model: all-MiniLM-L6-v2 (default
~/.cache/lora-rs/models/all-MiniLM-L6-v2) as BertForSequenceClassification (pooler + a new
linear head, as `lora train --head pooler`), float32.

The settings are those of the main job (scripts/demo.sh) and of `lora train`'s defaults:
LoRA r=8 alpha=16 dropout 0.1 on query,value, classifier trainable (PEFT modules_to_save);
AdamW (Trainer default, torch AdamW) lr 5e-4, weight decay 0.01, linear decay after 6%
warm-up, gradient-norm clip 1.0, batch 32, max length 128 (dynamic padding,
DataCollatorWithPadding), length-grouped batches (train_sampling_strategy="group_by_length":
mega-batches of 50 x batch sorted by length, the same scheme `lora train` uses), 3 epochs,
evaluation on the valid split after every epoch, the best epoch by macro F1 kept
(load_best_model_at_end), seed 0; then accuracy on the test split.

Prints ONE JSON object on stdout: wall_s (from the start of this script, imports included),
train_s, test_eval_s, peak_rss_mb (resource.getrusage RUSAGE_SELF ru_maxrss, MB = 2^20 bytes),
test_accuracy, test_macro_f1, train_samples_per_s (Trainer's own), best valid metric, steps.
"""
import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_csv(path, text_col, label_col):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r[text_col] for r in rows], [r[label_col] for r in rows]


def main():
    cache = os.environ.get("LORA_CACHE", os.path.expanduser("~/.cache/lora-rs"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(cache, "models/all-MiniLM-L6-v2"))
    ap.add_argument("--data", default=os.path.join(cache, "data/sentiment"),
                    help="folder with train.csv, valid.csv, test.csv")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true",
                    help="TrainingArguments(bf16=True): bf16 autocast on the CPU (training and evaluation)")
    ap.add_argument("--no-group-by-length", action="store_true",
                    help="random batches (Trainer's default sampler) instead of length-grouped ones")
    ap.add_argument("--out", help="Trainer output_dir (default: a temporary folder, removed)")
    args = ap.parse_args()

    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    import peft
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)
    transformers.logging.set_verbosity_error()
    set_seed(args.seed)

    splits = {s: read_csv(os.path.join(args.data, f"{s}.csv"), args.text_column, args.label_column)
              for s in ("train", "valid", "test")}
    names = sorted(set(splits["train"][1]))
    label_id = {n: i for i, n in enumerate(names)}
    tok = AutoTokenizer.from_pretrained(args.model)

    class Split(torch.utils.data.Dataset):
        def __init__(self, texts, labels):
            enc = tok(texts, truncation=True, max_length=args.max_len)
            self.items = [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                           "attention_mask": enc["attention_mask"][i], "labels": label_id[labels[i]]}
                          for i in range(len(texts))]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    data = {s: Split(*splits[s]) for s in splits}
    model = BertForSequenceClassification.from_pretrained(
        args.model, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label_id,
        dtype=torch.float32)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                      target_modules=["query", "value"])  # classifier -> modules_to_save
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def metrics(p):
        pred = np.argmax(p.predictions, axis=-1)
        y = p.label_ids
        f1 = []
        for c in range(len(names)):
            tp = int(((pred == c) & (y == c)).sum())
            fp = int(((pred == c) & (y != c)).sum())
            fn = int(((pred != c) & (y == c)).sum())
            f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return {"accuracy": float((pred == y).mean()), "macro_f1": float(np.mean(f1))}

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="e2e_trainer_")
    targs = TrainingArguments(
        output_dir=args.out or tmp.name,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        weight_decay=0.01,
        warmup_steps=0.06,  # a float < 1 is a ratio of the total steps (transformers 5)
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        train_sampling_strategy="random" if args.no_group_by_length else "group_by_length",
        eval_strategy="steps" if args.max_steps > 0 else "epoch",
        eval_steps=args.max_steps if args.max_steps > 0 else None,
        save_strategy="steps" if args.max_steps > 0 else "epoch",
        save_steps=args.max_steps if args.max_steps > 0 else None,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_steps=10,
        seed=args.seed,
        use_cpu=True,
        bf16=args.bf16,
        bf16_full_eval=False,
        dataloader_pin_memory=False,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["valid"],
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=metrics)
    t0 = time.perf_counter()
    tr = trainer.train()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = trainer.predict(data["test"])
    test_s = time.perf_counter() - t0
    m = pred.metrics
    best = trainer.state.best_metric
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps({
        "tool": "transformers Trainer + PEFT", "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "threads": args.threads, "model": args.model, "data": args.data,
        "train_rows": len(data["train"]), "valid_rows": len(data["valid"]), "test_rows": len(data["test"]),
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "max_len": args.max_len,
        "max_steps": args.max_steps, "group_by_length": not args.no_group_by_length, "bf16": args.bf16,
        "trainable_params": trainable, "steps": trainer.state.global_step,
        "best_valid_macro_f1": best,
        "wall_s": time.perf_counter() - T_START, "train_s": train_s, "test_eval_s": test_s,
        "train_samples_per_s": tr.metrics.get("train_samples_per_second"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "test_accuracy": m.get("test_accuracy"), "test_macro_f1": m.get("test_macro_f1"),
    }))


if __name__ == "__main__":
    main()
