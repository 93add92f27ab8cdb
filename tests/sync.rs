//! `offsite sync`, `render`, `plan` and `doctor` against the two real Garage servers and the
//! rclone of this pass (scripts/test runs the suite once with 1.60.x and once with the latest).
//! Each test asserts what an admin would check: ciphertext only on the secondary, correct
//! counts, nothing leaked, nothing left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MARKER: &[u8] = b"PLAINTEXT-CONTENT-MARKER-7c1e";

/// Run offsite with the policy; `TMPDIR` points at `tmp` so leftovers can be checked.
#[track_caller]
fn run(policy: &Path, tmp: &Path, args: &[&str]) -> Out {
    let out = offsite()
        .arg("-c")
        .arg(policy)
        .args(args)
        .env("TMPDIR", tmp)
        .output()
        .unwrap();
    Out::from(out)
}

/// Every secret the policy in `dir` references.
fn secrets(dir: &Path) -> Vec<String> {
    [
        PASSWORD_FILE,
        SALT_FILE,
        PRIMARY_SECRET_FILE,
        SECONDARY_SECRET_FILE,
    ]
    .iter()
    .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
    .collect()
}

#[track_caller]
fn assert_no_secret(dir: &Path, what: &str, text: &str) {
    for s in secrets(dir) {
        assert!(!text.contains(&s), "a secret appears in {what}");
    }
}

#[track_caller]
fn assert_empty_dir(p: &Path) {
    // The run lock file (`offsite-<policy>.lock`: pid, run id, time; no secret) stays by
    // design: removing a flock file races with the next run.
    let left: Vec<PathBuf> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

/// Every object of the replica (`offsite:data/`, all buckets), listed through crypt with plain
/// rclone and `offsite render`'s config: the admin's view.
fn replica(policy: &Path, dir: &Path) -> Vec<String> {
    let conf = dir.join("replica-view.conf");
    if !conf.exists() {
        let out = offsite()
            .arg("-c")
            .arg(policy)
            .args(["render", "--to"])
            .arg(&conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    crypt_ls(&conf, "offsite:data")
}

fn bucket<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("bucket {name} not in {doc}"))
}

struct Setup {
    b: Buckets,
    dir: tempfile::TempDir,
    tmp: tempfile::TempDir,
    policy: PathBuf,
}

fn setup(n: usize, overrides: &str) -> Setup {
    let b = bucket_pair(n);
    let dir = tempdir();
    let tmp = tempdir();
    let policy = s3_policy_with(dir.path(), &b, overrides);
    Setup {
        b,
        dir,
        tmp,
        policy,
    }
}

/// The acceptance core: after a sync every object is under the crypt root, and the raw
/// secondary shows no plaintext bucket name, object name or content.
#[test]
fn sync_replicates_only_ciphertext() {
    let s = setup(2, "");
    let names = [
        "ledger-customer-alpha.csv",
        "deep/path/velero-backup-nightly.tar",
        "unicode/résumé-日本.txt",
    ];
    for (i, src) in s.b.sources.iter().enumerate() {
        for n in names {
            let mut body = MARKER.to_vec();
            body.extend_from_slice(format!(" {src} {n} {i}").as_bytes());
            put(&format!("primary:{src}/{n}"), &body);
        }
    }
    put(
        &format!("primary:{}/big.bin", s.b.sources[0]),
        &vec![42u8; 300_000],
    );

    let o = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["changed"], true);
    assert_eq!(doc["command"], "sync");
    assert!(doc["run_id"].as_str().unwrap().len() > 16);
    let b0 = bucket(&doc, &s.b.sources[0]);
    assert_eq!(b0["copied"], 4);
    // copied_bytes is plaintext size on every rclone version.
    let plain: u64 = ls(&s.b.source(0)).iter().map(|(_, n)| n).sum();
    assert_eq!(b0["copied_bytes"], plain);
    assert_eq!(bucket(&doc, &s.b.sources[1])["copied"], 3);
    assert_no_secret(s.dir.path(), "stdout", &o.stdout);
    assert_no_secret(s.dir.path(), "stderr", &o.stderr);
    assert_empty_dir(s.tmp.path());

    // Raw view of the secondary: everything lives under the prefix, and nothing is readable.
    let raw = ls(&s.b.dest());
    // 7 replica objects, plus .offsite/canary, state.json and lock.
    assert_eq!(raw.len(), 7 + 3, "{raw:?}");
    assert_eq!(replica(&s.policy, s.dir.path()).len(), 7);
    for (path, _) in &raw {
        assert!(path.starts_with("replica/"), "{path}");
        for leak in
            s.b.sources
                .iter()
                .map(String::as_str)
                .chain(["ledger", "velero", "deep", "unicode", "résumé", "data"])
        {
            assert!(
                !path.contains(leak),
                "plaintext name `{leak}` in raw path {path}"
            );
        }
        let bytes = cat(&format!("{}/{path}", s.b.dest()));
        assert!(
            bytes.starts_with(b"RCLONE\x00\x00"),
            "{path} is not crypt data"
        );
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER),
            "plaintext content in {path}"
        );
    }

    // Through crypt (render's config, plain rclone) every source object is there, byte-identical.
    let conf = s.dir.path().join("admin.conf");
    let o = run(
        &s.policy,
        s.tmp.path(),
        &["render", "--to", conf.to_str().unwrap()],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for (i, src) in s.b.sources.iter().enumerate() {
        let out = crypt(
            &conf,
            &[
                "lsjson",
                "-R",
                "--files-only",
                &format!("offsite:data/{src}"),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = parse_lsjson(&out.stdout);
        assert_eq!(
            got,
            ls(&s.b.source(i)),
            "replica of {src} differs from source"
        );
        let data = crypt(&conf, &["cat", &format!("offsite:data/{src}/{}", names[2])]);
        assert_eq!(data.stdout, cat(&format!("primary:{src}/{}", names[2])));
    }
}

/// `copied_bytes` is plaintext bytes also when few objects of a larger bucket change (rclone
/// < 1.63 logs copies without sizes; offsite then looks the copied objects up one by one
/// instead of listing the bucket).
#[test]
fn copied_bytes_of_a_small_change_in_a_larger_bucket() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    let local = tempdir();
    for i in 0..150 {
        let p = local.path().join(format!("d{}/o{i:03}.txt", i % 5));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("object {i:03}")).unwrap();
    }
    rclone_ok(&[
        "copy",
        local.path().to_str().unwrap(),
        &format!("primary:{src}"),
    ]);
    let o = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(bucket(&o.json(), src)["copied_bytes"], 150 * 10);
    std::thread::sleep(Duration::from_millis(1100));
    put(&format!("primary:{src}/d2/o007.txt"), b"seventeen bytes!!");
    let o = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let b = bucket(&o.json(), src).clone();
    assert_eq!(
        (b["copied"].clone(), b["copied_bytes"].clone()),
        (1.into(), 17.into()),
        "{b}"
    );
}

#[test]
fn resync_is_a_noop_and_changes_propagate() {
    let s = setup(1, "guards:\n  max_delete_percent: 100\n");
    let src = &s.b.sources[0];
    for n in ["keep.txt", "modify.txt", "remove.txt"] {
        put(&format!("primary:{src}/{n}"), n.as_bytes());
    }
    let first = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(bucket(&first.json(), src)["copied"], 3);

    let again = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let doc = again.json();
    assert_eq!(doc["changed"], false);
    assert_eq!(bucket(&doc, src)["copied"], 0);
    assert_eq!(bucket(&doc, src)["deleted"], 0);

    std::thread::sleep(Duration::from_millis(1100)); // a visibly newer mtime
    put(
        &format!("primary:{src}/modify.txt"),
        b"modified content, longer",
    );
    put(&format!("primary:{src}/new.txt"), b"new");
    delete(&format!("primary:{src}/remove.txt"));
    let third = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    let doc = third.json();
    assert_eq!(doc["changed"], true);
    let b = bucket(&doc, src);
    assert_eq!(b["copied"], 2, "{doc}");
    assert_eq!(b["deleted"], 1, "{doc}");
    assert_eq!(b["copied_bytes"], 24 + 3);
    assert_eq!(replica(&s.policy, s.dir.path()).len(), 3);
}

#[test]
fn dry_run_changes_nothing() {
    let s = setup(1, "");
    put(&format!("primary:{}/a.txt", s.b.sources[0]), b"aaa");
    put(&format!("primary:{}/b.txt", s.b.sources[0]), b"bbb");
    let o = run(
        &s.policy,
        s.tmp.path(),
        &["sync", "--dry-run", "--output", "json"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    assert_eq!(doc["changed"], false);
    assert_eq!(bucket(&doc, &s.b.sources[0])["would_copy"], 2);
    assert_eq!(ls(&s.b.dest()), vec![]);

    // `run --dry-run` too: no canary, lease, state or attestation on the secondary, and no
    // metrics or attestation file (a dry run must not move last_success).
    let metrics = s.dir.path().join("offsite.prom");
    let attestation = s.dir.path().join("attestation.json");
    let policy = s3_policy_with(
        s.dir.path(),
        &s.b,
        &format!(
            "reporting:\n  metrics_file: {}\n  attestation_file: {}\n",
            yaml_str(&metrics),
            yaml_str(&attestation)
        ),
    );
    let o = run(
        &policy,
        s.tmp.path(),
        &["run", "--dry-run", "--output", "json"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    assert_eq!(doc["changed"], false);
    let canary = doc["guards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["guard"] == "key_canary")
        .unwrap();
    assert!(
        canary["detail"]
            .as_str()
            .unwrap()
            .contains("would be written"),
        "{canary}"
    );
    assert_eq!(ls(&s.b.dest()), vec![], "a dry run wrote to the secondary");
    assert!(!metrics.exists() && !attestation.exists());
}

#[test]
fn missing_source_bucket_fails_that_bucket_only() {
    let s = setup(1, "");
    let missing = unique("missing");
    let text = std::fs::read_to_string(&s.policy).unwrap().replacen(
        "buckets:\n",
        &format!("buckets:\n  - {missing}\n"),
        1,
    );
    std::fs::write(&s.policy, text).unwrap();
    put(&format!("primary:{}/x.txt", s.b.sources[0]), b"x");
    let o = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(o.code, 5, "{}", o.stderr);
    let doc = o.json();
    assert_eq!(doc["status"], "failed");
    let m = bucket(&doc, &missing);
    assert_eq!(m["status"], "failed");
    assert!(m["error"].as_str().unwrap().contains("not found"), "{m}");
    assert_eq!(bucket(&doc, &s.b.sources[0])["status"], "ok");
    assert!(
        o.stderr.contains(&missing),
        "stderr names the bucket: {}",
        o.stderr
    );
    assert_empty_dir(s.tmp.path());
}

#[test]
fn bucket_selection_and_parallel_buckets() {
    let s = setup(3, "sync:\n  parallel_buckets: 3\n");
    for src in &s.b.sources {
        put(&format!("primary:{src}/o.txt"), src.as_bytes());
    }
    let only = &s.b.sources[1];
    let o = run(
        &s.policy,
        s.tmp.path(),
        &["sync", "--bucket", only, "--output", "json"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json()["buckets"].as_array().unwrap().len(), 1);
    assert_eq!(replica(&s.policy, s.dir.path()).len(), 1);
    let o = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    for src in &s.b.sources {
        assert_eq!(bucket(&doc, src)["status"], "ok");
    }
    assert_eq!(replica(&s.policy, s.dir.path()).len(), 3);
    // A bucket the policy does not list is a usage error.
    let o = run(
        &s.policy,
        s.tmp.path(),
        &["sync", "--bucket", "not-in-policy"],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
}

/// `buckets: all` discovers the source buckets its key can see. The test gets a key of its own
/// that sees only its two buckets, so other tests' buckets stay out of it.
#[test]
fn buckets_all_discovers_source_buckets() {
    let r = rig();
    let garage = |args: &[&str]| {
        let out = std::process::Command::new(&r.garage_bin)
            .arg("-c")
            .arg(&r.primary.garage_config)
            .args(args)
            .env_remove("AWS_CA_BUNDLE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "garage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Buckets created over S3 only get a key-local alias in Garage; create these two with a
    // global name so a second key can be allowed on them.
    let mut b = bucket_pair(0);
    b.sources = vec![unique("alla"), unique("allb")];
    let key_name = unique("allkey");
    let created = garage(&["key", "create", &key_name]);
    let field = |label: &str| {
        created
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {label} in {created}"))
    };
    let (id, secret) = (field("Key ID"), field("Secret key"));
    for src in &b.sources {
        garage(&["bucket", "create", src]);
        for key in [key_name.as_str(), r.primary.key_id.as_str()] {
            garage(&["bucket", "allow", "--read", "--write", src, "--key", key]);
        }
        put(&format!("primary:{src}/obj.txt"), src.as_bytes());
    }
    let dir = tempdir();
    let tmp = tempdir();
    let policy = s3_policy_with(dir.path(), &b, "buckets: all\n");
    // This key sees only the two buckets above.
    write_secret(dir.path(), PRIMARY_KEY_ID_FILE, &id);
    write_secret(dir.path(), PRIMARY_SECRET_FILE, &secret);
    let o = run(&policy, tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    let names: Vec<&str> = doc["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = b.sources.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(replica(&policy, dir.path()).len(), 2);
}

/// Secrets never reach rclone's argv or environment, nor offsite's output; the private config
/// is gone after success, failure and SIGTERM.
#[test]
fn secrets_stay_out_of_argv_output_and_disk() {
    let s = setup(1, "sync:\n  bwlimit: \"100k\"\n");
    let src = &s.b.sources[0];
    put(&format!("primary:{src}/slow.bin"), &vec![7u8; 600_000]);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_offsite"))
        .arg("-c")
        .arg(&s.policy)
        .args(["sync", "--output", "json"])
        .env("OFFSITE_RCLONE", &rig().rclone)
        .env("TMPDIR", s.tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Find the rclone child while it transfers; read its argv and environment.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut inspected = false;
    let mut rclone_pid = 0;
    while Instant::now() < deadline && !inspected {
        for pid in children(child.id()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmd.contains(" sync ") {
                assert_no_secret(s.dir.path(), "rclone argv", &cmd);
                assert_no_secret(
                    s.dir.path(),
                    "rclone environment",
                    &String::from_utf8_lossy(&environ),
                );
                let env = String::from_utf8_lossy(&environ);
                assert!(
                    !env.contains("AWS_") && !env.contains("RCLONE_"),
                    "unscrubbed env: {env}"
                );
                // The config is private while it exists.
                let conf = cmd
                    .split(" --config ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_string();
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{conf}");
                let dmode = std::fs::metadata(Path::new(&conf).parent().unwrap())
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777;
                assert_eq!(dmode, 0o700);
                inspected = true;
                rclone_pid = pid;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(inspected, "never saw the rclone sync process");
    // SIGTERM mid-transfer: exit 143, rclone stopped, nothing left in TMPDIR.
    let t0 = Instant::now();
    let offsite_pid = child.id();
    nix_kill(offsite_pid, "TERM");
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON document after SIGTERM");
    assert_eq!(doc["status"], "interrupted");
    assert_eq!(doc["exit_code"], 143);
    assert_empty_dir(s.tmp.path());
    assert_no_secret(
        s.dir.path(),
        "stdout",
        &String::from_utf8_lossy(&out.stdout),
    );
    assert_no_secret(
        s.dir.path(),
        "stderr",
        &String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !Path::new(&format!("/proc/{rclone_pid}")).exists(),
        "rclone {rclone_pid} is still running"
    );

    // A failing run (unreachable secondary) also cleans up and prints no secret.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = std::fs::read_to_string(&s.policy)
        .unwrap()
        .replace(
            &rig().secondary.endpoint,
            &format!("http://127.0.0.1:{port}"),
        )
        .replace(
            "bwlimit: \"100k\"",
            "extra_flags: [\"--retries\", \"1\", \"--low-level-retries\", \"1\"]",
        );
    std::fs::write(&s.policy, text).unwrap();
    let o = run(&s.policy, s.tmp.path(), &["sync", "--output", "json"]);
    assert_eq!(o.code, 5, "{}", o.stderr);
    // Unreachable secondary: refused before any bucket is touched, naming the crypt root.
    assert!(
        o.stderr.contains(&format!(
            "destination unreachable: reading .offsite/ under the crypt root destination:{}",
            s.b.destination
        )),
        "the destination is named: {}",
        o.stderr
    );
    assert_eq!(
        o.stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "{}",
        o.stderr
    );
    assert_no_secret(s.dir.path(), "stdout", &o.stdout);
    assert_no_secret(s.dir.path(), "stderr", &o.stderr);
    assert_empty_dir(s.tmp.path());
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // Field 4 (after the parenthesised command) is the parent pid.
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ppid == pid {
            out.push(p);
        }
    }
    out
}

fn nix_kill(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

/// rclone < 1.68 fails completely when AWS_CA_BUNDLE is set; offsite must work anyway.
#[test]
fn works_with_aws_ca_bundle_set() {
    let s = setup(1, "");
    put(&format!("primary:{}/a.txt", s.b.sources[0]), b"a");
    let bundle = ["/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a CA bundle on this machine");
    let out = offsite()
        .arg("-c")
        .arg(&s.policy)
        .args(["sync", "--output", "json"])
        .env("AWS_CA_BUNDLE", bundle)
        .env(
            "RCLONE_CRYPT_PASSWORD",
            "an-inherited-value-that-must-be-ignored",
        )
        .env("AWS_ACCESS_KEY_ID", "inherited-must-be-ignored")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(replica(&s.policy, s.dir.path()).len(), 1);
}

#[test]
fn plan_shows_commands_and_no_secret() {
    let s = setup(2, "");
    let o = run(&s.policy, s.tmp.path(), &["plan"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for src in &s.b.sources {
        assert!(
            o.stdout
                .contains(&format!("sync source:{src} offsite:data/{src}")),
            "{}",
            o.stdout
        );
    }
    assert!(o.stdout.contains("[offsite]\ntype = crypt"));
    assert!(o.stdout.contains("<redacted: file "));
    assert_no_secret(s.dir.path(), "plan output", &o.stdout);
    // plan contacts nothing: the buckets are still empty and nothing was created.
    assert_eq!(ls(&s.b.dest()), vec![]);
}

#[test]
fn doctor_checks_both_sides() {
    let s = setup(1, "");
    let o = run(&s.policy, s.tmp.path(), &["doctor", "--output", "json"]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let doc = o.json();
    assert!(doc["rclone"]["sha256"].as_str().unwrap().len() == 64);
    let canary = |doc: &Value| {
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "key canary")
            .cloned()
            .unwrap()
    };
    assert_eq!(canary(&doc)["ok"], true);
    assert!(canary(&doc)["detail"]
        .as_str()
        .unwrap()
        .contains("none yet"));
    // After a sync the canary is there; with another password doctor says the key is wrong.
    put(&format!("primary:{}/a.txt", s.b.sources[0]), b"a");
    assert_eq!(run(&s.policy, s.tmp.path(), &["sync"]).code, 0);
    let o = run(&s.policy, s.tmp.path(), &["doctor", "--output", "json"]);
    assert_eq!(canary(&o.json())["detail"], "decrypts with this key");
    let good = std::fs::read_to_string(s.dir.path().join(PASSWORD_FILE)).unwrap();
    write_secret(s.dir.path(), PASSWORD_FILE, &random_secret(40));
    let o = run(&s.policy, s.tmp.path(), &["doctor", "--output", "json"]);
    assert_eq!(o.code, 4, "{}", o.stdout);
    assert_eq!(canary(&o.json())["ok"], false);
    write_secret(s.dir.path(), PASSWORD_FILE, &good);
    // A missing destination bucket is named, with advice; exit 5.
    let text = std::fs::read_to_string(&s.policy)
        .unwrap()
        .replace(&s.b.destination, &unique("nobucket"));
    std::fs::write(&s.policy, text).unwrap();
    let o = run(&s.policy, s.tmp.path(), &["doctor"]);
    assert_eq!(o.code, 5, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("FAIL destination bucket"), "{}", o.stdout);
    assert!(o.stdout.contains("->"), "advice expected: {}", o.stdout);
    assert_empty_dir(s.tmp.path());
}

/// offsite obscures crypt passwords in-process; the real `rclone reveal` of this pass must give
/// back exactly the password and salt.
#[test]
fn obscured_passwords_reveal_with_real_rclone() {
    let s = setup(1, "");
    let conf = s.dir.path().join("admin.conf");
    let o = run(
        &s.policy,
        s.tmp.path(),
        &["render", "--to", conf.to_str().unwrap()],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let text = std::fs::read_to_string(&conf).unwrap();
    for (key, file) in [("password = ", PASSWORD_FILE), ("password2 = ", SALT_FILE)] {
        let obscured = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in config"));
        let want = std::fs::read_to_string(s.dir.path().join(file)).unwrap();
        assert_ne!(obscured, want, "stored in clear");
        let out = std::process::Command::new(&rig().rclone)
            // `--`: an obscured value may start with `-` (base64url).
            .args(["reveal", "--", obscured])
            .env_remove("AWS_CA_BUNDLE")
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), want);
    }
}
