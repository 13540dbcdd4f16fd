//! Data for LoRA fine-tuning of classifiers: reading labelled text (CSV, TSV,
//! JSON Lines), label sets and stratified splits, scikit-learn-equal
//! classification metrics, the `metrics.jsonl` training log, SVG plots, and
//! atomic file writes.

pub mod error;
pub mod fsutil;
pub mod gen_metrics;
pub mod labels;
pub mod metrics;
pub mod metrics_log;
pub mod plot;
pub mod table;

pub use error::{DataError, Result};
pub use fsutil::write_atomic;
pub use gen_metrics::{BleuScore, GenMetricsError, GenerationReport};
pub use labels::{label_ids, split_train_valid, LabelSet};
pub use metrics::{Avg, ClassMetrics, ClassificationReport};
pub use metrics_log::{
    eval_series, read_metrics_log, rewrite_truncated, train_loss_series, EvalRecord, LogRecord,
    MetricsLog, TrainRecord,
};
pub use plot::{plot_confusion, plot_curves, plot_training, Series};
pub use table::{read_examples, Example, Format};
