//! Shared helpers for the integration tests (`mod common;` in each `tests/*.rs`).
//!
//! The tests run against two real Garage S3 servers started by `scripts/test`, which describes
//! them in `OFFSITE_TEST_*` environment variables:
//!
//! | variable | meaning |
//! |---|---|
//! | `OFFSITE_TEST_RCLONE` | the rclone binary under test (1.60 and latest, one pass each) |
//! | `OFFSITE_TEST_{PRIMARY,SECONDARY}_ENDPOINT` | `http://127.0.0.1:PORT` |
//! | `OFFSITE_TEST_{PRIMARY,SECONDARY}_REGION` | `sto1` / `fra1` |
//! | `OFFSITE_TEST_{PRIMARY,SECONDARY}_KEY_ID` | access key id (may create buckets) |
//! | `OFFSITE_TEST_{PRIMARY,SECONDARY}_SECRET` | secret access key |
//! | `OFFSITE_TEST_{PRIMARY,SECONDARY}_GARAGE_CONFIG` | the server's garage.toml (fault tests) |
//! | `OFFSITE_TEST_GARAGE_BIN` | the garage binary |
//!
//! Every test creates its own buckets with [`unique`] names ([`bucket_pair`]), so tests run in
//! parallel and both rclone passes share the servers.
//!
//! The raw [`rclone`] helper is the tests' independent view of the storage: it writes its own
//! rclone.conf (remotes `primary` and `secondary`) and runs rclone with a scrubbed environment
//! (only `PATH` and `HOME`), because rclone 1.60's S3 backend fails whenever `AWS_CA_BUNDLE` is
//! set. [`offsite`] on the other hand inherits the full environment: the product must cope.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};
pub mod garage;

/// One Garage server as seen by an S3 client.
#[derive(Debug, Clone)]
pub struct Side {
    pub endpoint: String,
    pub region: String,
    pub key_id: String,
    pub secret: String,
    /// The server's garage.toml, for tests that stop or reconfigure it.
    pub garage_config: PathBuf,
}

/// The two servers and the rclone binary of this test pass.
#[derive(Debug, Clone)]
pub struct Rig {
    pub rclone: PathBuf,
    pub primary: Side,
    pub secondary: Side,
    pub garage_bin: PathBuf,
}

const NO_RIG: &str = "integration tests need the Garage rig: run scripts/test";

fn env_var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{NO_RIG} (missing {name})"),
    }
}

fn side(name: &str) -> Side {
    Side {
        endpoint: env_var(&format!("OFFSITE_TEST_{name}_ENDPOINT")),
        region: env_var(&format!("OFFSITE_TEST_{name}_REGION")),
        key_id: env_var(&format!("OFFSITE_TEST_{name}_KEY_ID")),
        secret: env_var(&format!("OFFSITE_TEST_{name}_SECRET")),
        garage_config: env_var(&format!("OFFSITE_TEST_{name}_GARAGE_CONFIG")).into(),
    }
}

/// The rig described by `scripts/test`. Panics with a hint when the variables are missing.
pub fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| Rig {
        rclone: env_var("OFFSITE_TEST_RCLONE").into(),
        primary: side("PRIMARY"),
        secondary: side("SECONDARY"),
        garage_bin: env_var("OFFSITE_TEST_GARAGE_BIN").into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Unique names and pseudo-random values (no extra dependency; not cryptographic, test use only)

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn nanos() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    d.as_secs()
        .wrapping_mul(1_000_000_000)
        .wrapping_add(u64::from(d.subsec_nanos()))
}

/// splitmix64 over time, pid and a process-wide counter.
fn random_u64() -> u64 {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z =
        nanos() ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A name that is unique across tests, threads, processes and runs, and valid as an S3 bucket
/// name: lowercase `[a-z0-9-]`, starts with a letter or digit, at most 40 characters.
/// Format: `<prefix>-<pid hex>-<counter hex><6 random hex>`.
pub fn unique(prefix: &str) -> String {
    let mut p: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    p = p.trim_matches('-').to_string();
    if p.is_empty() {
        p.push('t');
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tail = format!(
        "{:x}-{:x}{:06x}",
        std::process::id(),
        n,
        random_u64() & 0xff_ffff
    );
    p.truncate(40 - 1 - tail.len());
    let p = p.trim_end_matches('-');
    let name = format!("{p}-{tail}");
    debug_assert!(name.len() <= 40 && name.len() >= 3);
    name
}

/// A random-looking secret of `len` characters from `[A-Za-z0-9]`, with at least 10 distinct
/// characters (passes offsite's entropy rule C004 when `len >= 32`).
pub fn random_secret(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    loop {
        let s: String = (0..len)
            .map(|_| ALPHABET[(random_u64() % ALPHABET.len() as u64) as usize] as char)
            .collect();
        let mut distinct: Vec<char> = s.chars().collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() >= 10.min(len) {
            return s;
        }
    }
}

/// A fresh private temporary directory, removed when the value is dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("offsite-test-")
        .tempdir()
        .expect("create temp dir")
}

// ---------------------------------------------------------------------------------------------
// Raw rclone, independent of offsite

/// The rig's two servers as a [`garage::Storage`]: what the helpers below run on.
fn storage() -> garage::Storage {
    garage::Storage::rig()
}

/// Runs the rig's rclone with remotes `primary:` and `secondary:` configured and a scrubbed
/// environment. Does not check the exit status.
pub fn rclone(args: &[&str]) -> Output {
    storage().rclone(args)
}

/// Like [`rclone`], feeding `stdin` to the process.
pub fn rclone_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    storage().rclone_with(args, Some(stdin))
}

/// Runs raw rclone and panics with its stderr unless it exits 0. Returns stdout.
pub fn rclone_ok(args: &[&str]) -> Vec<u8> {
    storage().ok(args)
}

/// Uploads `bytes` to `remote_path` (e.g. `primary:bucket/dir/file`) with `rclone rcat`.
pub fn put(remote_path: &str, bytes: &[u8]) {
    storage().put(remote_path, bytes)
}

/// The content of the object at `remote_path`.
pub fn cat(remote_path: &str) -> Vec<u8> {
    rclone_ok(&["cat", remote_path])
}

/// Every object under `remote_path` (recursive), as (path relative to `remote_path`, size),
/// sorted by path. A missing bucket or directory is an error (rclone exit 3).
pub fn ls(remote_path: &str) -> Vec<(String, u64)> {
    parse_lsjson(&rclone_ok(&["lsjson", "-R", "--files-only", remote_path]))
}

/// `rclone lsjson` output as (path, size), sorted by path.
pub fn parse_lsjson(out: &[u8]) -> Vec<(String, u64)> {
    let items: Vec<serde_json::Value> =
        serde_json::from_slice(out).unwrap_or_else(|e| panic!("rclone lsjson: bad JSON: {e}"));
    let mut files: Vec<(String, u64)> = items
        .iter()
        .map(|i| {
            let path = i["Path"].as_str().expect("lsjson Path").to_string();
            let size = i["Size"].as_u64().expect("lsjson Size");
            (path, size)
        })
        .collect();
    files.sort();
    files
}

/// The bucket names on a remote (`"primary:"` or `"secondary:"`), from `rclone lsd`.
pub fn buckets(remote: &str) -> Vec<String> {
    let out = rclone_ok(&["lsd", remote]);
    let mut names: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Deletes the single object at `remote_path` (`rclone deletefile`).
pub fn delete(remote_path: &str) {
    rclone_ok(&["deletefile", remote_path]);
}

/// Deletes a directory or bucket and everything in it (`rclone purge`).
pub fn purge(remote_path: &str) {
    rclone_ok(&["purge", remote_path]);
}

/// Creates a bucket or directory (`rclone mkdir`).
pub fn mkdir(remote_path: &str) {
    rclone_ok(&["mkdir", remote_path]);
}

// ---------------------------------------------------------------------------------------------
// Plain rclone through offsite's rendered config

/// Plain rclone with `conf`, a config written by `offsite render --to` (remotes `source`,
/// `destination` and the crypt remote `offsite`): the admin's view of the crypt root. It
/// inherits the environment except `AWS_CA_BUNDLE`, which breaks rclone 1.60's S3 backend (the
/// rendered config carries no CA setting; offsite passes `--ca-cert` itself). Does not check
/// the exit status.
pub fn crypt(conf: &Path, args: &[&str]) -> Output {
    Command::new(&rig().rclone)
        .arg("--config")
        .arg(conf)
        .args(args)
        .env_remove("AWS_CA_BUNDLE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Plaintext paths under a crypt path, recursive and sorted; empty when it does not exist.
pub fn crypt_ls(conf: &Path, path: &str) -> Vec<String> {
    let out = crypt(conf, &["lsf", "-R", "--files-only", path]);
    if out.status.code() == Some(3) {
        return vec![];
    }
    assert!(
        out.status.success(),
        "lsf {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// The plaintext of the object at a crypt path.
pub fn crypt_cat(conf: &Path, path: &str) -> Vec<u8> {
    let out = crypt(conf, &["cat", path]);
    assert!(
        out.status.success(),
        "cat {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

// ---------------------------------------------------------------------------------------------
// Buckets

/// Fresh buckets for one test: `sources` on the primary, `destination` on the secondary.
#[derive(Debug, Clone)]
pub struct Buckets {
    pub sources: Vec<String>,
    pub destination: String,
}

impl Buckets {
    /// `primary:<source i>`.
    pub fn source(&self, i: usize) -> String {
        format!("primary:{}", self.sources[i])
    }

    /// `secondary:<destination>`.
    pub fn dest(&self) -> String {
        format!("secondary:{}", self.destination)
    }
}

/// Creates `n_sources` fresh, empty source buckets on the primary and one fresh destination
/// bucket on the secondary.
pub fn bucket_pair(n_sources: usize) -> Buckets {
    storage().bucket_pair(n_sources)
}

// ---------------------------------------------------------------------------------------------
// offsite

/// What one offsite run gave: exit code and output. Made from its `Output`, asserting that
/// offsite did not panic.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// stdout as the one JSON document `--output json` promises.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", self.stdout))
    }
}

impl From<Output> for Out {
    fn from(out: Output) -> Out {
        let o = Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
        o
    }
}

/// The real `offsite` binary, with `OFFSITE_RCLONE` set to the rig's rclone and
/// `RUST_BACKTRACE=0`. It inherits the rest of the environment (including `AWS_CA_BUNDLE`).
pub fn offsite() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_offsite"));
    cmd.env("OFFSITE_RCLONE", &rig().rclone)
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// `offsite` as if on another machine that shares the secondary: in a new UTS namespace
/// (`unshare --uts`; the rig runs as root) with host name `host`. A lease knows its owner's
/// machine by host name (with boot id and pid namespace, src/guards.rs), so to offsite this is
/// a second host. Use it with a TMPDIR of its own, as another machine would have.
pub fn offsite_on_host(host: &str) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new("unshare");
    cmd.args(["--uts", "sh", "-c", "hostname \"$0\" && exec \"$@\"", host])
        .arg(env!("CARGO_BIN_EXE_offsite"))
        .env("OFFSITE_RCLONE", &rig().rclone)
        .env("RUST_BACKTRACE", "0");
    cmd
}

// ---------------------------------------------------------------------------------------------
// Policies and secrets

pub(crate) fn write_private(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(bytes)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    // An existing file keeps its mode through open(): force 0600.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Writes `value` (no trailing newline) to `dir/name` with mode 0600 and returns the path.
pub fn write_secret(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    write_private(&path, value.as_bytes());
    path
}

/// A YAML scalar: JSON string syntax is valid YAML and escapes everything.
pub fn yaml_str(s: impl AsRef<OsStr>) -> String {
    serde_json::to_string(&s.as_ref().to_string_lossy()).unwrap()
}

/// `{file: "<path>"}`
fn file_ref(path: &Path) -> String {
    format!("{{file: {}}}", yaml_str(path))
}

/// File names (inside the policy dir) of the secrets written by [`s3_policy`]; tests may rewrite
/// them, e.g. `write_secret(dir, PASSWORD_FILE, "...")` for a wrong-key scenario.
pub const PRIMARY_KEY_ID_FILE: &str = "primary_access_key_id";
pub const PRIMARY_SECRET_FILE: &str = "primary_secret_access_key";
pub const SECONDARY_KEY_ID_FILE: &str = "secondary_access_key_id";
pub const SECONDARY_SECRET_FILE: &str = "secondary_secret_access_key";
pub const PASSWORD_FILE: &str = "crypt_password";
pub const SALT_FILE: &str = "crypt_salt";
pub const POLICY_FILE: &str = "policy.yaml";

/// Writes a valid policy (version 1) for the rig into `dir/policy.yaml`, with all secrets as
/// `{file: ..}` references to 0600 files in `dir` (see the `*_FILE` constants; a fresh random
/// 40-character crypt password and salt each time unless those files already exist). Returns
/// the policy path.
pub fn s3_policy(dir: &Path, b: &Buckets) -> PathBuf {
    s3_policy_with(dir, b, "")
}

/// Like [`s3_policy`], with top-level sections replaced or added: every top-level key in
/// `overrides` (a YAML fragment such as `"guards:\n  max_delete_percent: 50\n"`) replaces the
/// default section of that name, or is appended when there is none. The default sections are
/// `version`, `name`, `source`, `destination`, `encryption`, `buckets` and `compliance`.
pub fn s3_policy_with(dir: &Path, b: &Buckets, overrides: &str) -> PathBuf {
    let yaml = s3_policy_yaml(dir, b, overrides);
    let path = dir.join(POLICY_FILE);
    std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// The text [`s3_policy_with`] writes (secret files are written as a side effect).
pub fn s3_policy_yaml(dir: &Path, b: &Buckets, overrides: &str) -> String {
    let r = rig();
    let secret = |name: &str, value: &str| file_ref(&write_secret(dir, name, value));
    let keep_or_new = |name: &str| {
        let p = dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(v) if !v.is_empty() => file_ref(&p),
            _ => secret(name, &random_secret(40)),
        }
    };
    let password = keep_or_new(PASSWORD_FILE);
    let salt = keep_or_new(SALT_FILE);
    let buckets: String = b
        .sources
        .iter()
        .map(|s| format!("  - {}\n", yaml_str(s)))
        .collect();

    let mut sections: Vec<(String, String)> = vec![
        ("version".into(), "version: 1\n".into()),
        ("name".into(), format!("name: {}\n", unique("rig"))),
        (
            "source".into(),
            format!(
                "source:\n  type: s3\n  endpoint: {}\n  region: {}\n  access_key_id: {}\n  \
                 secret_access_key: {}\n  options: {{force_path_style: true}}\n",
                yaml_str(&r.primary.endpoint),
                yaml_str(&r.primary.region),
                secret(PRIMARY_KEY_ID_FILE, &r.primary.key_id),
                secret(PRIMARY_SECRET_FILE, &r.primary.secret),
            ),
        ),
        (
            "destination".into(),
            format!(
                "destination:\n  type: s3\n  endpoint: {}\n  region: {}\n  bucket: {}\n  \
                 prefix: replica\n  access_key_id: {}\n  secret_access_key: {}\n  \
                 options: {{force_path_style: true}}\n",
                yaml_str(&r.secondary.endpoint),
                yaml_str(&r.secondary.region),
                yaml_str(&b.destination),
                secret(SECONDARY_KEY_ID_FILE, &r.secondary.key_id),
                secret(SECONDARY_SECRET_FILE, &r.secondary.secret),
            ),
        ),
        (
            "encryption".into(),
            format!("encryption:\n  password: {password}\n  salt: {salt}\n"),
        ),
        ("buckets".into(), format!("buckets:\n{buckets}")),
        (
            "compliance".into(),
            "compliance: {require_tls: false}\n".into(),
        ),
    ];

    for (key, text) in top_level_sections(overrides) {
        match sections.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = text,
            None => sections.push((key, text)),
        }
    }
    sections.into_iter().map(|(_, t)| t).collect()
}

/// Splits a YAML fragment into (top-level key, text of that key's block incl. its lines).
fn top_level_sections(yaml: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in yaml.lines() {
        let top = !line.is_empty() && !line.starts_with([' ', '\t', '#', '-']);
        if top {
            let key = line.split(':').next().unwrap_or("").trim().to_string();
            out.push((key, String::new()));
        }
        match out.last_mut() {
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None if line.trim().is_empty() || line.trim_start().starts_with('#') => {}
            None => panic!("s3_policy_with: override must start with a top-level key: {line:?}"),
        }
    }
    out
}
