//! The safety guards (policy.md `guards`, product.md "Layout of the secondary"): what stands
//! between a bare `rclone sync` and the loss of the only off-site copy.
//!
//! - **Key canary** `.offsite/canary`: read back through crypt before any write. rclone 1.60
//!   gives no error for a wrong key (it lists nothing and re-uploads everything), so a root that
//!   is non-empty at the raw level but whose canary does not decrypt is refused (exit 4) before
//!   a single object is written — the lease and the canary are written only after it passed.
//! - **Empty-source breaker**: a source bucket that lists nothing while its replica holds
//!   objects is refused (exit 4) unless `--allow-empty-source`.
//! - **Delete-storm breaker**: at most `max_delete_percent` of the replica's objects per bucket
//!   and run, passed to rclone as `--max-delete` (moves into the backup dir count too). The
//!   replica count comes from `.offsite/state.json`, so it costs no listing when state exists.
//! - **Kept deletions**: `--backup-dir offsite:deleted/<run-id>/<bucket>`; [`prune`] removes
//!   generations older than `keep_deleted_days`.
//! - **Run lock**: a local `flock` (one host) plus lease objects in `.offsite/leases/` with a
//!   TTL (hosts sharing the secondary). See docs/guards.md for the semantics and the provider
//!   assumptions.
//!
//! Round trips are what a no-change run pays for the guards, so they are batched: one
//! `rclone copy` fetches canary, state and lease; the per-bucket source probes run in parallel
//! with it; one `rclone copy` at the end writes the state and releases the lease.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::exit::{fail, Code};
use crate::policy::{BucketSpec, Policy};
use crate::rclone::{FirstLine, Rclone};
use crate::render::{crypt_root, PrivateConfig};
use crate::report::{rfc3339, unix, BucketResult};

/// The canary's plaintext. Authenticated encryption means a wrong password, salt or name
/// encoding cannot produce it: the object is either not found (names encrypt differently) or
/// fails to decrypt.
pub const CANARY: &[u8] =
    b"offsite key canary v1\nThis object proves the crypt key of this root. Do not delete it.\n";

/// Default lease lifetime. A crashed run blocks others at most this long; a live run renews its
/// lease every third of it. `OFFSITE_LOCK_TTL_SECONDS` overrides it (tests, operations).
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(15 * 60);

/// At most this many changed-object paths are kept per bucket in state.json; beyond it
/// `changed_truncated` is set and verify's `changed` mode checks the whole bucket instead.
const MAX_CHANGED: usize = 100_000;

pub fn lock_ttl() -> Duration {
    std::env::var("OFFSITE_LOCK_TTL_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LOCK_TTL)
}

/// One guard decision, as in the JSON document's `guards[]`.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub guard: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    pub result: &'static str,
    pub detail: String,
}

impl Decision {
    fn new(
        guard: &'static str,
        bucket: Option<&str>,
        result: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Decision {
            guard,
            bucket: bucket.map(String::from),
            result,
            detail: detail.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State and lease documents (stored encrypted under .offsite/)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub policy: String,
    pub run_id: String,
    pub updated: String,
    #[serde(default)]
    pub buckets: BTreeMap<String, BucketState>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BucketState {
    /// Objects in the replica after the last sync (`data/<bucket>`).
    pub replica_objects: u64,
    pub last_run_id: String,
    pub last_sync: String,
    /// Objects the last sync copied (verify's `changed` mode).
    #[serde(default)]
    pub changed_objects: Vec<String>,
    #[serde(default)]
    pub changed_truncated: bool,
    #[serde(default)]
    pub deleted_objects: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub run_id: String,
    pub since: String,
    pub since_unix: u64,
    pub expires_unix: u64,
    #[serde(default)]
    pub released: bool,
    /// Set once the run has won the lock (see [`Guarded::take_lease`]); before that the lease
    /// is a candidate that may still back off.
    #[serde(default)]
    pub held: bool,
    /// Where the owner's pid means something: the kernel's boot id and the owner's pid
    /// namespace. With the host name they tell a later run on the same machine that the owner
    /// is gone (see [`dead_local_owner`]). Absent in leases of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<String>,
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn pid_ns() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The pid of a lease's owner when that owner ran on this machine (same host name, same boot,
/// same pid namespace) and is no longer running. Such a lease is stale for certain: its run
/// died without releasing it (SIGKILL, OOM kill, or the secondary was unreachable when it
/// tried). Anything less certain (another host, an older lease without these fields, a pid
/// that exists or that we may not signal) is None, and the lease is honoured until its TTL.
fn dead_local_owner(l: &Lease) -> Option<u32> {
    let (h, pid) = l.owner.rsplit_once(':')?;
    let pid: i32 = pid.parse().ok().filter(|&p| p > 0)?;
    let here = h == host() && l.boot_id.is_some() && l.boot_id == boot_id();
    if !here || l.pid_ns.is_none() || l.pid_ns != pid_ns() {
        return None;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Err(nix::errno::Errno::ESRCH) => Some(pid as u32),
        _ => None,
    }
}

/// One object under `.offsite/leases*/`, as a run finds it.
struct SeenLease {
    name: String,
    lease: Option<Lease>,
    /// The object's modification time (the writer's clock), for an object that does not parse.
    mtime: Option<SystemTime>,
}

/// What a lease object means to the run looking at it.
enum Kind {
    Own,
    /// Released, expired, or its owner certainly died (the detail says so: taken over).
    Stale(Option<String>),
    /// Released by its run: it held the lock and has ended.
    Released,
    /// Another run won the lock and holds it.
    Held(Lease),
    /// Another run is taking the lock right now (or an unreadable object younger than the TTL).
    Candidate,
}

fn classify(s: &SeenLease, own: &str, ttl: Duration) -> Kind {
    if s.name == own {
        return Kind::Own;
    }
    let now = unix(SystemTime::now());
    let Some(l) = &s.lease else {
        let young = s.mtime.is_some_and(|m| unix(m) + ttl.as_secs() > now);
        return if young {
            Kind::Candidate
        } else {
            Kind::Stale(None)
        };
    };
    if l.released {
        return Kind::Released;
    }
    if l.expires_unix <= now {
        return Kind::Stale(None);
    }
    if let Some(pid) = dead_local_owner(l) {
        return Kind::Stale(Some(format!(
            "the lease of run {} ({}, valid {} more s) belonged to pid {pid} on this machine, which no longer runs: taken over",
            l.run_id,
            l.owner,
            l.expires_unix - now
        )));
    }
    if l.held {
        Kind::Held(l.clone())
    } else {
        Kind::Candidate
    }
}

fn held_error(policy: &Policy, l: &Lease) -> anyhow::Error {
    let now = unix(SystemTime::now());
    fail(Code::Locked, format!(
        "another offsite run holds the lock of policy {}: {} (run {}) since {}, lease valid for {} more s",
        policy.name, l.owner, l.run_id, l.since, l.expires_unix.saturating_sub(now)
    ))
}

/// How often a run that met other candidates backs off and tries again before it gives up
/// (exit 8).
const LEASE_ATTEMPTS: usize = 5;

/// The lease objects in `dir` (a local copy of `.offsite/leases*/`).
fn read_leases(dir: &Path) -> Vec<SeenLease> {
    let mut seen: Vec<SeenLease> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| SeenLease {
            name: e.file_name().to_string_lossy().into_owned(),
            lease: std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok()),
            mtime: e.metadata().and_then(|m| m.modified()).ok(),
        })
        .collect();
    seen.sort_by(|a, b| a.name.cmp(&b.name));
    seen
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

// ---------------------------------------------------------------------------------------------
// Local lock
// ---------------------------------------------------------------------------------------------

/// An exclusive `flock` on `$TMPDIR/offsite-<name>.lock`, released by the kernel when the
/// process ends however it ends.
pub struct LocalLock {
    _lock: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl LocalLock {
    pub fn acquire(lock_name: &str, run_id: &str) -> anyhow::Result<LocalLock> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!("offsite-{lock_name}.lock"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0)?;
                let _ = writeln!(
                    *lock,
                    "pid {} run {run_id} since {}",
                    std::process::id(),
                    rfc3339(SystemTime::now())
                );
                Ok(LocalLock { _lock: lock, path })
            }
            Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                // The holder writes its pid, run id and start time right after locking; a
                // holder that has not written yet (or a lock taken by another tool) shows none.
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => String::new(),
                    h => format!(" ({h})"),
                };
                Err(fail(
                    Code::Locked,
                    format!(
                        "another offsite run of policy {lock_name} holds the local lock {}{holder}; try again when it ends",
                        path.display(),
                    ),
                ))
            }
            Err((_, errno)) => Err(anyhow::anyhow!("locking {}: {errno}", path.display())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

// ---------------------------------------------------------------------------------------------
// The guarded run
// ---------------------------------------------------------------------------------------------

/// What the guards decided for one bucket before its sync.
pub struct BucketPlan {
    pub spec: BucketSpec,
    /// Set when the bucket must not be synced: its result, already decided.
    pub skip: Option<BucketResult>,
    /// The delete-storm limit in replica objects (`max_delete_percent` of the replica).
    pub delete_limit: Option<u64>,
    /// What rclone gets as `--max-delete` for that limit: rclone counts differently from
    /// objects (see [`delete_weight`]).
    pub max_delete: Option<u64>,
    pub backup_dir: Option<String>,
}

/// How many `--max-delete` counts one deleted replica object costs. Measured with 1.60.1 and
/// 1.75.2 through crypt: plain deletes count 1; with `--backup-dir` a deletion is a move, and a
/// destination without server-side move (S3 and the other object stores) does it as a
/// server-side copy plus a delete, which rclone counts twice (the move, then its delete), while
/// the move of an overwritten object's old version counts once. A local destination renames:
/// 1 per deletion, 0 per overwrite. So with kept deletions on object storage the budget is
/// doubled, or the configured limit would stop at half its objects and a bucket of under 20
/// objects could never lose one (docs/guards.md).
pub fn delete_weight(policy: &Policy, kept: bool) -> u64 {
    if kept && !matches!(policy.destination, crate::policy::Side::Local { .. }) {
        2
    } else {
        1
    }
}

pub struct Options {
    pub dry_run: bool,
    pub allow_empty_source: bool,
    /// Lease and lock name suffix (a shard), empty for the whole policy.
    pub lock_suffix: String,
}

/// Guards that hold for the whole run: the lease (renewed in the background) and what was read
/// from `.offsite/`. [`Guarded::finish`] writes state and releases the lease; dropping it
/// without finishing releases the lease best-effort (errors, signals).
pub struct Guarded<'a> {
    /// The checked rclone (its version known).
    rclone: Rclone,
    config: &'a PrivateConfig,
    policy: &'a Policy,
    run_id: String,
    /// `leases<shard>`: the directory of lease objects under `.offsite/`.
    lease_dir: String,
    /// This run's lease object in it: `<run-id>.<random>`, unique across hosts.
    lease_token: String,
    /// Other runs' leases found released, expired or dead, removed once the lock is ours.
    stale_leases: Vec<String>,
    /// What to report of the dead runs' leases among them (`lock: taken_over`).
    taken_over: Vec<String>,
    state_name: String,
    lease_held: bool,
    heartbeat: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    pub state: State,
    pub decisions: Vec<Decision>,
    /// Replica counts taken by listing this run (state.json did not know them), or known to
    /// be 0 (the crypt root was empty and no other run came between).
    counted: BTreeMap<String, u64>,
    /// The leases in the first read of `.offsite/`.
    first_seen: Vec<String>,
    /// A later listing showed a lease of another run that the first read had not: that run
    /// may have written the replica and the state since.
    newcomer: bool,
    _local: LocalLock,
}

fn args(rclone: &Rclone, config: &Path, rest: &[&str]) -> Vec<OsString> {
    let mut a = rclone.meta_args(config);
    a.extend(rest.iter().map(OsString::from));
    a
}

fn storage_error(what: &str, stderr: &[u8]) -> anyhow::Error {
    fail(
        Code::Failed,
        format!("{what}: {}", crate::sync::last_line(stderr)),
    )
}

/// What `rclone copy offsite:.offsite` brought down.
struct Fetched {
    canary: Option<Vec<u8>>,
    state: Option<State>,
    leases: Vec<SeenLease>,
}

/// Scratch directories for copies of `.offsite/` must not mix ([`copy_down`]).
static FETCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn fetch(
    rclone: &Rclone,
    config: &PrivateConfig,
    config_policy: &Policy,
    lease_dir: &str,
    state_name: &str,
) -> anyhow::Result<Fetched> {
    let lease_filter = format!("/{lease_dir}/*");
    let state_filter = format!("/{state_name}");
    // Exit 3: `.offsite` does not exist under this key (first run, or a wrong key).
    let down = copy_down(
        rclone,
        config,
        "remote-in",
        "offsite:.offsite",
        &[
            "--max-depth",
            "2",
            "--include",
            "/canary",
            "--include",
            &state_filter,
            "--include",
            &lease_filter,
        ],
        &format!(
            "destination unreachable: reading .offsite/ under the crypt root {} failed",
            crypt_root(config_policy)
        ),
    )?;
    let read = |name: &str| std::fs::read(down.join(name)).ok();
    let state = match read(state_name) {
        Some(b) => Some(serde_json::from_slice(&b).context(".offsite/state.json is not valid")?),
        None => None,
    };
    Ok(Fetched {
        canary: read("canary"),
        state,
        leases: read_leases(&down.join(lease_dir)),
    })
}

/// `rclone copy` of `from` (`.offsite/` or part of it) into a new scratch directory named
/// after `scratch`, which it returns; `from` missing (rclone exit 3) leaves it empty. Another
/// run may delete its withdrawn lease between rclone's listing and its download (the object
/// is gone: 404), so a failed copy is taken again, up to three times, before it fails as
/// `what`. A partial copy never counts: a lease that failed to come down for another reason
/// could be a live one.
fn copy_down(
    rclone: &Rclone,
    config: &PrivateConfig,
    scratch: &str,
    from: &str,
    filters: &[&str],
    what: &str,
) -> anyhow::Result<PathBuf> {
    // A run may read `.offsite/` more than once: each copy gets a directory of its own.
    let n = FETCHES.fetch_add(1, Ordering::SeqCst);
    let down = config.scratch_dir(&format!("{scratch}-{n}"))?;
    let mut a = args(
        rclone,
        config.path(),
        &[
            "copy",
            from,
            down.to_str().context("temp path is not UTF-8")?,
        ],
    );
    a.extend(filters.iter().map(OsString::from));
    let mut out = rclone.output(&a, None)?;
    for _ in 0..2 {
        if out.status.success() || out.status.code() == Some(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        out = rclone.output(&a, None)?;
    }
    if !out.status.success() && out.status.code() != Some(3) {
        return Err(storage_error(what, &out.stderr));
    }
    Ok(down)
}

/// Is there anything at `path`? (`lsf --max-depth 1`, first line only.) `None` when the path
/// does not exist (rclone exit 3).
fn probe(rclone: &Rclone, config: &Path, path: &str) -> anyhow::Result<Option<bool>> {
    match rclone.first_line(&args(rclone, config, &["lsf", "--max-depth", "1", path]))? {
        FirstLine::Line => Ok(Some(true)),
        FirstLine::Empty => Ok(Some(false)),
        FirstLine::Failed { code: Some(3), .. } => Ok(None),
        FirstLine::Failed { stderr, .. } => Err(storage_error(
            &format!("listing {path} failed"),
            stderr.as_bytes(),
        )),
    }
}

/// The key canary, read-only (for `doctor`): `(ok, what was found)`.
pub fn canary_status(
    rclone: &Rclone,
    config: &Path,
    policy: &Policy,
) -> anyhow::Result<(bool, String)> {
    let out = rclone.output(
        &args(rclone, config, &["cat", "offsite:.offsite/canary"]),
        None,
    )?;
    // `rclone cat` of a missing object prints nothing and exits 0: empty output is "absent".
    let found = (out.status.success() && !out.stdout.is_empty()).then_some(out.stdout);
    canary_verdict(rclone, config, policy, found)
}

/// [`canary_status`] from the canary as already read (`None`: there is none), e.g. by a copy
/// of `.offsite/` that fetched it with the state.
pub fn canary_verdict(
    rclone: &Rclone,
    config: &Path,
    policy: &Policy,
    found: Option<Vec<u8>>,
) -> anyhow::Result<(bool, String)> {
    if let Some(c) = found {
        return Ok(if c == CANARY {
            (true, "decrypts with this key".into())
        } else {
            (
                false,
                "decrypts but its content is wrong: the root may belong to another tool".into(),
            )
        });
    }
    let root = crypt_root(policy);
    Ok(match probe(rclone, config, &root)? {
        None | Some(false) => (true, format!("none yet: {root} is empty, the first sync writes it")),
        Some(true) => match probe(rclone, config, "offsite:")? {
            Some(true) => (true, "none yet, but the existing replica decrypts with this key: the next sync adds it".into()),
            _ => (false, format!("{root} holds objects but none decrypts with this key: wrong encryption.password, encryption.salt or filename_encoding")),
        },
    })
}

/// Count the objects of a replica (`rclone size`), when state.json does not know it.
fn count_replica(rclone: &Rclone, config: &Path, bucket: &str) -> anyhow::Result<u64> {
    let path = crate::sync::replica_path(bucket);
    let out = rclone.output(&args(rclone, config, &["size", "--json", &path]), None)?;
    if out.status.code() == Some(3) {
        return Ok(0);
    }
    if !out.status.success() {
        return Err(storage_error(
            &format!("counting {path} failed"),
            &out.stderr,
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("parsing rclone size output")?;
    Ok(v["count"].as_u64().unwrap_or(0))
}

impl<'a> Guarded<'a> {
    /// Take the locks and run the guards that come before any write. Errors: exit 7 (the
    /// version check), exit 8 (lock), exit 4 (canary), exit 5 (storage).
    ///
    /// `check_version` ([`Rclone::probe_at`]) runs in parallel with the first, read-only
    /// phase, which uses `rclone` as [`Rclone::unchecked`] may be: one rclone start less in
    /// sequence on every run. Its error comes first, before any result of that phase is used
    /// and before anything is written; the checked rclone is returned for the syncs.
    pub fn begin(
        policy: &'a Policy,
        rclone: &Rclone,
        config: &'a PrivateConfig,
        run_id: &str,
        buckets: &[BucketSpec],
        opts: &Options,
        check_version: impl FnOnce() -> anyhow::Result<Rclone> + Send,
    ) -> anyhow::Result<(Guarded<'a>, Vec<BucketPlan>, Rclone)> {
        let lock_name = format!("{}{}", policy.name, opts.lock_suffix);
        let local = LocalLock::acquire(&lock_name, run_id)?;
        let lease_dir = format!("leases{}", opts.lock_suffix);
        // One state file per shard: shards run at once and must not overwrite each other.
        let state_name = format!("state{}.json", opts.lock_suffix);
        let g = &policy.guards;
        let cfg = config.path();

        // Phase 1, in parallel: .offsite/ (canary, state, lease) and, per bucket, whether the
        // source lists anything.
        let (checked, fetched, source_probes) = std::thread::scope(|s| {
            let v = s.spawn(check_version);
            let f = s.spawn(|| fetch(rclone, config, policy, &lease_dir, &state_name));
            let probes: Vec<_> = buckets
                .iter()
                .map(|b| {
                    s.spawn(move || {
                        if g.refuse_empty_source {
                            probe(rclone, cfg, &format!("source:{}", b.name)).map(Some)
                        } else {
                            Ok(None)
                        }
                    })
                })
                .collect();
            let f = f
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("state fetch panicked")));
            let p: Vec<anyhow::Result<Option<Option<bool>>>> = probes
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("probe panicked")))
                })
                .collect();
            let v = v
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("version check panicked")));
            (v, f, p)
        });
        let checked = checked?;
        let rclone = &checked;
        let fetched = fetched?;
        let mut decisions = Vec::new();

        // Key canary: before anything is written.
        let mut write_canary = false;
        // The raw crypt root held nothing at all at the first read: every replica starts at 0.
        let mut root_empty = false;
        if g.key_canary {
            match &fetched.canary {
                Some(c) if c == CANARY => decisions.push(Decision::new(
                    "key_canary",
                    None,
                    "pass",
                    "the canary decrypts with this key",
                )),
                Some(_) => {
                    return Err(fail(Code::GuardRefused, "key canary: .offsite/canary decrypts but its content is wrong; the crypt root may belong to another tool. Nothing was written. Check encryption settings, or move the canary away only if you are sure this is the right key"));
                }
                None => {
                    let root = crypt_root(policy);
                    match probe(rclone, cfg, &root)? {
                        None | Some(false) => {
                            write_canary = true;
                            root_empty = true;
                            decisions.push(Decision::new(
                                "key_canary",
                                None,
                                "created",
                                if opts.dry_run {
                                    "empty crypt root: the canary would be written with this key (dry run: nothing is written)"
                                } else {
                                    "empty crypt root: the canary is written with this key"
                                },
                            ));
                        }
                        Some(true) => {
                            // Non-empty at the raw level. If this key decrypts the names that
                            // are there (an existing replica made by plain rclone), adopt it.
                            match probe(rclone, cfg, "offsite:")? {
                                Some(true) => {
                                    write_canary = true;
                                    decisions.push(Decision::new(
                                        "key_canary",
                                        None,
                                        "created",
                                        if opts.dry_run {
                                            "existing replica decrypts with this key: the canary would be added (dry run: nothing is written)"
                                        } else {
                                            "existing replica decrypts with this key: canary added"
                                        },
                                    ));
                                }
                                _ => {
                                    return Err(fail(Code::GuardRefused, format!(
                                        "key canary: the crypt root {root} holds objects but none decrypts with this key (wrong encryption.password, encryption.salt or filename_encoding?). Nothing was written. Restore the original secrets; never sync with a new key into the same root"
                                    )));
                                }
                            }
                        }
                    }
                }
            }
        } else {
            decisions.push(Decision::new(
                "key_canary",
                None,
                "disabled",
                "guards.key_canary is false (C011)",
            ));
            // Without the canary's probe of an empty root, ask the same of a run with no
            // state (a first run): is the root empty, so that every replica starts at 0? A
            // failed probe only means "not known".
            if fetched.state.is_none() && !opts.dry_run {
                root_empty = matches!(
                    probe(rclone, cfg, &crypt_root(policy)),
                    Ok(None | Some(false))
                );
            }
        }

        // Remote lease: a run that holds it is refused before anything is written; a lease
        // whose owner certainly died is taken over.
        let ttl = lock_ttl();
        let mut token = [0u8; 8];
        let _ = getrandom::fill(&mut token);
        let lease_token = format!(
            "{run_id}.{}",
            token.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let mut guarded = Guarded {
            rclone: checked.clone(),
            config,
            policy,
            run_id: run_id.to_string(),
            lease_dir,
            lease_token,
            stale_leases: Vec::new(),
            taken_over: Vec::new(),
            state_name,
            lease_held: false,
            heartbeat: None,
            state: fetched.state.clone().unwrap_or_else(|| State {
                version: 1,
                policy: policy.name.0.clone(),
                ..Default::default()
            }),
            decisions,
            counted: BTreeMap::new(),
            first_seen: fetched.leases.iter().map(|l| l.name.clone()).collect(),
            newcomer: false,
            _local: local,
        };
        let candidates = guarded.sort_leases(fetched.leases, ttl, &[])?;
        if !opts.dry_run {
            guarded.take_lease(ttl, candidates)?;
            if root_empty && !guarded.newcomer {
                // Nobody wrote between the first read and our lease, and nobody can now: the
                // first run need not list each replica at its end to count it.
                for b in buckets {
                    guarded.counted.insert(b.name.0.clone(), 0);
                }
            }
            guarded.start_heartbeat(ttl);
            for detail in std::mem::take(&mut guarded.taken_over) {
                guarded
                    .decisions
                    .push(Decision::new("lock", None, "taken_over", detail));
            }
            guarded.decisions.push(Decision::new(
                "lock",
                None,
                "acquired",
                format!(
                    "local {} and lease .offsite/{}/ (ttl {} s)",
                    guarded._local.path().display(),
                    guarded.lease_dir,
                    ttl.as_secs()
                ),
            ));
            if write_canary {
                guarded.request(
                    &["rcat", "offsite:.offsite/canary"],
                    Some(CANARY),
                    "writing the key canary failed",
                )?;
            }
        }

        // Per-bucket guards.
        let mut plans = Vec::new();
        for (b, p) in buckets.iter().zip(source_probes) {
            let name = b.name.0.as_str();
            let mut plan = BucketPlan {
                spec: b.clone(),
                skip: None,
                delete_limit: None,
                max_delete: None,
                backup_dir: (g.keep_deleted_days.0 > 0)
                    .then(|| format!("offsite:deleted/{run_id}/{name}")),
            };
            let known = guarded
                .state
                .buckets
                .get(name)
                .map(|s| s.replica_objects)
                .or_else(|| guarded.counted.get(name).copied());
            let source_empty = match p {
                Ok(Some(Some(has))) => !has,
                Ok(Some(None)) => {
                    // Missing source bucket: an error for this bucket, never "empty".
                    plan.skip = Some(BucketResult {
                        name: name.to_string(),
                        status: Code::Failed.status(),
                        error: Some(format!("source bucket {name} not found")),
                        code: Some(Code::Failed),
                        ..Default::default()
                    });
                    plans.push(plan);
                    continue;
                }
                Ok(None) => false,
                Err(e) => {
                    plan.skip = Some(BucketResult {
                        name: name.to_string(),
                        status: Code::Failed.status(),
                        error: Some(format!("{e:#}")),
                        code: Some(crate::exit::code_of(&e)),
                        ..Default::default()
                    });
                    plans.push(plan);
                    continue;
                }
            };
            if source_empty {
                let replica_has = match known {
                    Some(n) => n > 0,
                    None => probe(rclone, cfg, &crate::sync::replica_path(name))?.unwrap_or(false),
                };
                if replica_has && !opts.allow_empty_source {
                    let detail = format!(
                        "source bucket {name} is empty but its replica holds {} objects; nothing was deleted. If the source really was emptied on purpose, re-run with --allow-empty-source (deletions are kept in deleted/ for {} days)",
                        known.map(|n| n.to_string()).unwrap_or_else(|| "some".into()),
                        g.keep_deleted_days.0
                    );
                    guarded.decisions.push(Decision::new(
                        "refuse_empty_source",
                        Some(name),
                        "refused",
                        detail.clone(),
                    ));
                    plan.skip = Some(BucketResult {
                        name: name.to_string(),
                        status: Code::GuardRefused.status(),
                        error: Some(detail),
                        code: Some(Code::GuardRefused),
                        ..Default::default()
                    });
                    plans.push(plan);
                    continue;
                }
                if replica_has {
                    guarded.decisions.push(Decision::new(
                        "refuse_empty_source",
                        Some(name),
                        "overridden",
                        "--allow-empty-source: the replica follows the empty source",
                    ));
                    // The breaker would refuse what the admin just allowed.
                    plans.push(plan);
                    continue;
                }
            }
            if g.max_delete_percent.0 < 100 {
                let count = match known {
                    Some(n) => n,
                    None => {
                        let n = count_replica(rclone, cfg, name)?;
                        guarded.counted.insert(name.to_string(), n);
                        n
                    }
                };
                if count > 0 {
                    // At least one: otherwise a small bucket could never lose an object. The
                    // empty-source breaker covers the wholesale case.
                    let limit = (count * u64::from(g.max_delete_percent.0) / 100).max(1);
                    plan.delete_limit = Some(limit);
                    plan.max_delete =
                        Some(limit * delete_weight(policy, plan.backup_dir.is_some()));
                }
            }
            plans.push(plan);
        }
        Ok((guarded, plans, checked))
    }

    fn lease_doc(&self, ttl: Duration, released: bool, held: bool) -> Lease {
        let now = SystemTime::now();
        Lease {
            owner: format!("{}:{}", host(), std::process::id()),
            run_id: self.run_id.clone(),
            since: rfc3339(now),
            since_unix: unix(now),
            expires_unix: unix(now) + ttl.as_secs(),
            released,
            held,
            boot_id: boot_id(),
            pid_ns: pid_ns(),
        }
    }

    /// `offsite:.offsite/<lease dir>/<token>`: this run's lease object.
    fn lease_path(&self) -> String {
        format!("offsite:.offsite/{}/{}", self.lease_dir, self.lease_token)
    }

    /// Take the lease: write our own lease object under a name no other run uses, then list
    /// the lease directory. A run that finds no other live lease has the lock. S3 offers no
    /// create-if-absent through rclone, but a listing started after a write completed shows
    /// that object (strong read-after-write, docs/guards.md); so of two runs the one whose
    /// write completed last sees the other's lease and does not go on — two runs cannot both
    /// find themselves alone. A run that meets other candidates deletes its own, backs off
    /// (by rank, so the earliest name tries again first) and looks again: a lease that is
    /// marked held, or that is still there after the back-off, wins; otherwise it tries
    /// again, up to [`LEASE_ATTEMPTS`] times. Without contention this is one write and one
    /// listing, and no waiting. `met`: the candidates already seen in `.offsite/`.
    fn take_lease(&mut self, ttl: Duration, mut met: Vec<String>) -> anyhow::Result<()> {
        let mut contended = !met.is_empty();
        for _ in 0..LEASE_ATTEMPTS {
            self.write_lease(ttl)?;
            // From here a failure must release what we wrote (Drop does, for a held lease).
            self.lease_held = true;
            let others = self.look(ttl, &met)?;
            if others.is_empty() {
                if contended || self.newcomer {
                    // Another run may have finished between our first read and now: read
                    // the state it wrote.
                    let f = fetch(
                        &self.rclone,
                        self.config,
                        self.policy,
                        &self.lease_dir,
                        &self.state_name,
                    )?;
                    if let Some(st) = f.state {
                        self.state = st;
                    }
                }
                return Ok(());
            }
            contended = true;
            self.delete_own_lease()?;
            let rank = others.iter().filter(|n| **n < self.lease_token).count() as u64;
            let mut jitter = [0u8; 1];
            let _ = getrandom::fill(&mut jitter);
            std::thread::sleep(Duration::from_millis(
                300 + 600 * rank + u64::from(jitter[0]),
            ));
            crate::signals::check()?;
            met.extend(others.iter().cloned());
            let again = self.look(ttl, &met)?;
            if let Some(n) = again.iter().find(|n| others.contains(n)) {
                return Err(fail(Code::Locked, format!(
                    "another offsite run is taking the lock of policy {} at the same moment (lease .offsite/{}/{n}); it replicates, this run stops",
                    self.policy.name, self.lease_dir
                )));
            }
        }
        Err(fail(
            Code::Locked,
            format!(
                "other offsite runs of policy {} kept taking the lock at the same moment, {LEASE_ATTEMPTS} times; try again later",
                self.policy.name
            ),
        ))
    }

    /// List the lease directory (one `rclone copy` of it) and sort what is there
    /// ([`Guarded::sort_leases`]).
    fn look(&mut self, ttl: Duration, met: &[String]) -> anyhow::Result<Vec<String>> {
        // Exit 3: the directory is gone (every other lease withdrawn, ours too): nobody.
        let down = copy_down(
            &self.rclone,
            self.config,
            "leases-in",
            &format!("offsite:.offsite/{}", self.lease_dir),
            &["--max-depth", "1"],
            "listing the lock leases failed",
        )?;
        let seen = read_leases(&down);
        if seen
            .iter()
            .any(|l| l.name != self.lease_token && !self.first_seen.contains(&l.name))
        {
            self.newcomer = true;
        }
        self.sort_leases(seen, ttl, met)
    }

    /// The other live candidates' names among `seen`. A held lease of another run is exit 8
    /// (our own lease object, if any, is withdrawn first), and so is the released lease of a
    /// candidate we `met` before: it won while we waited and has ended, so its run did this
    /// one's work. Stale ones are noted for removal, dead runs' for the report.
    fn sort_leases(
        &mut self,
        seen: Vec<SeenLease>,
        ttl: Duration,
        met: &[String],
    ) -> anyhow::Result<Vec<String>> {
        let mut others = Vec::new();
        for l in seen {
            match classify(&l, &self.lease_token, ttl) {
                Kind::Own => {}
                Kind::Held(h) => {
                    if self.lease_held {
                        self.delete_own_lease()?;
                    }
                    return Err(held_error(self.policy, &h));
                }
                Kind::Released if met.contains(&l.name) => {
                    if self.lease_held {
                        self.delete_own_lease()?;
                    }
                    let who = l
                        .lease
                        .as_ref()
                        .map(|x| format!(": {} (run {}) since {}", x.owner, x.run_id, x.since))
                        .unwrap_or_default();
                    return Err(fail(Code::Locked, format!(
                        "another offsite run took the lock of policy {} at the same moment and has ended{who}; this run stops",
                        self.policy.name
                    )));
                }
                Kind::Stale(detail) => {
                    if !self.stale_leases.contains(&l.name) {
                        self.stale_leases.push(l.name);
                        self.taken_over.extend(detail);
                    }
                }
                Kind::Released => {
                    if !self.stale_leases.contains(&l.name) {
                        self.stale_leases.push(l.name);
                    }
                }
                Kind::Candidate => others.push(l.name),
            }
        }
        Ok(others)
    }

    /// One of offsite's own requests to the secondary; its failure is `what` (exit 5).
    fn request(&self, rest: &[&str], stdin: Option<&[u8]>, what: &str) -> anyhow::Result<()> {
        let out = self
            .rclone
            .output(&args(&self.rclone, self.config.path(), rest), stdin)?;
        if !out.status.success() {
            return Err(storage_error(what, &out.stderr));
        }
        Ok(())
    }

    fn write_lease(&self, ttl: Duration) -> anyhow::Result<()> {
        let doc = serde_json::to_vec(&self.lease_doc(ttl, false, false))?;
        self.request(
            &["rcat", &self.lease_path()],
            Some(&doc),
            "writing the lock lease failed",
        )
    }

    /// Withdraw our candidate lease (we met another run).
    fn delete_own_lease(&mut self) -> anyhow::Result<()> {
        self.request(
            &["deletefile", &self.lease_path()],
            None,
            "withdrawing the lock lease failed",
        )?;
        self.lease_held = false;
        Ok(())
    }

    /// In the background while the run goes on: mark our lease held (so that runs starting
    /// now stop at once), remove the stale leases we met, and renew ours every third of the
    /// TTL.
    fn start_heartbeat(&mut self, ttl: Duration) {
        // Stopping is a message (or the sender dropped), not a flag polled between sleeps:
        // the run's end does not wait for a sleep to run out.
        let (stop, stopped) = mpsc::channel::<()>();
        let rclone = self.rclone.clone();
        let a = args(
            &self.rclone,
            self.config.path(),
            &["rcat", &self.lease_path()],
        );
        let stale: Vec<Vec<OsString>> = std::mem::take(&mut self.stale_leases)
            .iter()
            .map(|n| {
                args(
                    &self.rclone,
                    self.config.path(),
                    &[
                        "deletefile",
                        &format!("offsite:.offsite/{}/{n}", self.lease_dir),
                    ],
                )
            })
            .collect();
        let owner = self.lease_doc(ttl, false, true);
        let h = std::thread::spawn(move || {
            let renew = |rclone: &Rclone| {
                let now = unix(SystemTime::now());
                let doc = Lease {
                    expires_unix: now + ttl.as_secs(),
                    ..owner.clone()
                };
                if let Ok(b) = serde_json::to_vec(&doc) {
                    let _ = rclone.output(&a, Some(&b));
                }
            };
            renew(&rclone);
            for d in &stale {
                if !matches!(stopped.try_recv(), Err(mpsc::TryRecvError::Empty)) {
                    return;
                }
                let _ = rclone.output(d, None);
            }
            let every = ttl / 3;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                renew(&rclone);
            }
        });
        self.heartbeat = Some((stop, h));
    }

    fn stop_heartbeat(&mut self) {
        if let Some((stop, h)) = self.heartbeat.take() {
            let _ = stop.send(());
            let _ = h.join();
        }
    }

    /// Record the results in state.json and release the lease, in one `rclone copy`.
    pub fn finish(
        mut self,
        results: &[(BucketResult, Option<crate::events::BucketCounts>)],
    ) -> anyhow::Result<()> {
        self.stop_heartbeat();
        if !self.lease_held {
            return Ok(());
        }
        let now = SystemTime::now();
        for (r, counts) in results {
            let Some(c) = counts else { continue };
            if r.code
                .is_some_and(|c| c == Code::Failed || c == Code::Internal)
                && c.copied == 0
                && c.deleted == 0
            {
                continue;
            }
            let before = self
                .state
                .buckets
                .get(&r.name)
                .map(|b| b.replica_objects)
                .or_else(|| self.counted.get(&r.name).copied());
            let replica = match before {
                Some(n) => (n + c.copied).saturating_sub(c.replaced + c.deleted),
                // Nothing known (first run with the breaker off): count once.
                None => count_replica(&self.rclone, self.config.path(), &r.name)?,
            };
            let mut changed = c.changed_objects.clone();
            let truncated = changed.len() > MAX_CHANGED;
            changed.truncate(MAX_CHANGED);
            self.state.buckets.insert(
                r.name.clone(),
                BucketState {
                    replica_objects: replica,
                    last_run_id: self.run_id.clone(),
                    last_sync: rfc3339(now),
                    changed_objects: changed,
                    changed_truncated: truncated,
                    deleted_objects: c
                        .deleted_objects
                        .iter()
                        .take(MAX_CHANGED)
                        .cloned()
                        .collect(),
                },
            );
        }
        self.state.version = 1;
        self.state.policy = self.policy.name.0.clone();
        self.state.run_id = self.run_id.clone();
        self.state.updated = rfc3339(now);
        let up = self.config.scratch_dir("remote-out")?;
        crate::render::write_scratch(
            &up.join(&self.state_name),
            &serde_json::to_vec_pretty(&self.state)?,
        )?;
        let leases = up.join(&self.lease_dir);
        std::fs::create_dir_all(&leases)?;
        crate::render::write_scratch(
            &leases.join(&self.lease_token),
            &serde_json::to_vec(&self.lease_doc(Duration::ZERO, true, false))?,
        )?;
        self.request(
            &[
                "copy",
                "--ignore-times",
                up.to_str().context("temp path")?,
                "offsite:.offsite",
            ],
            None,
            "writing .offsite/state.json failed",
        )?;
        self.lease_held = false;
        Ok(())
    }
}

impl Drop for Guarded<'_> {
    fn drop(&mut self) {
        self.stop_heartbeat();
        if self.lease_held {
            // Best effort after an error or a signal: release the lease so the next run need
            // not wait for the TTL. Bounded in time; runs even with a signal pending.
            if let Ok(doc) = serde_json::to_vec(&self.lease_doc(Duration::ZERO, true, false)) {
                let target = self.lease_path();
                let _ = self.rclone.output_cleanup(
                    &args(&self.rclone, self.config.path(), &["rcat", &target]),
                    Some(&doc),
                );
            }
        }
    }
}

/// Guard decisions as JSON values for the document.
pub fn decisions_json(d: &[Decision]) -> Vec<Value> {
    d.iter()
        .map(|x| serde_json::to_value(x).unwrap_or(Value::Null))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Kept deletions
// ---------------------------------------------------------------------------------------------

/// One generation under `deleted/`.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub run_id: String,
    pub objects: u64,
    pub bytes: u64,
    pub buckets: BTreeMap<String, u64>,
    /// Age in days from the run id's timestamp, when it parses.
    pub age_days: Option<f64>,
}

/// Parse the UTC time of a run id `YYYYMMDDTHHMMSSZ-xxxx`.
pub fn run_id_time(id: &str) -> Option<u64> {
    let b = id.as_bytes();
    if b.len() < 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| id.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, s) = (
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(9..11)?,
        n(11..13)?,
        n(13..15)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // days_from_civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + s).ok()
}

/// List the generations under `deleted/` (one listing).
pub fn generations(rclone: &Rclone, config: &Path) -> anyhow::Result<Vec<Generation>> {
    let out = rclone.output(
        &args(
            rclone,
            config,
            &[
                "lsjson",
                "-R",
                "--files-only",
                "--no-mimetype",
                "offsite:deleted",
            ],
        ),
        None,
    )?;
    if out.status.code() == Some(3) {
        return Ok(vec![]);
    }
    if !out.status.success() {
        return Err(storage_error("listing deleted/ failed", &out.stderr));
    }
    #[derive(Deserialize)]
    struct E {
        #[serde(rename = "Path")]
        path: String,
        #[serde(rename = "Size")]
        size: i64,
    }
    let entries: Vec<E> = serde_json::from_slice(&out.stdout).context("parsing rclone lsjson")?;
    let now = unix(SystemTime::now());
    let mut map: BTreeMap<String, Generation> = BTreeMap::new();
    for e in entries {
        let mut parts = e.path.splitn(3, '/');
        let (Some(id), Some(bucket)) = (parts.next(), parts.next()) else {
            continue;
        };
        let g = map.entry(id.to_string()).or_insert_with(|| Generation {
            run_id: id.to_string(),
            objects: 0,
            bytes: 0,
            buckets: BTreeMap::new(),
            age_days: run_id_time(id).map(|t| now.saturating_sub(t) as f64 / 86_400.0),
        });
        g.objects += 1;
        g.bytes += e.size.max(0) as u64;
        *g.buckets.entry(bucket.to_string()).or_default() += 1;
    }
    Ok(map.into_values().collect())
}

/// Remove generations older than `keep_days`. Generations whose id does not parse are kept
/// (never delete what we cannot date). Returns the pruned ids.
pub fn prune(
    rclone: &Rclone,
    config: &Path,
    keep_days: u32,
    dry_run: bool,
) -> anyhow::Result<(Vec<String>, Vec<Decision>)> {
    let mut pruned = Vec::new();
    let mut decisions = Vec::new();
    for g in generations(rclone, config)? {
        let Some(age) = g.age_days else {
            decisions.push(Decision::new(
                "keep_deleted",
                None,
                "kept",
                format!("deleted/{}: name is not a run id, kept", g.run_id),
            ));
            continue;
        };
        if age <= f64::from(keep_days) {
            continue;
        }
        if !dry_run {
            let out = rclone.output(
                &args(
                    rclone,
                    config,
                    &["purge", &format!("offsite:deleted/{}", g.run_id)],
                ),
                None,
            )?;
            if !out.status.success() {
                return Err(storage_error(
                    &format!("pruning deleted/{} failed", g.run_id),
                    &out.stderr,
                ));
            }
        }
        decisions.push(Decision::new(
            "keep_deleted",
            None,
            "pruned",
            format!(
                "deleted/{}: {} object(s), {:.1} days old > keep_deleted_days {}",
                g.run_id, g.objects, age, keep_days
            ),
        ));
        pruned.push(g.run_id);
    }
    Ok((pruned, decisions))
}

/// `json!` helper for generations.
pub fn generations_json(g: &[Generation]) -> Value {
    json!(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_parse_to_unix_time() {
        assert_eq!(run_id_time("19700101T000000Z-0000"), Some(0));
        assert_eq!(run_id_time("20261203T051500Z-4f2a"), Some(1_796_274_900));
        assert_eq!(run_id_time("20000229T000000Z-abcd"), Some(951_782_400));
        assert_eq!(run_id_time("not-a-run-id"), None);
        assert_eq!(run_id_time("20261303T051500Z-4f2a"), None);
    }

    #[test]
    fn run_ids_round_trip_with_report() {
        let t = SystemTime::now();
        let id = crate::report::run_id(t);
        assert_eq!(run_id_time(&id), Some(unix(t)));
    }
}
