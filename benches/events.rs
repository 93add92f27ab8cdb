//! The events-parser bench (issue 8, item 7): 1,000,000 JSON log lines recorded from rclone
//! 1.60.1 and 1.75.2 (`tests/fixtures/rclone-logs/`, every scenario, repeated in order) through
//! [`offsite::events::count_lines`], the streaming reader + parser + counter that folds one
//! bucket's rclone stderr. Prints lines/s and the process's peak RSS (VmHWM).
//!
//! `cargo bench --bench events` (release profile). Target: >= 500,000 lines/s, <= 20 MiB.
//! The lines are generated on the fly by a `Read` implementation, never held in memory, so the
//! peak RSS is the parser's (plus the binary), not the input's.
//!
//! `OFFSITE_BENCH_LINES=N` changes the line count.

use std::io::{self, BufReader, Read};
use std::time::Instant;

use offsite::events::{self, Line};

const TARGET_LINES_PER_SEC: f64 = 500_000.0;
const TARGET_RSS_MIB: f64 = 20.0;

#[path = "../tests/rclone_logs/mod.rs"]
mod rclone_logs;
use rclone_logs::LOGS;

/// Yields `remaining` lines, cycling through `lines` (each ends in `\n`).
struct Repeat {
    lines: Vec<&'static [u8]>,
    next: usize,
    offset: usize,
    remaining: u64,
}

impl Read for Repeat {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < out.len() && self.remaining > 0 {
            let line = self.lines[self.next];
            let take = (line.len() - self.offset).min(out.len() - n);
            out[n..n + take].copy_from_slice(&line[self.offset..self.offset + take]);
            n += take;
            self.offset += take;
            if self.offset == line.len() {
                self.offset = 0;
                self.next = (self.next + 1) % self.lines.len();
                self.remaining -= 1;
            }
        }
        Ok(n)
    }
}

/// CPU time of this (single-threaded) process in ns: on a shared machine the wall clock also
/// counts the time other processes held the cores.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument would mean "not this bench".
    if std::env::args().skip(1).any(|a| !a.starts_with("--")) {
        return;
    }
    let total: u64 = std::env::var("OFFSITE_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // The recorded JSON lines only: the plain-text usage output of the usage-error scenario is
    // not what a sync's stderr consists of.
    let lines: Vec<&'static [u8]> = LOGS
        .iter()
        .flat_map(|(_, log)| log.split_inclusive(|&b| b == b'\n'))
        .filter(|l| matches!(events::parse_line(l), Line::Json(_)))
        .collect();
    let bytes_per_cycle: usize = lines.iter().map(|l| l.len()).sum();
    let cycle = lines.len() as u64;
    let input = Repeat {
        lines,
        next: 0,
        offset: 0,
        remaining: total,
    };
    let rss_before = vm_hwm_kib().unwrap_or(0);
    let start = Instant::now();
    let cpu_start = cpu_ns().unwrap_or(0);
    let counts = events::count_lines(BufReader::with_capacity(64 * 1024, input));
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = cpu_ns().unwrap_or(0).saturating_sub(cpu_start) as f64 / 1e9;
    let rss_mib = vm_hwm_kib().unwrap_or(0) as f64 / 1024.0;
    let per_sec = total as f64 / secs;
    let mb = (bytes_per_cycle as f64 * total as f64 / cycle as f64) / 1e6;
    // The counts prove the lines were parsed (and keep the work from being optimised away).
    eprintln!(
        "events bench: {cycle} distinct recorded JSON lines repeated to {total}; {mb:.0} MB; \
         folded: {} copied, {} deleted, {} dry-run copies, {} failed attempts; \
         VmHWM before parsing {:.1} MiB",
        counts.copied,
        counts.deleted,
        counts.dry_run_copies,
        counts.failed_attempts,
        rss_before as f64 / 1024.0
    );
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "events parser: {total} lines in {secs:.3} s = {per_sec:.0} lines/s ({:.0} MB/s; \
         CPU {cpu_secs:.3} s = {:.0} lines/s), peak RSS {rss_mib:.1} MiB; \
         targets >= {TARGET_LINES_PER_SEC:.0} lines/s {}, <= {TARGET_RSS_MIB:.0} MiB {}",
        mb / secs,
        total as f64 / cpu_secs,
        verdict(per_sec >= TARGET_LINES_PER_SEC),
        verdict(rss_mib <= TARGET_RSS_MIB),
    );
}
