//! Shared helpers for the CLI integration tests: run the built `lora` binary,
//! make throw-away folders and small data files, read JSON outputs.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const BIN: &str = env!("CARGO_BIN_EXE_lora");

/// The tiny random BertForSequenceClassification (labels neg/neu/pos).
pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert/model")
}

/// A fresh folder under the system temp dir, removed on drop (kept when
/// `LORA_TEST_KEEP` is set, for debugging).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "lora-cli-test-{name}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// Writes `bytes` to `name` inside the folder and returns its path.
    pub fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("LORA_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Result of one `lora` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub args: Vec<String>,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "lora {}\nexit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }

    /// Asserts exit code 0 and returns self.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success:\n{}", self.describe());
        self
    }

    /// stdout parsed as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.describe()))
    }

    /// Asserts a failed run whose stderr is exactly one line `error: ...`
    /// containing every string of `needles`, with no panic or backtrace.
    /// Returns the message.
    pub fn clean_error(&self, needles: &[&str]) -> String {
        assert_ne!(self.code, 0, "expected failure:\n{}", self.describe());
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.to_lowercase().contains("backtrace"),
            "panic or backtrace:\n{}",
            self.describe()
        );
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected exactly one stderr line:\n{}", self.describe());
        let line = lines[0];
        assert!(line.starts_with("error: "), "stderr does not start with 'error: ':\n{}", self.describe());
        for n in needles {
            assert!(line.contains(n), "error line does not mention {n:?}:\n{}", self.describe());
        }
        // Shown with --nocapture, for reviewing the messages.
        eprintln!("[{}] {line}", self.args.first().map(String::as_str).unwrap_or(""));
        line.to_string()
    }
}

fn to_strings<I, S>(args: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    args.into_iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect()
}

/// A `lora` command with a clean, reproducible environment. RUST_BACKTRACE
/// is on so that an error carrying a backtrace would show up in stderr.
pub fn command<I, S>(args: I) -> (Command, Vec<String>)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args = to_strings(args);
    let mut c = Command::new(BIN);
    c.args(&args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RAYON_NUM_THREADS")
        .env("NO_COLOR", "1");
    (c, args)
}

pub fn from_output(out: Output, args: Vec<String>) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        args,
    }
}

/// Runs `lora ARGS` to completion.
pub fn lora<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let (mut c, args) = command(args);
    let out = c.output().expect("cannot start the lora binary");
    from_output(out, args)
}

/// Shorthand for building argument lists from strings and paths.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        vec![$(std::ffi::OsString::from($a)),*]
    };
}

const POS: &[&str] = &["good", "great", "love", "fun", "excellent", "amazing"];
const NEG: &[&str] = &["bad", "terrible", "hate", "boring", "awful", "horrible"];
const NEU: &[&str] = &["okay", "average", "fine", "decent", "mediocre", "ok"];
const FRAMES: &[&str] = &[
    "the movie was {}",
    "this film is {}",
    "i think the story is {}",
    "{} acting and {} music",
    "what a {} film",
    "the plot felt {} to me",
    "{} {} {}",
    "really {} movie",
];

/// A learnable toy sentiment table: `n_per_label` rows per label, each text
/// made of a frame filled with that label's words. `labels` picks among
/// "pos", "neg", "neu".
pub fn toy_rows(labels: &[&str], n_per_label: usize) -> Vec<(String, String)> {
    let mut rows = vec![];
    for i in 0..n_per_label {
        for (li, l) in labels.iter().enumerate() {
            let words = match *l {
                "pos" => POS,
                "neg" => NEG,
                "neu" => NEU,
                _ => panic!("unknown toy label {l}"),
            };
            let frame = FRAMES[(i + li) % FRAMES.len()];
            let mut k = 0;
            let mut text = String::new();
            for (j, part) in frame.split("{}").enumerate() {
                if j > 0 {
                    text.push_str(words[(i * 3 + k) % words.len()]);
                    k += 1;
                }
                text.push_str(part);
            }
            rows.push((text.trim().to_string(), l.to_string()));
        }
    }
    rows
}

/// CSV text with a `text,label` header.
pub fn csv(rows: &[(String, String)]) -> String {
    let mut s = String::from("text,label\n");
    for (t, l) in rows {
        s.push_str(&format!("\"{}\",{}\n", t.replace('"', "\"\""), l));
    }
    s
}

/// The JSON lines of a file.
pub fn jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display())))
        .collect()
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(step, epoch, loss, lr)` of the train records, with the numbers as
/// written (to compare runs exactly); `samples_per_s` is left out.
pub fn train_losses(metrics: &Path) -> Vec<(u64, String, String, String)> {
    jsonl(metrics)
        .into_iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["epoch"].to_string(), v["loss"].to_string(), v["lr"].to_string()))
        .collect()
}

/// The eval records (all fields), in order.
pub fn eval_records(metrics: &Path) -> Vec<Value> {
    jsonl(metrics).into_iter().filter(|v| v["kind"] == "eval").collect()
}

/// Copies a folder's files (not recursive) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}
