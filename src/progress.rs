//! Progress on stderr while rclone transfers: an indicatif bar per bucket when stderr is a
//! terminal, a plain line every 10 s otherwise (CronJob and Ansible logs), nothing with
//! `--no-progress` or `-q`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::events::Progress as Snapshot;
use crate::report::human_bytes;

const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub enum Progress {
    Off,
    Bars(MultiProgress),
    Plain,
}

/// One bucket's progress display.
pub enum BucketProgress {
    Off,
    Bar(ProgressBar),
    Plain {
        bucket: String,
        last: Mutex<Instant>,
    },
}

impl Progress {
    pub fn new(disabled: bool) -> Progress {
        if disabled {
            Progress::Off
        } else if std::io::stderr().is_terminal() {
            Progress::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Progress::Plain
        }
    }

    pub fn bucket(&self, name: &str) -> BucketProgress {
        match self {
            Progress::Off => BucketProgress::Off,
            Progress::Bars(m) => {
                let bar = m.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>16} {bar:30} {bytes:>10}/{total_bytes:<10} {msg} {binary_bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_prefix(name.to_string());
                BucketProgress::Bar(bar)
            }
            Progress::Plain => BucketProgress::Plain {
                bucket: name.to_string(),
                last: Mutex::new(Instant::now()),
            },
        }
    }
}

impl BucketProgress {
    /// Show a stats snapshot. Byte counts are rclone's transfer bytes (ciphertext under crypt),
    /// so the bar can briefly pass 100 %: clamp it.
    pub fn update(&self, s: &Snapshot) {
        match self {
            BucketProgress::Off => {}
            BucketProgress::Bar(b) => {
                let total = s.total_bytes.max(s.bytes);
                b.set_length(total);
                b.set_position(s.bytes);
                b.set_message(format!("{}/{} objects", s.transfers, s.total_transfers));
            }
            BucketProgress::Plain { bucket, last } => {
                let Ok(mut last) = last.lock() else { return };
                if last.elapsed() < PLAIN_EVERY {
                    return;
                }
                *last = Instant::now();
                let eta = s
                    .eta
                    .map(|e| format!("{e:.0}s"))
                    .unwrap_or_else(|| "-".into());
                eprintln!(
                    "offsite: {bucket}: {} of {}, {}/{} objects, {}/s, eta {eta}",
                    human_bytes(s.bytes),
                    human_bytes(s.total_bytes.max(s.bytes)),
                    s.transfers,
                    s.total_transfers,
                    human_bytes(s.speed as u64),
                );
            }
        }
    }

    pub fn finish(&self) {
        if let BucketProgress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}
