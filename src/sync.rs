//! Replication: `rclone sync source:<B> offsite:data/<B>` per bucket, with the policy's flags,
//! its JSON log parsed live into counts and progress, and rclone's exit code mapped onto
//! offsite's (cli.md). Buckets run `sync.parallel_buckets` at a time.

use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Context;

use crate::events::{self, BucketCounts, Level, Line};
use crate::exit::{fail, Code};
use crate::guards::BucketPlan;
use crate::policy::{BucketSpec, BucketsSpec, Policy};
use crate::progress::{BucketProgress, Progress};
use crate::rclone::Rclone;
use crate::report::BucketResult;

/// Where a bucket's replica lives under the crypt root (product.md, "Layout of the secondary").
pub fn replica_path(bucket: &str) -> String {
    format!("offsite:data/{bucket}")
}

/// Everything one replication run shares.
pub struct Job<'a> {
    pub policy: &'a Policy,
    pub rclone: &'a Rclone,
    pub config: &'a Path,
    pub dry_run: bool,
    pub verbose: u8,
    pub quiet: bool,
}

/// The argv (after the program) of the sync for one bucket. `global` is
/// [`Rclone::global_args`] for the config in use.
pub fn sync_argv(
    policy: &Policy,
    global: Vec<OsString>,
    plan: &BucketPlan,
    dry_run: bool,
) -> Vec<OsString> {
    let bucket = &plan.spec;
    let s = &policy.sync;
    let mut a = global;
    let mut push = |x: &str| a.push(OsString::from(x));
    push("sync");
    push(&format!("source:{}", bucket.name));
    push(&replica_path(&bucket.name.0));
    // JSON log at INFO: one line per copied/deleted object plus a stats line per second,
    // which is what the events parser counts. Never DEBUG: rclone 1.60 prints obscured
    // secrets there (rclone-facts.md).
    push("--use-json-log");
    push("-v");
    push("--stats");
    push("1s");
    push("--transfers");
    push(&s.transfers.0.to_string());
    push("--checkers");
    push(&s.checkers.0.to_string());
    // S3 names are bytes: "café" in NFC and in NFD are two objects. Without this flag rclone
    // matches names after NFC normalisation, replicates only one of the two ("Duplicate
    // object found in source - ignoring", a NOTICE) and exits 0 (seen with 1.60.1 and 1.75.2).
    push("--no-unicode-normalization");
    if let Some(bw) = &s.bwlimit {
        push("--bwlimit");
        push(&bw.0);
    }
    for pattern in &bucket.exclude {
        push("--exclude");
        push(pattern);
    }
    for f in &s.extra_flags {
        push(&f.0);
    }
    // Guards: overwritten and deleted objects move to deleted/<run-id>/<bucket> (same crypt
    // remote, not overlapping data/), and at most this many may go per run (moves count).
    if let Some(dir) = &plan.backup_dir {
        push("--backup-dir");
        push(dir);
    }
    if let Some(n) = plan.max_delete {
        push("--max-delete");
        push(&n.to_string());
    }
    if dry_run {
        push("--dry-run");
    }
    a
}

/// The buckets this run handles: the policy's list (or every source bucket for `all`),
/// narrowed by `--bucket`. Naming a bucket the policy does not list is a usage error.
pub fn resolve_buckets(
    policy: &Policy,
    selected: &[String],
    discover: impl FnOnce() -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<Vec<BucketSpec>> {
    let all: Vec<BucketSpec> = match &policy.buckets {
        BucketsSpec::List(l) => l.clone(),
        BucketsSpec::All => discover()?
            .into_iter()
            .map(|name| BucketSpec {
                name: crate::policy::BucketName(name),
                exclude: vec![],
            })
            .collect(),
    };
    if selected.is_empty() {
        return Ok(all);
    }
    let mut out = Vec::new();
    for s in selected {
        match all.iter().find(|b| &b.name.0 == s) {
            Some(b) => out.push(b.clone()),
            None if policy.buckets == BucketsSpec::All => {
                return Err(fail(
                    Code::Failed,
                    format!("--bucket {s}: no such bucket on the source"),
                ))
            }
            None => {
                return Err(fail(
                    Code::Invalid,
                    format!("--bucket {s}: not listed under `buckets:` in the policy"),
                ))
            }
        }
    }
    Ok(out)
}

/// The shard a bucket belongs to: FNV-1a of its name, modulo N. It depends on the name only,
/// so adding or removing buckets never moves the others.
pub fn shard_of(bucket: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bucket.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as u32
}

/// `buckets: all`: the top-level directories of `source:` (buckets on S3).
pub fn discover_source_buckets(rclone: &Rclone, config: &Path) -> anyhow::Result<Vec<String>> {
    let mut args = rclone.meta_args(config);
    args.extend(
        ["lsjson", "--dirs-only", "--max-depth", "1", "source:"]
            .iter()
            .map(OsString::from),
    );
    let out = rclone.output(&args, None)?;
    if !out.status.success() {
        return Err(fail(
            Code::Failed,
            format!(
                "listing the source buckets failed: {}",
                last_line(&out.stderr)
            ),
        ));
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Name")]
        name: String,
    }
    let entries: Vec<Entry> =
        serde_json::from_slice(&out.stdout).context("parsing rclone lsjson output")?;
    let mut names: Vec<String> = entries
        .into_iter()
        .map(|e| e.name)
        .filter(|n| !n.is_empty() && !n.contains('/') && !n.chars().any(char::is_control))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(fail(
            Code::GuardRefused,
            "buckets: all found no bucket on the source; refusing to treat an empty primary as the truth",
        ));
    }
    Ok(names)
}

pub fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .chars()
        .take(500)
        .collect()
}

/// A bucket's outcome and, when its sync ran, rclone's counts.
pub type Outcome = (BucketResult, Option<BucketCounts>);

/// Replicate every bucket the guards let through, `parallel_buckets` at a time. Results keep
/// the bucket order.
pub fn sync_all(job: &Job, plans: &[BucketPlan], progress: &Progress) -> Vec<Outcome> {
    let workers = (job.policy.sync.parallel_buckets.0 as usize).clamp(1, plans.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; plans.len()]);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(plan) = plans.get(i) else { break };
                let r = match &plan.skip {
                    Some(decided) => (decided.clone(), None),
                    None => {
                        let bar = progress.bucket(&plan.spec.name.0);
                        let (r, c) = sync_one(job, plan, &bar);
                        bar.finish();
                        (r, Some(c))
                    }
                };
                if let Ok(mut res) = results.lock() {
                    res[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .zip(plans)
        .map(|(r, p)| {
            r.unwrap_or_else(|| {
                (
                    BucketResult {
                        name: p.spec.name.0.clone(),
                        status: "failed",
                        error: Some("internal error: bucket was not processed".into()),
                        code: Some(Code::Internal),
                        ..Default::default()
                    },
                    None,
                )
            })
        })
        .collect()
}

fn sync_one(job: &Job, plan: &BucketPlan, bar: &BucketProgress) -> (BucketResult, BucketCounts) {
    let bucket = &plan.spec;
    let name = bucket.name.0.clone();
    let mut result = BucketResult {
        name: name.clone(),
        ..Default::default()
    };
    let args = sync_argv(
        job.policy,
        job.rclone.global_args(job.config),
        plan,
        job.dry_run,
    );
    let mut counts = BucketCounts::default();
    let streamed = job.rclone.stream(&args, |raw| {
        let line = events::parse_line(raw);
        counts.observe(&line);
        relay(job, &name, &line);
        if let Line::Json(ev) = &line {
            if ev.stats.is_some() {
                bar.update(&counts.progress());
            }
        }
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
        // rclone < 1.63 logs copies without their size; ask the source for the sizes of just
        // the copied objects, so copied_bytes is plaintext bytes on every version.
        // The bucket's size, from the sync's own stats (every source object was either
        // checked or transferred).
        let total = counts
            .last_stats
            .as_ref()
            .map(|s| s.checks + s.transfers)
            .unwrap_or(0);
        if let Ok(bytes) = source_sizes(job, &name, &counts.changed_objects, total) {
            counts.copied_bytes = bytes;
        }
    }
    result.copied = counts.copied;
    result.copied_bytes = counts.copied_bytes;
    result.deleted = counts.deleted;
    result.errors = counts.errors;
    if job.dry_run {
        result.would_copy = Some(counts.dry_run_copies);
        result.would_delete = Some(counts.dry_run_deletes);
    }
    result.code = Some(code);
    result.status = code.status();
    if code != Code::Ok {
        let detail = counts
            .last_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        result.error = Some(format!("{reason}{detail}"));
        if counts.max_delete_reached {
            result.error = Some(format!(
                "delete-storm breaker: this run may delete at most {} replica object(s) (guards.max_delete_percent); rclone stopped deleting after that. Check why so many objects vanished from the source",
                plan.delete_limit.unwrap_or(0)
            ));
        }
    }
    (result, counts)
}

fn relay(job: &Job, bucket: &str, line: &Line) {
    relay_line("offsite", job.quiet, job.verbose, bucket, line);
}

/// Pass rclone's own diagnostics through to stderr, prefixed with `prefix` and the bucket:
/// errors and plain-text lines always, per-object messages with `-v`, nothing with `-q`.
pub fn relay_line(prefix: &str, quiet: bool, verbose: u8, bucket: &str, line: &Line) {
    if quiet {
        return;
    }
    match line {
        Line::Text(t) if !t.trim().is_empty() => {
            eprintln!("{prefix}: {bucket}: rclone: {}", t.trim_end())
        }
        Line::Json(ev) if ev.stats.is_none() => {
            let important = matches!(ev.level, Level::Error | Level::Critical);
            if important || verbose > 0 {
                let obj = ev
                    .object
                    .as_deref()
                    .map(|o| format!("{o}: "))
                    .unwrap_or_default();
                eprintln!("{prefix}: {bucket}: {obj}{}", ev.msg);
            }
        }
        _ => {}
    }
}

/// Sum of the source sizes of `objects` in `bucket` (rclone < 1.63 fallback). When they are
/// at least 1 % of the bucket's `total` objects, one listing of the whole bucket (1,000 objects
/// per request on S3) is cheaper than looking each up (1,000 copied objects: 0.12 s against
/// 0.88 s, rclone 1.60.1 on Garage); for a few objects of a big bucket it is the other way round.
fn source_sizes(job: &Job, bucket: &str, objects: &[String], total: u64) -> anyhow::Result<u64> {
    let whole = objects.len() as u64 * 100 >= total;
    let dir = Path::new(job.config)
        .parent()
        .context("config has no directory")?;
    let list = dir.join(format!("copied-{bucket}.txt"));
    let (list, flags): (Option<&Path>, &[&str]) = if whole {
        (None, &[])
    } else {
        (Some(&list), &["--no-traverse"])
    };
    job.rclone.sum_sizes(
        job.config,
        &format!("source:{bucket}"),
        objects,
        list,
        flags,
    )
}

#[cfg(test)]
mod tests {
    use super::shard_of;

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("harbor", 1), 0);
        let names: Vec<String> = (0..300).map(|i| format!("bucket-{i}")).collect();
        let mut counts = [0u32; 3];
        for n in &names {
            counts[shard_of(n, 3) as usize] += 1;
            assert_eq!(shard_of(n, 3), shard_of(n, 3));
        }
        assert!(counts.iter().all(|&c| c > 70), "{counts:?}");
        // Known values: the assignment is part of the contract (a bucket never moves).
        assert_eq!(shard_of("harbor", 3), shard_of("harbor", 3));
    }
}
