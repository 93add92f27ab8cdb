//! `offsite manifest kubernetes`: every rendered stream is validated with kubernetes-validate
//! (PyPI; `--strict`, against the oldest and newest Kubernetes this project claims), and the
//! tests check what an admin would: the hardening of the CronJob, the Indexed Job for shards,
//! the Secret skeleton and that every file lands at the path the policy names, that no secret
//! value reaches the output, and the exit codes. A golden file pins the manifests of
//! `examples/s3-sto1-to-fra1.yaml`. These contact no storage, so they need no rig.
//!
//! kubernetes-validate comes from `OFFSITE_TEST_KUBERNETES_VALIDATE` (set by scripts/test), else
//! `.tools/py/bin/kubernetes-validate`; without either the tests fail (they never skip).
//!
//! Update the golden files after an intended change with
//! `OFFSITE_UPDATE_GOLDEN=1 cargo test --test manifest golden`, and review the diff.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde::Deserialize;
use serde_json::Value;

/// The oldest Kubernetes with `backoffLimitPerIndex` GA, and the newest kubernetes-validate
/// 1.37.0 knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.33.0", "1.37.0"];

const PASSWORD: &str = "Zq8vT3mW9xK2pL7nR4sY6uB1cD5fG0hJ-manifest-pw";
const SALT: &str = "Hy3Nb7Vc1Xz5Lk9Jm2Qw4Er6Ty8Ui0Op-manifest-salt";
const KEY_ID: &str = "AKIAMANIFESTKEYIDNEVERPRINTED";
const KEY_SECRET: &str = "S3cretAccessKeyValueThatMustNeverAppearInAManifest";
const ENV_KEY_ID: &str = "ENVKEYIDVALUETHATMUSTNEVERAPPEAR";
const ENV_SECRET: &str = "EnvSecretAccessKeyValueThatMustNeverAppear";
const SECRETS: &[&str] = &[PASSWORD, SALT, KEY_ID, KEY_SECRET, ENV_KEY_ID, ENV_SECRET];

/// Absolute `{file:}` references, the layout of the production example, plus two `{env:}`.
const ABSOLUTE: &str = r#"version: 1
name: t-manifest
source:
  type: s3
  endpoint: https://s3.sto1.example.com
  region: sto1
  access_key_id: {env: PRIMARY_ACCESS_KEY_ID}
  secret_access_key: {file: /run/secrets/offsite/primary/secret_access_key}
destination:
  type: s3
  endpoint: https://s3.fra1.example.com
  region: fra1
  bucket: offsite-replica
  access_key_id: {file: /run/secrets/offsite/secondary/access_key_id}
  secret_access_key: {env: SECONDARY_SECRET_ACCESS_KEY}
encryption:
  password: {file: /run/secrets/offsite/crypt/password}
  salt: {file: /run/secrets/offsite/crypt/salt}
buckets: [harbor, velero, thanos]
"#;

/// Relative `{file:}` references (as `offsite init` writes them), one file named twice.
const RELATIVE: &str = r#"version: 1
name: t-manifest-rel
source:
  type: s3
  endpoint: https://s3.sto1.example.com
  region: sto1
  access_key_id: {file: secrets/key_id}
  secret_access_key: {file: secrets/secret_key}
destination:
  type: s3
  endpoint: https://s3.fra1.example.com
  region: fra1
  bucket: offsite-replica
  access_key_id: {file: secrets/key_id}
  secret_access_key: {file: ./secrets/../secrets/secret_key}
encryption:
  password: {file: secrets/password}
  salt: {file: secrets/salt}
buckets: [harbor]
"#;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    /// A policy directory whose secret files hold the distinctive values above (0600), so a
    /// leak of any of them would show.
    fn new() -> Dir {
        let d = Dir {
            tmp: tempfile::tempdir().expect("tempdir"),
        };
        std::fs::create_dir(d.path().join("secrets")).unwrap();
        for (name, value) in [
            ("password", PASSWORD),
            ("salt", SALT),
            ("key_id", KEY_ID),
            ("secret_key", KEY_SECRET),
        ] {
            d.secret(&format!("secrets/{name}"), value);
        }
        d
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn secret(&self, rel: &str, value: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn policy(&self, text: &str) -> PathBuf {
        let p = self.path().join("offsite.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn offsite() -> Command {
    let mut c = Command::cargo_bin("offsite").unwrap();
    c.env("RUST_BACKTRACE", "0")
        .env_remove("OFFSITE_CONFIG")
        // Set, so that a command that wrongly resolved them could leak them.
        .env("PRIMARY_ACCESS_KEY_ID", ENV_KEY_ID)
        .env("SECONDARY_SECRET_ACCESS_KEY", ENV_SECRET);
    c
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `offsite -c POLICY [--output json] manifest kubernetes ARGS`; asserts no panic and that no
/// secret value appears in stdout or stderr.
#[track_caller]
fn manifest(policy: &Path, json: bool, args: &[&str]) -> Out {
    let mut c = offsite();
    c.arg("-c").arg(policy);
    if json {
        c.args(["--output", "json"]);
    }
    let out = c
        .args(["manifest", "kubernetes"])
        .args(args)
        .output()
        .unwrap();
    let o = Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(!all.contains("panicked"), "panic: {all}");
    for s in SECRETS {
        assert!(!all.contains(s), "secret value {s} in the output: {all}");
    }
    o
}

/// Render in text mode, expect success, validate, return the YAML and its documents.
#[track_caller]
fn rendered(policy: &Path, args: &[&str]) -> (String, Vec<Value>) {
    let o = manifest(policy, false, args);
    assert_eq!(o.code, 0, "stdout={} stderr={}", o.stdout, o.stderr);
    let docs = documents(&o.stdout);
    validate(&o.stdout, docs.len());
    (o.stdout, docs)
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("the stream parses as YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn validator() -> PathBuf {
    if let Some(p) = std::env::var_os("OFFSITE_TEST_KUBERNETES_VALIDATE").filter(|p| !p.is_empty())
    {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/py/bin/kubernetes-validate");
    assert!(
        p.exists(),
        "kubernetes-validate not found: set OFFSITE_TEST_KUBERNETES_VALIDATE or run scripts/test (it installs it into .tools/py)"
    );
    p
}

/// kubernetes-validate, strict, against every version in [`KUBERNETES_VERSIONS`]. It only warns
/// (exit 0) for a kind it has no schema for, so every document must be reported as passed.
#[track_caller]
fn validate(yaml: &str, count: usize) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), yaml).unwrap();
    let mut c = std::process::Command::new(validator());
    c.arg("--strict");
    for v in KUBERNETES_VERSIONS {
        c.args(["-k", v]);
    }
    let out = c
        .arg(f.path())
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{text}\n{yaml}"
    );
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed "))
        .count();
    assert_eq!(
        passed,
        count * KUBERNETES_VERSIONS.len(),
        "not every document validated:\n{text}"
    );
    assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {docs:?}"))
}

fn job_spec(docs: &[Value]) -> &Value {
    &of_kind(docs, "CronJob")["spec"]["jobTemplate"]["spec"]
}

fn pod_spec(docs: &[Value]) -> &Value {
    &job_spec(docs)["template"]["spec"]
}

fn container<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    let spec = pod_spec(docs);
    spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn volume<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    pod_spec(docs)["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The init container's `install` triples: destination path -> (mode, staged source).
fn installs(docs: &[Value]) -> BTreeMap<String, (String, String)> {
    let cmd = strings(&container(docs, "install-files")["command"]);
    assert_eq!(&cmd[..2], &["/bin/sh", "-c"]);
    let args = &cmd[4..];
    assert_eq!(args.len() % 3, 0, "{cmd:?}");
    args.chunks(3)
        .map(|t| (t[2].to_string(), (t[0].to_string(), t[1].to_string())))
        .collect()
}

/// The container's mount that holds `path` (the deepest), as (volume name, mountPath, readOnly).
fn mount_of<'a>(c: &'a Value, path: &str) -> Option<(&'a str, &'a str, bool)> {
    c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            let mp = m["mountPath"].as_str()?;
            Path::new(path)
                .starts_with(mp)
                .then(|| (m["name"].as_str().unwrap(), mp, m["readOnly"] == true))
        })
        .max_by_key(|(_, mp, _)| mp.len())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn one_pod_cronjob_is_hardened_and_valid() {
    let d = Dir::new();
    let (_, docs) = rendered(&d.policy(ABSOLUTE), &[]);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Secret", "CronJob"]);
    for doc in &docs {
        assert_eq!(doc["metadata"]["namespace"], "offsite");
    }
    let cron = of_kind(&docs, "CronJob");
    assert_eq!(cron["metadata"]["name"], "offsite-t-manifest");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(cron["spec"]["schedule"], "17 3 * * *");
    assert_eq!(cron["spec"]["timeZone"], "Etc/UTC");
    let job = job_spec(&docs);
    assert_eq!(job["backoffLimit"], 0);
    assert_eq!(job["activeDeadlineSeconds"], 21600);
    assert!(job.get("completionMode").is_none(), "{job}");
    assert!(job.get("parallelism").is_none(), "{job}");
    let pod = pod_spec(&docs);
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["enableServiceLinks"], false);
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() >= 30);
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert!(psc["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    for name in ["offsite", "install-files"] {
        let c = container(&docs, name);
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["privileged"], false, "{name}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
        for k in ["requests", "limits"] {
            for r in ["cpu", "memory"] {
                assert!(c["resources"][k][r].is_string(), "{name} {k}.{r}");
            }
        }
    }
    let main = container(&docs, "offsite");
    assert_eq!(
        main["image"],
        concat!("localhost/offsite:", env!("CARGO_PKG_VERSION"))
    );
    let args = strings(&main["args"]);
    assert_eq!(
        args,
        ["-c", "/etc/offsite/offsite.yaml", "--output", "json", "run"]
    );
    // TMPDIR is a writable, memory-backed emptyDir.
    let env: BTreeMap<&str, &Value> = main["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    let tmpdir = env["TMPDIR"]["value"].as_str().unwrap();
    let (vol, at, ro) = mount_of(main, tmpdir).expect("TMPDIR is mounted");
    assert_eq!((at, ro), (tmpdir, false));
    assert_eq!(volume(&docs, vol)["emptyDir"]["medium"], "Memory");
    // The policy: a ConfigMap mounted read-only where -c points.
    let (vol, _, ro) = mount_of(main, args[1]).unwrap();
    assert!(ro);
    let cm = &volume(&docs, vol)["configMap"];
    assert_eq!(cm["name"], of_kind(&docs, "ConfigMap")["metadata"]["name"]);
    assert_eq!(
        of_kind(&docs, "ConfigMap")["data"]["offsite.yaml"],
        ABSOLUTE
    );
}

#[test]
fn shards_make_the_job_indexed() {
    let d = Dir::new();
    let (_, docs) = rendered(&d.policy(ABSOLUTE), &["--shards", "3"]);
    let job = job_spec(&docs);
    assert_eq!(job["completionMode"], "Indexed");
    assert_eq!(job["completions"], 3);
    assert_eq!(job["parallelism"], 3);
    // One shard failing must not stop the others: per-index limit, no global one.
    assert_eq!(job["backoffLimitPerIndex"], 0);
    assert!(job.get("backoffLimit").is_none(), "{job}");
    assert_eq!(pod_spec(&docs)["restartPolicy"], "Never");
    let args = strings(&container(&docs, "offsite")["args"]);
    let i = args.iter().position(|a| *a == "run").unwrap();
    assert_eq!(&args[i..], ["run", "--shards", "3"]);
    // Kubernetes sets JOB_COMPLETION_INDEX itself; the manifest must not override it.
    let env = &container(&docs, "offsite")["env"];
    assert!(!env.to_string().contains("JOB_COMPLETION_INDEX"), "{env}");
    assert_eq!(
        of_kind(&docs, "CronJob")["spec"]["concurrencyPolicy"],
        "Forbid"
    );
}

#[test]
fn secret_skeleton_and_mounts_follow_the_policy_refs() {
    let d = Dir::new();
    let (_, docs) = rendered(&d.policy(ABSOLUTE), &[]);
    let secret = of_kind(&docs, "Secret");
    let data = secret["stringData"].as_object().unwrap();
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "PRIMARY_ACCESS_KEY_ID",
            "SECONDARY_SECRET_ACCESS_KEY",
            "destination.access_key_id",
            "encryption.password",
            "encryption.salt",
            "source.secret_access_key",
        ]
    );
    assert!(data.values().all(|v| v == ""), "{data:?}");
    assert!(secret.get("data").is_none());

    // Every {file:} lands at exactly its path, installed 0400 from the Secret key.
    let installs = installs(&docs);
    let expected = [
        (
            "/run/secrets/offsite/primary/secret_access_key",
            "source.secret_access_key",
        ),
        (
            "/run/secrets/offsite/secondary/access_key_id",
            "destination.access_key_id",
        ),
        ("/run/secrets/offsite/crypt/password", "encryption.password"),
        ("/run/secrets/offsite/crypt/salt", "encryption.salt"),
    ];
    assert_eq!(installs.len(), expected.len(), "{installs:?}");
    let init = container(&docs, "install-files");
    let main = container(&docs, "offsite");
    let staging = volume(&docs, "staging");
    let items: BTreeMap<&str, &str> = staging["projected"]["sources"][0]["secret"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["path"].as_str().unwrap(), i["key"].as_str().unwrap()))
        .collect();
    assert_eq!(
        staging["projected"]["sources"][0]["secret"]["name"],
        secret["metadata"]["name"]
    );
    for (path, key) in expected {
        let (mode, src) = &installs[path];
        assert_eq!(mode, "0400", "{path}");
        // The source is the staged Secret key.
        let (svol, smount, _) = mount_of(init, src).unwrap();
        assert_eq!(svol, "staging");
        assert_eq!(items[&src[smount.len() + 1..]], key, "{path}");
        // The destination is on a memory-backed emptyDir that the init container writes and
        // the offsite container mounts read-only at the same path.
        let (ivol, iat, iro) = mount_of(init, path).unwrap();
        let (mvol, mat, mro) = mount_of(main, path).unwrap();
        assert_eq!((ivol, iat), (mvol, mat), "{path}");
        assert!(!iro && mro, "{path}");
        assert_eq!(
            volume(&docs, mvol)["emptyDir"]["medium"],
            "Memory",
            "{path}"
        );
        assert_eq!(Path::new(path).parent().unwrap(), Path::new(mat), "{path}");
    }
    // The staged files are never visible to offsite itself.
    assert!(mount_of(main, "/offsite-staging/x").is_none());
    // {env:} refs: from the Secret, under the same name.
    for name in ["PRIMARY_ACCESS_KEY_ID", "SECONDARY_SECRET_ACCESS_KEY"] {
        let e = main["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no env {name}"));
        assert_eq!(
            e["valueFrom"]["secretKeyRef"]["name"],
            secret["metadata"]["name"]
        );
        assert_eq!(e["valueFrom"]["secretKeyRef"]["key"], name);
    }
}

#[test]
fn relative_refs_land_next_to_the_policy() {
    let d = Dir::new();
    let (_, docs) = rendered(&d.policy(RELATIVE), &[]);
    let installs = installs(&docs);
    let secret = of_kind(&docs, "Secret");
    let mut keys: Vec<&str> = secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    // One key per file: secrets/key_id serves both sides, and ./secrets/../secrets/secret_key
    // is secrets/secret_key.
    assert_eq!(
        keys,
        [
            "encryption.password",
            "encryption.salt",
            "source.access_key_id",
            "source.secret_access_key",
        ]
    );
    for p in ["key_id", "secret_key", "password", "salt"] {
        let path = format!("/etc/offsite/secrets/{p}");
        assert_eq!(installs[&path].0, "0400", "{path}");
    }
    // The policy's directory holds secrets, so it is an emptyDir and the init container puts
    // the policy there too (a ConfigMap mount could not have the secrets inside it).
    let (mode, src) = &installs["/etc/offsite/offsite.yaml"];
    assert_eq!(mode, "0444");
    let staging = &volume(&docs, "staging")["projected"]["sources"];
    assert!(
        staging
            .to_string()
            .contains("offsite-t-manifest-rel-policy"),
        "{staging}"
    );
    assert!(src.starts_with("/offsite-staging/"));
    let main = container(&docs, "offsite");
    let (vol, at, ro) = mount_of(main, "/etc/offsite/offsite.yaml").unwrap();
    assert_eq!((at, ro), ("/etc/offsite", true));
    assert_eq!(volume(&docs, vol)["emptyDir"]["medium"], "Memory");
    assert_eq!(main["workingDir"], "/etc/offsite");
    assert_eq!(
        of_kind(&docs, "ConfigMap")["data"]["offsite.yaml"],
        RELATIVE
    );
}

/// Run the init container's own command (with the pod paths moved under a temp dir) on staged
/// files as Kubernetes presents them with fsGroup (0440), then `offsite check` the result: the
/// copies must pass C012 where the staged files fail it.
#[test]
fn init_container_files_pass_c012() {
    let d = Dir::new();
    let (_, docs) = rendered(&d.policy(ABSOLUTE), &[]);
    let cmd = strings(&container(&docs, "install-files")["command"]);
    let pod = tempfile::tempdir().unwrap();
    let moved = |p: &str| pod.path().join(p.trim_start_matches('/'));
    for m in container(&docs, "install-files")["volumeMounts"]
        .as_array()
        .unwrap()
    {
        let dir = moved(m["mountPath"].as_str().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let values: BTreeMap<&str, &str> = [
        ("source.secret_access_key", KEY_SECRET),
        ("destination.access_key_id", KEY_ID),
        ("encryption.password", PASSWORD),
        ("encryption.salt", SALT),
    ]
    .into();
    for (key, value) in &values {
        let p = moved(&format!("/offsite-staging/{key}"));
        std::fs::write(&p, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o440)).unwrap();
    }
    let args: Vec<String> = cmd[4..]
        .chunks(3)
        .flat_map(|t| {
            [
                t[0].to_string(),
                moved(t[1]).display().to_string(),
                moved(t[2]).display().to_string(),
            ]
        })
        .collect();
    let st = std::process::Command::new(cmd[0])
        .args(&cmd[1..4])
        .args(&args)
        .status()
        .unwrap();
    assert!(st.success(), "the init command failed");
    for (dst, (_, src)) in installs(&docs) {
        let meta = std::fs::metadata(moved(&dst)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400, "{dst}");
        assert_eq!(
            std::fs::read(moved(&dst)).unwrap(),
            std::fs::read(moved(&src)).unwrap()
        );
    }
    let check = |policy: &str| -> Value {
        let p = d.path().join("check.yaml");
        std::fs::write(&p, policy).unwrap();
        let out = offsite()
            .arg("-c")
            .arg(&p)
            .args(["--output", "json", "check"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let copied = ABSOLUTE.replace("/run/", &format!("{}/run/", pod.path().display()));
    let doc = check(&copied);
    assert_eq!(doc["exit_code"], 0, "{doc}");
    // Control: the staged 0440 file, as fsGroup leaves it, is refused by C012.
    let staged = copied.replace(
        &moved("/run/secrets/offsite/crypt/salt")
            .display()
            .to_string(),
        &moved("/offsite-staging/encryption.salt")
            .display()
            .to_string(),
    );
    let doc = check(&staged);
    assert_eq!(doc["exit_code"], 3, "{doc}");
    assert!(doc["findings"].to_string().contains("C012"), "{doc}");
}

#[test]
fn no_secret_value_reaches_the_output() {
    let d = Dir::new();
    // Relative refs: the files exist here with the distinctive values; and both env
    // variables are set. `manifest` (which asserts it) must print none of them.
    for policy in [RELATIVE, ABSOLUTE] {
        let p = d.policy(policy);
        for shards in ["1", "3"] {
            for json in [false, true] {
                let o = manifest(&p, json, &["--shards", shards]);
                assert_eq!(o.code, 0, "{}", o.stderr);
            }
        }
    }
}

#[test]
fn json_output_is_one_document_matching_the_text() {
    let d = Dir::new();
    let p = d.policy(ABSOLUTE);
    let text = manifest(&p, false, &["--shards", "2"]).stdout;
    let o = manifest(&p, true, &["--shards", "2"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc: Value = serde_json::from_str(&o.stdout).expect("one JSON document on stdout");
    assert_eq!(doc["command"], "manifest");
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["exit_code"], 0);
    assert_eq!(doc["policy"], "t-manifest");
    assert_eq!(doc["yaml"], text.as_str());
    assert_eq!(doc["manifests"], Value::Array(documents(&text)));
    assert_eq!(doc["kubernetes"]["shards"], 2);
}

#[test]
fn malformed_policy_exits_2_with_one_json_document() {
    let d = Dir::new();
    let p = d.policy(&ABSOLUTE.replace("buckets:", "bukets:"));
    let o = manifest(&p, true, &[]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let doc: Value = serde_json::from_str(&o.stdout).expect("one JSON document on stdout");
    assert_eq!(doc["status"], "invalid");
    assert_eq!(doc["exit_code"], 2);
    assert!(doc["error"].as_str().unwrap().contains("bukets"), "{doc}");
    let o = manifest(&p, false, &[]);
    assert_eq!(o.code, 2);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    assert!(o.stderr.contains("offsite.yaml:"), "{}", o.stderr);
}

#[test]
fn noncompliant_policy_exits_3() {
    let d = Dir::new();
    let p = d.policy(&ABSOLUTE.replace(
        "  salt: {file: /run/secrets/offsite/crypt/salt}",
        "  salt: {file: /run/secrets/offsite/crypt/salt}\n  filename_encryption: obfuscate",
    ));
    let o = manifest(&p, true, &[]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    let doc: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(doc["status"], "noncompliant");
    assert!(o.stderr.contains("C001"), "{}", o.stderr);
    // Password and salt from one file are equal whatever it holds (C003).
    let p = d.policy(&ABSOLUTE.replace("crypt/password", "crypt/salt"));
    let o = manifest(&p, false, &[]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(o.stderr.contains("C003"), "{}", o.stderr);
    // Rules on secret values cannot run without them: no C003/C004 on unread files.
    let o = manifest(&d.policy(ABSOLUTE), false, &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!o.stderr.contains("C00"), "{}", o.stderr);
}

#[test]
fn inline_secret_is_refused() {
    let d = Dir::new();
    let inline = ABSOLUTE
        .replace("{file: /run/secrets/offsite/crypt/password}", PASSWORD)
        .replace(
            "buckets:",
            "compliance: {allow_inline_secrets: true}\nbuckets:",
        );
    let o = manifest(&d.policy(&inline), true, &[]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(o.stderr.contains("encryption.password"), "{}", o.stderr);
}

#[test]
fn flags_are_checked() {
    let d = Dir::new();
    let p = d.policy(ABSOLUTE);
    let long = "x".repeat(53);
    for args in [
        &["--shards", "0"][..],
        &["--namespace", "Bad_NS"],
        &["--namespace", "a\nkind: Pod"],
        &["--name", long.as_str()],
        &["--schedule", "0 3 * *"],
        &["--schedule", "0 3 * * *\nkind: Pod"],
        &["--time-zone", "Europe/Stock holm"],
        &["--image", "offsite:1\"\nx"],
        &["--active-deadline-seconds", "5"],
        &["--cpu-request", "4", "--cpu-limit", "2"],
        &["--memory", "lots"],
        &["--memory", "64Mi"],
        // Pod hostnames of an Indexed Job are <name>-<8 digits>-<index>, at most 63.
        &["--name", &long[..52], "--shards", "11"],
    ] {
        let o = manifest(&p, true, args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        let doc: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(doc["exit_code"], 2, "{args:?}");
        let flag = args[0];
        assert!(
            doc["error"].as_str().unwrap().contains(flag),
            "{args:?}: {doc}"
        );
    }
    let (_, docs) = rendered(
        &p,
        &[
            "--name",
            "dr-copy",
            "--namespace",
            "backup",
            "--schedule",
            "@daily",
            "--time-zone",
            "Europe/Stockholm",
            "--image",
            "registry.example.com/offsite:1.2.3@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "--active-deadline-seconds",
            "3600",
            "--memory",
            "2Gi",
        ],
    );
    let cron = of_kind(&docs, "CronJob");
    assert_eq!(cron["metadata"]["name"], "dr-copy");
    assert_eq!(cron["metadata"]["namespace"], "backup");
    assert_eq!(cron["spec"]["schedule"], "@daily");
    assert_eq!(cron["spec"]["timeZone"], "Europe/Stockholm");
    assert_eq!(job_spec(&docs)["activeDeadlineSeconds"], 3600);
    assert_eq!(
        container(&docs, "offsite")["resources"]["limits"]["memory"],
        "2Gi"
    );
    assert_eq!(
        of_kind(&docs, "Secret")["metadata"]["name"],
        "dr-copy-secrets"
    );
}

/// Text that a naive template would turn into new keys or documents: a YAML 1.1 line separator
/// (U+2028, legal inside a quoted policy value), a document marker in a comment, CRLF line
/// ends, a BOM and extra final newlines. The ConfigMap must hold the file exactly and the stream must still be
/// the same three documents.
#[test]
fn hostile_policy_text_cannot_change_the_documents() {
    let d = Dir::new();
    for text in [
        ABSOLUTE.replace(
            "buckets: [harbor, velero, thanos]",
            "buckets: [harbor, {name: velero, exclude: [\"a\u{2028}kind: Pod\"]}]\n# ---\n#kind: Pod",
        ),
        ABSOLUTE.replace('\n', "\r\n"),
        format!("\u{feff}{ABSOLUTE}\n\n"),
    ] {
        let (_, docs) = rendered(&d.policy(&text), &[]);
        assert_eq!(docs.len(), 3);
        assert_eq!(of_kind(&docs, "ConfigMap")["data"]["offsite.yaml"], text.as_str());
    }
}

#[test]
fn paths_that_would_hide_the_image_are_refused() {
    let d = Dir::new();
    for (path, field) in [
        ("/etc/offsite-password", "encryption.password"),
        ("/usr/local/bin/password", "encryption.password"),
        ("/tmp/password", "encryption.password"),
        ("/etc/offsite/offsite.yaml", "encryption.password"),
        ("/run/secrets with space/pw", "encryption.password"),
        ("/run/secrets/offsite/crypt/salt/pw", "encryption.password"),
        ("/proc/self/pw", "encryption.password"),
    ] {
        let p = d.policy(&ABSOLUTE.replace("/run/secrets/offsite/crypt/password", path));
        let o = manifest(&p, true, &[]);
        assert_eq!(o.code, 2, "{path}: {}", o.stdout);
        let doc: Value = serde_json::from_str(&o.stdout).unwrap();
        assert!(
            doc["error"].as_str().unwrap().contains(field),
            "{path}: {doc}"
        );
    }
}

#[test]
fn env_only_policy_needs_no_init_container() {
    let d = Dir::new();
    let p = d.policy(
        &ABSOLUTE
            .replace(
                "{file: /run/secrets/offsite/primary/secret_access_key}",
                "{env: PRIMARY_SECRET}",
            )
            .replace(
                "{file: /run/secrets/offsite/secondary/access_key_id}",
                "{env: SECONDARY_KEY_ID}",
            )
            .replace(
                "{file: /run/secrets/offsite/crypt/password}",
                "{env: OFFSITE_PASSWORD}",
            )
            .replace(
                "{file: /run/secrets/offsite/crypt/salt}",
                "{env: OFFSITE_SALT}",
            ),
    );
    let (_, docs) = rendered(&p, &[]);
    assert!(pod_spec(&docs).get("initContainers").is_none());
    let keys = of_kind(&docs, "Secret")["stringData"]
        .as_object()
        .unwrap()
        .len();
    assert_eq!(keys, 6);
    // A variable the pod sets itself cannot be a secret.
    let p = d.policy(&ABSOLUTE.replace("{env: PRIMARY_ACCESS_KEY_ID}", "{env: TMPDIR}"));
    let o = manifest(&p, false, &[]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("source.access_key_id"), "{}", o.stderr);
}

/// Report files get a writable emptyDir at their directory (the root filesystem is read-only);
/// one under the policy's directory makes that directory writable, with the policy copied in.
#[test]
fn report_files_get_writable_volumes() {
    let d = Dir::new();
    let reporting = "reporting:\n  metrics_file: /var/lib/node_exporter/textfile/offsite.prom\n  attestation_file: reports/attestation.json\n";
    let o = manifest(&d.policy(&format!("{ABSOLUTE}{reporting}")), false, &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("reporting.metrics_file"), "{}", o.stderr);
    let docs = documents(&o.stdout);
    validate(&o.stdout, docs.len());
    let main = container(&docs, "offsite");
    for (file, at) in [
        (
            "/var/lib/node_exporter/textfile/offsite.prom",
            "/var/lib/node_exporter/textfile",
        ),
        ("/etc/offsite/reports/attestation.json", "/etc/offsite"),
    ] {
        let (vol, mount, ro) = mount_of(main, file).unwrap();
        assert_eq!((mount, ro), (at, false), "{file}");
        assert!(volume(&docs, vol)["emptyDir"].is_object(), "{file}");
    }
    assert_eq!(installs(&docs)["/etc/offsite/offsite.yaml"].0, "0444");
}

#[test]
fn no_secret_flag_leaves_the_secret_out() {
    let d = Dir::new();
    let (_, docs) = rendered(&d.policy(ABSOLUTE), &["--no-secret"]);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "CronJob"]);
    // The pod still reads the (already filled) Secret.
    assert!(volume(&docs, "staging")
        .to_string()
        .contains("offsite-t-manifest-secrets"));
}

/// The manifests of the production example, pinned. `OFFSITE_UPDATE_GOLDEN=1` rewrites the
/// files instead of comparing (then review the diff).
#[test]
fn golden_example_manifests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("examples/s3-sto1-to-fra1.yaml");
    for (args, file) in [
        (&[][..], "s3-sto1-to-fra1.yaml"),
        (&["--shards", "3"][..], "s3-sto1-to-fra1-shards-3.yaml"),
    ] {
        let (yaml, _) = rendered(&example, args);
        let golden = root.join("tests/fixtures/kubernetes").join(file);
        if std::env::var_os("OFFSITE_UPDATE_GOLDEN").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
            std::fs::write(&golden, &yaml).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; create it with OFFSITE_UPDATE_GOLDEN=1",
                golden.display()
            )
        });
        if yaml != want {
            let first = yaml
                .lines()
                .zip(want.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(yaml.lines().count().min(want.lines().count()));
            panic!(
                "{} differs from the rendered manifests at line {}:\n  got:  {:?}\n  want: {:?}\nIf the change is intended: OFFSITE_UPDATE_GOLDEN=1 cargo test --test manifest golden",
                golden.display(),
                first + 1,
                yaml.lines().nth(first),
                want.lines().nth(first)
            );
        }
    }
}
