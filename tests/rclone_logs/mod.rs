//! The recorded rclone logs (`tests/fixtures/rclone-logs/`, recorded with the rig from 1.60.1
//! and 1.75.2), compiled in: shared by `tests/events_hostile.rs` and `benches/events.rs`
//! (`#[path]` module).

macro_rules! fixtures {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!("../fixtures/rclone-logs/", $name)).as_slice())),*]
    };
}

pub const LOGS: &[(&str, &[u8])] = fixtures!(
    "1.60.1-initial.log",
    "1.60.1-dry-run.log",
    "1.60.1-incremental.log",
    "1.60.1-max-delete.log",
    "1.60.1-missing-source.log",
    "1.60.1-usage-error.log",
    "1.60.1-io-error.log",
    "1.60.1-replace-delete.log",
    "1.60.1-progress.log",
    "1.75.2-initial.log",
    "1.75.2-dry-run.log",
    "1.75.2-incremental.log",
    "1.75.2-max-delete.log",
    "1.75.2-missing-source.log",
    "1.75.2-usage-error.log",
    "1.75.2-io-error.log",
    "1.75.2-replace-delete.log",
    "1.75.2-progress.log",
);
