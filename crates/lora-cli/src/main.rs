//! `lora`: fine-tune, evaluate, merge and inspect LoRA adapters.

mod bench;
mod cmd_causal;
mod cmd_classify;
mod cmd_decoder_io;
mod cmd_inspect;
mod cmd_lowrank;
mod cmd_merge;
mod ui;

use clap::{Parser, Subcommand};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;


#[derive(Parser)]
#[command(
    name = "lora",
    version,
    about = "Fine-tune transformers with LoRA adapters, evaluate, merge and inspect them.",
    long_about = "Fine-tune transformers with LoRA (low-rank adaptation) from one binary.\n\n\
A LoRA adapter keeps the pretrained weight W frozen and learns a low-rank update B·A \
(rank r, scaled by alpha/r), so training touches well under 1% of the parameters. \
Adapters are written in Hugging Face PEFT's format (adapter_config.json + \
adapter_model.safetensors) and load in PEFT unchanged, and PEFT adapters load here.\n\n\
Typical session:\n  \
lora train --task classify --model MODEL_DIR --train train.csv --out runs/sst\n  \
lora eval --model MODEL_DIR --adapter runs/sst --data test.csv\n  \
lora predict --model MODEL_DIR --adapter runs/sst --data new.csv --out preds.jsonl\n  \
lora merge --model MODEL_DIR --adapter runs/sst --out merged/\n  \
lora inspect runs/sst"
)]
struct Cli {
    /// Worker threads for the numeric kernels (default: all cores). On the
    /// CPU each f32 batch is split into one shard per thread, each shard's
    /// forward and backward on its own thread (data parallel; dropout masks
    /// then depend on the thread count). LORA_DATA_PARALLEL=0 splits each op
    /// over the threads instead.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Precision of the frozen-weight matmuls: f32 (default, exact) or bf16
    /// (inputs and weights rounded to bf16, sums in f32, on Intel AMX tiles:
    /// ~2-3x faster GEMMs; like PyTorch's set_float32_matmul_precision("medium")).
    /// LoRA weights, their gradients, attention and norms stay f32. With
    /// --device cuda, bf16 is cuBLAS's as torch.autocast computes it: linears
    /// and attention products with bf16 inputs, f32 sums (no AMX needed).
    #[arg(long, global = true, value_name = "f32|bf16")]
    matmul_precision: Option<lora_core::amx::MatmulPrecision>,
    /// Where the model computes: cpu (default), cuda (= cuda:0), cuda:N, or auto
    /// (the first GPU when this binary was built with CUDA and one answers, else
    /// the CPU). Used by train, eval, predict, generate, chat and bench; the file
    /// commands (merge, export, inspect, extract, combine, compress, analyze,
    /// convert) always run on the CPU. CUDA needs a `--features cuda` build
    /// (scripts/build_cuda.sh, docs/cuda.md).
    #[arg(long, global = true, value_name = "cpu|cuda[:N]|auto", default_value = "cpu")]
    device: lora_core::device::DeviceSpec,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a LoRA adapter: text classification or causal-LM fine-tuning (QLoRA on GGUF).
    Train(Box<cmd_classify::TrainArgs>),
    /// Evaluate: accuracy, per-class P/R/F1, confusion (classify); perplexity, BLEU, chrF (causal-lm).
    Eval(cmd_classify::EvalArgs),
    /// Generate text from a prompt (greedy or sampled), streaming to the terminal.
    Generate(cmd_causal::GenerateArgs),
    /// An interactive conversation using the model's chat template.
    Chat(cmd_causal::ChatArgs),
    /// Predict labels for a data file; writes JSONL with label, probs and logits.
    Predict(cmd_classify::PredictArgs),
    /// Fold an adapter into the base weights: a full model folder, or GGUF for decoders.
    Merge(cmd_merge::MergeArgs),
    /// Write a decoder adapter for llama.cpp (GGUF LoRA adapter, `--lora FILE`).
    Export(cmd_decoder_io::ExportArgs),
    /// Show what a model or adapter folder holds.
    Inspect(cmd_inspect::InspectArgs),
    /// Fixed-shape training and inference benchmark (MiniLM shape by default).
    Bench(bench::BenchArgs),
    /// Turn a fully fine-tuned model into a LoRA adapter (best rank-r of W_tuned - W_base per module).
    Extract(cmd_lowrank::ExtractArgs),
    /// Combine adapters as PEFT's add_weighted_adapter (linear, cat, svd, ties).
    Combine(cmd_lowrank::CombineArgs),
    /// Replace weight matrices of a model by rank-r factor pairs.
    Compress(cmd_lowrank::CompressArgs),
    /// Singular spectrum, effective rank and subspace similarity of adapters.
    Analyze(cmd_lowrank::AnalyzeArgs),
    /// Convert a trained PiSSA/OLoRA adapter to a plain LoRA on the unmodified base.
    Convert(cmd_lowrank::ConvertArgs),
}

/// Keep freed memory in the heap: training allocates and frees the same large
/// buffers every step, and glibc's defaults (mmap + munmap for every large
/// block, trimming the heap top) cost a page fault per 4 KiB each time
/// (CANDLE_NOTES.md: half the CPU time). Activations are below 32 MiB each.
/// Measured against mimalloc (purge disabled): same speed, 7% lower peak RSS.
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called first thing in main.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            std::process::exit(2);
        }
        let _ = rayon_pool(n);
    }
    let model_cmd = matches!(
        cli.cmd,
        Cmd::Train(_) | Cmd::Eval(_) | Cmd::Predict(_) | Cmd::Generate(_) | Cmd::Chat(_) | Cmd::Bench(_)
    );
    // The device first: its error names the real problem (a build without
    // CUDA, say), and the precision check depends on where the model runs.
    let d = match cli.device.open() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --device {}: {e}", cli.device);
            std::process::exit(2);
        }
    };
    if let Some(p) = cli.matmul_precision {
        let bf16 = p == lora_core::amx::MatmulPrecision::Bf16;
        if !d.is_cpu() && model_cmd {
            // bf16 on a GPU is cuBLAS's, autocast-style: no AMX needed.
            lora_core::amx::set_gpu_matmul_precision(p);
            if bf16 {
                eprintln!("matmul precision: bf16 (frozen-weight matmuls and attention products with bf16 inputs on cuBLAS, f32 sums; adapter, norms, softmax and optimizer in f32)");
            }
        } else {
            if let Err(e) = lora_core::amx::set_matmul_precision(p) {
                eprintln!("error: --matmul-precision {p}: {e}");
                std::process::exit(2);
            }
            if bf16 {
                eprintln!("matmul precision: bf16 (frozen-weight GEMMs on AMX tiles, f32 sums; adapter, attention and norms in f32)");
            }
        }
    }
    if !d.is_cpu() {
        if model_cmd {
            eprintln!("device: {}", lora_core::device::name(&d));
        } else {
            eprintln!("note: this command runs on the CPU; --device {} is not used", cli.device);
        }
    }
    if model_cmd {
        ui::set_device(d);
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without saving");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing the current step and saving a checkpoint (Ctrl-C again to abort)");
        });
    }
    let res = match cli.cmd {
        Cmd::Train(a) => cmd_classify::train(*a, &stop),
        Cmd::Eval(a) => cmd_classify::eval(a),
        Cmd::Generate(a) => cmd_causal::generate_cmd(a),
        Cmd::Chat(a) => cmd_causal::chat(a),
        Cmd::Predict(a) => cmd_classify::predict(a),
        Cmd::Merge(a) => cmd_merge::merge(a),
        Cmd::Export(a) => cmd_decoder_io::export(a),
        Cmd::Inspect(a) => cmd_inspect::inspect(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Extract(a) => cmd_lowrank::extract(a),
        Cmd::Combine(a) => cmd_lowrank::combine(a),
        Cmd::Compress(a) => cmd_lowrank::compress(a, &stop),
        Cmd::Analyze(a) => cmd_lowrank::analyze(a),
        Cmd::Convert(a) => cmd_lowrank::convert(a),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the outermost context and its cause, no backtrace.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ")
                .replace('\n', " ");
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}

fn rayon_pool(n: usize) -> Result<(), String> {
    // candle reads RAYON_NUM_THREADS for its own sizing; set both.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    lora_core::ops::set_threads(n);
    Ok(())
}
