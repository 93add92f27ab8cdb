//! Verification that never passes what it could not check (issue 5).
//!
//! `rclone cryptcheck` compares each source object, encrypted with the nonce of its replica,
//! against the replica's MD5 on the secondary. When a replica has no MD5 — every object rclone
//! uploaded in multipart (above `--s3-upload-cutoff`, 200 MiB by default), because crypt cannot
//! tell S3 the ciphertext's MD5 in advance — cryptcheck counts it as matching, exits 0, and only
//! the NOTICE `N hashes could not be checked` says so (rclone-facts.md; observed on Garage with
//! 1.60.1 and 1.75.2). offsite finds those replicas (a raw listing with hashes, names decoded
//! with `rclone cryptdecode`) and checks them by download (`rclone check --download`), so they
//! end up matched or differ. If it cannot account for every unchecked object it downloads all
//! of them; if even that fails they are `unverifiable` and the result is exit 6.
//!
//! Modes: `full` (the whole bucket), `changed` (what the last sync copied, from state.json or
//! from this run), `sample` (a seeded random `sample_percent` of the objects plus every
//! replica without MD5; the seed is reported so a run can be repeated).

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::events::{self, Line};
use crate::exit::{fail, Code};
use crate::policy::BucketSpec;
use crate::rclone::Rclone;
use crate::render::PrivateConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Changed,
    Sample,
    Full,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Changed => "changed",
            Mode::Sample => "sample",
            Mode::Full => "full",
        }
    }
}

/// The `verify` object of a bucket in the JSON document (cli.md).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verified {
    pub mode: &'static str,
    pub checked: u64,
    pub matched: u64,
    pub differ: u64,
    pub missing_on_destination: u64,
    pub missing_on_source: u64,
    pub unverifiable: u64,
    /// Of `matched`, checked by download because the replica had no MD5.
    pub by_download: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The first names that differ, are missing or could not be checked (never contents).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub object: String,
    pub problem: &'static str,
}

impl Verified {
    pub fn ok(&self) -> bool {
        self.differ == 0
            && self.missing_on_destination == 0
            && self.missing_on_source == 0
            && self.unverifiable == 0
    }
}

/// How to verify: the mode, the sampling seed, how many problem names to report.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub mode: Mode,
    pub seed: u64,
    pub show: usize,
}

pub struct Request<'a> {
    pub policy: &'a crate::policy::Policy,
    pub rclone: &'a Rclone,
    pub config: &'a PrivateConfig,
    pub bucket: &'a BucketSpec,
    pub mode: Mode,
    /// `changed`: the objects to check. `None` means "not known" and checks the whole bucket.
    pub changed: Option<&'a [String]>,
    pub sample_percent: f64,
    pub seed: u64,
    pub checkers: u32,
    /// How many problem names to report.
    pub show: usize,
}

fn args(r: &Request, rest: &[&str]) -> Vec<OsString> {
    let mut a = r.rclone.meta_args(r.config.path());
    a.extend(rest.iter().map(OsString::from));
    a
}

fn write_list(r: &Request, name: &str, items: &[String]) -> anyhow::Result<std::path::PathBuf> {
    let p = r
        .config
        .scratch()
        .join(format!("{name}-{}.txt", r.bucket.name));
    let mut text = items.join("\n");
    text.push('\n');
    crate::render::write_scratch(&p, text.as_bytes())?;
    Ok(p)
}

/// One line of `--combined`: `= ` match, `+ ` only on source, `- ` only on destination,
/// `* ` differ, `! ` error.
fn parse_combined(text: &str) -> Vec<(char, String)> {
    text.lines()
        .filter_map(|l| {
            let mut chars = l.chars();
            let c = chars.next()?;
            let rest = l.get(2..)?;
            matches!(c, '=' | '+' | '-' | '*' | '!').then(|| (c, rest.to_string()))
        })
        .collect()
}

/// rclone's messages for a replica whose ciphertext is damaged (seen with 1.60.1 and 1.75.2):
/// the object was checked, and it is not the source's data. That is a difference, not an
/// object that could not be checked.
const CORRUPT: &[&str] = &[
    "bad magic string",
    "failed to authenticate decrypted block",
    "too short to be encrypted",
];

struct CheckRun {
    /// `!` entries whose error says the ciphertext is damaged are turned into `*`.
    entries: Vec<(char, String)>,
    /// From `N hashes could not be checked`.
    unhashed: u64,
}

/// `rclone cryptcheck` or `rclone check --download` with `--combined`, log parsed live.
fn run_check(r: &Request, download: bool, files: Option<&Path>) -> anyhow::Result<CheckRun> {
    let combined = r.config.scratch().join(format!(
        "combined-{}-{}.txt",
        r.bucket.name,
        if download { "download" } else { "crypt" }
    ));
    let src = format!("source:{}", r.bucket.name);
    let dst = crate::sync::replica_path(&r.bucket.name.0);
    let mut a = r.rclone.global_args(r.config.path());
    let verb: &[&str] = if download {
        &["check", "--download"]
    } else {
        &["cryptcheck"]
    };
    a.extend(verb.iter().map(OsString::from));
    a.push(src.into());
    a.push(dst.into());
    a.extend(
        // Byte-exact names, as the sync compares them (sync.rs: NFC/NFD twins are two objects).
        [
            "--use-json-log",
            "-v",
            "--no-unicode-normalization",
            "--checkers",
        ]
        .iter()
        .map(OsString::from),
    );
    a.push(r.checkers.to_string().into());
    a.push("--combined".into());
    a.push(combined.clone().into());
    for p in &r.bucket.exclude {
        a.push("--exclude".into());
        a.push(p.into());
    }
    if let Some(f) = files {
        a.push("--files-from-raw".into());
        a.push(f.into());
        // Look the listed objects up one by one instead of listing both trees: a changed-only
        // check of 10 objects in a bucket of 1,000 took 0.26 s instead of 0.19 s. Missing
        // objects are still reported (checked with 1.60.1 and 1.75.2).
        a.push("--no-traverse".into());
    }
    let mut unhashed = 0u64;
    let mut fatal: Option<String> = None;
    let mut corrupt: HashSet<String> = HashSet::new();
    let code = r.rclone.stream(&a, |raw| {
        let line = events::parse_line(raw);
        if let Line::Json(ev) = &line {
            if let Some(o) = &ev.object {
                if CORRUPT.iter().any(|c| ev.msg.contains(c)) {
                    corrupt.insert(o.clone());
                }
            }
        }
        let msg = match &line {
            Line::Json(ev) => ev.msg.clone(),
            Line::Text(t) => t.clone(),
        };
        if let Some(n) = msg
            .split(" hashes could not be checked")
            .next()
            .filter(|_| msg.contains(" hashes could not be checked"))
            .and_then(|head| head.rsplit([' ', ':']).next())
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            unhashed = n;
        }
        if msg.contains("Failed to") || msg.contains("directory not found") {
            fatal = Some(msg);
        }
    })?;
    let text = std::fs::read_to_string(&combined).unwrap_or_default();
    let _ = std::fs::remove_file(&combined);
    let entries: Vec<(char, String)> = parse_combined(&text)
        .into_iter()
        .map(|(c, n)| {
            if c == '!' && corrupt.contains(&n) {
                ('*', n)
            } else {
                (c, n)
            }
        })
        .collect();
    // Differences exit 1; anything else without a report is a failure of the check itself.
    if entries.is_empty() && !matches!(code, Some(0) | Some(1)) {
        let what = if code == Some(3) {
            format!("bucket {} or its replica not found", r.bucket.name)
        } else {
            format!(
                "rclone {} failed (exit {code:?}): {}",
                if download {
                    "check --download"
                } else {
                    "cryptcheck"
                },
                fatal.unwrap_or_default()
            )
        };
        return Err(fail(Code::Failed, what));
    }
    Ok(CheckRun { entries, unhashed })
}

/// Replica objects of this bucket that have no MD5 on the secondary, as plaintext paths
/// relative to the bucket: one raw listing with hashes, then `rclone cryptdecode`.
fn replicas_without_md5(r: &Request) -> anyhow::Result<Vec<String>> {
    let plain_dir = format!("data/{}", r.bucket.name);
    let out = r.rclone.output(
        &args(r, &["cryptdecode", "--reverse", "offsite:", &plain_dir]),
        None,
    )?;
    let enc_dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split('\t').nth(1).map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .context("rclone cryptdecode --reverse printed no name")?;
    let root = crate::render::crypt_root(r.policy);
    let raw_dir = if root.ends_with(':') {
        format!("{root}{enc_dir}")
    } else {
        format!("{root}/{enc_dir}")
    };
    let out = r.rclone.output(
        &args(
            r,
            &[
                "lsjson",
                "-R",
                "--files-only",
                "--hash",
                "--hash-type",
                "MD5",
                "--no-mimetype",
                &raw_dir,
            ],
        ),
        None,
    )?;
    if !out.status.success() {
        return Err(fail(
            Code::Failed,
            format!(
                "listing the replica of {} with hashes failed: {}",
                r.bucket.name,
                crate::sync::last_line(&out.stderr)
            ),
        ));
    }
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing rclone lsjson")?;
    let no_md5: Vec<String> = entries
        .iter()
        .filter(|e| {
            e["Hashes"]["md5"]
                .as_str()
                .or_else(|| e["Hashes"]["MD5"].as_str())
                .is_none_or(str::is_empty)
        })
        .filter_map(|e| e["Path"].as_str().map(|p| format!("{enc_dir}/{p}")))
        .collect();
    let mut plain = Vec::new();
    // Encrypted names are not secret; batches keep argv short.
    for chunk in no_md5.chunks(200) {
        let mut a = args(r, &["cryptdecode", "offsite:"]);
        a.extend(chunk.iter().map(OsString::from));
        let out = r.rclone.output(&a, None)?;
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = l
                .split('\t')
                .nth(1)
                .map(str::trim)
                .and_then(|p| p.strip_prefix(&format!("{plain_dir}/")))
            {
                plain.push(p.to_string());
            }
        }
    }
    Ok(plain)
}

/// A small seeded generator (splitmix64) for sampling: reproducible from the reported seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `ceil(n * percent / 100)` objects chosen with a seeded partial Fisher-Yates shuffle.
pub fn sample(mut names: Vec<String>, percent: f64, seed: u64) -> Vec<String> {
    names.sort();
    let k = ((names.len() as f64) * percent / 100.0).ceil() as usize;
    let k = k.min(names.len());
    let mut rng = Rng(seed);
    for i in 0..k {
        let j = i + (rng.next() % (names.len() - i) as u64) as usize;
        names.swap(i, j);
    }
    names.truncate(k);
    names
}

pub fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b) >> 11 // fits a JSON number exactly
}

/// Verify one bucket.
pub fn verify_bucket(r: &Request) -> anyhow::Result<Verified> {
    let mut v = Verified {
        mode: r.mode.as_str(),
        ..Default::default()
    };
    // The set to check: None = everything.
    let mut list: Option<Vec<String>> = match r.mode {
        Mode::Full => None,
        Mode::Changed => r.changed.map(|c| c.to_vec()),
        Mode::Sample => {
            v.seed = Some(r.seed);
            let out = r.rclone.output(
                &args(
                    r,
                    &[
                        "lsf",
                        "-R",
                        "--files-only",
                        &format!("source:{}", r.bucket.name),
                    ],
                ),
                None,
            )?;
            if !out.status.success() {
                return Err(fail(
                    Code::Failed,
                    format!(
                        "listing source bucket {} failed: {}",
                        r.bucket.name,
                        crate::sync::last_line(&out.stderr)
                    ),
                ));
            }
            let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from)
                .collect();
            let mut chosen = sample(names, r.sample_percent, r.seed);
            // Every replica without MD5 is checked too (by download, below). A local
            // secondary hashes everything itself (and listing its hashes would read it all).
            let mut seen: HashSet<String> = chosen.iter().cloned().collect();
            let no_md5 = match r.policy.destination {
                crate::policy::Side::Local { .. } => vec![],
                _ => replicas_without_md5(r)?,
            };
            for p in no_md5 {
                if seen.insert(p.clone()) {
                    chosen.push(p);
                }
            }
            Some(chosen)
        }
    };
    if let Some(l) = &mut list {
        l.sort();
        l.dedup();
        if l.is_empty() {
            return Ok(v);
        }
    }
    let files = match &list {
        Some(l) => Some(write_list(r, "verify", l)?),
        None => None,
    };
    let crypt = run_check(r, false, files.as_deref())?;
    let mut results: std::collections::BTreeMap<String, char> =
        crypt.entries.iter().map(|(c, n)| (n.clone(), *c)).collect();
    let errored: Vec<String> = results
        .iter()
        .filter(|(_, c)| **c == '!')
        .map(|(n, _)| n.clone())
        .collect();
    if crypt.unhashed > 0 || !errored.is_empty() {
        // Which "=" were never compared? Replicas without MD5, restricted to what was checked.
        let matched: BTreeSet<&String> = results
            .iter()
            .filter(|(_, c)| **c == '=')
            .map(|(n, _)| n)
            .collect();
        let no_md5 = if crypt.unhashed > 0 {
            replicas_without_md5(r).unwrap_or_default()
        } else {
            vec![]
        };
        let mut suspects: Vec<String> =
            no_md5.into_iter().filter(|p| matched.contains(p)).collect();
        if (suspects.len() as u64) < crypt.unhashed {
            // Could not account for every unchecked object: download all the "=" ones.
            suspects = matched.iter().map(|s| s.to_string()).collect();
        }
        // cryptcheck errors that are not damage (a read that failed) get a second chance.
        suspects.extend(errored);
        let dl_list = write_list(r, "download", &suspects)?;
        let suspects: HashSet<String> = suspects.into_iter().collect();
        match run_check(r, true, Some(&dl_list)) {
            Ok(dl) => {
                let mut seen = HashSet::new();
                for (c, n) in dl.entries {
                    if suspects.contains(&n) {
                        if c == '=' {
                            v.by_download += 1;
                        }
                        seen.insert(n.clone());
                        results.insert(n, c);
                    }
                }
                for n in suspects.difference(&seen) {
                    results.insert(n.clone(), '?');
                }
            }
            Err(_) => {
                for n in suspects {
                    results.insert(n, '?');
                }
            }
        }
    }
    for (name, c) in &results {
        v.checked += 1;
        let problem = match c {
            '=' => {
                v.matched += 1;
                None
            }
            '*' => {
                v.differ += 1;
                Some("differ")
            }
            '+' => {
                v.missing_on_destination += 1;
                Some("missing_on_destination")
            }
            '-' => {
                v.missing_on_source += 1;
                Some("missing_on_source")
            }
            _ => {
                v.unverifiable += 1;
                Some("unverifiable")
            }
        };
        if let Some(p) = problem {
            if v.problems.len() < r.show {
                v.problems.push(Problem {
                    object: name.clone(),
                    problem: p,
                });
            }
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_lines_parse() {
        let t = "= a.txt\n+ only src.txt\n- only dst\n* diff/x y\n! err\n\nweird\n";
        let p = parse_combined(t);
        assert_eq!(
            p,
            vec![
                ('=', "a.txt".into()),
                ('+', "only src.txt".into()),
                ('-', "only dst".into()),
                ('*', "diff/x y".into()),
                ('!', "err".into()),
            ]
        );
    }

    #[test]
    fn sampling_is_seeded_and_sized() {
        let names: Vec<String> = (0..1000).map(|i| format!("o{i}")).collect();
        let a = sample(names.clone(), 5.0, 42);
        let b = sample(names.clone(), 5.0, 42);
        let c = sample(names.clone(), 5.0, 43);
        assert_eq!(a.len(), 50);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(sample(names.clone(), 0.01, 1).len(), 1);
        assert_eq!(sample(names, 100.0, 1).len(), 1000);
        assert!(sample(vec![], 5.0, 1).is_empty());
    }

    #[test]
    fn verified_ok_only_when_everything_matched() {
        let mut v = Verified::default();
        assert!(v.ok());
        v.unverifiable = 1;
        assert!(!v.ok());
    }
}
