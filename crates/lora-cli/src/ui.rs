//! Progress bars and small output helpers.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A progress bar on stderr (hidden when stderr is not a terminal, or with --json).
pub fn bar(len: u64, unit: &str, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if quiet || !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let tmpl = format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:30.cyan/blue}} {{pos}}/{{len}} {unit} · {{msg}} · {{per_sec}} · ETA {{eta}}"
    );
    pb.set_style(
        ProgressStyle::with_template(&tmpl)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// Whether progress is drawn (so plain log lines are needed otherwise).
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}

pub fn human_count(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}k", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

/// Peak resident set size of this process in MB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();

/// Sets the device of the global `--device` (once, from main).
pub fn set_device(d: candle_core::Device) {
    let _ = DEVICE.set(d);
}

/// The device the model commands compute on (the CPU unless `--device` says otherwise).
pub fn device() -> candle_core::Device {
    DEVICE.get().cloned().unwrap_or(candle_core::Device::Cpu)
}
