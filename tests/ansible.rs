//! The Ansible example (`examples/ansible/`) as an admin runs it: the real `ansible-playbook`
//! (ansible-core from PyPI, `OFFSITE_TEST_ANSIBLE_PLAYBOOK`), connection local, the real offsite
//! binary and the Garage rig with the rclone of this pass. The first run replicates and reports
//! changed, the second changes nothing, check mode only reports, a wrong key fails the task with
//! offsite's message, a held lock is ok unless asked otherwise, and no secret reaches the output.
//!
//! Ansible is sandboxed in the test's temp dir (`ANSIBLE_HOME`, temp dirs, an empty config file)
//! and reports every task result as one JSON line through a small callback plugin written by the
//! test (ansible-core has no JSON callback of its own; the community one needs a collection).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

/// The events callback: one JSON line per task result and one for the final stats. The
/// results it sees are the ones every callback sees, already censored where `no_log` applies.
const CALLBACK: &str = r#"
from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = '''
name: offsite_test_events
type: aggregate
short_description: one JSON line per task result (offsite's tests)
description: [Writes one JSON line per task result to $OFFSITE_TEST_ANSIBLE_EVENTS.]
'''


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'aggregate'
    CALLBACK_NAME = 'offsite_test_events'
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._out = open(os.environ['OFFSITE_TEST_ANSIBLE_EVENTS'], 'a', encoding='utf-8')

    def _emit(self, record):
        self._out.write(json.dumps(record, default=str) + '\n')
        self._out.flush()

    def _result(self, event, result):
        self._emit({
            'event': event,
            'task': result.task_name,
            'host': result.host.name,
            'changed': bool(result.result.get('changed', False)),
            'result': result.result,
        })

    def v2_runner_on_ok(self, result):
        self._result('ok', result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._result('failed', result)

    def v2_runner_on_skipped(self, result):
        self._result('skipped', result)

    def v2_runner_on_unreachable(self, result):
        self._result('unreachable', result)

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed.keys())
        self._emit({'event': 'stats', 'hosts': {h: stats.summarize(h) for h in hosts}})
"#;

const RUN_TASK: &str = "Run offsite";
const REPORT_TASK: &str = "Report why offsite failed";
const LOCK_TASK: &str = "Warn that another run holds the lock";

fn playbook_bin() -> PathBuf {
    match std::env::var("OFFSITE_TEST_ANSIBLE_PLAYBOOK") {
        Ok(p) if !p.is_empty() => p.into(),
        _ => panic!("OFFSITE_TEST_ANSIBLE_PLAYBOOK is not set: run the suite with scripts/test"),
    }
}

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ansible")
}

/// One sandboxed Ansible controller (and, with connection local, its managed host).
struct Ansible {
    dir: tempfile::TempDir,
    runs: usize,
}

/// One `ansible-playbook` run.
struct Play {
    code: i32,
    /// stdout and stderr of ansible-playbook.
    output: String,
    events: Vec<Value>,
}

impl Play {
    /// The results of the task named `name`.
    fn task(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["task"] == name).collect()
    }

    /// The single result of the task named `name`.
    #[track_caller]
    fn one(&self, name: &str) -> &Value {
        let t = self.task(name);
        assert_eq!(t.len(), 1, "task {name:?}: {t:?}\n{}", self.output);
        t[0]
    }

    /// The PLAY RECAP numbers of localhost (ok, changed, failures, skipped, rescued, ...).
    #[track_caller]
    fn stats(&self) -> &Value {
        let s = self
            .events
            .iter()
            .find(|e| e["event"] == "stats")
            .unwrap_or_else(|| panic!("no stats event\n{}", self.output));
        &s["hosts"]["localhost"]
    }

    /// Names of the tasks that reported changed.
    fn changed_tasks(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["changed"] == true)
            .map(|e| e["task"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// The whole of what Ansible printed or reported, for leak checks.
    fn everything(&self) -> String {
        let mut s = self.output.clone();
        for e in &self.events {
            s.push_str(&e.to_string());
        }
        s
    }

    #[track_caller]
    fn assert_no_secret(&self, secrets: &[&str]) {
        let all = self.everything();
        for s in secrets {
            assert!(!s.is_empty());
            assert!(
                !all.contains(s),
                "a secret value appears in the Ansible output"
            );
        }
    }
}

impl Ansible {
    fn new() -> Ansible {
        let dir = tempdir();
        let d = dir.path();
        for sub in [
            "home",
            "local-tmp",
            "remote-tmp",
            "callback_plugins",
            "run-tmp",
            "bin",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("callback_plugins/offsite_test_events.py"), CALLBACK).unwrap();
        std::fs::write(d.join("ansible.cfg"), "").unwrap();
        // The venv's python when ansible-playbook comes from one, else the system's.
        let venv_python = playbook_bin().with_file_name("python");
        let python = if venv_python.exists() {
            venv_python
        } else {
            PathBuf::from("/usr/bin/python3")
        };
        std::fs::write(
            d.join("hosts.ini"),
            format!(
                "[offsite]\nlocalhost ansible_connection=local ansible_python_interpreter={}\n",
                python.display()
            ),
        )
        .unwrap();
        // A snapshot of the binary to install: cargo may rebuild target/debug/offsite while
        // the test runs (a shared target dir), and a changed source file is a changed task.
        std::fs::copy(env!("CARGO_BIN_EXE_offsite"), d.join("offsite.src")).unwrap();
        Ansible { dir, runs: 0 }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The host's configuration directory the role manages.
    fn etc(&self) -> PathBuf {
        self.path().join("etc/offsite")
    }

    fn policy_file(&self) -> PathBuf {
        self.etc().join("offsite.yaml")
    }

    /// The role's variables for the rig: the offsite binary installed from cargo's build, the
    /// rig's rclone, a policy for `b` with every secret as a file the role installs.
    fn rig_vars(&self, b: &Buckets, name: &str, password: &str, salt: &str) -> Value {
        let r = rig();
        let side = |s: &Side, prefix: &str| {
            json!({
                "type": "s3",
                "endpoint": s.endpoint,
                "region": s.region,
                "access_key_id": {"file": format!("secrets/{prefix}_access_key_id")},
                "secret_access_key": {"file": format!("secrets/{prefix}_secret_access_key")},
                "options": {"force_path_style": true},
            })
        };
        let mut destination = side(&r.secondary, "secondary");
        destination["bucket"] = json!(b.destination);
        destination["prefix"] = json!("replica");
        json!({
            "offsite_config_dir": self.etc(),
            "offsite_bin": self.path().join("bin/offsite"),
            "offsite_binary_src": self.path().join("offsite.src"),
            "offsite_rclone": r.rclone,
            "offsite_environment": {"TMPDIR": self.path().join("run-tmp")},
            "offsite_policy": {
                "version": 1,
                "name": name,
                "source": side(&r.primary, "primary"),
                "destination": destination,
                "encryption": {
                    "password": {"file": "secrets/crypt_password"},
                    "salt": {"file": "secrets/crypt_salt"},
                },
                "buckets": b.sources,
                "compliance": {"require_tls": false},
            },
            "offsite_secrets": {
                "primary_access_key_id": r.primary.key_id,
                "primary_secret_access_key": r.primary.secret,
                "secondary_access_key_id": r.secondary.key_id,
                "secondary_secret_access_key": r.secondary.secret,
                "crypt_password": password,
                "crypt_salt": salt,
            },
        })
    }

    /// Runs `ansible-playbook -i hosts.ini site.yml -v --diff ARGS -e @VARS`: `vars` are extra
    /// variables in a 0600 JSON file (not on the command line: they hold secrets), given last so
    /// that they win over any `-e` in `args`.
    fn play(&mut self, vars: &Value, args: &[&str]) -> Play {
        self.runs += 1;
        let d = self.path();
        let vars_file = d.join(format!("vars-{}.json", self.runs));
        std::fs::write(&vars_file, vars.to_string()).unwrap();
        std::fs::set_permissions(&vars_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let events_file = d.join(format!("events-{}.jsonl", self.runs));
        let mut cmd = Command::new(playbook_bin());
        // Only the sandbox's Ansible settings, none from the environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ANSIBLE_") {
                cmd.env_remove(&k);
            }
        }
        cmd.arg("-i")
            .arg(d.join("hosts.ini"))
            .arg(example_dir().join("site.yml"))
            .args(["-v", "--diff"])
            .args(args)
            // Last: extra vars given later win.
            .arg("-e")
            .arg(format!("@{}", vars_file.display()))
            .current_dir(d)
            .env("ANSIBLE_CONFIG", d.join("ansible.cfg"))
            .env("ANSIBLE_HOME", d.join("home"))
            .env("ANSIBLE_LOCAL_TEMP", d.join("local-tmp"))
            .env("ANSIBLE_REMOTE_TEMP", d.join("remote-tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_STDOUT_CALLBACK", "default")
            .env("ANSIBLE_CALLBACK_PLUGINS", d.join("callback_plugins"))
            .env("ANSIBLE_CALLBACKS_ENABLED", "offsite_test_events")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("OFFSITE_TEST_ANSIBLE_EVENTS", &events_file)
            .env("LC_ALL", "C.UTF-8")
            // The role passes --rclone and -c itself.
            .env_remove("OFFSITE_RCLONE")
            .env_remove("OFFSITE_CONFIG")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null());
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", playbook_bin().display()));
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let events = std::fs::read_to_string(&events_file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l}: {e}")))
            .collect();
        let play = Play {
            code: out.status.code().unwrap_or(-1),
            output,
            events,
        };
        assert!(!play.output.contains("panicked"), "{}", play.output);
        play
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// offsite's JSON document as the role kept it (fact `offsite_report`).
#[track_caller]
fn report(p: &Play) -> &Value {
    let r =
        &p.one("Keep offsite's document as a fact")["result"]["ansible_facts"]["offsite_report"];
    assert!(r.is_object(), "{}", p.output);
    r
}

fn raw_listing(b: &Buckets) -> Vec<(String, u64)> {
    ls(&b.dest())
}

#[test]
fn playbook_replicates_is_idempotent_and_fails_on_a_wrong_key() {
    let b = bucket_pair(2);
    for i in 0..3 {
        put(
            &format!("{}/dir/obj-{i}.txt", b.source(0)),
            format!("object {i} of the first bucket").as_bytes(),
        );
    }
    put(&format!("{}/only.bin", b.source(1)), &[7u8; 70_000]);
    let mut a = Ansible::new();
    let password = random_secret(40);
    let salt = random_secret(40);
    let wrong = random_secret(40);
    let name = unique("ansible");
    let vars = a.rig_vars(&b, &name, &password, &salt);
    let r = rig();
    let secrets = [
        password.as_str(),
        salt.as_str(),
        wrong.as_str(),
        r.primary.secret.as_str(),
        r.secondary.secret.as_str(),
    ];

    // 1. Fresh buckets: the files are installed and the run replicates: changed.
    let p = a.play(&vars, &[]);
    assert_eq!(p.code, 0, "{}", p.output);
    let run = p.one(RUN_TASK);
    assert_eq!(run["event"], "ok", "{}", p.output);
    assert_eq!(run["changed"], true, "{}", p.output);
    let doc = report(&p);
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["changed"], true);
    let copied: u64 = doc["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["copied"].as_u64().unwrap())
        .sum();
    assert_eq!(copied, 4, "{doc}");
    assert_eq!(p.stats()["failures"], 0);
    p.assert_no_secret(&secrets);
    // The role's files: 0700 directories, 0600 secrets and policy.
    assert_eq!(mode(&a.etc()), 0o700);
    assert_eq!(mode(&a.etc().join("secrets")), 0o700);
    assert_eq!(mode(&a.policy_file()), 0o600);
    for f in ["crypt_password", "crypt_salt", "primary_secret_access_key"] {
        assert_eq!(mode(&a.etc().join("secrets").join(f)), 0o600, "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(a.etc().join("secrets/crypt_password")).unwrap(),
        password
    );
    // The replica holds every object: the installed policy, outside Ansible, verifies in full.
    let out = offsite()
        .arg("-c")
        .arg(a.policy_file())
        .args(["verify", "--mode", "full", "--output", "json"])
        .env("TMPDIR", a.path().join("run-tmp"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let matched: Vec<(String, u64)> = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["verify"]["matched"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut want = vec![(b.sources[0].clone(), 3), (b.sources[1].clone(), 1)];
    want.sort();
    let mut got = matched;
    got.sort();
    assert_eq!(got, want, "{v}");

    // 2. Nothing new: no task changes anything.
    let p = a.play(&vars, &[]);
    assert_eq!(p.code, 0, "{}", p.output);
    let run = p.one(RUN_TASK);
    assert_eq!(run["event"], "ok");
    assert_eq!(run["changed"], false, "{}", p.output);
    assert_eq!(report(&p)["changed"], false);
    assert_eq!(p.changed_tasks(), Vec::<String>::new(), "{}", p.output);
    assert_eq!(p.stats()["changed"], 0, "{}", p.output);
    p.assert_no_secret(&secrets);

    // 3. Check mode with a new object on the primary: reported as a change, nothing copied.
    put(&format!("{}/dir/new.txt", b.source(0)), b"arrived later");
    let before = raw_listing(&b);
    let p = a.play(&vars, &["--check"]);
    assert_eq!(p.code, 0, "{}", p.output);
    let run = p.one(RUN_TASK);
    assert_eq!(run["changed"], true, "{}", p.output);
    assert_eq!(report(&p)["changed"], false, "a dry run changes nothing");
    assert_eq!(
        p.changed_tasks(),
        vec![RUN_TASK.to_string()],
        "{}",
        p.output
    );
    assert_eq!(raw_listing(&b), before, "check mode wrote to the secondary");
    p.assert_no_secret(&secrets);

    // 4. A wrong crypt password in the vault: the run task fails, and the play fails with
    // offsite's key canary message. Nothing reaches the secondary.
    let mut bad = vars.clone();
    bad["offsite_secrets"]["crypt_password"] = json!(wrong);
    let p = a.play(&bad, &[]);
    assert_ne!(p.code, 0, "{}", p.output);
    let run = p.one(RUN_TASK);
    assert_eq!(run["event"], "failed", "{}", p.output);
    assert_eq!(run["result"]["rc"], 4, "{}", p.output);
    let why = p.one(REPORT_TASK);
    assert_eq!(why["event"], "failed");
    let msg = why["result"]["msg"].as_str().unwrap();
    assert!(
        msg.starts_with("offsite run failed (exit 4, guard_refused): key canary:"),
        "{msg}"
    );
    assert!(msg.contains("Nothing was written"), "{msg}");
    assert!(
        p.output.contains(msg),
        "the message is in the play's output"
    );
    assert_eq!(p.stats()["failures"], 1, "{}", p.output);
    assert_eq!(
        raw_listing(&b),
        before,
        "a wrong key wrote to the secondary"
    );
    p.assert_no_secret(&secrets);

    // 5. The right key again: the object that arrived later is replicated.
    let p = a.play(&vars, &[]);
    assert_eq!(p.code, 0, "{}", p.output);
    assert_eq!(p.one(RUN_TASK)["changed"], true, "{}", p.output);
    let doc = report(&p);
    let first = doc["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == b.sources[0].as_str())
        .unwrap();
    assert_eq!(first["copied"], 1, "{doc}");
    p.assert_no_secret(&secrets);
}

/// Holds offsite's local lock of policy `name`: an exclusive `flock` on
/// `$TMPDIR/offsite-<name>.lock`, the way a running offsite holds it, until dropped.
struct HeldLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl HeldLock {
    fn new(tmpdir: &Path, name: &str) -> HeldLock {
        let file = tmpdir.join(format!("offsite-{name}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&file)
            .unwrap();
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .unwrap_or_else(|(_, e)| panic!("flock {}: {e}", file.display()));
        HeldLock(lock)
    }
}

#[test]
fn lock_held_by_another_run_is_ok_unless_asked_to_fail() {
    let b = bucket_pair(1);
    put(&format!("{}/a.txt", b.source(0)), b"a");
    let mut a = Ansible::new();
    let name = unique("ansible-lock");
    let vars = a.rig_vars(&b, &name, &random_secret(40), &random_secret(40));
    let lock = HeldLock::new(&a.path().join("run-tmp"), &name);

    // Default: another run is replicating this policy; the play succeeds, changed=false, and
    // says why nothing was replicated.
    let p = a.play(&vars, &[]);
    assert_eq!(p.code, 0, "{}", p.output);
    let run = p.one(RUN_TASK);
    assert_eq!(run["event"], "ok", "{}", p.output);
    assert_eq!(run["changed"], false);
    assert_eq!(run["result"]["rc"], 8, "{}", p.output);
    let warn = p.one(LOCK_TASK);
    assert_eq!(warn["event"], "ok", "{}", p.output);
    let msg = warn["result"]["msg"].as_str().unwrap();
    assert!(msg.contains("holds the local lock"), "{msg}");

    // offsite_lock_held_fails: the task fails with offsite's message.
    let mut strict = vars.clone();
    strict["offsite_lock_held_fails"] = json!(true);
    let p = a.play(&strict, &[]);
    assert_ne!(p.code, 0, "{}", p.output);
    assert_eq!(p.one(RUN_TASK)["event"], "failed", "{}", p.output);
    let msg = p.one(REPORT_TASK)["result"]["msg"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("offsite run failed (exit 8, failed): another offsite run"),
        "{msg}"
    );

    drop(lock);
}

/// The shipped inventory's variables render a policy that offsite accepts, with the secrets
/// from the vault variables the example documents (no storage is contacted: `offsite_run: false`,
/// then `offsite check`).
#[test]
fn example_inventory_vars_render_a_policy_that_checks() {
    let mut a = Ansible::new();
    let group_vars = example_dir().join("inventory/group_vars/offsite/main.yml");
    let template = example_dir().join("vault.yml.example");
    // Every vault variable the example uses is in the template.
    let gv = std::fs::read_to_string(&group_vars).unwrap();
    let tv = std::fs::read_to_string(&template).unwrap();
    let mut vault_vars: Vec<&str> = gv
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("vault_"))
        .collect();
    vault_vars.sort_unstable();
    vault_vars.dedup();
    assert_eq!(vault_vars.len(), 6, "{vault_vars:?}");
    let mut vars = json!({});
    for v in &vault_vars {
        assert!(
            tv.contains(&format!("\n{v}: ")),
            "{v} missing from vault.yml.example"
        );
        vars[*v] = json!(random_secret(40));
    }
    // The example's own settings, redirected into the sandbox and without become or a run.
    let overrides = json!({
        "ansible_become": false,
        "offsite_config_dir": a.etc(),
        "offsite_run": false,
    });
    let vars_file = a.path().join("vault-vars.json");
    std::fs::write(&vars_file, vars.to_string()).unwrap();
    std::fs::set_permissions(&vars_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secret_values: Vec<String> = vault_vars
        .iter()
        .map(|v| vars[*v].as_str().unwrap().to_string())
        .collect();
    let p = a.play(
        &overrides,
        &[
            "-e",
            &format!("@{}", group_vars.display()),
            "-e",
            &format!("@{}", vars_file.display()),
        ],
    );
    assert_eq!(p.code, 0, "{}", p.output);
    assert!(p.task(RUN_TASK).iter().all(|t| t["event"] == "skipped"));
    let refs: Vec<&str> = secret_values.iter().map(String::as_str).collect();
    p.assert_no_secret(&refs);
    assert_eq!(
        std::fs::read_to_string(a.etc().join("secrets/crypt_salt")).unwrap(),
        vars["vault_offsite_crypt_salt"].as_str().unwrap()
    );
    // `check` needs no rclone and no rig.
    let out = assert_cmd::Command::new(env!("CARGO_BIN_EXE_offsite"))
        .arg("-c")
        .arg(a.policy_file())
        .args(["check", "--output", "json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let policy = std::fs::read_to_string(a.policy_file()).unwrap();
    assert!(policy.starts_with("# Managed by Ansible"), "{policy}");
}
