//! offsite: replicate backup buckets to a second object storage, encrypted client-side with
//! rclone crypt. The binary (`main.rs`) is a thin shell over [`cli::main`]; the modules are a
//! library so that property tests, the fuzz corpus and the log-parser bench can call the policy
//! parser, the renderer and the events parser directly.
//!
//! Modules follow the data flow: policy → compliance → render → rclone → events → guards /
//! sync / verify / restore → report / reporting; `cli` and `commands` compose them.

pub mod cli;
pub mod commands;
pub mod compliance;
pub mod events;
pub mod exit;
pub mod guards;
pub mod manifest;
pub mod policy;
pub mod progress;
pub mod rclone;
pub mod render;
pub mod report;
pub mod reporting;
pub mod restore;
pub mod signals;
pub mod sync;
pub mod verify;
