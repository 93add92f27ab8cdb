//! `offsite restore` against the two real Garage servers, with the rclone of this pass: the
//! round trip on awkward data (every name byte-for-byte, every object's sha256), the refusals
//! that keep a target untouched (wrong key, non-empty target), an interrupted restore that
//! converges, kept generations, and the names crypt cannot carry.

mod common;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

struct Setup {
    b: Buckets,
    dir: tempfile::TempDir,
    tmp: tempfile::TempDir,
    /// Restore targets (local directories) live here.
    work: tempfile::TempDir,
    policy: PathBuf,
}

fn setup(n: usize, overrides: &str) -> Setup {
    let b = bucket_pair(n);
    let dir = tempdir();
    let policy = s3_policy_with(dir.path(), &b, overrides);
    Setup {
        b,
        dir,
        tmp: tempdir(),
        work: tempdir(),
        policy,
    }
}

impl Setup {
    #[track_caller]
    fn run(&self, args: &[&str]) -> Out {
        let out = offsite()
            .arg("-c")
            .arg(&self.policy)
            .args(args)
            .env("TMPDIR", self.tmp.path())
            .output()
            .unwrap();
        Out::from(out)
    }

    #[track_caller]
    fn sync_ok(&self) -> Value {
        let o = self.run(&["sync", "--output", "json"]);
        assert_eq!(o.code, 0, "sync: {}\n{}", o.stdout, o.stderr);
        o.json()
    }

    /// `restore ... --output json`.
    #[track_caller]
    fn restore(&self, args: &[&str]) -> Out {
        let mut a = vec!["restore", "--output", "json"];
        a.extend_from_slice(args);
        self.run(&a)
    }

    fn target(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }
}

fn bucket<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("bucket {name} not in {doc}"))
}

fn guard<'a>(doc: &'a Value, name: &str) -> Vec<&'a Value> {
    doc["guards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["guard"] == name)
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every file under `root`, as (exact relative name, sha256). Names must be UTF-8; they are
/// compared byte for byte (NFC stays NFC, NFD stays NFD).
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec();
                let name = String::from_utf8(rel).expect("restored name is UTF-8");
                out.insert(name, sha256(&std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

/// A bucket's objects as (exact name, sha256): downloaded with raw rclone (its own config,
/// `--no-unicode-normalization` so NFC/NFD twins both arrive), hashed here.
fn bucket_tree(remote_path: &str) -> BTreeMap<String, String> {
    let d = tempdir();
    let local = d.path().join("t");
    rclone_ok(&[
        "copy",
        "--no-unicode-normalization",
        remote_path,
        local.to_str().unwrap(),
    ]);
    let t = tree(&local);
    // The listing S3 itself gives must name the same objects, byte for byte.
    let listed: Vec<String> = ls(remote_path).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        listed,
        t.keys().cloned().collect::<Vec<_>>(),
        "{remote_path}"
    );
    t
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible, no extra dependency.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `objects` into a local directory and uploads them to `remote_path` with raw rclone,
/// byte-exact names (`--no-unicode-normalization`).
fn upload(remote_path: &str, objects: &BTreeMap<String, Vec<u8>>) {
    let d = tempdir();
    for (name, body) in objects {
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
    }
    rclone_ok(&[
        "copy",
        "--no-unicode-normalization",
        d.path().to_str().unwrap(),
        remote_path,
    ]);
}

/// The awkward dataset of issue 6, as (name, content). The 30 MB object is uploaded
/// separately (multipart); [`awkward`] returns it too, for comparison.
fn awkward() -> BTreeMap<String, Vec<u8>> {
    let mut m: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut add = |name: String, body: Vec<u8>| {
        assert!(m.insert(name, body).is_none());
    };
    // "café" twice: precomposed U+00E9 (NFC) and "e" + U+0301 (NFD): two distinct objects.
    add("caf\u{e9}.txt".into(), b"NFC cafe".to_vec());
    add(
        "cafe\u{301}.txt".into(),
        b"NFD cafe, different bytes".to_vec(),
    );
    add(
        "unicode/r\u{e9}sum\u{e9} NFC.txt".into(),
        b"nfc dir entry".to_vec(),
    );
    add(
        "\u{65e5}\u{672c}\u{8a9e}/\u{30d5}\u{30a1}\u{30a4}\u{30eb}.txt".into(),
        "日本語".into(),
    );
    add(
        "emoji \u{1f389}\u{1f680}/\u{1f600}.txt".into(),
        b"emoji".to_vec(),
    );
    add("with space/a b  c .txt".into(), b"spaces".to_vec());
    add(
        "symbols/100% sure+#1.txt".into(),
        b"percent plus hash".to_vec(),
    );
    add(
        "symbols/%2F%20+plus#frag?q=1&x.txt".into(),
        b"url-ish".to_vec(),
    );
    let long: String = std::iter::repeat_n('L', 196).collect::<String>() + ".txt";
    assert_eq!(long.chars().count(), 200);
    add(format!("long/{long}"), b"two hundred characters".to_vec());
    let deep: Vec<String> = (1..=12).map(|i| format!("d{i:02}")).collect();
    add(
        format!("{}/deep.txt", deep.join("/")),
        b"twelve deep".to_vec(),
    );
    add("empty.txt".into(), vec![]);
    add("dir/empty-too".into(), vec![]);
    let same = noise(70_000, 7);
    add("same/one.bin".into(), same.clone());
    add("same/two.bin".into(), same.clone());
    add("same-three.bin".into(), same);
    m
}

const BIG: &str = "big/multipart 30MB.bin";

/// Uploads the dataset to `primary:<bucket>`: the small objects in one rclone copy, the 30 MB
/// object with 5 MiB parts (multipart). Returns every object with its content.
fn upload_awkward(bucket: &str) -> BTreeMap<String, Vec<u8>> {
    let mut objects = awkward();
    upload(&format!("primary:{bucket}"), &objects);
    let big = noise(30 * 1024 * 1024, 30);
    let d = tempdir();
    let f = d.path().join("big.bin");
    std::fs::write(&f, &big).unwrap();
    rclone_ok(&[
        "copyto",
        "--s3-upload-cutoff",
        "5M",
        "--s3-chunk-size",
        "5M",
        f.to_str().unwrap(),
        &format!("primary:{bucket}/{BIG}"),
    ]);
    objects.insert(BIG.into(), big);
    objects
}

fn hashes(objects: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    objects
        .iter()
        .map(|(n, b)| (n.clone(), sha256(b)))
        .collect()
}

#[track_caller]
fn assert_same_tree(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>, what: &str) {
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differ: Vec<&String> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "{what}: missing {missing:?}, extra {extra:?}, content differs {differ:?}"
    );
    assert_eq!(got.len(), want.len());
}

#[track_caller]
fn assert_verified(b: &Value, n: usize) {
    assert_eq!(b["status"], "ok", "{b}");
    let v = &b["verify"];
    assert_eq!(v["mode"], "download", "{b}");
    assert_eq!(v["checked"], n as u64, "{b}");
    assert_eq!(v["matched"], n as u64, "{b}");
    for k in ["differ", "missing_on_destination", "unverifiable"] {
        assert_eq!(v[k], 0, "{k}: {b}");
    }
}

/// The acceptance round trip: awkward names and contents, synced, then restored into a local
/// directory and into a new bucket on the primary; every name and sha256 identical.
#[test]
fn round_trip_of_awkward_objects_to_a_directory_and_a_new_bucket() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    let objects = upload_awkward(src);
    let want = hashes(&objects);
    let total: u64 = objects.values().map(|b| b.len() as u64).sum();
    // The primary holds exactly the dataset (the test's own upload is right).
    assert_same_tree(&bucket_tree(&s.b.source(0)), &want, "uploaded source");

    let doc = s.sync_ok();
    assert_eq!(bucket(&doc, src)["copied"], objects.len() as u64, "{doc}");

    // (a) Into a local directory that does not exist yet.
    let dir = s.target("restored");
    let o = s.restore(&["--bucket", src, "--to", dir.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(doc["command"], "restore");
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["changed"], true);
    assert_eq!(guard(&doc, "key_canary")[0]["result"], "pass");
    let b = bucket(&doc, src);
    assert_eq!(b["copied"], objects.len() as u64, "{b}");
    assert_eq!(b["copied_bytes"], total, "{b}");
    assert_eq!(b["deleted"], 0);
    assert_eq!(b["target"], dir.to_str().unwrap());
    assert_verified(b, objects.len());
    assert_same_tree(&tree(&dir), &want, "restored directory");

    // (b) Into a new bucket on the primary, under another name.
    let newb = unique("rebuilt");
    let o = s.restore(&["--bucket", src, "--to", &format!("source:{newb}")]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let b = bucket(&o.json(), src).clone();
    assert_eq!(b["target"], format!("source:{newb}"));
    assert_verified(&b, objects.len());
    assert_same_tree(
        &bucket_tree(&format!("primary:{newb}")),
        &want,
        "restored bucket",
    );
    // The original is untouched.
    assert_same_tree(&bucket_tree(&s.b.source(0)), &want, "source after restore");
}

/// A wrong key refuses before the target is touched (exit 4): an empty directory stays empty
/// and no bucket is created.
#[test]
fn wrong_key_refuses_and_leaves_the_target_untouched() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    put(&format!("primary:{src}/a.txt"), b"a");
    s.sync_ok();
    write_secret(s.dir.path(), PASSWORD_FILE, &random_secret(40));

    let dir = s.target("empty");
    std::fs::create_dir(&dir).unwrap();
    let o = s.restore(&["--bucket", src, "--to", dir.to_str().unwrap()]);
    assert_eq!(o.code, 4, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(doc["status"], "guard_refused");
    assert_eq!(guard(&doc, "key_canary")[0]["result"], "refused");
    assert!(
        doc["error"].as_str().unwrap().contains("key canary"),
        "{doc}"
    );
    assert!(o.stderr.contains("was not touched"), "{}", o.stderr);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    let before = buckets("primary:");
    let newb = unique("never");
    let o = s.restore(&["--bucket", src, "--to", &format!("source:{newb}")]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    let o = s.restore(&["--all", "--to", "source:"]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    assert_eq!(
        buckets("primary:"),
        before,
        "a bucket was created or removed"
    );
}

/// A non-empty target is refused (exit 4) and left as it was; with --force the restore copies
/// into it and never deletes what was there.
#[test]
fn non_empty_target_needs_force_and_nothing_is_deleted() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    let objects: BTreeMap<String, Vec<u8>> = [
        ("a.txt", &b"replica a"[..]),
        ("sub/b.txt", b"replica b"),
        ("same-name.txt", b"the replica's version"),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_string(), b.to_vec()))
    .collect();
    upload(&s.b.source(0), &objects);
    s.sync_ok();

    let dir = s.target("busy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("extra.txt"), b"not from the replica").unwrap();
    std::fs::write(dir.join("same-name.txt"), b"local, different").unwrap();
    let before = tree(&dir);

    let o = s.restore(&["--bucket", src, "--to", dir.to_str().unwrap()]);
    assert_eq!(o.code, 4, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(doc["status"], "guard_refused");
    let g = guard(&doc, "restore_target_not_empty");
    assert_eq!(g.len(), 1, "{doc}");
    assert_eq!(g[0]["result"], "refused");
    assert_eq!(bucket(&doc, src)["status"], "guard_refused");
    assert!(o.stderr.contains("--force"), "{}", o.stderr);
    assert_eq!(tree(&dir), before, "a refused restore changed the target");

    // A dry run with --force says what would be copied and writes nothing.
    let o = s.restore(&[
        "--bucket",
        src,
        "--to",
        dir.to_str().unwrap(),
        "--force",
        "--dry-run",
    ]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(doc["changed"], false);
    assert_eq!(bucket(&doc, src)["would_copy"], 3, "{doc}");
    assert_eq!(bucket(&doc, src)["verify"], Value::Null);
    assert_eq!(tree(&dir), before);

    let o = s.restore(&["--bucket", src, "--to", dir.to_str().unwrap(), "--force"]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(
        guard(&doc, "restore_target_not_empty")[0]["result"],
        "overridden"
    );
    assert_verified(bucket(&doc, src), 3);
    let mut want = hashes(&objects);
    want.insert("extra.txt".into(), sha256(b"not from the replica"));
    assert_same_tree(&tree(&dir), &want, "forced restore");
}

/// SIGTERM while rclone copies: exit 143, rclone stopped, private files gone. Re-running the
/// same restore with --force (the target now holds part of it) converges to a complete,
/// verified target.
#[test]
fn interrupted_restore_converges_when_re_run_with_force() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    let mut objects: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    objects.insert("slow.bin".into(), noise(3 * 1024 * 1024, 3));
    for i in 0..5 {
        objects.insert(format!("small/{i}.txt"), format!("small {i}").into_bytes());
    }
    upload(&s.b.source(0), &objects);
    s.sync_ok();
    // Slow the restore down: it uses the policy's sync.bwlimit (same link as the sync).
    s3_policy_with(s.dir.path(), &s.b, "sync:\n  bwlimit: \"1M\"\n");

    let dir = s.target("partial");
    let child = spawn_restore(&s, &["--bucket", src, "--to", dir.to_str().unwrap()]);
    let rclone_pid = wait_for_rclone(child.id(), "copy");
    std::thread::sleep(Duration::from_millis(1200));
    let t0 = Instant::now();
    kill(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["status"], "interrupted");
    assert!(
        !Path::new(&format!("/proc/{rclone_pid}")).exists(),
        "rclone {rclone_pid} still runs"
    );
    // The only file allowed to stay is the earlier sync's run lock (`offsite-<policy>.lock`,
    // no secret in it; README "Temp files"): restore itself takes no lock.
    let left: Vec<_> = std::fs::read_dir(s.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "private files left: {left:?}");
    let partial = tree(&dir);
    assert!(
        partial.get("slow.bin") != Some(&sha256(&objects["slow.bin"])),
        "the restore was not interrupted mid-copy"
    );

    if !partial.is_empty() {
        let o = s.restore(&["--bucket", src, "--to", dir.to_str().unwrap()]);
        assert_eq!(o.code, 4, "a partial target needs --force: {}", o.stderr);
    }
    let o = s.restore(&["--bucket", src, "--to", dir.to_str().unwrap(), "--force"]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_verified(bucket(&o.json(), src), objects.len());
    let got = tree(&dir);
    for (name, sum) in hashes(&objects) {
        assert_eq!(got.get(&name), Some(&sum), "{name}");
    }
}

fn spawn_restore(s: &Setup, args: &[&str]) -> Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_offsite"))
        .arg("-c")
        .arg(&s.policy)
        .args(["restore", "--output", "json"])
        .args(args)
        .env("OFFSITE_RCLONE", &rig().rclone)
        .env("TMPDIR", s.tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The pid of `parent`'s rclone child running `subcommand`, once it runs.
fn wait_for_rclone(parent: u32, subcommand: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(parent) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmd.split(|&b| b == 0).any(|a| a == subcommand.as_bytes()) {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no rclone {subcommand} under pid {parent}");
}

fn kill(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

/// `--all` restores every bucket of the replica: into TARGET/<bucket> for a directory, and
/// under the original names for `source:` — the disaster-recovery move into a rebuilt,
/// empty primary.
#[test]
fn all_buckets_into_a_directory_and_into_a_rebuilt_primary() {
    let s = setup(2, "");
    let mut want = Vec::new();
    for (i, src) in s.b.sources.iter().enumerate() {
        let objects: BTreeMap<String, Vec<u8>> = (0..3)
            .map(|j| {
                (
                    format!("p{j}/o{j}.txt"),
                    format!("{src} {i} {j}").into_bytes(),
                )
            })
            .collect();
        upload(&s.b.source(i), &objects);
        want.push(hashes(&objects));
    }
    s.sync_ok();

    let dry = s.target("dry");
    let o = s.restore(&["--all", "--to", dry.to_str().unwrap(), "--dry-run"]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    for src in &s.b.sources {
        assert_eq!(bucket(&o.json(), src)["would_copy"], 3);
    }
    assert!(!dry.exists(), "a dry run created the target");

    let all = s.target("all");
    let o = s.restore(&["--all", "--to", all.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    for (i, src) in s.b.sources.iter().enumerate() {
        assert_verified(bucket(&o.json(), src), 3);
        assert_same_tree(&tree(&all.join(src)), &want[i], src);
    }

    // The primary is lost: its buckets are gone. Restore them under their own names.
    for i in 0..2 {
        purge(&s.b.source(i));
    }
    let o = s.restore(&["--all", "--to", "source:"]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(doc["buckets"].as_array().unwrap().len(), 2);
    for (i, src) in s.b.sources.iter().enumerate() {
        assert_eq!(bucket(&doc, src)["target"], format!("source:{src}"));
        assert_same_tree(&bucket_tree(&s.b.source(i)), &want[i], src);
    }
    // And the rebuilt primary syncs again without copying or deleting anything.
    let doc = s.sync_ok();
    for src in &s.b.sources {
        assert_eq!(bucket(&doc, src)["copied"], 0, "{doc}");
        assert_eq!(bucket(&doc, src)["deleted"], 0, "{doc}");
    }
}

/// `--from-deleted RUN_ID` restores the generation a sync kept: the overwritten and deleted
/// versions, byte for byte.
#[test]
fn from_deleted_restores_a_kept_generation() {
    let s = setup(
        1,
        "guards:\n  max_delete_percent: 100\n  keep_deleted_days: 7\n",
    );
    let src = &s.b.sources[0];
    put(
        &format!("primary:{src}/over.txt"),
        b"version one of over.txt",
    );
    put(
        &format!("primary:{src}/gone/deleted.txt"),
        b"deleted at the source",
    );
    put(&format!("primary:{src}/keep.txt"), b"unchanged");
    s.sync_ok();
    std::thread::sleep(Duration::from_millis(1100));
    put(
        &format!("primary:{src}/over.txt"),
        b"version two, longer than one",
    );
    delete(&format!("primary:{src}/gone/deleted.txt"));
    let doc = s.sync_ok();
    let run_id = doc["run_id"].as_str().unwrap().to_string();

    let dir = s.target("generation");
    let o = s.restore(&[
        "--bucket",
        src,
        "--from-deleted",
        &run_id,
        "--to",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(doc["from_deleted"], run_id);
    let b = bucket(&doc, src);
    assert_eq!(b["source"], format!("offsite:deleted/{run_id}/{src}"));
    assert_verified(b, 2);
    let mut want = BTreeMap::new();
    want.insert("over.txt".to_string(), sha256(b"version one of over.txt"));
    want.insert(
        "gone/deleted.txt".to_string(),
        sha256(b"deleted at the source"),
    );
    assert_same_tree(&tree(&dir), &want, "kept generation");

    // A generation that does not exist is a clear error, and nothing is written.
    let none = s.target("none");
    let o = s.restore(&[
        "--bucket",
        src,
        "--from-deleted",
        "20000101T000000Z-0000",
        "--to",
        none.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 5, "{}", o.stderr);
    assert!(o.stderr.contains("offsite deleted list"), "{}", o.stderr);
    assert!(!none.exists());
}

/// Names the secondary cannot store. crypt grows every path segment to a multiple of 16 bytes
/// (at least one byte of padding) and base32-encodes it: 1.6 × the padded length. Garage takes
/// keys up to its ~64 KiB request-URI limit, so a 44 KB plaintext path fits the primary but its
/// ~73 KB encrypted form is refused (414). offsite's sync must fail that bucket (exit 5) and
/// name the object, not skip it silently.
#[test]
fn sync_names_an_object_whose_encrypted_name_is_too_long() {
    let s = setup(1, "sync:\n  extra_flags: [\"--retries\", \"1\"]\n");
    let src = &s.b.sources[0];
    let segment: String = std::iter::repeat_n('s', 200).collect();
    let long = vec![segment; 220].join("/") + "/too-long.txt";
    assert!(long.len() > 44_000);
    put(&format!("primary:{src}/{long}"), b"cannot be replicated");
    put(&format!("primary:{src}/fine.txt"), b"fine");

    let o = s.run(&["sync", "--output", "json"]);
    assert_eq!(o.code, 5, "{}\n{}", o.stdout, o.stderr.len());
    let doc = o.json();
    assert_eq!(bucket(&doc, src)["status"], "failed");
    assert!(
        o.stderr.contains(&format!("{long}: Failed to copy")),
        "stderr does not name the object"
    );
    // The other object made it; restoring shows exactly what the replica holds.
    let dir = s.target("partial-replica");
    let o = s.restore(&["--bucket", src, "--to", dir.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(tree(&dir).keys().collect::<Vec<_>>(), ["fine.txt"]);
}

/// A local directory cannot hold a name segment over 255 bytes (NAME_MAX); S3 can. Restore
/// into a directory fails that bucket (exit 5) naming the object; into a bucket it works.
#[test]
fn restore_names_objects_a_directory_cannot_hold() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    // 100 CJK characters: 300 bytes in one segment.
    let name: String = std::iter::repeat_n('\u{6f22}', 100).collect::<String>() + ".txt";
    put(&format!("primary:{src}/{name}"), b"long segment");
    put(&format!("primary:{src}/short.txt"), b"short");
    s.sync_ok();

    let dir = s.target("local");
    let o = s.restore(&["--bucket", src, "--to", dir.to_str().unwrap()]);
    assert_eq!(o.code, 5, "{}\n{}", o.stdout, o.stderr);
    let b = bucket(&o.json(), src).clone();
    assert_eq!(b["status"], "failed");
    assert_eq!(b["failed_objects"], serde_json::json!([name]), "{b}");
    assert!(o.stderr.contains(&name), "{}", o.stderr);
    assert_eq!(tree(&dir).keys().collect::<Vec<_>>(), ["short.txt"]);

    let newb = unique("longnames");
    let o = s.restore(&["--bucket", src, "--to", &format!("source:{newb}")]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_verified(bucket(&o.json(), src), 2);
    let names: Vec<String> = ls(&format!("primary:{newb}"))
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(names, vec!["short.txt".to_string(), name]);
}

/// Usage and storage errors are refused before anything is written, with a message that says
/// what to do; each still prints one JSON document.
#[test]
fn bad_targets_and_buckets_are_refused_clearly() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    put(&format!("primary:{src}/a.txt"), b"a");
    s.sync_ok();
    let dir = s.target("x");
    let d = dir.to_str().unwrap();
    for (args, code, says) in [
        (vec!["--to", d], 2, "--bucket"),
        (vec!["--all", "--bucket", src, "--to", d], 2, "--bucket"),
        (vec!["--all", "--to", "offsite:data"], 2, "secondary"),
        (vec!["--all", "--to", "destination:x"], 2, "secondary"),
        (vec!["--all", "--to", "elsewhere:x"], 2, "./elsewhere:x"),
        (
            vec!["--bucket", "nope", "--to", d],
            5,
            "holds no bucket nope",
        ),
        (
            vec!["--bucket", src, "--from-deleted", "../x", "--to", d],
            2,
            "not a run id",
        ),
    ] {
        let o = s.restore(&args);
        assert_eq!(o.code, code, "{args:?}: {}", o.stderr);
        let doc = o.json();
        assert_eq!(doc["exit_code"], code);
        assert!(
            doc["error"].as_str().unwrap_or_default().contains(says),
            "{args:?}: {doc}"
        );
        assert!(!dir.exists(), "{args:?} wrote to the target");
    }
}

/// A missing target bucket is created when the key may; when it may not, the error names the
/// bucket and says what to do (exit 5).
#[test]
fn target_bucket_that_cannot_be_created_is_named() {
    let r = rig();
    let s = setup(1, "");
    let src = &s.b.sources[0];
    put(&format!("primary:{src}/a.txt"), b"a");
    s.sync_ok();
    // A key for the primary that may not create buckets (Garage's default for new keys).
    let out = std::process::Command::new(&r.garage_bin)
        .arg("-c")
        .arg(&r.primary.garage_config)
        .args(["key", "create", &unique("nocreate")])
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |label: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {label} in {text}"))
    };
    write_secret(s.dir.path(), PRIMARY_KEY_ID_FILE, &field("Key ID"));
    write_secret(s.dir.path(), PRIMARY_SECRET_FILE, &field("Secret key"));
    let newb = unique("denied");
    let o = s.restore(&["--bucket", src, "--to", &format!("source:{newb}")]);
    assert_eq!(o.code, 5, "{}\n{}", o.stdout, o.stderr);
    let err = o.json()["error"].as_str().unwrap().to_string();
    assert!(err.contains(&format!("Create bucket {newb}")), "{err}");
    assert!(!buckets("primary:").contains(&newb));
}
