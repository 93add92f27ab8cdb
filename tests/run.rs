//! `offsite run` as production runs it: the JSON document, Prometheus metrics (promtool-valid,
//! pushed to a real Pushgateway), the attestation record, sharding across processes, and
//! SIGTERM. Real Garage, real rclone (both versions via scripts/test).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn run_in(policy: &Path, tmp: &Path, args: &[&str]) -> Out {
    let out = offsite()
        .arg("-c")
        .arg(policy)
        .args(args)
        .env("TMPDIR", tmp)
        .output()
        .unwrap();
    Out::from(out)
}

/// A tool the rig provides: required when the rig runs the suite (OFFSITE_TEST_RCLONE set).
fn rig_tool(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: run the suite with scripts/test"))
}

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

fn crypt(policy: &Path, dir: &Path, args: &[&str]) -> std::process::Output {
    let conf = dir.join("admin.conf");
    if !conf.exists() {
        let o = offsite()
            .arg("-c")
            .arg(policy)
            .args(["render", "--to"])
            .arg(&conf)
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    common::crypt(&conf, args)
}

#[test]
fn run_reports_metrics_pushgateway_and_attestation() {
    let promtool = rig_tool("OFFSITE_TEST_PROMTOOL");
    let push = rig_tool("OFFSITE_TEST_PUSHGATEWAY");
    let b = bucket_pair(2);
    let dir = tempdir();
    let tmp = tempdir();
    let metrics = dir.path().join("textfile/offsite.prom");
    let attest = dir.path().join("log/attestation.json");
    let policy = s3_policy_with(
        dir.path(),
        &b,
        &format!(
            "verify:\n  after_sync: full\nreporting:\n  metrics_file: {}\n  pushgateway_url: {}\n  attestation_file: {}\n",
            yaml_str(&metrics),
            yaml_str(&push),
            yaml_str(&attest)
        ),
    );
    for (i, src) in b.sources.iter().enumerate() {
        put(
            &format!("primary:{src}/a.txt"),
            format!("bucket {i}").as_bytes(),
        );
    }
    let o = run_in(&policy, tmp.path(), &["run", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    for k in [
        "command",
        "policy",
        "run_id",
        "status",
        "exit_code",
        "changed",
        "rclone",
        "started",
        "finished",
        "buckets",
        "guards",
        "findings",
    ] {
        assert!(doc.get(k).is_some(), "{k} missing from {doc}");
    }
    assert_eq!(doc["changed"], true);
    for bk in doc["buckets"].as_array().unwrap() {
        assert_eq!(bk["verify"]["mode"], "full", "{bk}");
        assert_eq!(bk["verify"]["matched"], 1, "{bk}");
    }

    // The textfile passes promtool and carries the fixed names.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let check = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&metrics).unwrap())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let name = doc["policy"].as_str().unwrap().to_string();
    assert!(
        text.contains(&format!("offsite_run_exit_code{{policy=\"{name}\"}} 0")),
        "{text}"
    );
    let success: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "offsite_last_success_timestamp_seconds{{policy=\"{name}\"}} "
            ))
        })
        .unwrap()
        .parse()
        .unwrap();
    for s in secrets(dir.path()) {
        assert!(!text.contains(&s));
    }

    // The Pushgateway shows the series.
    let body = ureq::get(&format!("{push}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        body.contains("offsite_run_exit_code") && body.contains(&format!("policy=\"{name}\"")),
        "pushgateway lacks the run"
    );

    // The attestation: local file and encrypted copy, equal, no secret.
    let a: Value = serde_json::from_slice(&std::fs::read(&attest).unwrap()).unwrap();
    assert_eq!(a["run_id"], doc["run_id"]);
    assert_eq!(a["policy"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(a["rclone"]["sha256"].as_str().unwrap().len(), 64);
    assert!(a["crypto"]["data"]
        .as_str()
        .unwrap()
        .contains("XSalsa20-Poly1305"));
    assert!(a["crypto"]["names"]
        .as_str()
        .unwrap()
        .contains("AES-256-EME"));
    assert_eq!(a["crypto"]["kdf"], "scrypt N=16384 r=8 p=1");
    let raw = std::fs::read_to_string(&attest).unwrap();
    for s in secrets(dir.path()) {
        assert!(!raw.contains(&s), "secret in attestation");
    }
    let remote = crypt(
        &policy,
        dir.path(),
        &[
            "cat",
            &format!(
                "offsite:.offsite/attestations/{}.json",
                doc["run_id"].as_str().unwrap()
            ),
        ],
    );
    let remote: Value =
        serde_json::from_slice(&remote.stdout).expect("encrypted attestation stored");
    assert_eq!(remote, a);

    // A failing run (wrong key): exit 4, exit code metric 4, last success unchanged.
    std::thread::sleep(Duration::from_millis(1100));
    let good = std::fs::read_to_string(dir.path().join(PASSWORD_FILE)).unwrap();
    write_secret(dir.path(), PASSWORD_FILE, &random_secret(40));
    let o = run_in(&policy, tmp.path(), &["run", "--output", "json"]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains(&format!("offsite_run_exit_code{{policy=\"{name}\"}} 4")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "offsite_last_success_timestamp_seconds{{policy=\"{name}\"}} {success}"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "offsite_guard_refused{{policy=\"{name}\",guard=\"key_canary\"}} 1"
        )),
        "{text}"
    );
    let body = ureq::get(&format!("{push}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let pushed_success = body.lines().find(|l| {
        l.starts_with("offsite_last_success_timestamp_seconds")
            && l.contains(&format!("policy=\"{name}\""))
    });
    assert!(
        pushed_success.is_some(),
        "the pushgateway lost the last success"
    );
    write_secret(dir.path(), PASSWORD_FILE, &good);
}

#[test]
fn early_failure_still_prints_one_json_document() {
    let dir = tempdir();
    let p = dir.path().join("broken.yaml");
    std::fs::write(&p, "version: 1\nname: x\nbogus: 1\n").unwrap();
    let o = run_in(&p, dir.path(), &["run", "--output", "json"]);
    assert_eq!(o.code, 2);
    let doc = o.json();
    assert_eq!(doc["status"], "invalid");
    assert_eq!(doc["exit_code"], 2);
    assert!(doc["error"].as_str().unwrap().contains("broken.yaml:"));
}

/// N shards in parallel produce the same replica as one process, each bucket exactly once.
#[test]
fn shards_split_the_buckets_and_agree_with_one_process() {
    let b = bucket_pair(6);
    for (i, src) in b.sources.iter().enumerate() {
        put(
            &format!("primary:{src}/o.txt"),
            format!("object of bucket {i}").as_bytes(),
        );
    }
    let dir = tempdir();
    let tmp = tempdir();
    let policy = s3_policy(dir.path(), &b);
    let children: Vec<_> = (0..3)
        .map(|i| {
            std::process::Command::new(env!("CARGO_BIN_EXE_offsite"))
                .arg("-c")
                .arg(&policy)
                .args(["run", "--shards", "3", "--output", "json", "--no-progress"])
                .env("JOB_COMPLETION_INDEX", i.to_string())
                .env("OFFSITE_RCLONE", &rig().rclone)
                .env("TMPDIR", tmp.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut seen: Vec<String> = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        for bk in doc["buckets"].as_array().unwrap() {
            seen.push(bk["name"].as_str().unwrap().to_string());
            assert_eq!(bk["copied"], 1);
        }
    }
    seen.sort();
    let mut all = b.sources.clone();
    all.sort();
    assert_eq!(seen, all, "every bucket exactly once across the shards");

    // One unsharded process into a second destination: the same replica.
    let b2 = Buckets {
        sources: b.sources.clone(),
        destination: bucket_pair(0).destination,
    };
    let dir2 = tempdir();
    let policy2 = s3_policy(dir2.path(), &b2);
    let o = run_in(&policy2, tmp.path(), &["run", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let list = |p: &Path, d: &Path| {
        let out = crypt(p, d, &["lsjson", "-R", "--files-only", "offsite:data"]);
        let mut v: Vec<(String, u64)> = serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["Path"].as_str().unwrap().to_string(),
                    e["Size"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let sharded = list(&policy, dir.path());
    assert_eq!(sharded.len(), 6);
    assert_eq!(sharded, list(&policy2, dir2.path()));
    // Each shard keeps its own state file.
    let out = crypt(&policy, dir.path(), &["lsf", "offsite:.offsite"]);
    let names = String::from_utf8_lossy(&out.stdout).to_string();
    for i in 0..3 {
        assert!(
            names.contains(&format!("state-shard-{i}-of-3.json")),
            "{names}"
        );
    }
    // And `verify --mode changed` merges them.
    let o = run_in(
        &policy,
        tmp.path(),
        &["verify", "--mode", "changed", "--output", "json"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    for bk in o.json()["buckets"].as_array().unwrap() {
        assert_eq!(bk["verify"]["mode"], "changed", "{bk}");
        assert_eq!(bk["verify"]["checked"], 1, "{bk}");
    }
}

#[test]
fn sigterm_stops_rclone_cleans_up_and_reports_interrupted() {
    let b = bucket_pair(1);
    let src = &b.sources[0];
    put(&format!("primary:{src}/slow.bin"), &vec![3u8; 1_500_000]);
    let dir = tempdir();
    let tmp = tempdir();
    let metrics = dir.path().join("offsite.prom");
    let policy = s3_policy_with(
        dir.path(),
        &b,
        &format!(
            "sync:\n  bwlimit: \"100k\"\nreporting:\n  metrics_file: {}\n",
            yaml_str(&metrics)
        ),
    );
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_offsite"))
        .arg("-c")
        .arg(&policy)
        .args(["run", "--output", "json"])
        .env("OFFSITE_RCLONE", &rig().rclone)
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until rclone is transferring.
    let tmp_s = tmp.path().to_str().unwrap().to_string();
    let rclone_running = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let c = std::fs::read(e.path().join("cmdline")).ok()?;
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                (c.contains(&tmp_s) && c.contains(" sync ")).then_some(pid)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while rclone_running().is_empty() {
        assert!(Instant::now() < deadline, "rclone never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["status"], "interrupted");
    assert!(rclone_running().is_empty(), "rclone left running");
    let left: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains("offsite_run_exit_code{policy=") && text.contains("} 143"),
        "{text}"
    );

    // The next run completes (the lease was released, no TTL wait) and verifies.
    let text = std::fs::read_to_string(&policy)
        .unwrap()
        .replace("bwlimit: \"100k\"", "transfers: 4");
    std::fs::write(&policy, text).unwrap();
    let o = run_in(&policy, tmp.path(), &["run", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    assert_eq!(doc["buckets"][0]["verify"]["matched"], 1, "{doc}");
}
