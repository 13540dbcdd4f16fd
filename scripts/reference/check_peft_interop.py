#!/usr/bin/env python3
"""Cross-check the `lora` binary against HF transformers + PEFT (adapter interop).

Run from the repository root, with the reference venv (scripts/reference/setup_venv.sh)
and a release build of the CLI (cargo build --release):

    VENV=${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}
    $VENV/bin/python scripts/reference/check_peft_interop.py \\
        --model ~/.cache/lora-rs/models/all-MiniLM-L6-v2 \\
        --data data/sentiment/test.csv \\
        [--adapter runs/my-run/adapter]      # an adapter written by `lora train`
        [--lora-bin target/release/lora] [--limit 64] [--max-len 128] [--tol 1e-4]

Small and fast with the committed fixtures:

    $VENV/bin/python scripts/reference/check_peft_interop.py \\
        --model tests/fixtures/tiny-bert/model --data SOME.csv \\
        --adapter tests/fixtures/tiny-bert-peft/adapter

Checks (each one a row of the printed table; exit status 1 if any fails, 2 on bad usage):
  rust->peft  (only with --adapter) the adapter written by `lora train` (PEFT layout:
              adapter_config.json + adapter_model.safetensors + labels.json) is loaded with
              AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
              + PeftModel.from_pretrained; its logits must match the `logits` of
              `lora predict --model BASE --adapter ADAPTER --data CSV --out JSONL`.
  peft->rust  this script makes a PEFT LoRA adapter on the base (seeded, non-zero B, the
              classifier head in modules_to_save with seeded noise, labels.json beside it),
              runs `lora predict` on it and compares logits the same way.
  merged      for each adapter above: `lora merge --model BASE --adapter ADAPTER --out DIR2`,
              DIR2 is loaded with AutoModelForSequenceClassification and its logits must
              match the PEFT (unmerged) model's.
A check passes when the max |logit difference| over all rows and classes is <= --tol.

Texts: the `text` column of --data (first --limit rows; the subset is written to the work
dir and that file is what `lora predict` reads). Tokenization: the base folder's
tokenizer.json with the HF `tokenizers` library, truncated to --max-len tokens, its own
padding switched off; batches are right-padded with the tokenizer's pad id (0 for BERT).
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # no per-load reports (a random head for the base is expected)
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

IGNORABLE_MISSING = ("position_ids",)


# ---------------------------------------------------------------------------- inputs

def read_texts(path, limit):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "text" not in (reader.fieldnames or []):
            raise SystemExit(f"{path}: no `text` column (columns: {reader.fieldnames})")
        rows = []
        for row in reader:
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


def write_subset(rows, path):
    cols = ["text"] + (["label"] if "label" in rows[0] else [])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def load_tokenizer(model_dir, max_len):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    pad_id = tok.token_to_id("[PAD]")
    return tok, (0 if pad_id is None else pad_id)


def batches(tok, pad_id, texts, batch_size=32):
    for i in range(0, len(texts), batch_size):
        encs = tok.encode_batch(texts[i:i + batch_size])
        t = max(len(e.ids) for e in encs)
        ids = [e.ids + [pad_id] * (t - len(e.ids)) for e in encs]
        mask = [[1] * len(e.ids) + [0] * (t - len(e.ids)) for e in encs]
        types = [e.type_ids + [0] * (t - len(e.ids)) for e in encs]
        yield {"input_ids": torch.tensor(ids, dtype=torch.int64),
               "attention_mask": torch.tensor(mask, dtype=torch.int64),
               "token_type_ids": torch.tensor(types, dtype=torch.int64)}


def logits_of(model, tok, pad_id, texts):
    model.eval()
    out = []
    with torch.inference_mode():
        for b in batches(tok, pad_id, texts):
            out.append(model(**b).logits.float())
    return torch.cat(out, 0)


# ---------------------------------------------------------------------------- models

def load_base(model_dir, labels):
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels),
        id2label={i: l for i, l in enumerate(labels)},
        label2id={l: i for i, l in enumerate(labels)},
        ignore_mismatched_sizes=True, attn_implementation="eager", dtype=torch.float32,
        output_loading_info=True)
    model.eval()
    return model, info


def load_peft(model_dir, adapter_dir, labels):
    base, _ = load_base(model_dir, labels)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model


def make_peft_adapter(model_dir, labels, out_dir, seed, target_modules, r, alpha, rslora):
    base, _ = load_base(model_dir, labels)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=target_modules, use_rslora=rslora,
                        init_lora_weights=False)  # B random (non-zero), not zeros
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    head = model.base_model.model.classifier.modules_to_save["default"]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head.weight.copy_(0.1 * torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(0.1 * torch.randn(head.bias.shape, generator=g))
    model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "labels.json"), "w") as f:
        json.dump(labels, f)
        f.write("\n")
    return out_dir


def read_labels(adapter_dir):
    path = os.path.join(adapter_dir, "labels.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{adapter_dir}: no labels.json (list of label names by class id)")
    with open(path) as f:
        labels = json.load(f)
    if not isinstance(labels, list) or not labels:
        raise SystemExit(f"{path}: expected a non-empty JSON list of label names")
    return [str(l) for l in labels]


# ---------------------------------------------------------------------------- lora CLI

def run_cli(argv):
    print("  $", " ".join(argv), flush=True)
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stdout[-2000:] + "\n" + p.stderr[-2000:]).strip()
        raise RuntimeError(f"`{' '.join(argv)}` exited {p.returncode}:\n{tail}")


def lora_predict(args, adapter_dir, data_csv, out_jsonl):
    run_cli([args.lora_bin, "predict", "--model", args.model, "--adapter", adapter_dir,
             "--data", data_csv, "--out", out_jsonl] + args.predict_arg)
    rows = []
    with open(out_jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                obj = json.loads(line)
                if "logits" not in obj:
                    raise RuntimeError(f"{out_jsonl}:{n}: no `logits` field")
                rows.append(obj)
    return rows


def lora_merge(args, adapter_dir, out_dir):
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    run_cli([args.lora_bin, "merge", "--model", args.model, "--adapter", adapter_dir,
             "--out", out_dir])
    return out_dir


# ---------------------------------------------------------------------------- checks

def compare(name, ref, rows_or_tensor, labels, tol):
    """ref: [N, C] tensor from PyTorch. Returns a result dict."""
    res = {"check": name, "rows": ref.shape[0], "max_abs_diff": float("nan"),
           "labels_agree": "-", "ok": False, "note": ""}
    if isinstance(rows_or_tensor, torch.Tensor):
        other, names = rows_or_tensor, None
    else:
        rows = rows_or_tensor
        if len(rows) != ref.shape[0]:
            res["note"] = f"{len(rows)} output rows for {ref.shape[0]} inputs"
            return res
        other = torch.tensor([r["logits"] for r in rows], dtype=torch.float32)
        names = [r.get("label") for r in rows]
    if other.shape != ref.shape:
        res["note"] = f"logits shape {list(other.shape)} != {list(ref.shape)}"
        return res
    diff = (other - ref).abs().max().item()
    res["max_abs_diff"] = diff
    ref_pred = ref.argmax(-1).tolist()
    if names is not None:
        top2 = ref.topk(min(2, ref.shape[1]), -1).values
        margin = (top2[:, 0] - top2[:, -1]).tolist()
        agree, clear_disagree = 0, 0
        for i, lab in enumerate(names):
            want = labels[ref_pred[i]]
            same = lab == want or lab == ref_pred[i]
            agree += same
            clear_disagree += (not same) and margin[i] > 1e-3
        res["labels_agree"] = f"{agree}/{len(names)}"
        if clear_disagree:
            res["note"] = f"{clear_disagree} predicted labels differ"
            return res
    res["ok"] = diff <= tol
    if not res["ok"]:
        res["note"] = f"max |diff| {diff:.3g} > tol {tol:g}"
    return res


def guarded(results, name, fn):
    try:
        results.append(fn())
    except Exception as e:  # report and continue with the other checks
        results.append({"check": name, "rows": "-", "max_abs_diff": float("nan"),
                        "labels_agree": "-", "ok": False,
                        "note": f"{type(e).__name__}: {e}".strip()})


def print_table(results):
    print()
    print(f"{'check':<26} {'rows':>5} {'max_abs_diff':>13} {'labels':>8}  status")
    print("-" * 66)
    for r in results:
        d = r["max_abs_diff"]
        ds = "-" if d != d else f"{d:.3e}"
        print(f"{r['check']:<26} {str(r['rows']):>5} {ds:>13} {r['labels_agree']:>8}  "
              f"{'PASS' if r['ok'] else 'FAIL'}")
        if r["note"]:
            for line in r["note"].splitlines()[:15]:
                print(f"    {line}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF base model folder (config.json, "
                    "model.safetensors, tokenizer.json)")
    ap.add_argument("--data", required=True, help="CSV with a `text` column")
    ap.add_argument("--adapter", help="adapter written by `lora train` (checks rust->peft)")
    ap.add_argument("--lora-bin", default="target/release/lora")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--limit", type=int, default=64, help="first N rows of --data (0 = all)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--labels", help="comma-separated label names for the PEFT-made adapter "
                    "(default: those of --adapter, else the sorted values of a `label` "
                    "column, else neg,pos)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--target-modules", default="query,value",
                    help="for the PEFT-made adapter (comma-separated)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--rslora", action="store_true", help="PEFT-made adapter uses rsLoRA")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["rust2peft", "peft2rust", "merged"])
    ap.add_argument("--predict-arg", action="append", default=[],
                    help="extra argument passed to `lora predict` (repeatable)")
    ap.add_argument("--workdir", help="keep intermediate files here (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        print(f"error: {args.model}/tokenizer.json not found", file=sys.stderr)
        return 2
    if not (os.path.isfile(args.lora_bin) and os.access(args.lora_bin, os.X_OK)):
        print(f"error: lora binary {args.lora_bin} not found (cargo build --release, or "
              f"--lora-bin PATH)", file=sys.stderr)
        return 2
    args.lora_bin = os.path.abspath(args.lora_bin)

    rows = read_texts(args.data, args.limit)
    texts = [r["text"] for r in rows]
    workdir = args.workdir or tempfile.mkdtemp(prefix="lora-interop-")
    os.makedirs(workdir, exist_ok=True)
    data_csv = os.path.join(workdir, "data.csv")
    write_subset(rows, data_csv)
    tok, pad_id = load_tokenizer(args.model, args.max_len)
    print(f"base {args.model}; {len(texts)} texts from {args.data}; work dir {workdir}")

    results = []
    adapters = []  # (tag, adapter_dir, labels, peft_logits)

    # -- Rust -> PEFT
    if args.adapter and "rust2peft" not in args.skip:
        def rust2peft():
            labels = read_labels(args.adapter)
            peft_model = load_peft(args.model, args.adapter, labels)
            ref = logits_of(peft_model, tok, pad_id, texts)
            adapters.append(("rust-adapter", args.adapter, labels, ref))
            out = lora_predict(args, args.adapter, data_csv,
                               os.path.join(workdir, "predict_rust_adapter.jsonl"))
            return compare("rust->peft (predict)", ref, out, labels, args.tol)
        guarded(results, "rust->peft (predict)", rust2peft)

    # -- PEFT -> Rust
    if "peft2rust" not in args.skip:
        def peft2rust():
            if args.labels:
                labels = [l.strip() for l in args.labels.split(",") if l.strip()]
            elif args.adapter and os.path.isfile(os.path.join(args.adapter, "labels.json")):
                labels = read_labels(args.adapter)
            elif "label" in rows[0]:
                labels = sorted({r["label"] for r in rows})
            else:
                labels = ["neg", "pos"]
            adir = make_peft_adapter(args.model, labels, os.path.join(workdir, "peft_adapter"),
                                     args.seed, args.target_modules.split(","), args.r,
                                     args.alpha, args.rslora)
            ref = logits_of(load_peft(args.model, adir, labels), tok, pad_id, texts)
            adapters.append(("peft-adapter", adir, labels, ref))
            out = lora_predict(args, adir, data_csv,
                               os.path.join(workdir, "predict_peft_adapter.jsonl"))
            return compare("peft->rust (predict)", ref, out, labels, args.tol)
        guarded(results, "peft->rust (predict)", peft2rust)

    # -- merged
    if "merged" not in args.skip:
        for tag, adir, labels, ref in adapters:
            name = f"merged ({tag})"

            def merged(tag=tag, adir=adir, labels=labels, ref=ref, name=name):
                out_dir = lora_merge(args, adir, os.path.join(workdir, f"merged_{tag}"))
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    out_dir, attn_implementation="eager", dtype=torch.float32,
                    output_loading_info=True)
                missing = [k for k in info.get("missing_keys", [])
                           if not k.endswith(IGNORABLE_MISSING)]
                if missing:
                    raise RuntimeError(f"merged model lacks tensors: {missing[:8]}")
                if model.config.num_labels != len(labels):
                    raise RuntimeError(f"merged config has num_labels "
                                       f"{model.config.num_labels}, adapter has {len(labels)}")
                got = logits_of(model, tok, pad_id, texts)
                return compare(name, ref, got, labels, args.tol)
            guarded(results, name, merged)

    if not results:
        print("nothing checked", file=sys.stderr)
        return 2
    print_table(results)
    ok = all(r["ok"] for r in results)
    print(f"\n{sum(r['ok'] for r in results)} passed, {sum(not r['ok'] for r in results)} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
