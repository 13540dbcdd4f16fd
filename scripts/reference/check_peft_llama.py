#!/usr/bin/env python3
"""Check a LoRA adapter written by `lora` for a LLaMA-family GGUF (SmolLM2) against PEFT.

Not run by the test suite (it needs the reference venv and the real GGUF). From the repository
root, with the venv made by scripts/reference/setup_venv.sh:

    VENV=${LORA_REF_VENV:-$HOME/.cache/lora-rs/venv}
    # 1. token ids for the prompts, as transformers tokenizes them (optional: the Rust side may
    #    tokenize itself; then the ids it stores in its dump are checked against these)
    $VENV/bin/python scripts/reference/check_peft_llama.py --gguf FILE --adapter DIR \\
        [--prompts-file PROMPTS] --emit-ids ids.json
    # 2. compare the Rust logits with PEFT's
    $VENV/bin/python scripts/reference/check_peft_llama.py --gguf FILE --adapter DIR \\
        --rust-logits rust.safetensors [--prompts-file PROMPTS] [--tolerance 0.1] [--dump py.safetensors]

What it does: loads the GGUF with transformers (AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name): every tensor dequantized to float32, attn_q/attn_k un-permuted from llama.cpp's
rope layout to Hugging Face's; see tests/fixtures/smollm2/make_smollm2.py), computes the base
logits, applies the adapter with PeftModel.from_pretrained (checking that every tensor of
adapter_model.safetensors found its module, and that nothing is missing), computes the unmerged
logits, then merge_and_unload() and the merged logits. It prints, per prompt, the max-abs
difference Rust vs PEFT (unmerged), PEFT merged vs unmerged, adapter vs base (the adapter must
change something), argmax agreement and the top-5 overlap; exit status 1 if a Rust difference is
above --tolerance, if merged and unmerged PEFT disagree beyond 1e-3, if adapter keys do not match
or if Rust's token ids differ from transformers'.

--prompts-file (optional; without it the three DEFAULT_PROMPTS below are used):
  * a .json file holding a list whose entries are one of
        "plain text"                                  tokenized as is (no BOS/EOS is added:
        {"text": "plain text"}                          the GGUF says add_bos_token=false)
        {"chat": [{"role": "user", "content": "..."}]}  rendered with the GGUF's chat template,
                                                        add_generation_prompt=True, then tokenized
        {"ids": [1, 2, 3]}                            used verbatim
  * any other file: one plain-text prompt per non-empty line.
  The file written by --emit-ids (entries {"prompt", "rendered_text", "ids"}) is itself a valid
  prompts file (its ids are used verbatim).

--rust-logits: a safetensors file written by the Rust side, with either
  * `logits`: [N, V] (the LAST position of each of the N prompts, in prompt order) or
    [N, T, V] (every position; all prompts must then have T tokens), or
  * `logits.{i}` for i = 0..N-1: [V] (last position) or [T_i, V] (every position).
  Optionally `input_ids.{i}` ([T_i]) or `input_ids` ([N, T]), any integer dtype: compared with
  transformers' ids, and used as the model input when given (so the logits are still compared on
  the same tokens). Float dtypes F32/F16/BF16 are accepted (compared in float32).
  Optionally the Rust BASE model's logits (no adapter) under `logits_base` / `logits_base.{i}`,
  same layout: then the adapter's effect is compared too, delta = logits - logits_base on each
  side, max|delta_rust - delta_peft| / max|delta_peft| (reported; a failure only when
  --delta-tolerance is given).

Tolerance: transformers runs float32 matmuls on the dequantized weights. If the Rust side also
dequantizes to f32 for the dump, expect < 1e-3 max-abs: pass --tolerance 1e-3. This is the
recommended way to check an adapter (names, q/k row un-permutation of B, scaling) exactly.
If the Rust side uses quantized matmuls (candle's CPU QMatMul quantizes activations to Q8 blocks
of 32), the logits differ by that activation quantization, and SmolLM2 amplifies it: a
simulation moves last-position base logits by 0.45-1.3 max-abs
(tests/fixtures/smollm2/expected.json, q8_activation_simulation); hence the loose default
--tolerance 2.0, which only catches gross errors. Measured with a random r=4 adapter on
q,k,v,down (f32 effect ~1 logit): the simulation also changes the adapter's own effect by
~80-100% relative, and PEFT merged vs unmerged by ~1.5 (the LoRA path sees f32 inputs, the merged
weight quantized ones), so neither --q8-sim (PEFT with that quantization simulated on every base
nn.Linear input; LoRA A/B stay f32) nor the delta comparison makes a quantized comparison tight:
they are reported for information. Even the rounding mode of the simulation (half-even vs
half-away) moves top logits by ~0.25.
"""

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_PROMPTS = [
    {"text": "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find"},
    {"chat": [{"role": "user", "content": "What is the capital of France?"}]},
    {"text": "It is a truth universally acknowledged, that a single man in possession of a good fortune,"},
]


def read_prompts(path):
    if path is None:
        return DEFAULT_PROMPTS
    if path.endswith(".json"):
        with open(path) as f:
            items = json.load(f)
        if not isinstance(items, list):
            raise SystemExit(f"{path}: expected a JSON list of prompts")
        out = []
        for i, it in enumerate(items):
            if isinstance(it, str):
                out.append({"text": it})
            elif isinstance(it, dict) and len(set(it) & {"text", "chat", "ids"}) == 1:
                out.append(it)
            else:
                raise SystemExit(f"{path}: entry {i}: expected a string or an object with exactly one "
                                 f"of text / chat / ids, got {it!r}")
        return out
    with open(path, encoding="utf-8") as f:
        return [{"text": line.rstrip("\n")} for line in f if line.strip()]


def tokenize(tok, prompt):
    if "ids" in prompt:
        return [int(x) for x in prompt["ids"]], None
    if "chat" in prompt:
        text = tok.apply_chat_template(prompt["chat"], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt["text"]
    return tok(text, add_special_tokens=True)["input_ids"], text


def read_logits(f, keys, path, n, key, required):
    if key in keys:
        t = f.get_tensor(key).float()
        if t.dim() not in (2, 3) or t.shape[0] != n:
            raise SystemExit(f"{path}: `{key}` has shape {list(t.shape)}; expected [N={n}, V] or [N, T, V]")
        return [t[i] for i in range(n)]
    missing = [f"{key}.{i}" for i in range(n) if f"{key}.{i}" not in keys]
    if missing:
        if not required and len(missing) == n:
            return None
        raise SystemExit(f"{path}: no `{key}` key and missing {missing} (keys: {sorted(keys)})")
    return [f.get_tensor(f"{key}.{i}").float() for i in range(n)]


def read_rust(path, n):
    """-> (n float tensors [V] or [T_i, V]; n id lists or None; n base-logit tensors or None)."""
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        get = lambda k: f.get_tensor(k)  # noqa: E731
        logits = read_logits(f, keys, path, n, "logits", True)
        base = read_logits(f, keys, path, n, "logits_base", False)
        ids = None
        if "input_ids" in keys:
            t = get("input_ids")
            ids = [t[i].reshape(-1).tolist() for i in range(n)]
        elif all(f"input_ids.{i}" in keys for i in range(n)):
            ids = [get(f"input_ids.{i}").reshape(-1).tolist() for i in range(n)]
    return logits, ids, base


def run(model, ids_list):
    out = []
    model.eval()
    with torch.no_grad():
        for ids in ids_list:
            out.append(model(input_ids=torch.tensor([ids], dtype=torch.int64), use_cache=False)
                       .logits[0].float())
    return out


def compare(a, b):
    """a: Python [T, V]; b: Rust [V] (last position) or [T, V]."""
    if b.dim() == 1:
        a = a[-1]
    if a.shape != b.shape:
        return None
    diff = (a - b).abs().max().item()
    a_last, b_last = (a, b) if a.dim() == 1 else (a[-1], b[-1])
    top_a = set(torch.topk(a_last, 5).indices.tolist())
    top_b = set(torch.topk(b_last, 5).indices.tolist())
    argmax_all = bool((a.argmax(-1) == b.argmax(-1)).all())
    return {"max_abs": diff, "argmax_agree": argmax_all, "top5_overlap_last": len(top_a & top_b)}


def q8_quantize(x):
    """Q8_0/Q8_1-style activation quantization along the last dim: blocks of 32,
    d = max|x|/127 (stored f16), q = round(x/d). Same as tests/fixtures/smollm2/make_smollm2.py."""
    shape = x.shape
    b = x.reshape(-1, shape[-1] // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(b / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(b))
    return (q * d.half().float()).reshape(shape)


def adapter_keys(adapter_dir):
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found")
    with safe_open(path, "pt") as f:
        return set(f.keys())


def main():
    ap = argparse.ArgumentParser(description="Compare lora's logits for a LLaMA GGUF + adapter with PEFT's.")
    ap.add_argument("--gguf", required=True, help="the base model, e.g. SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--adapter", required=True, help="PEFT-format adapter directory written by `lora`")
    ap.add_argument("--rust-logits", help="safetensors dump from the Rust side (see the docstring)")
    ap.add_argument("--prompts-file", help="JSON list or one prompt per line (see the docstring)")
    ap.add_argument("--emit-ids", help="write the prompts' transformers token ids as JSON here")
    ap.add_argument("--dump", help="write PEFT's logits (logits.{i} [T_i, V], logits_merged.{i}, "
                                   "logits_base.{i}, input_ids.{i}) to this safetensors file")
    ap.add_argument("--tolerance", type=float, default=2.0,
                    help="max-abs logit difference allowed Rust vs PEFT (default 2.0, sized for quantized "
                         "matmuls with Q8 activations; use 1e-3 for a dequantized f32 path)")
    ap.add_argument("--delta-tolerance", type=float, default=None,
                    help="fail if max|delta_rust - delta_peft| / max|delta_peft| exceeds this (needs "
                         "logits_base in the dump; default: report only)")
    ap.add_argument("--q8-sim", action="store_true",
                    help="simulate Q8 activation quantization on every base nn.Linear input in PEFT's runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(args.gguf))
    if not os.path.isfile(args.gguf):
        raise SystemExit(f"{args.gguf} not found")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    prompts = read_prompts(args.prompts_file)
    ids_list, texts = [], []
    for p in prompts:
        ids, text = tokenize(tok, p)
        if not ids:
            raise SystemExit(f"prompt {p!r} has no tokens")
        ids_list.append(ids)
        texts.append(text)
    if args.emit_ids:
        with open(args.emit_ids, "w") as f:
            json.dump([{"prompt": p, "rendered_text": t, "ids": i} for p, t, i in zip(prompts, texts, ids_list)],
                      f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {args.emit_ids} ({len(ids_list)} prompts)")

    failures = []
    rust_logits = rust_ids = rust_base = None
    if args.rust_logits:
        rust_logits, rust_ids, rust_base = read_rust(args.rust_logits, len(prompts))
        if rust_ids is not None:
            for i, (a, b) in enumerate(zip(ids_list, rust_ids)):
                if a != b:
                    failures.append(f"prompt {i}: token ids differ: transformers {a} vs rust {b}")
                    print(f"prompt {i}: token ids differ (using Rust's for the logit comparison)\n"
                          f"  transformers {a}\n  rust         {b}")
            ids_list = [list(map(int, b)) for b in rust_ids]

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    if args.q8_sim:
        # On the original nn.Linear modules: PEFT keeps them as base_layer (and merge_and_unload
        # returns them), while its lora_A / lora_B are new modules, left unquantized.
        for m in list(model.modules()):
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(lambda mod, a: (q8_quantize(a[0]),))
        print("PEFT side runs with simulated Q8 activation quantization (--q8-sim)")
    base_logits = run(model, ids_list)

    saved = adapter_keys(args.adapter)
    peft_model = PeftModel.from_pretrained(model, args.adapter)
    loaded = {n.replace(".default.", ".") for n, _ in peft_model.named_parameters() if ".lora_" in n}
    unexpected, missing = sorted(saved - loaded), sorted(loaded - saved)
    if unexpected or missing:
        failures.append(f"adapter keys: {len(unexpected)} in the file matched no module "
                        f"(e.g. {unexpected[:3]}), {len(missing)} modules got no tensor (e.g. {missing[:3]})")
    with open(os.path.join(args.adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    print(f"adapter: r={cfg.get('r')} alpha={cfg.get('lora_alpha')} rslora={cfg.get('use_rslora')} "
          f"targets={cfg.get('target_modules')}; {len(saved)} tensors, {len(loaded)} LoRA parameters in the model")
    peft_logits = run(peft_model, ids_list)
    merged = peft_model.merge_and_unload()
    merged_logits = run(merged, ids_list)

    for i, ids in enumerate(ids_list):
        d_merge = (peft_logits[i] - merged_logits[i]).abs().max().item()
        d_base = (peft_logits[i] - base_logits[i]).abs().max().item()
        line = f"prompt {i} ({len(ids)} tokens): merged-vs-unmerged {d_merge:.2e}, adapter-vs-base {d_base:.3e}"
        if d_merge > 1e-3 and not args.q8_sim:  # under --q8-sim they legitimately differ
            failures.append(f"prompt {i}: PEFT merged vs unmerged {d_merge:.2e} > 1e-3")
        if d_base < 1e-6:
            print(f"  warning: prompt {i}: the adapter does not change the logits (B == 0?)")
        if rust_logits is not None:
            r = compare(peft_logits[i], rust_logits[i])
            rm = compare(merged_logits[i], rust_logits[i])
            if r is None:
                failures.append(f"prompt {i}: rust logits shape {list(rust_logits[i].shape)} vs "
                                f"python {list(peft_logits[i].shape)}")
            else:
                line += (f" | rust-vs-peft {r['max_abs']:.3e} (vs merged {rm['max_abs']:.3e}), "
                         f"argmax agree {r['argmax_agree']}, top5 overlap {r['top5_overlap_last']}/5")
                if r["max_abs"] > args.tolerance:
                    failures.append(f"prompt {i}: rust vs peft max-abs {r['max_abs']:.3e} > {args.tolerance}")
            if rust_base is not None:
                py_delta = peft_logits[i] - base_logits[i]
                rs_delta = rust_logits[i] - rust_base[i]
                if rs_delta.dim() == 1:
                    py_delta = py_delta[-1]
                if rs_delta.shape != py_delta.shape:
                    failures.append(f"prompt {i}: rust logits_base shape {list(rust_base[i].shape)}")
                else:
                    rel = (rs_delta - py_delta).abs().max().item() / max(py_delta.abs().max().item(), 1e-12)
                    line += f" | adapter-effect rel diff {rel:.3e}"
                    if args.delta_tolerance is not None and rel > args.delta_tolerance:
                        failures.append(f"prompt {i}: adapter effect differs: rel {rel:.3e} > {args.delta_tolerance}")
        print(line)

    if args.dump:
        tensors = {}
        for i, ids in enumerate(ids_list):
            tensors[f"input_ids.{i}"] = torch.tensor(ids, dtype=torch.int64)
            tensors[f"logits.{i}"] = peft_logits[i].contiguous()
            tensors[f"logits_merged.{i}"] = merged_logits[i].contiguous()
            tensors[f"logits_base.{i}"] = base_logits[i].contiguous()
        save_file(tensors, args.dump)
        print(f"wrote {args.dump}")

    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    print("OK" + ("" if rust_logits is not None else " (no --rust-logits given: PEFT side only)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
