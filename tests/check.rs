//! `offsite check` and `offsite init` against real policy files: every compliance rule tripped
//! once, malformed policies rejected with a located one-line error, and every shipped example
//! parsed. These contact no storage, so they need no rig.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

const PASSWORD: &str = "Zq8vT3mW9xK2pL7nR4sY6uB1cD5fG0hJ-pw";
const SALT: &str = "Hy3Nb7Vc1Xz5Lk9Jm2Qw4Er6Ty8Ui0Op-salt";
const KEY_SECRET: &str = "S3cretAccessKeyValueThatMustNeverPrint";

struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        let d = Dir {
            tmp: tempfile::tempdir().expect("tempdir"),
        };
        d.secret("password", PASSWORD);
        d.secret("salt", SALT);
        d.secret("key_id", "AKIAEXAMPLEKEYID");
        d.secret("secret_key", KEY_SECRET);
        d
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn secret(&self, name: &str, value: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// A compliant production-shaped policy; `edit` rewrites it.
    fn policy(&self, edit: impl Fn(String) -> String) -> PathBuf {
        let base = r#"version: 1
name: t-check
source:
  type: s3
  endpoint: https://s3.sto1.example.com
  region: sto1
  access_key_id: {file: key_id}
  secret_access_key: {file: secret_key}
destination:
  type: s3
  endpoint: https://s3.fra1.example.com
  region: fra1
  bucket: offsite-replica
  prefix: cluster-a
  access_key_id: {file: key_id}
  secret_access_key: {file: secret_key}
encryption:
  password: {file: password}
  salt: {file: salt}
buckets: [harbor, velero]
"#;
        let p = self.path().join("policy.yaml");
        std::fs::write(&p, edit(base.to_string())).unwrap();
        p
    }
}

fn offsite() -> Command {
    let mut c = Command::cargo_bin("offsite").unwrap();
    c.env("RUST_BACKTRACE", "0").env_remove("OFFSITE_CONFIG");
    c
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

#[track_caller]
fn check(policy: &Path) -> Run {
    let out = offsite()
        .arg("-c")
        .arg(policy)
        .arg("check")
        .output()
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(!all.contains("panicked"), "panic: {all}");
    for s in [PASSWORD, SALT, KEY_SECRET] {
        assert!(!all.contains(s), "secret printed: {all}");
    }
    run
}

#[track_caller]
fn check_json(policy: &Path) -> Value {
    let out = offsite()
        .arg("-c")
        .arg(policy)
        .args(["check", "--output", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

/// Assert the policy trips rule `id` with the expected severity, and the exit code.
#[track_caller]
fn trips(d: &Dir, edit: impl Fn(String) -> String, id: &str, severity: &str, code: i32) {
    let p = d.policy(edit);
    let run = check(&p);
    assert_eq!(
        run.code, code,
        "{id}: stdout={} stderr={}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains(id), "{id} not reported: {}", run.stdout);
    let doc = check_json(&p);
    assert_eq!(doc["exit_code"], code);
    let found = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["id"] == id && f["severity"] == severity && f["field"].is_string());
    assert!(found, "{id}/{severity} missing from {doc}");
}

#[test]
fn compliant_policy_passes() {
    let d = Dir::new();
    let run = check(&d.policy(|s| s));
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let doc = check_json(&d.policy(|s| s));
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["findings"].as_array().unwrap().len(), 0);
}

#[test]
fn c001_filename_encryption_not_standard() {
    let d = Dir::new();
    let e = |s: String| {
        s.replace(
            "salt: {file: salt}",
            "salt: {file: salt}\n  filename_encryption: obfuscate",
        )
    };
    trips(&d, e, "C001", "error", 3);
}

#[test]
fn c002_directory_names_in_clear() {
    let d = Dir::new();
    let e = |s: String| {
        s.replace(
            "salt: {file: salt}",
            "salt: {file: salt}\n  directory_name_encryption: false",
        )
    };
    trips(&d, e, "C002", "error", 3);
}

#[test]
fn c003_salt_equals_password() {
    let d = Dir::new();
    d.secret("salt2", PASSWORD);
    trips(
        &d,
        |s| s.replace("{file: salt}", "{file: salt2}"),
        "C003",
        "error",
        3,
    );
}

#[test]
fn c004_short_or_low_entropy_secret() {
    let d = Dir::new();
    d.secret("short", "tooShort123");
    trips(
        &d,
        |s| s.replace("{file: password}", "{file: short}"),
        "C004",
        "error",
        3,
    );
    d.secret("repeat", &"ab".repeat(20));
    trips(
        &d,
        |s| s.replace("{file: salt}", "{file: repeat}"),
        "C004",
        "error",
        3,
    );
}

#[test]
fn c005_inline_secret() {
    let d = Dir::new();
    let e = |s: String| {
        s.replace(
            "secret_access_key: {file: secret_key}\ndestination",
            "secret_access_key: inlineSecretValue123\ndestination",
        )
    };
    trips(&d, e, "C005", "error", 3);
    // Allowed: a warning, exit 0.
    let e = |s: String| {
        s.replace(
            "secret_access_key: {file: secret_key}\ndestination",
            "secret_access_key: inlineSecretValue123\ndestination",
        ) + "compliance: {allow_inline_secrets: true}\n"
    };
    trips(&d, e, "C005", "warning", 0);
}

#[test]
fn c006_plain_http_endpoint() {
    let d = Dir::new();
    trips(
        &d,
        |s| s.replace("https://s3.fra1", "http://s3.fra1"),
        "C006",
        "error",
        3,
    );
    // require_tls: false is itself a warning.
    let e = |s: String| {
        s.replace("https://s3.fra1", "http://s3.fra1") + "compliance: {require_tls: false}\n"
    };
    trips(&d, e, "C006", "warning", 0);
}

#[test]
fn c007_same_region() {
    let d = Dir::new();
    trips(
        &d,
        |s| s.replace("region: fra1", "region: sto1"),
        "C007",
        "error",
        3,
    );
}

#[test]
fn c008_region_not_allowed() {
    let d = Dir::new();
    let e = |s: String| s + "compliance: {allowed_destination_regions: [ams3]}\n";
    trips(&d, e, "C008", "error", 3);
}

#[test]
fn c009_forbidden_flags() {
    let d = Dir::new();
    for flag in [
        "--no-check-certificate",
        "-vv",
        "--s3-disable-checksum",
        "--max-delete=5",
        "-M",
        "--checksum",
        "--log-level=DEBUG",
    ] {
        let e = move |s: String| s + &format!("sync: {{extra_flags: [\"{flag}\"]}}\n");
        trips(&d, e, "C009", "error", 3);
    }
}

#[test]
fn c010_destination_is_a_source_bucket() {
    let d = Dir::new();
    let e = |s: String| {
        s.replace("https://s3.fra1.example.com", "https://s3.sto1.example.com")
            .replace("bucket: offsite-replica", "bucket: harbor")
    };
    trips(&d, e, "C010", "error", 3);
}

#[test]
fn c011_guard_disabled_warns() {
    let d = Dir::new();
    for g in [
        "key_canary: false",
        "refuse_empty_source: false",
        "max_delete_percent: 100",
    ] {
        let e = move |s: String| s + &format!("guards: {{{g}}}\n");
        // A warning, per policy.md: reported, exit 0.
        trips(&d, e, "C011", "warning", 0);
    }
}

#[test]
fn c012_secret_file_readable_by_others() {
    let d = Dir::new();
    let p = d.secret("loose", "Lq2Wz8Xc4Vb6Nm1As3Df5Gh7Jk9-loose-one");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    trips(
        &d,
        |s| s.replace("{file: password}", "{file: loose}"),
        "C012",
        "error",
        3,
    );
}

/// Malformed policies: exit 2 (or 3 where a rule applies), one line naming the location.
#[test]
fn malformed_policies_are_rejected_with_location() {
    let d = Dir::new();
    let big = "# padding\n".repeat(5_300_000); // ~50 MB
    type Edit = Box<dyn Fn(String) -> String>;
    let cases: Vec<(&str, Edit, i32, &str)> = vec![
        (
            "bad indentation",
            Box::new(|s| s.replace("  region: fra1", "     region: fra1")),
            2,
            "policy.yaml:",
        ),
        (
            "wrong type",
            Box::new(|s| s + "sync: {transfers: many}\n"),
            2,
            "sync.transfers",
        ),
        (
            "unknown key",
            Box::new(|s| s.replace("  prefix: cluster-a", "  prefix: cluster-a\n  prefx: x")),
            2,
            "destination.prefx: unknown field",
        ),
        (
            "missing required field",
            Box::new(|s| s.replace("  bucket: offsite-replica\n", "")),
            2,
            "destination.bucket: missing field",
        ),
        (
            "alias bomb",
            Box::new(|s| {
                let mut b = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
                for i in 1..9 {
                    b += &format!(
                        "a{i}: &a{i} [{}]\n",
                        vec![format!("*a{}", i - 1); 10].join(", ")
                    );
                }
                b + &s
            }),
            2,
            "policy.yaml:1:1",
        ),
        ("50 MB file", Box::new(move |s| s + &big), 2, "larger than"),
        ("empty file", Box::new(|_| String::new()), 2, "empty"),
        (
            "missing secret env",
            Box::new(|s| s.replace("{file: password}", "{env: OFFSITE_TEST_NOT_SET_ANYWHERE}")),
            2,
            "OFFSITE_TEST_NOT_SET_ANYWHERE is not set",
        ),
        (
            "missing secret file",
            Box::new(|s| s.replace("{file: password}", "{file: /nonexistent/pw}")),
            2,
            "/nonexistent/pw",
        ),
        (
            "version 2",
            Box::new(|s| s.replace("version: 1", "version: 2")),
            2,
            "policy.yaml:1:10: version: only version 1",
        ),
        (
            "newline inside endpoint",
            Box::new(|s| {
                s.replace(
                    "endpoint: https://s3.fra1.example.com",
                    "endpoint: \"https://s3.fra1.example.com\\n[evil]\\ntype = local\"",
                )
            }),
            2,
            "destination.endpoint: contains a control character",
        ),
        (
            "bad name",
            Box::new(|s| s.replace("name: t-check", "name: Prod_SC")),
            2,
            "name:",
        ),
        (
            "buckets empty",
            Box::new(|s| s.replace("buckets: [harbor, velero]", "buckets: []")),
            2,
            "buckets",
        ),
        (
            "bucket traversal",
            Box::new(|s| s.replace("buckets: [harbor, velero]", "buckets: [\"../etc\"]")),
            2,
            "not a valid bucket name",
        ),
        (
            "prefix traversal",
            Box::new(|s| s.replace("prefix: cluster-a", "prefix: a/../../b")),
            2,
            "destination.prefix",
        ),
        (
            "duplicate key",
            Box::new(|s| s.replace("name: t-check", "name: t-check\nname: again")),
            2,
            "policy.yaml:",
        ),
        (
            "tab indentation",
            Box::new(|s| s.replace("  region: fra1", "\tregion: fra1")),
            2,
            "policy.yaml:",
        ),
        (
            "not a mapping",
            Box::new(|_| "- just\n- a list\n".into()),
            2,
            "policy.yaml:",
        ),
    ];
    for (what, edit, code, needle) in cases {
        let p = d.policy(edit);
        let run = check(&p);
        assert_eq!(run.code, code, "{what}: {}{}", run.stdout, run.stderr);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{what}: one-line error expected: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains(needle),
            "{what}: `{needle}` not in: {}",
            run.stderr
        );
        // The JSON document is still printed, with the error.
        let doc = check_json(&p);
        assert_eq!(doc["exit_code"], code, "{what}");
        assert_eq!(doc["status"], "invalid", "{what}");
        assert!(doc["error"].as_str().unwrap().contains(needle), "{what}");
    }
    // Non-UTF-8 bytes.
    let p = d.path().join("policy.yaml");
    std::fs::write(&p, b"version: 1\nname: \xff\xfe\n").unwrap();
    let run = check(&p);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("policy.yaml:2:7: policy file is not valid UTF-8"),
        "{}",
        run.stderr
    );
}

#[test]
fn windows_line_endings_and_bom_are_accepted() {
    let d = Dir::new();
    let p = d.policy(|s| format!("\u{feff}{}", s.replace('\n', "\r\n")));
    let run = check(&p);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn init_writes_a_policy_that_checks() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("site");
    offsite()
        .args(["init", "--dir"])
        .arg(&dir)
        .assert()
        .success();
    for f in ["password", "salt"] {
        let p = dir.join("secrets").join(f);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
        let v = std::fs::read_to_string(&p).unwrap();
        assert!(v.trim_end().len() >= 32, "{f} too short");
    }
    let pw = std::fs::read_to_string(dir.join("secrets/password")).unwrap();
    let salt = std::fs::read_to_string(dir.join("secrets/salt")).unwrap();
    assert_ne!(pw, salt);
    let run = check(&dir.join("offsite.yaml"));
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains(pw.trim_end()));
    // A second init refuses to overwrite, and a second run generates different secrets.
    offsite().args(["init", "--dir"]).arg(&dir).assert().code(2);
    let dir2 = d.path().join("site2");
    offsite()
        .args(["init", "--dir"])
        .arg(&dir2)
        .assert()
        .success();
    assert_ne!(
        pw,
        std::fs::read_to_string(dir2.join("secrets/password")).unwrap()
    );
}

/// Every shipped example parses and passes compliance with the secrets it documents.
#[test]
fn every_example_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let d = Dir::new();
        // The S3 example documents secrets mounted under /run/secrets/offsite/: lay them out
        // in a temp dir and point the copy there.
        let mount = d.path().join("mnt");
        for (sub, name, value) in [
            ("primary", "access_key_id", "AKIAPRIMARY"),
            ("primary", "secret_access_key", KEY_SECRET),
            ("secondary", "access_key_id", "AKIASECONDARY"),
            ("secondary", "secret_access_key", KEY_SECRET),
            ("crypt", "password", PASSWORD),
            ("crypt", "salt", SALT),
        ] {
            std::fs::create_dir_all(mount.join(sub)).unwrap();
            let p = mount.join(sub).join(name);
            std::fs::write(&p, value).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/run/secrets/offsite", mount.to_str().unwrap());
        let copy = root.join(format!(
            ".check-{}-{}",
            std::process::id(),
            path.file_name().unwrap().to_str().unwrap()
        ));
        std::fs::write(&copy, text).unwrap();
        let out = offsite()
            .arg("-c")
            .arg(&copy)
            .arg("check")
            .env("OFFSITE_DEMO_PASSWORD", PASSWORD)
            .env("OFFSITE_DEMO_SALT", SALT)
            .output()
            .unwrap();
        std::fs::remove_file(&copy).unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(seen >= 2, "examples/ should hold at least two policies");
}
