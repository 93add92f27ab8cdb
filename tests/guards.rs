//! The safety guards against real Garage, with the rclone of this pass: a wrong key writes
//! nothing, an emptied source deletes nothing, a delete storm is cut off, deletions are kept and
//! pruned, and two runs never replicate at once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

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

impl Setup {
    #[track_caller]
    fn run(&self, args: &[&str]) -> Out {
        self.run_env(args, &[])
    }

    #[track_caller]
    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = offsite();
        cmd.arg("-c")
            .arg(&self.policy)
            .args(args)
            .env("TMPDIR", self.tmp.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        Out::from(out)
    }

    /// offsite's rendered config (`offsite render`), made once: the admin's plain-rclone view.
    fn admin_conf(&self) -> PathBuf {
        let conf = self.dir.path().join("admin.conf");
        if !conf.exists() {
            let o = self.run(&["render", "--to", conf.to_str().unwrap()]);
            assert_eq!(o.code, 0, "{}", o.stderr);
        }
        conf
    }

    /// Plain rclone through offsite's rendered config: the admin's view of the crypt root.
    fn crypt(&self, args: &[&str]) -> std::process::Output {
        crypt(&self.admin_conf(), args)
    }

    fn crypt_cat(&self, path: &str) -> Vec<u8> {
        crypt_cat(&self.admin_conf(), path)
    }

    fn crypt_ls(&self, path: &str) -> Vec<String> {
        crypt_ls(&self.admin_conf(), path)
    }

    /// offsite's private directories (`$TMPDIR/offsite-*`, not the lock files) left in this
    /// setup's TMPDIR.
    fn private_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("offsite-") && !n.ends_with(".lock"))
            .collect()
    }
}

fn guard<'a>(doc: &'a Value, name: &str) -> Vec<&'a Value> {
    doc["guards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["guard"] == name)
        .collect()
}

fn bucket<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap()
}

/// The raw listing of the whole destination bucket: every ciphertext object, with sizes.
fn raw(s: &Setup) -> Vec<(String, u64)> {
    ls(&s.b.dest())
}

#[test]
fn wrong_password_or_salt_writes_nothing() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    for i in 0..5 {
        put(
            &format!("primary:{src}/obj-{i}.txt"),
            format!("object {i}").as_bytes(),
        );
    }
    let o = s.run(&["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(guard(&o.json(), "key_canary")[0]["result"], "created");
    put(
        &format!("primary:{src}/after.txt"),
        b"new object that must not be uploaded under a wrong key",
    );
    let before = raw(&s);
    assert!(before.len() >= 6, "{before:?}");

    let good_pw = std::fs::read_to_string(s.dir.path().join(PASSWORD_FILE)).unwrap();
    let good_salt = std::fs::read_to_string(s.dir.path().join(SALT_FILE)).unwrap();
    for (file, what) in [(PASSWORD_FILE, "password"), (SALT_FILE, "salt")] {
        write_secret(s.dir.path(), file, &random_secret(40));
        let o = s.run(&["sync", "--output", "json"]);
        assert_eq!(o.code, 4, "wrong {what}: {}", o.stderr);
        let doc = o.json();
        assert_eq!(doc["status"], "guard_refused");
        assert!(
            doc["error"].as_str().unwrap().contains("key canary"),
            "{doc}"
        );
        assert!(o.stderr.contains("Nothing was written"), "{}", o.stderr);
        assert_eq!(raw(&s), before, "wrong {what} changed the secondary");
        // Put the right secret back.
        write_secret(s.dir.path(), PASSWORD_FILE, &good_pw);
        write_secret(s.dir.path(), SALT_FILE, &good_salt);
    }
    let o = s.run(&["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    assert_eq!(guard(&doc, "key_canary")[0]["result"], "pass");
    assert_eq!(bucket(&doc, src)["copied"], 1);
}

/// A fake rclone: the version check is the one error path a real rclone of this pass cannot
/// produce. The script reports 1.59.2 to `rclone version` and runs the real rclone for every
/// other request, so the first, read-only phase (which runs while the version is checked)
/// really reads the secondary; nothing may be written.
#[test]
fn fake_rclone_too_old_exits_7_and_writes_nothing() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    put(&format!("primary:{src}/one.txt"), b"first object");
    let o = s.run(&["sync"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    put(
        &format!("primary:{src}/two.txt"),
        b"second object, never uploaded",
    );
    let before = raw(&s);

    let fake = s.dir.path().join("rclone-1.59");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nif [ \"$1\" = version ]; then\n  echo 'rclone v1.59.2'\n  echo '- os/version: debian'\n  exit 0\nfi\nexec '{}' \"$@\"\n",
            rig().rclone.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for args in [
        &["sync"][..],
        &["run"][..],
        &["verify", "--mode", "changed"][..],
        &["verify", "--mode", "full"][..],
    ] {
        let mut a = vec!["--rclone", fake.to_str().unwrap()];
        a.extend(args);
        let o = s.run(&a);
        assert_eq!(o.code, 7, "{args:?}: {}", o.stderr);
        assert!(
            o.stderr.contains("C013") && o.stderr.contains("1.59.2"),
            "{args:?}: {}",
            o.stderr
        );
        // One line of reason (the other lines are the policy's compliance warnings).
        let errors = o.stderr.lines().filter(|l| !l.contains("warning C0"));
        assert_eq!(errors.count(), 1, "{args:?}: {}", o.stderr);
        assert_eq!(raw(&s), before, "{args:?} changed the secondary");
    }
    let left = s.private_dirs();
    assert!(left.is_empty(), "private dirs left behind: {left:?}");
}

/// state.json's replica count is what the delete limit and the empty-source breaker rest on.
/// A first run into an empty root knows it without listing (0 + copied); a run without state
/// into a root that already holds a replica must not assume 0. Both with the key canary off,
/// where the canary's probe of the root is not there to tell an empty root.
#[test]
fn replica_count_in_state_is_right_without_state_whether_or_not_the_root_was_empty() {
    let s = setup(
        1,
        "guards:\n  key_canary: false\n  refuse_empty_source: false\n  keep_deleted_days: 0\n",
    );
    let src = &s.b.sources[0];
    for i in 0..5 {
        put(
            &format!("primary:{src}/d/obj-{i}.txt"),
            format!("object {i}").as_bytes(),
        );
    }
    let replica_objects = || -> Value {
        let st: Value =
            serde_json::from_slice(&s.crypt_cat("offsite:.offsite/state.json")).unwrap();
        st["buckets"][src.as_str()]["replica_objects"].clone()
    };
    let o = s.run(&["sync"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(replica_objects(), 5, "first run into an empty root");

    // The state lost (or a replica made by plain rclone): the next run has none, the root
    // holds 5 replica objects, and it copies 1 more.
    let out = s.crypt(&["deletefile", "offsite:.offsite/state.json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    put(&format!("primary:{src}/d/obj-5.txt"), b"object 5");
    let o = s.run(&["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(bucket(&o.json(), src)["copied"], 1);
    assert_eq!(
        replica_objects(),
        6,
        "run without state into a non-empty root"
    );
    assert_eq!(s.crypt_ls(&format!("offsite:data/{src}")).len(), 6);
}

#[test]
fn emptied_source_deletes_nothing_unless_allowed() {
    let s = setup(1, "");
    let src = &s.b.sources[0];
    for i in 0..4 {
        put(
            &format!("primary:{src}/dir/obj-{i}.txt"),
            format!("object {i}").as_bytes(),
        );
    }
    assert_eq!(s.run(&["sync"]).code, 0);
    let replica = s.crypt_ls(&format!("offsite:data/{src}"));
    assert_eq!(replica.len(), 4);
    for i in 0..4 {
        delete(&format!("primary:{src}/dir/obj-{i}.txt"));
    }
    let o = s.run(&["sync", "--output", "json"]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    let doc = o.json();
    let g = guard(&doc, "refuse_empty_source");
    assert_eq!(g[0]["result"], "refused");
    assert_eq!(g[0]["bucket"], src.as_str());
    // The count comes from state.json: the first run into an empty root counted 0 + copied.
    let detail = g[0]["detail"].as_str().unwrap();
    assert!(detail.contains("holds 4 objects"), "{detail}");
    assert_eq!(bucket(&doc, src)["status"], "guard_refused");
    assert_eq!(
        s.crypt_ls(&format!("offsite:data/{src}")),
        replica,
        "replica lost objects"
    );

    let o = s.run(&["sync", "--allow-empty-source", "--output", "json"]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(bucket(&doc, src)["deleted"], 4);
    assert_eq!(
        guard(&doc, "refuse_empty_source")[0]["result"],
        "overridden"
    );
    assert_eq!(
        s.crypt_ls(&format!("offsite:data/{src}")),
        Vec::<String>::new()
    );
    let run_id = doc["run_id"].as_str().unwrap();
    let kept = s.crypt_ls(&format!("offsite:deleted/{run_id}/{src}"));
    assert_eq!(kept, replica, "deletions were not kept");
}

#[test]
fn delete_storm_is_cut_off() {
    let s = setup(1, "guards:\n  max_delete_percent: 10\n");
    let src = &s.b.sources[0];
    // 200 objects, uploaded in one rclone copy from a local dir.
    let data = tempdir();
    for i in 0..200 {
        std::fs::write(
            data.path().join(format!("o{i:03}.txt")),
            format!("object {i}"),
        )
        .unwrap();
    }
    rclone_ok(&[
        "copy",
        data.path().to_str().unwrap(),
        &format!("primary:{src}"),
        "--transfers",
        "16",
    ]);
    let o = s.run(&["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(bucket(&o.json(), src)["copied"], 200);
    // Half of the source disappears.
    let mut list = String::new();
    for i in (0..200).step_by(2) {
        list += &format!("o{i:03}.txt\n");
    }
    let listf = data.path().join("gone.txt");
    std::fs::write(&listf, list).unwrap();
    rclone_ok(&[
        "delete",
        &format!("primary:{src}"),
        "--files-from-raw",
        listf.to_str().unwrap(),
    ]);
    assert_eq!(ls(&s.b.source(0)).len(), 100);

    let o = s.run(&["sync", "--output", "json"]);
    assert_eq!(o.code, 4, "{}\n{}", o.stdout, o.stderr);
    let doc = o.json();
    assert_eq!(doc["status"], "guard_refused");
    let g = guard(&doc, "max_delete");
    assert_eq!(g.len(), 1, "{doc}");
    assert_eq!(g[0]["result"], "refused");
    assert!(o.stdout.contains("delete-storm") || o.stderr.contains("delete-storm"));
    let left = s.crypt_ls(&format!("offsite:data/{src}")).len();
    assert!(left >= 180, "more than 10 % removed: {left} of 200 left");
    assert!(left < 200 || bucket(&doc, src)["deleted"] == 0);
}

#[test]
fn overwritten_and_deleted_objects_are_kept_and_old_generations_pruned() {
    let s = setup(
        1,
        "guards:\n  max_delete_percent: 100\n  keep_deleted_days: 7\n",
    );
    let src = &s.b.sources[0];
    put(&format!("primary:{src}/keep.txt"), b"unchanged");
    put(
        &format!("primary:{src}/over.txt"),
        b"original version of over.txt",
    );
    put(
        &format!("primary:{src}/gone.txt"),
        b"this object will be deleted at the source",
    );
    assert_eq!(s.run(&["sync"]).code, 0);
    std::thread::sleep(Duration::from_millis(1100));
    put(&format!("primary:{src}/over.txt"), b"second version");
    delete(&format!("primary:{src}/gone.txt"));
    let o = s.run(&["sync", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    let run_id = doc["run_id"].as_str().unwrap();
    // One object deleted, one overwritten (its old version kept, the replica still holds it).
    assert_eq!(bucket(&doc, src)["deleted"], 1, "{doc}");
    assert_eq!(bucket(&doc, src)["copied"], 1, "{doc}");
    assert_eq!(
        s.crypt_cat(&format!("offsite:deleted/{run_id}/{src}/over.txt")),
        b"original version of over.txt"
    );
    assert_eq!(
        s.crypt_cat(&format!("offsite:deleted/{run_id}/{src}/gone.txt")),
        b"this object will be deleted at the source"
    );
    assert_eq!(
        s.crypt_cat(&format!("offsite:data/{src}/over.txt")),
        b"second version"
    );

    // A fabricated generation from 2020 is pruned by `run`; this run's generation stays.
    let old = format!("offsite:deleted/20200101T000000Z-0000/{src}/ancient.txt");
    let conf = s.dir.path().join("admin.conf");
    let mut child = std::process::Command::new(&rig().rclone)
        .arg("--config")
        .arg(&conf)
        .args(["rcat", &old])
        .env_remove("AWS_CA_BUNDLE")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"old").unwrap();
    assert!(child.wait().unwrap().success());
    let o = s.run(&["deleted", "list", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let gens: Vec<String> = o.json()["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["run_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        gens,
        vec!["20200101T000000Z-0000".to_string(), run_id.to_string()]
    );

    let o = s.run(&["run", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    assert_eq!(
        doc["pruned_generations"],
        serde_json::json!(["20200101T000000Z-0000"])
    );
    assert_eq!(
        s.crypt_ls("offsite:deleted/20200101T000000Z-0000"),
        Vec::<String>::new()
    );
    assert_eq!(s.crypt_ls(&format!("offsite:deleted/{run_id}")).len(), 2);
}

fn spawn(s: &Setup, tmp: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_offsite"));
    cmd.arg("-c")
        .arg(&s.policy)
        .args(args)
        .env("OFFSITE_RCLONE", &rig().rclone)
        .env("TMPDIR", tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Wait until the lease object exists through crypt (the first run holds the lock).
fn wait_for_lease(s: &Setup) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = s.crypt(&["cat", "offsite:.offsite/leases"]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"held\":true") {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the first run never took the lease");
}

#[test]
fn concurrent_runs_one_replicates_the_other_exits_8() {
    let s = setup(1, "sync:\n  bwlimit: \"200k\"\n");
    let src = &s.b.sources[0];
    put(&format!("primary:{src}/slow.bin"), &vec![1u8; 700_000]);
    // Make sure the admin config exists before the race (render is not a run).
    s.crypt(&["version"]);
    for same_host in [true, false] {
        if !same_host {
            // Second round: new object, so the first run has something to do again.
            put(&format!("primary:{src}/slow2.bin"), &vec![2u8; 700_000]);
        }
        let first = spawn(&s, s.tmp.path(), &["run", "--output", "json"], &[]);
        wait_for_lease(&s);
        // Another "host": a different TMPDIR means a different local lock file, so only the
        // lease can stop it.
        let other_tmp = tempdir();
        let tmp2 = if same_host {
            s.tmp.path()
        } else {
            other_tmp.path()
        };
        let second = spawn(&s, tmp2, &["run", "--output", "json"], &[])
            .wait_with_output()
            .unwrap();
        assert_eq!(
            second.status.code(),
            Some(8),
            "same_host={same_host}: {}",
            String::from_utf8_lossy(&second.stderr)
        );
        let doc: Value = serde_json::from_slice(&second.stdout).unwrap();
        let err = doc["error"].as_str().unwrap();
        assert!(err.contains("holds") && err.contains("since"), "{err}");
        let first = first.wait_with_output().unwrap();
        assert_eq!(
            first.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&first.stderr)
        );
        let doc: Value = serde_json::from_slice(&first.stdout).unwrap();
        assert_eq!(doc["changed"], true);
    }
    assert_eq!(
        s.crypt_ls(&format!("offsite:data/{src}")),
        vec!["slow.bin", "slow2.bin"]
    );
}

/// A run killed with SIGKILL leaves its lease behind. Another host honours it until its TTL
/// (exit 8 naming the dead owner), then takes over; a run on the killed run's own machine
/// takes over at once (tests/faults.rs `sigkill_of_offsite_mid_sync_leaves_it_safe_for_the_next_run`).
#[test]
fn a_killed_run_blocks_other_hosts_until_its_lease_expires() {
    let s = setup(1, "sync:\n  bwlimit: \"100k\"\n");
    let src = &s.b.sources[0];
    put(&format!("primary:{src}/slow.bin"), &vec![1u8; 800_000]);
    s.crypt(&["version"]);
    let ttl = [("OFFSITE_LOCK_TTL_SECONDS", "8")];
    let mut first = spawn(&s, s.tmp.path(), &["run"], &ttl);
    wait_for_lease(&s);
    first.kill().unwrap(); // SIGKILL: no cleanup at all
    first.wait().unwrap();
    let killed_at = Instant::now();
    // rclone dies with offsite (PR_SET_PDEATHSIG): no orphan keeps writing.
    std::thread::sleep(Duration::from_millis(300));
    let tmp = s.tmp.path().to_str().unwrap().to_string();
    let orphans: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&tmp) && c.contains(" sync "))
        .collect();
    assert!(orphans.is_empty(), "orphaned rclone: {orphans:?}");
    // Another host sees a valid lease: refused, naming the dead owner.
    let other_tmp = tempdir();
    let other = |args: &[&str]| -> Out {
        let out = offsite_on_host("other-host")
            .arg("-c")
            .arg(&s.policy)
            .args(args)
            .env("TMPDIR", other_tmp.path())
            .envs(ttl)
            .output()
            .unwrap();
        Out::from(out)
    };
    let o = other(&["run", "--output", "json"]);
    assert!(
        killed_at.elapsed() < Duration::from_secs(7),
        "too slow to test the TTL"
    );
    assert_eq!(o.code, 8, "{}", o.stderr);
    assert!(o.stderr.contains("lease valid for"), "{}", o.stderr);
    // After the TTL it takes over and completes.
    std::thread::sleep(Duration::from_secs(9).saturating_sub(killed_at.elapsed()));
    let o = other(&["run", "--no-progress", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(s.crypt_ls(&format!("offsite:data/{src}")), vec!["slow.bin"]);
    assert_eq!(
        s.crypt_cat(&format!("offsite:data/{src}/slow.bin")),
        vec![1u8; 800_000]
    );
    // The killed run's private directory is removed by the next run on its machine.
    let o = s.run_env(&["sync", "--output", "json"], &ttl);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let left = s.private_dirs();
    assert!(left.is_empty(), "stale private dirs: {left:?}");
}
