//! The hostile-policy corpus (issue 8, item 4; docs/reliability.md): every file in
//! `tests/fixtures/hostile-policies/`, and the few generated here because they are large or
//! binary (a 10 MB string, an alias bomb, deep nesting, NUL, invalid UTF-8, UTF-16, BOM + CRLF,
//! a FIFO as a secret), run through the real binary: `offsite check`, `offsite plan` and
//! `offsite render --to`.
//!
//! Each file starts with `# Attack: ...` and `# Expect: check=N plan=N render=N "needle"`, and
//! may set secret file contents with `# Secret: NAME = VALUE` (`\n`, `\r`, `\t`, `\e`, `\\`
//! escapes). An exit 2 must be one error line, free of control characters, that contains the
//! needle (the field or location); an exit 3 must report the needle (a rule id). Whenever a
//! config is rendered (plan's redacted one, render's real one), rclone must read exactly the
//! sections, keys and values the policy asked for (`rclone_conf::check`). Nothing may panic
//! or hang (every command has a 30 s limit).

mod rclone_conf;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;
use offsite::render::Secrets;
use serde_json::Value;

const PASSWORD: &str = "Zq8vT3mW9xK2pL7nR4sY6uB1cD5fG0hJ-pw";
const SALT: &str = "Hy3Nb7Vc1Xz5Lk9Jm2Qw4Er6Ty8Ui0Op-salt";
const KEY_ID: &str = "AKIAEXAMPLEKEYID";
const KEY_SECRET: &str = "S3cretAccessKeyValueThatMustNeverPrint";

/// A compliant s3 → s3 policy, the start of the generated cases.
const BASE: &str = "version: 1
name: hostile
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
";

#[derive(Debug)]
struct Expect {
    check: i32,
    plan: i32,
    render: i32,
    needle: Option<String>,
}

struct Case {
    name: String,
    text: Vec<u8>,
    expect: Expect,
    secrets: Vec<(String, String)>,
    /// A secret file that is a FIFO instead.
    fifo: Option<&'static str>,
}

fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('e') => out.push('\x1b'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn parse_expect(line: &str) -> Expect {
    let (codes, needle) = match line.split_once('"') {
        Some((c, n)) => (c, Some(n.trim_end_matches('"').to_string())),
        None => (line, None),
    };
    let code = |name: &str| -> i32 {
        codes
            .split_whitespace()
            .find_map(|t| t.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("`# Expect:` lacks {name}=N: {line}"))
            .parse()
            .unwrap()
    };
    Expect {
        check: code("check"),
        plan: code("plan"),
        render: code("render"),
        needle,
    }
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile-policies");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read(&path).unwrap();
            let head = String::from_utf8_lossy(&text);
            let mut lines = head.lines();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            assert!(
                lines.next().is_some_and(|l| l.starts_with("# Attack: ")),
                "{name}: the first line must say `# Attack: ...`"
            );
            let expect = parse_expect(
                lines
                    .next()
                    .and_then(|l| l.strip_prefix("# Expect: "))
                    .unwrap_or_else(|| panic!("{name}: the second line must be `# Expect: ...`")),
            );
            let secrets = lines
                .map_while(|l| l.strip_prefix("# Secret: "))
                .map(|l| {
                    let (k, v) = l.split_once(" = ").expect("# Secret: NAME = VALUE");
                    (k.to_string(), unescape(v))
                })
                .collect();
            Case {
                name,
                text,
                expect,
                secrets,
                fifo: None,
            }
        })
        .collect()
}

fn generated() -> Vec<Case> {
    let case = |name: &str, text: Vec<u8>, expect: &str| Case {
        name: name.to_string(),
        text,
        expect: parse_expect(expect),
        secrets: vec![],
        fifo: None,
    };
    let with = |from: &str, to: &str| BASE.replacen(from, to, 1).into_bytes();
    // Billion laughs: 10 levels of 10 aliases each (10^10 strings if expanded).
    let mut bomb = String::from("  - &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        bomb += &format!("  - &a{i} [{refs}]\n");
    }
    let crlf = |s: &str| {
        let mut b = b"\xEF\xBB\xBF".to_vec();
        b.extend(s.replace('\n', "\r\n").into_bytes());
        b
    };
    let utf16: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain(BASE.encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    let mut cases = vec![
        case(
            "gen-10mb-string",
            with(
                "name: hostile",
                &format!("name: \"{}\"", "A".repeat(10_000_000)),
            ),
            r#"check=2 plan=2 render=2 "larger than 1048576 bytes""#,
        ),
        case(
            "gen-alias-bomb",
            with("buckets: [harbor, velero]", &format!("buckets:\n{bomb}")),
            r#"check=2 plan=2 render=2 "policy.yaml:""#,
        ),
        case(
            "gen-alias-bomb-options",
            with(
                "  bucket: offsite-replica",
                &format!("  options:\n    acl: *a9\n  bucket: offsite-replica\nx-anchors:\n{bomb}"),
            ),
            r#"check=2 plan=2 render=2 "policy.yaml:""#,
        ),
        case(
            "gen-deep-nesting",
            with(
                "buckets: [harbor, velero]",
                &format!("buckets: {}{}", "[".repeat(100_000), "]".repeat(100_000)),
            ),
            r#"check=2 plan=2 render=2 "policy.yaml:""#,
        ),
        case(
            "gen-nul-byte",
            with("name: hostile", "name: host\0ile"),
            r#"check=2 plan=2 render=2 "control character""#,
        ),
        case(
            "gen-invalid-utf8",
            [BASE.as_bytes(), b"# \xff\xfe\n"].concat(),
            r#"check=2 plan=2 render=2 "not valid UTF-8""#,
        ),
        case(
            "gen-utf16",
            utf16,
            r#"check=2 plan=2 render=2 "not valid UTF-8""#,
        ),
        case("gen-bom-crlf", crlf(BASE), "check=0 plan=0 render=0"),
        case(
            "gen-lone-cr",
            BASE.replace('\n', "\r").into_bytes(),
            "check=0 plan=0 render=0",
        ),
        case(
            "gen-empty",
            b"# nothing but a comment\r\n\n".to_vec(),
            r#"check=2 plan=2 render=2 "empty""#,
        ),
        case(
            "gen-option-value-at-limit",
            with(
                "  bucket: offsite-replica",
                &format!(
                    "  options: {{description: {}}}\n  bucket: offsite-replica",
                    "d".repeat(4096)
                ),
            ),
            "check=0 plan=0 render=0",
        ),
        case(
            "gen-option-value-over-limit",
            with(
                "  bucket: offsite-replica",
                &format!(
                    "  options: {{description: {}}}\n  bucket: offsite-replica",
                    "d".repeat(4097)
                ),
            ),
            r#"check=2 plan=2 render=2 "destination.options.description""#,
        ),
    ];
    let mut big_secret = case(
        "gen-secret-70k",
        BASE.as_bytes().to_vec(),
        r#"check=2 plan=2 render=2 "source.secret_access_key""#,
    );
    big_secret
        .secrets
        .push(("secret_key".into(), "k".repeat(70_000)));
    cases.push(big_secret);
    let mut fifo = case(
        "gen-fifo-secret",
        BASE.as_bytes().to_vec(),
        r#"check=2 plan=2 render=2 "not a regular file""#,
    );
    fifo.fifo = Some("salt");
    cases.push(fifo);
    cases
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn offsite(dir: &Path, args: &[&str]) -> Out {
    let out = Command::cargo_bin("offsite")
        .unwrap()
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1")
        .env_remove("OFFSITE_CONFIG")
        .args(["-c", "policy.yaml"])
        .args(args)
        .timeout(Duration::from_secs(30))
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs one case; returns what went wrong, if anything.
fn run(case: &Case) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut secrets = vec![
        ("password", PASSWORD.to_string()),
        ("salt", SALT.to_string()),
        ("key_id", KEY_ID.to_string()),
        ("secret_key", KEY_SECRET.to_string()),
    ];
    for (k, v) in &case.secrets {
        let slot = secrets
            .iter_mut()
            .find(|(name, _)| name == k)
            .unwrap_or_else(|| panic!("{}: no secret file {k}", case.name));
        slot.1 = v.clone();
    }
    for (name, value) in &secrets {
        let p = dir.join(name);
        if case.fifo == Some(*name) {
            nix::unistd::mkfifo(
                &p,
                nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            )
            .unwrap();
            continue;
        }
        std::fs::write(&p, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(dir.join("policy.yaml"), &case.text).unwrap();
    let e = &case.expect;
    let check = offsite(dir, &["check"]);
    let plan = offsite(dir, &["plan", "--output", "json"]);
    let render = offsite(dir, &["render", "--to", "out.conf"]);
    let mut problems = Vec::new();
    for (cmd, out, want) in [
        ("check", &check, e.check),
        ("plan", &plan, e.plan),
        ("render", &render, e.render),
    ] {
        let all = format!("{}{}", out.stdout, out.stderr);
        if all.contains("panicked") || all.contains("RUST_BACKTRACE") {
            problems.push(format!("{cmd} panicked: {all}"));
        }
        for s in [PASSWORD, SALT, KEY_SECRET] {
            if all.contains(s) {
                problems.push(format!("{cmd} printed a secret"));
            }
        }
        if out.code != want {
            problems.push(format!(
                "{cmd} exited {}, expected {want}: {}{}",
                out.code,
                out.stderr,
                if out.stdout.len() < 2000 {
                    &out.stdout
                } else {
                    ""
                }
            ));
            continue;
        }
        if want == 2 {
            let errors: Vec<&str> = out
                .stderr
                .lines()
                .filter(|l| l.starts_with(&format!("offsite {cmd}: error: ")))
                .collect();
            let others: Vec<&str> = out
                .stderr
                .lines()
                .filter(|l| !l.starts_with("offsite: warning") && !errors.contains(l))
                .collect();
            if errors.len() != 1 || !others.is_empty() {
                problems.push(format!("{cmd}: not one error line: {:?}", out.stderr));
            }
            let line = errors.first().copied().unwrap_or("");
            if let Some(c) = line.chars().find(|c| c.is_control()) {
                problems.push(format!("{cmd}: control character {c:?} in {line:?}"));
            }
            if let Some(n) = &e.needle {
                if !line.contains(n.as_str()) {
                    problems.push(format!("{cmd}: error does not name {n:?}: {line}"));
                }
            }
            if e.check == 2 && !line.contains("policy.yaml") {
                problems.push(format!("{cmd}: parse error does not name the file: {line}"));
            }
        }
        if want == 3 {
            if let Some(n) = &e.needle {
                if !all.contains(n.as_str()) {
                    problems.push(format!("{cmd}: {n} not reported"));
                }
            }
        }
    }
    // What was rendered must be exactly what the policy asked for.
    if plan.code == 0 || plan.code == 3 {
        let policy = offsite::policy::load(&dir.join("policy.yaml"))
            .map_err(|e| format!("plan rendered a policy the library refuses: {e:#}"))?;
        let doc: Value = serde_json::from_str(&plan.stdout)
            .map_err(|e| format!("plan --output json: {e}: {}", plan.stdout))?;
        let conf = doc["rclone_conf"].as_str().unwrap_or("");
        if let Err(err) = rclone_conf::check(conf, &policy, &Secrets::Redacted) {
            problems.push(format!("plan's config: {err}\n{conf}"));
        }
        let out = dir.join("out.conf");
        if render.code == 0 {
            let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
            if mode != 0o600 {
                problems.push(format!("render wrote mode {mode:o}"));
            }
            let conf = std::fs::read_to_string(&out).unwrap();
            if let Err(err) = rclone_conf::check(&conf, &policy, &Secrets::Real) {
                problems.push(format!("render's config: {err}"));
            }
        }
    }
    if render.code != 0 && dir.join("out.conf").exists() {
        problems.push("render failed but left a config behind".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n  "))
    }
}

#[test]
fn the_corpus_is_rejected_or_rendered_safely() {
    let corpus = corpus();
    assert!(corpus.len() >= 30, "only {} corpus files", corpus.len());
    let cases: Vec<Case> = corpus.into_iter().chain(generated()).collect();
    // Two at a time: each case starts the binary three times.
    let failures: Vec<String> = std::thread::scope(|s| {
        let halves: [Vec<&Case>; 2] = [0, 1].map(|k| cases.iter().skip(k).step_by(2).collect());
        let h = halves.map(|part| {
            s.spawn(move || {
                part.iter()
                    .filter_map(|c| run(c).err().map(|e| format!("{}: {e}", c.name)))
                    .collect::<Vec<_>>()
            })
        });
        h.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
