//! `metrics.jsonl`: one JSON object per line, appended during training.
//!
//! ```text
//! {"kind":"train","step":10,"epoch":0.5,"loss":0.61,"lr":0.0002,"samples_per_s":812.3}
//! {"kind":"eval","step":20,"epoch":1,"accuracy":0.9,"macro_f1":0.88,"loss":0.31}
//! ```
//!
//! Appending is a plain `O_APPEND` write of one whole line per record, not
//! fsynced: a crash can lose the last records or leave a torn last line (no
//! final newline). Readers ignore such a torn last line, [`MetricsLog::append`]
//! cuts it off, and on resume [`rewrite_truncated`] drops the records logged
//! after the checkpoint being resumed from. Non-finite numbers (a NaN loss)
//! are written as `null` and read back as NaN.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Number, Value};

use crate::error::{DataError, Result};
use crate::fsutil::write_atomic;
use crate::metrics::ClassificationReport;

/// One training-step record.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRecord {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
}

/// One evaluation record: any named numbers (accuracy, macro_f1, loss ...).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: f64,
    pub metrics: BTreeMap<String, f64>,
}

impl EvalRecord {
    /// `accuracy`, `macro_f1` and `weighted_f1` of `report`, plus `loss`
    /// when given.
    pub fn from_report(step: u64, epoch: f64, report: &ClassificationReport, loss: Option<f64>) -> Self {
        let mut metrics = BTreeMap::new();
        metrics.insert("accuracy".to_string(), report.accuracy);
        metrics.insert("macro_f1".to_string(), report.macro_f1);
        metrics.insert("weighted_f1".to_string(), report.weighted_f1);
        if let Some(l) = loss {
            metrics.insert("loss".to_string(), l);
        }
        EvalRecord { step, epoch, metrics }
    }
}

/// A line of the log.
#[derive(Debug, Clone, PartialEq)]
pub enum LogRecord {
    Train(TrainRecord),
    Eval(EvalRecord),
    /// A line of another kind (kept verbatim, for forward compatibility).
    Other { kind: String, step: Option<u64>, value: Value },
}

impl LogRecord {
    /// The step of the record, if it has one.
    pub fn step(&self) -> Option<u64> {
        match self {
            LogRecord::Train(t) => Some(t.step),
            LogRecord::Eval(e) => Some(e.step),
            LogRecord::Other { step, .. } => *step,
        }
    }

    /// The record as one JSON line (no newline), `kind` first.
    pub fn to_json_line(&self) -> String {
        let mut fields: Vec<(&str, Value)> = Vec::new();
        match self {
            LogRecord::Train(t) => {
                fields.push(("kind", Value::from("train")));
                fields.push(("step", Value::from(t.step)));
                fields.push(("epoch", num(t.epoch)));
                fields.push(("loss", num(t.loss)));
                fields.push(("lr", num(t.lr)));
                fields.push(("samples_per_s", num(t.samples_per_s)));
            }
            LogRecord::Eval(e) => {
                fields.push(("kind", Value::from("eval")));
                fields.push(("step", Value::from(e.step)));
                fields.push(("epoch", num(e.epoch)));
                for (k, v) in &e.metrics {
                    if k != "kind" && k != "step" && k != "epoch" {
                        fields.push((k, num(*v)));
                    }
                }
            }
            LogRecord::Other { value, .. } => return value.to_string(),
        }
        let parts: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", Value::from(*k)))
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    /// Parses one line of the log; `Err` holds a message.
    pub fn from_json_line(line: &str) -> std::result::Result<Self, String> {
        let value: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
        let Value::Object(obj) = value else {
            return Err("expected a JSON object".into());
        };
        let kind = obj.get("kind").and_then(Value::as_str).ok_or("no string field 'kind'")?;
        let step = || obj.get("step").and_then(Value::as_u64).ok_or("no integer field 'step'");
        match kind {
            "train" => Ok(LogRecord::Train(TrainRecord {
                step: step()?,
                epoch: get_num(&obj, "epoch")?,
                loss: get_num(&obj, "loss")?,
                lr: get_num(&obj, "lr")?,
                samples_per_s: get_num(&obj, "samples_per_s")?,
            })),
            "eval" => {
                let metrics = obj
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "kind" | "step" | "epoch"))
                    .filter_map(|(k, v)| match v {
                        Value::Null => Some((k.clone(), f64::NAN)),
                        Value::Number(n) => n.as_f64().map(|x| (k.clone(), x)),
                        _ => None, // non-numbers are not metrics to plot
                    })
                    .collect();
                Ok(LogRecord::Eval(EvalRecord {
                    step: step()?,
                    epoch: get_num(&obj, "epoch")?,
                    metrics,
                }))
            }
            other => Ok(LogRecord::Other {
                kind: other.to_string(),
                step: obj.get("step").and_then(Value::as_u64),
                value: Value::Object(obj.clone()),
            }),
        }
    }
}

/// A finite number as JSON, anything else as `null`.
fn num(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// A numeric field (`null` reads as NaN).
fn get_num(obj: &Map<String, Value>, key: &str) -> std::result::Result<f64, String> {
    match obj.get(key) {
        Some(Value::Null) => Ok(f64::NAN),
        Some(v) => v.as_f64().ok_or_else(|| format!("field '{key}' is not a number")),
        None => Err(format!("no field '{key}'")),
    }
}

/// An open `metrics.jsonl`, appended to one line per record.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a new, empty log at `path` (replacing any old one); creates
    /// parent directories.
    pub fn create(path: &Path) -> Result<Self> {
        write_atomic(path, b"").map_err(|e| DataError::io(path, e))?;
        Self::append(path)
    }

    /// Opens `path` for appending (creating it if missing), first cutting off
    /// a torn last line left by a crash. To also drop records past a
    /// checkpoint, call [`rewrite_truncated`] before.
    pub fn append(path: &Path) -> Result<Self> {
        let io = |e| DataError::io(path, e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        let file = OpenOptions::new().create(true).append(true).read(true).open(path).map_err(io)?;
        let bytes = std::fs::read(path).map_err(io)?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64).map_err(io)?;
        }
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a line (one `write` call) and flushes.
    pub fn log(&mut self, record: &LogRecord) -> Result<()> {
        let mut line = record.to_json_line();
        line.push('\n');
        let io = |e| DataError::io(&self.path, e);
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.flush().map_err(io)
    }

    /// Appends a training record.
    pub fn log_train(&mut self, record: TrainRecord) -> Result<()> {
        self.log(&LogRecord::Train(record))
    }

    /// Appends an evaluation record.
    pub fn log_eval(&mut self, record: EvalRecord) -> Result<()> {
        self.log(&LogRecord::Eval(record))
    }
}

/// Parses the text of a log: (1-based line, record) pairs. A malformed last
/// line without a final newline is a torn write and is skipped.
fn parse_lines(path: &Path, text: &str) -> Result<Vec<(usize, String, LogRecord)>> {
    let torn_tail_ok = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, raw) in lines.iter().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        match LogRecord::from_json_line(raw) {
            Ok(r) => out.push((i + 1, raw.to_string(), r)),
            Err(_) if torn_tail_ok && i + 1 == lines.len() => {}
            Err(message) => {
                return Err(DataError::LogLine { path: path.to_path_buf(), line: i + 1, message })
            }
        }
    }
    Ok(out)
}

/// Reads every record of a metrics log (see the module docs on torn lines).
pub fn read_metrics_log(path: &Path) -> Result<Vec<LogRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    Ok(parse_lines(path, &text)?.into_iter().map(|(_, _, r)| r).collect())
}

/// Rewrites the log keeping only records with `step <= max_step` (and lines
/// without a step), for resuming from the checkpoint at `max_step`; also drops
/// a torn last line. Returns how many lines were dropped; a missing log is
/// left missing (0). The rewrite is atomic.
pub fn rewrite_truncated(path: &Path, max_step: u64) -> Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(DataError::io(path, e)),
    };
    let total = text.lines().filter(|l| !l.trim().is_empty()).count();
    let mut kept = String::with_capacity(text.len());
    let mut n_kept = 0;
    for (_, raw, rec) in parse_lines(path, &text)? {
        if rec.step().is_none_or(|s| s <= max_step) {
            kept.push_str(&raw);
            kept.push('\n');
            n_kept += 1;
        }
    }
    write_atomic(path, kept.as_bytes()).map_err(|e| DataError::io(path, e))?;
    Ok(total - n_kept)
}

/// The training loss by step, for plotting.
pub fn train_loss_series(records: &[LogRecord]) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| match r {
            LogRecord::Train(t) => Some((t.step as f64, t.loss)),
            _ => None,
        })
        .collect()
}

/// Each evaluation metric by step (named as logged, sorted by name), for
/// plotting.
pub fn eval_series(records: &[LogRecord]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut by_name: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        if let LogRecord::Eval(e) = r {
            for (k, v) in &e.metrics {
                by_name.entry(k.clone()).or_default().push((e.step as f64, *v));
            }
        }
    }
    by_name.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lora-data-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn train(step: u64, loss: f64) -> TrainRecord {
        TrainRecord { step, epoch: step as f64 / 10.0, loss, lr: 1e-4, samples_per_s: 100.0 }
    }

    #[test]
    fn line_format() {
        let line = LogRecord::Train(train(3, 0.5)).to_json_line();
        assert_eq!(line, r#"{"kind":"train","step":3,"epoch":0.3,"loss":0.5,"lr":0.0001,"samples_per_s":100.0}"#);
        let nan = LogRecord::Train(train(3, f64::NAN)).to_json_line();
        assert!(nan.contains(r#""loss":null"#), "{nan}");
        match LogRecord::from_json_line(&nan).unwrap() {
            LogRecord::Train(t) => assert!(t.loss.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write_read_truncate() {
        let d = dir("wrt");
        let path = d.join("run/metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        for s in 1..=4 {
            log.log_train(train(s * 10, 1.0 / s as f64)).unwrap();
            if s % 2 == 0 {
                let labels = vec!["a".to_string(), "b".to_string()];
                let r = ClassificationReport::new(&labels, &[0, 1], &[0, s as usize % 2]).unwrap();
                log.log_eval(EvalRecord::from_report(s * 10, s as f64, &r, Some(0.2))).unwrap();
            }
        }
        log.log(&LogRecord::from_json_line(r#"{"kind":"checkpoint","step":40,"dir":"x"}"#).unwrap())
            .unwrap();
        drop(log);
        let recs = read_metrics_log(&path).unwrap();
        assert_eq!(recs.len(), 7);
        assert_eq!(train_loss_series(&recs), vec![(10.0, 1.0), (20.0, 0.5), (30.0, 1.0 / 3.0), (40.0, 0.25)]);
        let ev = eval_series(&recs);
        let names: Vec<_> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["accuracy", "loss", "macro_f1", "weighted_f1"]);
        assert_eq!(ev[0].1, vec![(20.0, 0.5), (40.0, 0.5)]);

        // Resume from step 20: steps 30, 40 (train, eval, checkpoint) go.
        assert_eq!(rewrite_truncated(&path, 20).unwrap(), 4);
        let recs = read_metrics_log(&path).unwrap();
        assert_eq!(recs.iter().filter_map(LogRecord::step).max(), Some(20));
        assert_eq!(recs.len(), 3);
        let mut log = MetricsLog::append(&path).unwrap();
        log.log_train(train(30, 0.3)).unwrap();
        assert_eq!(read_metrics_log(&path).unwrap().len(), 4);
        assert_eq!(rewrite_truncated(&d.join("none.jsonl"), 5).unwrap(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torn_and_bad_lines() {
        let d = dir("torn");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("metrics.jsonl");
        let good = LogRecord::Train(train(1, 0.5)).to_json_line();
        std::fs::write(&path, format!("{good}\n{{\"kind\":\"tr")).unwrap();
        assert_eq!(read_metrics_log(&path).unwrap().len(), 1);
        let mut log = MetricsLog::append(&path).unwrap();
        log.log_train(train(2, 0.4)).unwrap();
        assert_eq!(read_metrics_log(&path).unwrap().len(), 2);

        std::fs::write(&path, format!("{good}\nnot json\n{good}\n")).unwrap();
        let e = read_metrics_log(&path).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl: line 2: malformed JSON"), "{e}");
        std::fs::write(&path, "{\"kind\":\"train\",\"step\":1}\n").unwrap();
        let e = read_metrics_log(&path).unwrap_err().to_string();
        assert!(e.contains("line 1: no field 'epoch'"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
