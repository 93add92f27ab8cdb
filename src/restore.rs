//! Disaster recovery: `offsite restore` (issue 6). Decrypts `data/<bucket>` (or a kept
//! generation) into a local directory, a bucket on the source storage, or a remote of the
//! rendered config, then checks the target against the replica by download.
//!
//! The order matters, and each step says why:
//! 1. Arguments, policy and compliance, rclone, the private config. No lock: restore only reads
//!    the secondary and never writes under the crypt root.
//! 2. **Key canary**, read-only ([`guards::canary_status`]). With a wrong key crypt lists
//!    nothing and rclone 1.60 exits 0, so without it a restore would "succeed" with zero
//!    objects. Refused with exit 4 before the target is even looked at.
//! 3. **What the replica holds**: one listing of `data/` (or `deleted/<run-id>/`). On S3 a
//!    missing prefix lists as empty with exit 0, so a bucket's presence is read from its parent.
//! 4. **Targets**: each probed with one listing page (`lsf --max-depth 1`, stopped at the first
//!    line). Non-empty targets are refused together (exit 4) unless `--force`, before anything
//!    is written; missing ones are created (`rclone mkdir`).
//! 5. **Copy**, never sync: restore never deletes at the target. rclone's JSON log feeds the
//!    same counts and progress as sync.
//! 6. **Check by download** (`rclone check --download --one-way`): every replica object must be
//!    at the target with identical bytes; extra objects at the target (`--force`) are allowed.
//!
//! Every rclone run here carries `--no-unicode-normalization`. Without it rclone matches names
//! after NFC normalisation, so "café" written as U+00E9 and as "e"+U+0301 — two distinct S3
//! objects — are one name to it: `copy` logs `Duplicate object found in source - ignoring`
//! (NOTICE), restores one of the two and exits 0, and `check` reports no difference (observed
//! with 1.60.1 and 1.75.2).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::{Cli, Ctx, Done};
use crate::events::{self, BucketCounts, Level, Line};
use crate::exit::{fail, Code};
use crate::guards::{self, Decision};
use crate::policy::{Policy, Side};
use crate::progress::{BucketProgress, Progress};
use crate::rclone::{Files, FirstLine, Rclone};
use crate::render::PrivateConfig;
use crate::report::{self, Document};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
TARGET:
  /abs/dir, ./rel/dir   a local directory (relative to the current directory)
  source:               the policy's source storage, under the ORIGINAL bucket names
  source:NAME[/PATH]    bucket NAME on the source storage (e.g. a new, empty bucket)
  destination: and offsite: (the secondary) are refused.

With one --bucket, TARGET receives that bucket's objects. With several --bucket or --all,
each bucket goes to TARGET/<bucket> (for source: alone: bucket <bucket> on the source).

Restore copies and never deletes. A non-empty target is refused (exit 4) unless --force;
objects already there with the same size and time are skipped, so re-running an interrupted
restore with --force resumes it. Afterwards every replica object is checked at the target by
download (exit 6 on any difference). Uses the policy's sync.transfers, sync.checkers and
sync.bwlimit.")]
pub struct RestoreArgs {
    /// Bucket to restore (repeatable); any bucket of the replica, listed in the policy or not
    #[arg(long = "bucket", value_name = "B")]
    pub buckets: Vec<String>,
    /// Restore every bucket found in the replica (or in the kept generation)
    #[arg(long)]
    pub all: bool,
    /// Target: a local directory, `source:` / `source:<bucket>`, or a remote of `offsite render`'s config
    #[arg(long, value_name = "TARGET")]
    pub to: String,
    /// Show what would be copied; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Restore into a non-empty target (restore never deletes at the target)
    #[arg(long)]
    pub force: bool,
    /// Restore the generation kept by run RUN_ID (deleted/<RUN_ID>/<bucket>)
    #[arg(long, value_name = "RUN_ID")]
    pub from_deleted: Option<String>,
}

/// Remotes of the rendered config (render.rs). The two on the secondary are never targets:
/// restoring into the replica's own storage makes no sense and could overwrite it.
const SECONDARY_REMOTES: [&str; 2] = ["destination", "offsite"];
const TARGET_REMOTES: [&str; 1] = ["source"];

/// At most this many object names per bucket and kind in the report.
const MAX_NAMED: usize = 100;

/// Where the restored objects go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A local directory, absolute (rclone reads `name:x` as a remote, never `/name:x`).
    Dir(String),
    /// `<remote>:<path>` of the rendered config; `path` has no leading or trailing `/`, and is
    /// empty for "the original bucket names".
    Remote { remote: String, path: String },
}

impl Target {
    fn parse(raw: &str, cwd: &Path) -> anyhow::Result<Target> {
        let usage = |m: String| fail(Code::Invalid, format!("--to {raw}: {m}"));
        if raw.is_empty() || raw.chars().any(char::is_control) {
            return Err(usage("empty, or contains a control character".to_string()));
        }
        let remote = raw
            .split_once(':')
            .filter(|(name, _)| !name.is_empty() && !name.contains('/') && !raw.starts_with('.'));
        let Some((name, path)) = remote else {
            let abs = lexical_absolute(&cwd.join(raw));
            let text = abs.to_str().ok_or_else(|| {
                usage("the current directory is not UTF-8; give an absolute path".into())
            })?;
            return Ok(Target::Dir(text.to_string()));
        };
        if SECONDARY_REMOTES.contains(&name) {
            return Err(usage(format!(
                "`{name}:` is the secondary (the replica's own storage); restore reads from it and never writes into it. Restore into a directory or into `source:`"
            )));
        }
        if !TARGET_REMOTES.contains(&name) {
            return Err(usage(format!(
                "`{name}:` is not a remote of offsite's rendered config (restore targets: a directory, or `source:`); for a local directory whose name contains ':', write ./{raw}"
            )));
        }
        let path = path.trim_matches('/');
        if path.split('/').any(|s| s == "." || s == "..") || path.contains("//") {
            return Err(usage(
                "`.`, `..` and empty segments are not allowed in a remote path".into(),
            ));
        }
        Ok(Target::Remote {
            remote: name.to_string(),
            path: path.to_string(),
        })
    }

    /// The rclone path one bucket is restored to (the TARGET rule of `--help`).
    fn for_bucket(&self, bucket: &str, several: bool) -> String {
        match self {
            Target::Dir(d) if several => format!("{}/{bucket}", d.trim_end_matches('/')),
            Target::Dir(d) => d.clone(),
            Target::Remote { remote, path } if path.is_empty() => format!("{remote}:{bucket}"),
            Target::Remote { remote, path } if several => format!("{remote}:{path}/{bucket}"),
            Target::Remote { remote, path } => format!("{remote}:{path}"),
        }
    }
}

/// `cwd.join(raw)` with `.` and `..` removed, without touching the file system (the target may
/// not exist yet).
fn lexical_absolute(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A bucket name as it may appear in an rclone path: one segment.
fn check_bucket_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("empty, `.` or `..`".into());
    }
    if name.contains('/') || name.contains(':') || name.chars().any(char::is_control) {
        return Err("contains `/`, `:` or a control character".into());
    }
    Ok(())
}

/// Run ids are `20261203T051500Z-4f2a`; accept any plain token so a generation made by another
/// offsite version can still be named, but nothing that could leave `deleted/`.
fn check_run_id(id: &str) -> anyhow::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(fail(
            Code::Invalid,
            format!("--from-deleted {id}: not a run id (like 20261203T051500Z-4f2a); `offsite deleted list` shows the kept generations"),
        ))
    }
}

/// Does restoring into `to` write into the storage that holds the crypt root? Only possible
/// when source and destination are the same storage (same S3 endpoint, or local paths that
/// nest).
fn overlaps_secondary(policy: &Policy, to: &Target, buckets: &[String], several: bool) -> bool {
    let nested = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
    match (&policy.destination, to) {
        (Side::Local { path: dest }, Target::Dir(_)) => buckets
            .iter()
            .any(|b| nested(Path::new(&to.for_bucket(b, several)), dest)),
        (Side::Local { path: dest }, Target::Remote { remote, .. }) if remote == "source" => {
            match &policy.source {
                Side::Local { path: src } => buckets.iter().any(|b| {
                    let rel = to.for_bucket(b, several);
                    let rel = rel.split_once(':').map(|x| x.1).unwrap_or_default();
                    nested(&src.join(rel), dest)
                }),
                _ => false,
            }
        }
        (Side::S3(d), Target::Remote { remote, .. }) if remote == "source" => {
            let same_endpoint = matches!(&policy.source, Side::S3(s)
                if s.endpoint.0.trim_end_matches('/').eq_ignore_ascii_case(d.endpoint.0.trim_end_matches('/')));
            let dest_bucket = d.bucket.as_ref().map(|b| b.0.as_str()).unwrap_or_default();
            same_endpoint
                && buckets.iter().any(|b| {
                    let p = to.for_bucket(b, several);
                    let bucket = p
                        .split_once(':')
                        .map(|x| x.1)
                        .unwrap_or_default()
                        .split('/')
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    bucket == dest_bucket
                })
        }
        _ => false,
    }
}

/// The argv (after the program) of one bucket's copy. `global` is [`Rclone::global_args`].
fn copy_argv(
    policy: &Policy,
    global: Vec<OsString>,
    from: &str,
    to: &str,
    dry_run: bool,
) -> Vec<OsString> {
    let s = &policy.sync;
    let mut a = global;
    let mut push = |x: &str| a.push(OsString::from(x));
    push("copy");
    push(from);
    push(to);
    // As sync: the JSON log at INFO (one line per copied object, stats every second), never
    // DEBUG (rclone 1.60 prints the obscured secrets there).
    push("--use-json-log");
    push("-v");
    push("--stats");
    push("1s");
    push("--no-unicode-normalization");
    push("--transfers");
    push(&s.transfers.0.to_string());
    push("--checkers");
    push(&s.checkers.0.to_string());
    // The restore crosses the same link as the nightly sync; an admin who wants full speed
    // for a disaster recovery raises or removes sync.bwlimit.
    if let Some(bw) = &s.bwlimit {
        push("--bwlimit");
        push(&bw.0);
    }
    if dry_run {
        push("--dry-run");
    }
    a
}

/// The argv of one bucket's check by download, writing its `--combined` report to `combined`.
fn check_argv(
    policy: &Policy,
    global: Vec<OsString>,
    from: &str,
    to: &str,
    combined: &Path,
) -> Vec<OsString> {
    let s = &policy.sync;
    let mut a = global;
    for x in [
        "check",
        from,
        to,
        // Compare bytes: crypt shares no hash with any other remote.
        "--download",
        // Every replica object must be at the target; extra objects there (--force) are fine.
        "--one-way",
        "--no-unicode-normalization",
        "--checkers",
    ] {
        a.push(x.into());
    }
    a.push(s.checkers.0.to_string().into());
    if let Some(bw) = &s.bwlimit {
        a.push("--bwlimit".into());
        a.push(bw.0.clone().into());
    }
    a.push("--combined".into());
    a.push(combined.into());
    a
}

/// The `verify` object of a restored bucket (cli.md's shape; "destination" is the target).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
struct Verify {
    mode: &'static str,
    checked: u64,
    matched: u64,
    differ: u64,
    missing_on_destination: u64,
    missing_on_source: u64,
    unverifiable: u64,
    /// The first [`MAX_NAMED`] objects that did not match, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<Problem>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
struct Problem {
    object: String,
    result: &'static str,
}

impl Verify {
    fn failures(&self) -> u64 {
        self.differ + self.missing_on_destination + self.unverifiable
    }
}

/// Parse `rclone check --combined`: `= ` match, `* ` differ, `+ ` only in the replica (missing
/// at the target), `- ` only at the target, `! ` error. Unknown lines are errors: a report
/// offsite cannot read is not a pass.
fn parse_combined(text: &[u8]) -> Verify {
    let mut v = Verify {
        mode: "download",
        ..Default::default()
    };
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let (tag, name) = match line {
            [t, b' ', rest @ ..] => (*t, String::from_utf8_lossy(rest).into_owned()),
            _ => (b'!', String::from_utf8_lossy(line).into_owned()),
        };
        let result = match tag {
            b'=' => {
                v.matched += 1;
                v.checked += 1;
                continue;
            }
            b'*' => {
                v.differ += 1;
                "differ"
            }
            b'+' => {
                v.missing_on_destination += 1;
                "missing_on_target"
            }
            b'-' => {
                v.missing_on_source += 1;
                v.checked += 1;
                continue;
            }
            _ => {
                v.unverifiable += 1;
                "error"
            }
        };
        v.checked += 1;
        if v.problems.len() < MAX_NAMED {
            v.problems.push(Problem {
                object: name,
                result,
            });
        }
    }
    v
}

/// One bucket to restore.
struct Plan {
    bucket: String,
    from: String,
    to: String,
    state: TargetState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetState {
    Missing,
    Empty,
    NotEmpty,
}

/// One bucket's outcome, as in the JSON document's `buckets[]`.
#[derive(Clone, Debug, Serialize)]
struct Restored {
    name: String,
    source: String,
    target: String,
    status: &'static str,
    copied: u64,
    copied_bytes: u64,
    /// Always 0: restore never deletes. Kept for the shape every document shares (cli.md).
    deleted: u64,
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Objects rclone could not copy (`Failed to copy`), by name: the first [`MAX_NAMED`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    failed_objects: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    would_copy: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    would_copy_bytes: Option<u64>,
    /// None for `--dry-run`, and when the copy failed or was refused (nothing to check).
    verify: Option<Verify>,
    #[serde(skip)]
    code: Code,
}

impl Restored {
    fn new(p: &Plan) -> Restored {
        Restored {
            name: p.bucket.clone(),
            source: p.from.clone(),
            target: p.to.clone(),
            status: Code::Ok.status(),
            copied: 0,
            copied_bytes: 0,
            deleted: 0,
            errors: 0,
            error: None,
            failed_objects: vec![],
            would_copy: None,
            would_copy_bytes: None,
            verify: None,
            code: Code::Ok,
        }
    }

    fn set(&mut self, code: Code, error: Option<String>) {
        self.code = code;
        self.status = code.status();
        self.error = error;
    }
}

fn meta(rclone: &Rclone, config: &Path, rest: &[&str]) -> Vec<OsString> {
    let mut a = rclone.meta_args(config);
    a.extend(rest.iter().map(OsString::from));
    a
}

/// The buckets under `dir` (`offsite:data` or `offsite:deleted/<run-id>`), sorted. A missing
/// directory holds none.
fn replica_buckets(rclone: &Rclone, config: &Path, dir: &str) -> anyhow::Result<Vec<String>> {
    let out = rclone.output(
        &meta(
            rclone,
            config,
            &[
                "lsjson",
                "--dirs-only",
                "--no-modtime",
                "--no-mimetype",
                dir,
            ],
        ),
        None,
    )?;
    if out.status.code() == Some(3) {
        return Ok(vec![]);
    }
    if !out.status.success() {
        return Err(fail(
            Code::Failed,
            format!(
                "listing {dir} on the secondary failed: {}",
                crate::sync::last_line(&out.stderr)
            ),
        ));
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Name")]
        name: String,
    }
    let entries: Vec<Entry> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing rclone lsjson output for {dir}"))?;
    let mut names: Vec<String> = entries
        .into_iter()
        .map(|e| e.name)
        .filter(|n| check_bucket_name(n).is_ok())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Is there anything at `target`? One listing page at most.
fn probe_target(rclone: &Rclone, config: &Path, target: &str) -> anyhow::Result<TargetState> {
    match rclone.first_line(&meta(rclone, config, &["lsf", "--max-depth", "1", target]))? {
        FirstLine::Line => Ok(TargetState::NotEmpty),
        FirstLine::Empty => Ok(TargetState::Empty),
        FirstLine::Failed { code: Some(3), .. } => Ok(TargetState::Missing),
        FirstLine::Failed { stderr, .. } => Err(fail(
            Code::Failed,
            format!(
                "cannot list the restore target {target}: {}; check that the storage is reachable and the keys may list it",
                crate::sync::last_line(stderr.as_bytes())
            ),
        )),
    }
}

/// Everything one restore run shares.
struct Job<'a> {
    policy: &'a Policy,
    rclone: &'a Rclone,
    config: &'a PrivateConfig,
    dry_run: bool,
    verbose: u8,
    quiet: bool,
}

pub fn command(cli: &Cli, ctx: &Ctx, args: &RestoreArgs) -> anyhow::Result<Done> {
    let started = SystemTime::now();
    let run_id = report::run_id(started);

    // 1. Arguments first: a typo costs nothing.
    // Exactly one of the two: both given, or neither, is a usage error.
    let has_buckets = !args.buckets.is_empty();
    if args.all == has_buckets {
        return Err(fail(
            Code::Invalid,
            "restore needs either --bucket B (repeatable) or --all, not both",
        ));
    }
    for b in &args.buckets {
        check_bucket_name(b).map_err(|m| fail(Code::Invalid, format!("--bucket {b:?}: {m}")))?;
    }
    if let Some(id) = &args.from_deleted {
        check_run_id(id)?;
    }
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let target = Target::parse(&args.to, &cwd)?;
    let several = args.all || args.buckets.len() > 1;

    let (policy, findings) = crate::commands::load_compliant(cli, ctx)?;
    let rclone = Rclone::probe(cli.rclone.as_deref())?;
    let config = PrivateConfig::new(&policy)?;
    let cfg = config.path();
    let mut decisions: Vec<Decision> = Vec::new();
    let doc = |code: Code, changed: bool, buckets: Vec<Value>, decisions: &[Decision]| {
        Document {
            command: "restore",
            policy: &policy.name.0,
            run_id: &run_id,
            rclone: &rclone,
            started,
            finished: SystemTime::now(),
            code,
            changed,
            buckets,
            guards: guards::decisions_json(decisions),
            findings: &findings,
        }
        .to_json()
    };

    // 2. Key canary, read-only: a wrong key must never look like an empty replica.
    let (ok, detail) = guards::canary_status(&rclone, cfg, &policy)?;
    decisions.push(Decision {
        guard: "key_canary",
        bucket: None,
        result: if ok { "pass" } else { "refused" },
        detail: detail.clone(),
    });
    if !ok {
        let msg = format!(
            "key canary: {detail}. Nothing was restored and the target {} was not touched; use the original encryption.password and encryption.salt",
            args.to
        );
        eprintln!("offsite restore: {msg}");
        let mut d = doc(Code::GuardRefused, false, vec![], &decisions);
        d["error"] = json!(msg);
        return Ok(Done {
            doc: d,
            code: Code::GuardRefused,
        });
    }

    // 3. What the replica (or the kept generation) holds.
    let dir = match &args.from_deleted {
        Some(id) => format!("offsite:deleted/{id}"),
        None => "offsite:data".to_string(),
    };
    let present = replica_buckets(&rclone, cfg, &dir)?;
    if present.is_empty() {
        return Err(fail(
            Code::Failed,
            match &args.from_deleted {
                Some(id) => format!("no kept generation {id} under deleted/ (or it holds no bucket); `offsite deleted list` shows the kept generations"),
                None => format!("the replica holds no bucket: {dir} is empty or missing under the crypt root {}; check destination.bucket and destination.prefix", crate::render::crypt_root(&policy)),
            },
        ));
    }
    let buckets: Vec<String> = if args.all {
        for b in policy.listed_buckets() {
            if !present.contains(&b.name.0) && !ctx.quiet {
                eprintln!(
                    "offsite restore: warning: bucket {} is listed in the policy but {dir} holds no copy of it",
                    b.name
                );
            }
        }
        present.clone()
    } else {
        let missing: Vec<&String> = args
            .buckets
            .iter()
            .filter(|b| !present.contains(b))
            .collect();
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Err(fail(
                Code::Failed,
                format!(
                    "{dir} holds no bucket {}; it holds: {}. Nothing was restored",
                    names.join(", "),
                    present.join(", ")
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        args.buckets
            .iter()
            .filter(|b| seen.insert(*b))
            .cloned()
            .collect()
    };
    if overlaps_secondary(&policy, &target, &buckets, several) {
        return Err(fail(
            Code::Invalid,
            format!(
                "--to {}: that is where the replica itself lives (the crypt root {}); restore into another bucket or directory",
                args.to,
                crate::render::crypt_root(&policy)
            ),
        ));
    }

    // 4. Targets: all probed before anything is written, so a refusal leaves every one untouched.
    let mut plans = Vec::new();
    for b in &buckets {
        let to = target.for_bucket(b, several);
        let state = probe_target(&rclone, cfg, &to)?;
        plans.push(Plan {
            bucket: b.clone(),
            from: format!("{dir}/{b}"),
            to,
            state,
        });
    }
    let not_empty: Vec<&Plan> = plans
        .iter()
        .filter(|p| p.state == TargetState::NotEmpty)
        .collect();
    for p in &not_empty {
        decisions.push(Decision {
            guard: "restore_target_not_empty",
            bucket: Some(p.bucket.clone()),
            result: if args.force { "overridden" } else { "refused" },
            detail: if args.force {
                format!("{} is not empty; --force: restoring into it (nothing there is deleted; objects of the replica overwrite same-named ones that differ)", p.to)
            } else {
                format!("{} is not empty; nothing was written. Restore into an empty directory or a new bucket, or re-run with --force to copy into it (restore never deletes, but overwrites same-named objects that differ)", p.to)
            },
        });
    }
    if !not_empty.is_empty() && !args.force {
        let names: Vec<&str> = not_empty.iter().map(|p| p.to.as_str()).collect();
        let msg = format!(
            "restore target(s) not empty: {}. Nothing was written; use an empty target, or --force to copy into it (restore never deletes)",
            names.join(", ")
        );
        eprintln!("offsite restore: {msg}");
        let results: Vec<Value> = plans
            .iter()
            .map(|p| {
                let mut r = Restored::new(p);
                let why = if p.state == TargetState::NotEmpty {
                    format!("target {} is not empty", p.to)
                } else {
                    "not started: another target was refused".into()
                };
                r.set(Code::GuardRefused, Some(why));
                serde_json::to_value(&r).unwrap_or(Value::Null)
            })
            .collect();
        let mut d = doc(Code::GuardRefused, false, results, &decisions);
        d["error"] = json!(msg);
        return Ok(Done {
            doc: d,
            code: Code::GuardRefused,
        });
    }
    if !args.dry_run {
        for p in plans.iter().filter(|p| p.state == TargetState::Missing) {
            create_target(&rclone, cfg, &p.to)?;
        }
    }

    // 5 and 6, per bucket, `sync.parallel_buckets` at a time.
    let job = Job {
        policy: &policy,
        rclone: &rclone,
        config: &config,
        dry_run: args.dry_run,
        verbose: ctx.verbose,
        quiet: ctx.quiet,
    };
    let progress = Progress::new(ctx.no_progress || ctx.quiet);
    let results = restore_all(&job, &plans, &progress);
    crate::signals::check()?;
    drop(config);

    let code = report::overall(results.iter().map(|r| r.code));
    let changed = !args.dry_run && results.iter().any(|r| r.copied > 0);
    if !ctx.json && !ctx.quiet {
        print!("{}", table(&results));
        for line in report::decision_lines(&decisions) {
            println!("{line}");
        }
        println!(
            "{}: {} bucket(s) restored, changed: {changed}{}",
            code.status(),
            results.len(),
            if args.dry_run {
                " (dry run: nothing was written)"
            } else {
                ""
            }
        );
    }
    for r in results.iter().filter(|r| r.code != Code::Ok) {
        eprintln!(
            "offsite restore: bucket {} -> {}: {}",
            r.name,
            r.target,
            r.error.as_deref().unwrap_or(r.status)
        );
    }
    let buckets: Vec<Value> = results
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        .collect();
    let mut d = doc(code, changed, buckets, &decisions);
    d["dry_run"] = json!(args.dry_run);
    if let Some(id) = &args.from_deleted {
        d["from_deleted"] = json!(id);
    }
    Ok(Done { doc: d, code })
}

/// `rclone mkdir` a missing target: creates the bucket on S3 (when the key may), the directory
/// locally.
fn create_target(rclone: &Rclone, config: &Path, to: &str) -> anyhow::Result<()> {
    let out = rclone.output(&meta(rclone, config, &["mkdir", to]), None)?;
    if !out.status.success() {
        let bucket = to.split_once(':').map(|x| x.1).unwrap_or(to);
        let bucket = bucket.split('/').next().unwrap_or(bucket);
        return Err(fail(
            Code::Failed,
            format!(
                "the restore target {to} does not exist and could not be created: {}. Create bucket {bucket} on that storage (or give the key permission to create buckets) and re-run. Nothing was restored",
                crate::sync::last_line(&out.stderr)
            ),
        ));
    }
    Ok(())
}

fn restore_all(job: &Job, plans: &[Plan], progress: &Progress) -> Vec<Restored> {
    let workers = (job.policy.sync.parallel_buckets.0 as usize).clamp(1, plans.len().max(1));
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<Restored>>> = Mutex::new(vec![None; plans.len()]);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                // After SIGTERM/SIGINT start nothing new; the caller exits 143/130.
                if crate::signals::pending().is_some() {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(plan) = plans.get(i) else { break };
                let bar = progress.bucket(&plan.bucket);
                let r = restore_one(job, plan, &bar);
                bar.finish();
                if let Ok(mut s) = slots.lock() {
                    s[i] = Some(r);
                }
            });
        }
    });
    slots
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .zip(plans)
        .map(|(r, p)| {
            r.unwrap_or_else(|| {
                let mut r = Restored::new(p);
                r.set(Code::Internal, Some("bucket was not processed".into()));
                r
            })
        })
        .collect()
}

fn restore_one(job: &Job, plan: &Plan, bar: &BucketProgress) -> Restored {
    let mut result = Restored::new(plan);
    let cfg = job.config.path();
    if !job.quiet && !job.dry_run {
        eprintln!("offsite restore: {} -> {}", plan.from, plan.to);
    }
    let args = copy_argv(
        job.policy,
        job.rclone.global_args(cfg),
        &plan.from,
        &plan.to,
        job.dry_run,
    );
    let mut counts = BucketCounts::default();
    let mut failed: Vec<String> = Vec::new();
    // The restored files are the admin's: the usual umask, not offsite's private one.
    let streamed = job.rclone.stream_with(&args, Files::UserUmask, |raw| {
        let line = events::parse_line(raw);
        counts.observe(&line);
        if let Line::Json(ev) = &line {
            if ev.stats.is_some() {
                bar.update(&counts.progress());
            } else if ev.level == Level::Error && ev.msg.starts_with("Failed to copy") {
                // Retries repeat the same failures: name each object once.
                if let Some(o) = &ev.object {
                    if failed.len() < MAX_NAMED && !failed.contains(o) {
                        failed.push(o.clone());
                    }
                }
            }
        }
        relay(job, &plan.bucket, &line);
    });
    let (code, reason) = match streamed {
        Ok(Some(rc)) => {
            let (code, reason) = events::map_exit(rc, job.rclone.version.minor, &counts);
            (code, format!("{reason} (rclone exit {rc})"))
        }
        Ok(None) => (Code::Failed, "rclone was killed by a signal".to_string()),
        Err(e) => (crate::exit::code_of(&e), format!("{e:#}")),
    };
    if code == Code::Ok && !counts.sizes_complete && counts.copied > 0 && !job.dry_run {
        // rclone < 1.63 logs copies without their size: ask the replica for the sizes of just
        // the copied objects, so copied_bytes is plaintext bytes on every version.
        if let Ok(bytes) = replica_sizes(job, &plan.from, &counts.changed_objects) {
            counts.copied_bytes = bytes;
        }
    }
    result.copied = counts.copied;
    result.copied_bytes = counts.copied_bytes;
    result.errors = counts.errors;
    result.failed_objects = failed;
    if job.dry_run {
        result.would_copy = Some(counts.dry_run_copies);
        result.would_copy_bytes = Some(counts.dry_run_bytes);
    }
    if code != Code::Ok {
        let detail = counts
            .last_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let named = if result.failed_objects.is_empty() {
            String::new()
        } else {
            format!(
                "; not restored: {}",
                result
                    .failed_objects
                    .iter()
                    .map(|o| format!("{o:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        result.set(code, Some(format!("{reason}{detail}{named}")));
        return result;
    }
    if job.dry_run {
        return result;
    }
    match verify(job, plan) {
        Ok(v) => {
            if v.failures() > 0 {
                let named: Vec<String> = v
                    .problems
                    .iter()
                    .take(10)
                    .map(|p| format!("{:?} ({})", p.object, p.result))
                    .collect();
                result.set(
                    Code::VerifyFailed,
                    Some(format!(
                        "check by download: {} differ, {} missing at the target, {} could not be checked: {}",
                        v.differ,
                        v.missing_on_destination,
                        v.unverifiable,
                        named.join(", ")
                    )),
                );
            }
            result.verify = Some(v);
        }
        Err(e) => result.set(crate::exit::code_of(&e), Some(format!("{e:#}"))),
    }
    result
}

/// `rclone check --download --one-way` of the replica against the target.
fn verify(job: &Job, plan: &Plan) -> anyhow::Result<Verify> {
    let cfg = job.config.path();
    // Unique per bucket within the private scratch directory (removed with the config).
    static N: AtomicUsize = AtomicUsize::new(0);
    let combined = job.config.scratch().join(format!(
        "restore-check-{}.txt",
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let out = job.rclone.output(
        &check_argv(
            job.policy,
            job.rclone.global_args(cfg),
            &plan.from,
            &plan.to,
            &combined,
        ),
        None,
    )?;
    let text = std::fs::read(&combined).unwrap_or_default();
    let _ = std::fs::remove_file(&combined);
    let mut v = parse_combined(&text);
    // Exit 1 is "differences found" (then the report says which). Anything else means the
    // check itself did not run through: whatever it did not report is not verified.
    let rc = out.status.code();
    if rc != Some(0) && (rc != Some(1) || v.failures() == 0) {
        v.unverifiable += 1;
        if v.problems.len() < MAX_NAMED {
            v.problems.push(Problem {
                object: format!(
                    "(the check failed: {})",
                    crate::sync::last_line(&out.stderr)
                ),
                result: "error",
            });
        }
    }
    Ok(v)
}

/// Sum of the replica sizes of `objects` under `from` (rclone < 1.63 fallback).
fn replica_sizes(job: &Job, from: &str, objects: &[String]) -> anyhow::Result<u64> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let list = job
        .config
        .scratch()
        .join(format!("restored-{}.txt", N.fetch_add(1, Ordering::SeqCst)));
    job.rclone.sum_sizes(
        job.config.path(),
        from,
        objects,
        Some(&list),
        &["--no-unicode-normalization"],
    )
}

fn relay(job: &Job, bucket: &str, line: &Line) {
    crate::sync::relay_line("offsite restore", job.quiet, job.verbose, bucket, line);
}

/// The summary table of a restore in text mode.
fn table(results: &[Restored]) -> String {
    let w = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:<w$}  {:<13}  {:>7}  {:>10}  {:>17}  target\n",
        "bucket", "status", "copied", "bytes", "verified/checked"
    );
    for r in results {
        let verified = match (&r.verify, r.would_copy) {
            (Some(v), _) => format!("{}/{}", v.matched, v.checked),
            (None, Some(n)) => format!("would copy {n}"),
            (None, None) => "-".into(),
        };
        out += &format!(
            "{:<w$}  {:<13}  {:>7}  {:>10}  {:>17}  {}\n",
            r.name,
            r.status,
            r.copied,
            report::human_bytes(r.copied_bytes),
            verified,
            r.target
        );
        if let Some(e) = &r.error {
            out += &format!("{:<w$}  error: {e}\n", "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(raw: &str) -> anyhow::Result<Target> {
        Target::parse(raw, Path::new("/work/cwd"))
    }

    fn dir(s: &str) -> Target {
        Target::Dir(s.into())
    }

    fn remote(path: &str) -> Target {
        Target::Remote {
            remote: "source".into(),
            path: path.into(),
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!(t("/srv/restore").unwrap(), dir("/srv/restore"));
        assert_eq!(t("/srv/restore/").unwrap(), dir("/srv/restore"));
        assert_eq!(t("restore").unwrap(), dir("/work/cwd/restore"));
        assert_eq!(t("./a/../b").unwrap(), dir("/work/cwd/b"));
        assert_eq!(t("../up").unwrap(), dir("/work/up"));
        // A ':' after a '/' or in a ./-path is a local name, never a remote.
        assert_eq!(t("./x:y").unwrap(), dir("/work/cwd/x:y"));
        assert_eq!(t("a/b:c").unwrap(), dir("/work/cwd/a/b:c"));
        assert_eq!(t("/abs/x:y").unwrap(), dir("/abs/x:y"));
        assert_eq!(t("source:").unwrap(), remote(""));
        assert_eq!(t("source:new-bucket").unwrap(), remote("new-bucket"));
        assert_eq!(t("source:/b/sub/").unwrap(), remote("b/sub"));
    }

    #[test]
    fn secondary_and_unknown_remotes_are_refused() {
        for raw in [
            "destination:x",
            "offsite:data/b",
            "offsite:",
            "s3:bucket",
            "C:x",
        ] {
            let e = t(raw).unwrap_err();
            assert_eq!(crate::exit::code_of(&e), Code::Invalid, "{raw}");
        }
        assert!(format!("{:#}", t("offsite:x").unwrap_err()).contains("secondary"));
        assert!(format!("{:#}", t("backup:2024").unwrap_err()).contains("./backup:2024"));
        for raw in ["", "source:a/../b", "source:a//b", "x\ny"] {
            assert!(t(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn one_bucket_fills_the_target_several_get_a_subfolder() {
        let d = dir("/r");
        assert_eq!(d.for_bucket("harbor", false), "/r");
        assert_eq!(d.for_bucket("harbor", true), "/r/harbor");
        assert_eq!(remote("").for_bucket("harbor", false), "source:harbor");
        assert_eq!(remote("").for_bucket("harbor", true), "source:harbor");
        assert_eq!(remote("new").for_bucket("harbor", false), "source:new");
        assert_eq!(
            remote("new").for_bucket("harbor", true),
            "source:new/harbor"
        );
    }

    #[test]
    fn combined_report_is_counted() {
        let v = parse_combined(
            "= a.txt\n= dir/b c.txt\n* changed.bin\n+ gone.txt\n- extra.txt\n! broken\nnonsense\n"
                .as_bytes(),
        );
        assert_eq!(
            (v.checked, v.matched, v.differ, v.missing_on_destination),
            (7, 2, 1, 1)
        );
        assert_eq!((v.missing_on_source, v.unverifiable), (1, 2));
        assert_eq!(v.failures(), 4);
        assert_eq!(v.problems[0].object, "changed.bin");
        assert_eq!(v.problems[1].result, "missing_on_target");
        assert_eq!(parse_combined(b"").failures(), 0);
        // Names keep their exact bytes (NFD stays NFD).
        let nfd = parse_combined("= cafe\u{301}.txt\n* cafe\u{301}\n".as_bytes());
        assert_eq!(nfd.problems[0].object, "cafe\u{301}");
    }

    fn policy(extra: &str) -> Policy {
        let y = format!(
            "version: 1\nname: t\nsource:\n  type: s3\n  endpoint: https://a.example\n  region: sto1\n  access_key_id: AKIA1\n  secret_access_key: sk1\ndestination:\n  type: s3\n  endpoint: https://b.example\n  region: fra1\n  bucket: rep\n  access_key_id: AKIA2\n  secret_access_key: sk2\nencryption:\n  password: {{env: PATH}}\n  salt: {{env: HOME}}\nbuckets: [one]\n{extra}"
        );
        crate::policy::parse("t.yaml", y.as_bytes(), Path::new("/")).unwrap()
    }

    fn strings(a: &[OsString]) -> Vec<String> {
        a.iter().map(|x| x.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn copy_and_check_never_sync_and_keep_nfc_nfd_apart() {
        let p = policy("sync:\n  transfers: 3\n  bwlimit: \"10M\"\n");
        let a = strings(&copy_argv(&p, vec![], "offsite:data/b", "/r", true));
        assert_eq!(&a[..3], ["copy", "offsite:data/b", "/r"]);
        for want in ["--no-unicode-normalization", "--dry-run", "--use-json-log"] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        assert!(a.windows(2).any(|w| w == ["--transfers", "3"]));
        assert!(a.windows(2).any(|w| w == ["--bwlimit", "10M"]));
        assert!(!a.iter().any(|x| x == "sync" || x.starts_with("--delete")));
        let c = strings(&check_argv(
            &p,
            vec![],
            "offsite:data/b",
            "/r",
            Path::new("/t/c"),
        ));
        assert_eq!(&c[..3], ["check", "offsite:data/b", "/r"]);
        for want in ["--download", "--one-way", "--no-unicode-normalization"] {
            assert!(c.iter().any(|x| x == want), "{want} in {c:?}");
        }
        assert!(c.windows(2).any(|w| w == ["--combined", "/t/c"]));
    }

    #[test]
    fn the_replica_storage_is_never_a_target() {
        let p = policy("");
        let b = vec!["one".to_string()];
        // Different endpoints: any bucket name is fine, even the destination's.
        assert!(!overlaps_secondary(&p, &remote("rep"), &b, false));
        let same = policy("").destination.clone();
        let mut p2 = p.clone();
        p2.source = same;
        assert!(overlaps_secondary(&p2, &remote("rep"), &b, false));
        assert!(overlaps_secondary(&p2, &remote("rep/sub"), &b, false));
        assert!(!overlaps_secondary(&p2, &remote("other"), &b, false));
        let mut p3 = p.clone();
        p3.destination = Side::Local {
            path: "/srv/secondary".into(),
        };
        assert!(overlaps_secondary(&p3, &dir("/srv/secondary/x"), &b, false));
        assert!(overlaps_secondary(&p3, &dir("/srv"), &b, false));
        assert!(!overlaps_secondary(&p3, &dir("/srv"), &b, true));
        assert!(!overlaps_secondary(&p3, &dir("/srv/secondary2"), &b, false));
    }

    #[test]
    fn run_ids_and_bucket_names_are_checked() {
        assert!(check_run_id("20261203T051500Z-4f2a").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "x y"] {
            assert!(check_run_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_bucket_name("harbor").is_ok());
        for bad in ["", ".", "..", "a/b", "a:b", "a\nb"] {
            assert!(check_bucket_name(bad).is_err(), "{bad:?}");
        }
    }
}
