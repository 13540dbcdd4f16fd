#!/usr/bin/env python3
"""Side-by-side benchmarks, `lora` vs PyTorch (+ PEFT / transformers Trainer): the same
command as bench/run_all.py, which holds the code and documents the parts, flags and outputs.

    python3 bench/compare.py [--parts fixed,e2e,decoder,gemm] [--rounds 3] [--steps 10] [--threads 2]

Writes bench/results/latest.json and bench/RESULTS.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import main  # noqa: E402

if __name__ == "__main__":
    main()
