//! The training loop shared by every task: AdamW, schedules, accumulation,
//! clipping, evaluation, best-checkpoint tracking, early stopping, resume.

pub mod checkpoint;
pub mod error;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use checkpoint::TrainState;
pub use error::{Result, TrainError};
pub use optim::{AdamW, AdamWConfig};
pub use schedule::Schedule;
pub use trainer::{EvalRecord, Hooks, Outcome, StepRecord, Task, TrainConfig, Trainer};
