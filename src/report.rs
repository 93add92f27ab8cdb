//! Reporting: run ids and timestamps, per-bucket results, the text summary table and the
//! `--output json` document (cli.md).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use crate::compliance::Finding;
use crate::exit::Code;
use crate::rclone::Rclone;

/// UTC civil date-time from a Unix timestamp (Howard Hinnant's `civil_from_days`), so no
/// date crate is needed for the two formats offsite prints.
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2026-12-03T05:15:00Z`
pub fn rfc3339(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(unix(t));
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `20261203T051500Z-4f2a`: sortable by time, unique enough across hosts sharing a secondary.
pub fn run_id(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(unix(t));
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    format!(
        "{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z-{:02x}{:02x}",
        r[0], r[1]
    )
}

/// One bucket's outcome, as in the JSON document's `buckets[]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BucketResult {
    pub name: String,
    pub status: &'static str,
    pub copied: u64,
    pub copied_bytes: u64,
    pub deleted: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `--dry-run`: what a real run would have done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_copy: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_delete: Option<u64>,
    #[serde(skip)]
    pub code: Option<Code>,
}

impl BucketResult {
    pub fn code(&self) -> Code {
        self.code.unwrap_or(Code::Ok)
    }
}

/// The exit code for a set of bucket results: the most pressing one. A guard refusal (4) ranks
/// above a failure (5) because it asks for a human decision before anything else happens.
pub fn overall(codes: impl IntoIterator<Item = Code>) -> Code {
    let rank = |c: Code| match c {
        Code::Ok => 0,
        Code::VerifyFailed => 1,
        Code::Failed => 2,
        Code::GuardRefused => 3,
        Code::Locked => 4,
        Code::Invalid | Code::Noncompliant => 5,
        Code::Internal => 6,
        Code::Rclone => 7,
        Code::Interrupted | Code::Terminated => 8,
    };
    codes
        .into_iter()
        .max_by_key(|c| rank(*c))
        .unwrap_or(Code::Ok)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The guard decisions worth a line in text mode: all but a plain pass and the lock being
/// taken.
pub fn decision_lines(decisions: &[crate::guards::Decision]) -> Vec<String> {
    decisions
        .iter()
        .filter(|d| !matches!(d.result, "pass" | "acquired"))
        .map(|d| {
            let bucket = d
                .bucket
                .as_deref()
                .map(|b| format!(" [{b}]"))
                .unwrap_or_default();
            format!("guard {}{bucket}: {}: {}", d.guard, d.result, d.detail)
        })
        .collect()
}

/// The summary table printed at the end of `sync` in text mode.
pub fn table(results: &[BucketResult]) -> String {
    let w = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:<w$}  {:<13}  {:>7}  {:>10}  {:>7}  {:>6}\n",
        "bucket", "status", "copied", "bytes", "deleted", "errors"
    );
    for r in results {
        out += &format!(
            "{:<w$}  {:<13}  {:>7}  {:>10}  {:>7}  {:>6}\n",
            r.name,
            r.status,
            r.copied,
            human_bytes(r.copied_bytes),
            r.deleted,
            r.errors
        );
        if let Some(e) = &r.error {
            out += &format!("{:<w$}  error: {e}\n", "");
        }
    }
    out
}

/// The fields every `sync`/`verify`/`run`/`restore` document shares (cli.md).
pub struct Document<'a> {
    pub command: &'a str,
    pub policy: &'a str,
    pub run_id: &'a str,
    pub rclone: &'a Rclone,
    pub started: SystemTime,
    pub finished: SystemTime,
    pub code: Code,
    pub changed: bool,
    pub buckets: Vec<Value>,
    pub guards: Vec<Value>,
    pub findings: &'a [Finding],
}

impl Document<'_> {
    pub fn to_json(&self) -> Value {
        json!({
            "command": self.command,
            "policy": self.policy,
            "run_id": self.run_id,
            "status": self.code.status(),
            "exit_code": self.code.as_i32(),
            "changed": self.changed,
            "rclone": {"path": self.rclone.path, "version": self.rclone.version.to_string()},
            "started": rfc3339(self.started),
            "finished": rfc3339(self.finished),
            "buckets": self.buckets,
            "guards": self.guards,
            "findings": self.findings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_known_instants() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_274_900); // 2026-12-03T05:15:00Z
        assert_eq!(rfc3339(t), "2026-12-03T05:15:00Z");
        assert!(run_id(t).starts_with("20261203T051500Z-"));
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn overall_prefers_guard_over_failure() {
        assert_eq!(
            overall([Code::Ok, Code::Failed, Code::GuardRefused]),
            Code::GuardRefused
        );
        assert_eq!(overall([Code::Ok, Code::Ok]), Code::Ok);
        assert_eq!(overall([Code::Failed, Code::Terminated]), Code::Terminated);
        assert_eq!(overall(Vec::<Code>::new()), Code::Ok);
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(250 * 1024 * 1024), "250.0 MiB");
    }
}
