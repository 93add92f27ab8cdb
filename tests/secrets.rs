//! Secret hygiene sweep (issue 8, item 6): every command, run with distinctive secrets, and
//! not one of them — in plain form or in rclone's reversible "obscured" form — may appear in
//! stdout, stderr, the JSON documents, the metrics (file and Pushgateway), the attestation,
//! the argv or environment of any process offsite starts, any file left on disk (other than
//! the secret files themselves and `render --to`'s 0600 file), or the `.offsite/` records on
//! the secondary.
//!
//! Obscured values are detected without knowing their random IV: every base64url token in a
//! text is decoded and de-obscured with rclone's fixed public key (an independent
//! implementation of `rclone reveal`), and compared with the secrets. A positive control (the
//! `render --to` file, which must hold the obscured crypt passwords) proves the detector works,
//! so the sweep cannot pass by seeing nothing.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// rclone's public obscure key (fs/config/obscure/obscure.go), written out again here so the
/// detector does not share code with the product it checks.
const OBSCURE_KEY: [u8; 32] = [
    0x9c, 0x93, 0x5b, 0x48, 0x73, 0x0a, 0x55, 0x4d, 0x6b, 0xfd, 0x7c, 0x63, 0xc8, 0x86, 0xa9, 0x2b,
    0xd3, 0x90, 0x19, 0x8e, 0xb8, 0x12, 0x8a, 0xfb, 0xf4, 0xde, 0x16, 0x2b, 0x8b, 0x95, 0xf6, 0x38,
];

/// `rclone reveal`: unpadded base64url of IV‖AES-256-CTR(secret). None if `token` is not one.
fn reveal(token: &str) -> Option<String> {
    use aes::cipher::{KeyIvInit, StreamCipher};
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    if raw.len() <= 16 {
        return None;
    }
    let (iv, ct) = raw.split_at(16);
    let mut buf = ct.to_vec();
    let iv: [u8; 16] = iv.try_into().ok()?;
    ctr::Ctr128BE::<aes::Aes256>::new(&OBSCURE_KEY.into(), &iv.into()).apply_keystream(&mut buf);
    String::from_utf8(buf).ok()
}

/// The secrets of one sweep and what was found where.
struct Sweep {
    secrets: Vec<(&'static str, String)>,
    leaks: Mutex<Vec<String>>,
    /// How many texts were scanned (the sweep must have looked at something).
    scanned: Mutex<usize>,
}

impl Sweep {
    /// Leaks in `text`: each secret found in plain form, or as an obscured token.
    fn find(&self, text: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (name, s) in &self.secrets {
            if text.contains(s.as_str()) {
                found.push(format!("{name} (plain)"));
            }
        }
        // Base64url tokens long enough to hold a 16-byte IV and a secret of >= 16 characters.
        let tokens = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .filter(|t| t.len() >= 40);
        for t in tokens {
            if let Some(plain) = reveal(t) {
                for (name, s) in &self.secrets {
                    if plain.contains(s.as_str()) {
                        found.push(format!("{name} (obscured)"));
                    }
                }
            }
        }
        found
    }

    fn scan(&self, what: &str, text: &str) {
        *self.scanned.lock().unwrap() += 1;
        for f in self.find(text) {
            self.leaks.lock().unwrap().push(format!("{f} in {what}"));
        }
    }

    fn scan_bytes(&self, what: &str, bytes: &[u8]) {
        self.scan(what, &String::from_utf8_lossy(bytes));
    }
}

/// All descendants of `pid` (through /proc/<pid>/task/*/children).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
                out.push(k);
                todo.push(k);
            }
        }
    }
    out
}

struct Ran {
    code: i32,
    stdout: String,
    /// Process argv/environment samples taken while it ran.
    samples: usize,
}

/// Runs offsite with `args`, samples the argv of offsite and the argv and environment of
/// every process it starts until it exits, and scans its stdout and stderr.
fn run(sweep: &Sweep, env: &Env, args: &[&str]) -> Ran {
    let label = args.join(" ");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_offsite"));
    cmd.arg("-c")
        .arg(&env.policy)
        .args(args)
        .env("OFFSITE_RCLONE", &rig().rclone)
        .env("TMPDIR", env.tmp.path())
        .env("HOME", env.home.path())
        .env_remove(PASSWORD_ENV)
        .current_dir(env.work.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(pw) = &env.password {
        cmd.env(PASSWORD_ENV, pw);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let offsite_exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_offsite")).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let samples = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut n = 0usize;
            let mut seen = BTreeSet::new();
            while !done.load(Ordering::Relaxed) {
                // offsite's own argv; its environment is the caller's (it holds the {env:}
                // password by design), its children's must not.
                if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                    sweep.scan_bytes(&format!("argv of offsite {label}"), &c);
                }
                for kid in descendants(pid) {
                    // Between fork and exec a child is still a copy of offsite, environment
                    // included; only what runs after exec is rclone's own. Reading `exe` first
                    // makes that certain (exec is one-way).
                    let exe = std::fs::read_link(format!("/proc/{kid}/exe")).unwrap_or_default();
                    if exe == offsite_exe {
                        continue;
                    }
                    let argv = std::fs::read(format!("/proc/{kid}/cmdline")).unwrap_or_default();
                    let envv = std::fs::read(format!("/proc/{kid}/environ")).unwrap_or_default();
                    // Labels never quote the scanned text: a leak report must not print it.
                    sweep.scan_bytes(&format!("argv of a child of offsite {label}"), &argv);
                    sweep.scan_bytes(&format!("environment of a child of offsite {label}"), &envv);
                    if seen.insert(kid) {
                        n += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        });
        let out = child.wait_with_output().unwrap();
        done.store(true, Ordering::Relaxed);
        let n = sampler.join().unwrap();
        sweep.scan_bytes(&format!("stdout of {label}"), &out.stdout);
        sweep.scan_bytes(&format!("stderr of {label}"), &out.stderr);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{label}: {stderr}");
        (out, n)
    });
    let (out, n) = samples;
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        samples: n,
    }
}

const PASSWORD_ENV: &str = "OFFSITE_SWEEP_PASSWORD";

struct Env {
    /// Policy and secret files.
    dir: tempfile::TempDir,
    tmp: tempfile::TempDir,
    home: tempfile::TempDir,
    /// The working directory of every command (relative outputs land here).
    work: tempfile::TempDir,
    policy: PathBuf,
    /// The value of the `{env:}` secret; None leaves the variable unset.
    password: Option<String>,
}

/// Every regular file under `root` with its contents, except `skip`.
fn files(root: &Path, skip: &[PathBuf], out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            files(&p, skip, out);
        } else if ft.is_file() && !skip.contains(&p) {
            out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
        }
    }
}

#[test]
fn no_command_shows_a_secret_anywhere() {
    let b = bucket_pair(1);
    let src = b.sources[0].clone();
    let env = Env {
        // Not under /tmp: `manifest kubernetes` mounts the policy's secret files at their own
        // paths in the pod, where /tmp is the pod's emptyDir (and refuses paths under it). The
        // target dir is under /tmp when the checkout is; /var/tmp is not.
        dir: tempfile::Builder::new()
            .prefix("offsite-sweep-")
            .tempdir_in(if env!("CARGO_TARGET_TMPDIR").starts_with("/tmp/") {
                "/var/tmp"
            } else {
                env!("CARGO_TARGET_TMPDIR")
            })
            .unwrap(),
        tmp: tempdir(),
        home: tempdir(),
        work: tempdir(),
        policy: PathBuf::new(),
        // Distinctive values: a prefix no other text has, then random characters.
        password: Some(format!("SweepPassword{}", random_secret(36))),
    };
    let salt = format!("SweepSalt{}", random_secret(36));
    let metrics = env.dir.path().join("metrics/offsite.prom");
    let attestation = env.dir.path().join("log/attestation.json");
    let push = std::env::var("OFFSITE_TEST_PUSHGATEWAY")
        .expect("OFFSITE_TEST_PUSHGATEWAY is not set: run the suite with scripts/test");
    // The password comes from the environment (the child must not inherit it), the salt and
    // the S3 keys from 0600 files.
    write_secret(env.dir.path(), SALT_FILE, &salt);
    let policy = s3_policy_with(
        env.dir.path(),
        &b,
        &format!(
            "encryption:\n  password: {{env: {PASSWORD_ENV}}}\n  salt: {{file: {}}}\n\
             verify:\n  after_sync: full\n\
             reporting:\n  metrics_file: {}\n  pushgateway_url: {}\n  attestation_file: {}\n",
            yaml_str(env.dir.path().join(SALT_FILE)),
            yaml_str(&metrics),
            yaml_str(&push),
            yaml_str(&attestation),
        ),
    );
    let env = Env { policy, ..env };
    let r = rig();
    let sweep = Sweep {
        secrets: vec![
            ("crypt password", env.password.clone().unwrap()),
            ("crypt salt", salt.clone()),
            ("primary S3 secret", r.primary.secret.clone()),
            ("secondary S3 secret", r.secondary.secret.clone()),
        ],
        leaks: Mutex::new(Vec::new()),
        scanned: Mutex::new(0),
    };
    put(&format!("primary:{src}/a/report.txt"), b"quarterly numbers");
    put(&format!("primary:{src}/b.bin"), &vec![9u8; 200_000]);

    // Every command, on the happy path.
    let rendered = env.dir.path().join("admin-rclone.conf");
    let rendered_s = rendered.to_str().unwrap().to_string();
    let restored = env.work.path().join("restored");
    let restored_s = restored.to_str().unwrap().to_string();
    let mut child_samples = 0;
    for (args, want) in [
        (vec!["check"], 0),
        (vec!["check", "--output", "json"], 0),
        (vec!["plan"], 0),
        (vec!["plan", "--output", "json"], 0),
        (vec!["render", "--to", &rendered_s], 0),
        (vec!["doctor", "--output", "json"], 0),
        (vec!["sync", "--output", "json"], 0),
        (vec!["sync", "-v"], 0),
        (vec!["verify", "--mode", "full", "--output", "json"], 0),
        (vec!["run", "--output", "json"], 0),
        (vec!["run", "-v"], 0),
        (vec!["deleted", "list", "--output", "json"], 0),
        (
            vec![
                "restore",
                "--bucket",
                &src,
                "--to",
                &restored_s,
                "--output",
                "json",
            ],
            0,
        ),
        (vec!["manifest", "kubernetes"], 0),
        (
            vec![
                "manifest",
                "kubernetes",
                "--shards",
                "3",
                "--output",
                "json",
            ],
            0,
        ),
    ] {
        let o = run(&sweep, &env, &args);
        assert_eq!(o.code, want, "offsite {}: {}", args.join(" "), o.stdout);
        child_samples += o.samples;
    }
    assert!(
        child_samples >= 10,
        "the sweep saw only {child_samples} rclone processes"
    );

    // Failure paths print errors, and errors must not carry secrets either.
    // A wrong salt: the key canary refuses (exit 4).
    write_secret(
        env.dir.path(),
        SALT_FILE,
        &format!("SweepSalt{}", random_secret(36)),
    );
    let o = run(&sweep, &env, &["run", "--output", "json"]);
    assert_eq!(o.code, 4, "{}", o.stdout);
    let o = run(&sweep, &env, &["doctor"]);
    assert_eq!(o.code, 4, "{}", o.stdout);
    write_secret(env.dir.path(), SALT_FILE, &salt);
    // A secret file readable by others (C012) and a missing environment variable.
    std::fs::set_permissions(
        env.dir.path().join(SALT_FILE),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let o = run(&sweep, &env, &["sync"]);
    assert_eq!(o.code, 3, "{}", o.stdout);
    std::fs::set_permissions(
        env.dir.path().join(SALT_FILE),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let no_pw = Env {
        password: None,
        ..env
    };
    let o = run(&sweep, &no_pw, &["sync", "--output", "json"]);
    assert_eq!(o.code, 2, "{}", o.stdout);
    let env = Env {
        password: Some(sweep.secrets[0].1.clone()),
        ..no_pw
    };
    // An unreachable secondary (exit 5).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let good_policy = std::fs::read_to_string(&env.policy).unwrap();
    std::fs::write(
        &env.policy,
        good_policy.replace(&r.secondary.endpoint, &format!("http://127.0.0.1:{port}")),
    )
    .unwrap();
    let o = run(&sweep, &env, &["sync", "--output", "json"]);
    assert_eq!(o.code, 5, "{}", o.stdout);
    std::fs::write(&env.policy, &good_policy).unwrap();

    // Metrics: the file and what the Pushgateway holds.
    sweep.scan_bytes("metrics file", &std::fs::read(&metrics).unwrap());
    let pushed = ureq::get(&format!("{push}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    sweep.scan("Pushgateway", &pushed);
    // Attestation: the file and the encrypted copies on the secondary, with every other record
    // under .offsite/ (state, lease, canary), read through crypt with plain rclone.
    sweep.scan_bytes("attestation file", &std::fs::read(&attestation).unwrap());
    let records = tempdir();
    let out = crypt(
        &rendered,
        &["copy", "offsite:.offsite", records.path().to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut recs = Vec::new();
    files(records.path(), &[], &mut recs);
    assert!(
        recs.iter()
            .any(|(p, _)| p.to_string_lossy().contains("attestations")),
        "no attestation under .offsite/: {:?}",
        recs.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    for (p, bytes) in &recs {
        sweep.scan_bytes(&format!("secondary record {}", p.display()), bytes);
    }

    // Disk: everything offsite could have written — TMPDIR, HOME, the working directory, the
    // policy directory — except the secret files and render --to's file.
    let mut skip: Vec<PathBuf> = [SALT_FILE, PRIMARY_SECRET_FILE, SECONDARY_SECRET_FILE]
        .iter()
        .map(|f| env.dir.path().join(f))
        .collect();
    skip.push(rendered.clone());
    let mut left = Vec::new();
    for root in [
        env.tmp.path(),
        env.home.path(),
        env.work.path(),
        env.dir.path(),
    ] {
        files(root, &skip, &mut left);
    }
    assert!(left.len() >= 3, "expected metrics, attestation, policy");
    for (p, bytes) in &left {
        sweep.scan_bytes(&format!("file {}", p.display()), bytes);
    }

    // Positive control: the rendered config holds both crypt secrets, obscured, and the S3
    // keys in plain form (that file is the admin's own, 0600). The detector must see them.
    let control = std::fs::read_to_string(&rendered).unwrap();
    let seen = sweep.find(&control);
    for want in [
        "crypt password (obscured)",
        "crypt salt (obscured)",
        "secondary S3 secret (plain)",
    ] {
        assert!(
            seen.iter().any(|s| s == want),
            "detector missed {want}: {seen:?}"
        );
    }

    let scanned = *sweep.scanned.lock().unwrap();
    assert!(scanned > 50, "only {scanned} texts scanned");
    let leaks = sweep.leaks.into_inner().unwrap();
    let unique: BTreeSet<&String> = leaks.iter().collect();
    assert!(unique.is_empty(), "secrets leaked:\n{unique:#?}");
}
