//! offsite: replicate backup buckets to a second object storage, encrypted client-side with
//! rclone crypt. `main` stays thin: it runs [`cli::run`] and prints an error once.

mod cli;
mod commands;
mod compliance;
mod events;
mod exit;
mod guards;
mod manifest;
mod policy;
mod progress;
mod rclone;
mod render;
mod report;
mod restore;
mod signals;
mod sync;
mod verify;

use std::process::ExitCode;

fn main() -> ExitCode {
    signals::install();
    let code = cli::main();
    ExitCode::from(u8::try_from(code.as_i32()).unwrap_or(1))
}
