//! `offsite verify` and the verify step of `run`, against real Garage with the rclone of this
//! pass: a clean replica passes in every mode, a corrupted or missing replica object fails with
//! exit 6 and is named, and a replica without MD5 (multipart) is checked by download — where
//! plain `rclone cryptcheck` passes it unchecked.

mod common;

use std::path::PathBuf;

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
        let out = offsite()
            .arg("-c")
            .arg(&self.policy)
            .args(args)
            .env("TMPDIR", self.tmp.path())
            .output()
            .unwrap();
        Out::from(out)
    }

    /// Plain rclone with offsite's rendered config (remotes source, destination, offsite).
    fn plain(&self, args: &[&str]) -> std::process::Output {
        let conf = self.dir.path().join("admin.conf");
        if !conf.exists() {
            let o = self.run(&["render", "--to", conf.to_str().unwrap()]);
            assert_eq!(o.code, 0, "{}", o.stderr);
        }
        crypt(&conf, args)
    }

    /// The raw (secondary) path of a replica object, e.g. `secondary:<bucket>/replica/<enc>`.
    fn raw_path(&self, bucket: &str, object: &str) -> String {
        let out = self.plain(&[
            "cryptdecode",
            "--reverse",
            "offsite:",
            &format!("data/{bucket}/{object}"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let enc = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.split('\t').nth(1).map(|s| s.trim().to_string()))
            .unwrap();
        format!("{}/replica/{enc}", self.b.dest())
    }
}

fn verify_of<'a>(doc: &'a Value, bucket: &str) -> &'a Value {
    &doc["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == bucket)
        .unwrap()["verify"]
}

fn fill(s: &Setup, n: usize) {
    let data = tempdir();
    for i in 0..n {
        let sub = data.path().join(format!("d{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join(format!("o{i:03}.txt")),
            format!("object number {i}"),
        )
        .unwrap();
    }
    rclone_ok(&[
        "copy",
        data.path().to_str().unwrap(),
        &s.b.source(0),
        "--transfers",
        "16",
    ]);
}

#[test]
fn clean_replica_passes_every_mode() {
    let s = setup(1, "verify:\n  after_sync: full\n  sample_percent: 20\n");
    fill(&s, 40);
    let o = s.run(&["run", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = verify_of(&o.json(), &s.b.sources[0]).clone();
    assert_eq!(
        (
            v["mode"].as_str(),
            v["checked"].as_u64(),
            v["matched"].as_u64()
        ),
        (Some("full"), Some(40), Some(40)),
        "{v}"
    );
    for (mode, checked) in [("full", 40), ("changed", 40), ("sample", 8)] {
        let o = s.run(&["verify", "--mode", mode, "--output", "json"]);
        assert_eq!(o.code, 0, "{mode}: {}", o.stderr);
        let doc = o.json();
        let v = verify_of(&doc, &s.b.sources[0]);
        assert_eq!(v["mode"], mode, "{v}");
        assert_eq!(v["checked"], checked, "{mode}: {v}");
        assert_eq!(v["matched"], checked, "{mode}: {v}");
        assert_eq!(v["unverifiable"], 0);
        if mode == "sample" {
            // The seed is reported, and repeating it checks the same objects.
            let seed = v["seed"].as_u64().unwrap().to_string();
            let again = s.run(&[
                "verify", "--mode", "sample", "--seed", &seed, "--output", "json",
            ]);
            assert_eq!(
                verify_of(&again.json(), &s.b.sources[0])["seed"]
                    .as_u64()
                    .unwrap()
                    .to_string(),
                seed
            );
        }
    }
}

#[test]
fn corrupted_or_missing_replica_objects_fail_with_their_names() {
    let s = setup(1, "");
    let src = s.b.sources[0].clone();
    fill(&s, 12);
    assert_eq!(s.run(&["sync"]).code, 0);
    // Overwrite one ciphertext object through the raw secondary, same size, other bytes.
    let victim = "d1/o005.txt";
    let raw = s.raw_path(&src, victim);
    let len = cat(&raw).len();
    put(&raw, &vec![0x5a; len]);
    for mode in ["full", "changed"] {
        let o = s.run(&["verify", "--mode", mode, "--output", "json"]);
        assert_eq!(o.code, 6, "{mode}: {}", o.stderr);
        let doc = o.json();
        assert_eq!(doc["status"], "verify_failed");
        let v = verify_of(&doc, &src);
        assert_eq!(v["differ"], 1, "{mode}: {v}");
        assert_eq!(v["problems"][0]["object"], victim);
        assert_eq!(v["problems"][0]["problem"], "differ");
    }
    // Text mode names the object too.
    let o = s.run(&["verify", "--mode", "full"]);
    assert!(
        o.stdout.contains(&format!("differ: {victim}")),
        "{}",
        o.stdout
    );

    // A replica object deleted on the secondary.
    let gone = "d2/o006.txt";
    delete(&s.raw_path(&src, gone));
    let o = s.run(&["verify", "--mode", "full", "--output", "json"]);
    assert_eq!(o.code, 6, "{}", o.stderr);
    let doc = o.json();
    let v = verify_of(&doc, &src);
    assert_eq!(v["missing_on_destination"], 1, "{v}");
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["object"] == gone && p["problem"] == "missing_on_destination"),
        "{v}"
    );
}

/// A 30 MB object uploaded multipart without MD5 at the source, replicated in multipart (so
/// the replica has no MD5 either): cryptcheck cannot hash it and passes it; offsite checks it by
/// download, reports it matched, and catches its corruption.
#[test]
fn multipart_replica_without_md5_is_checked_by_download() {
    let s = setup(
        1,
        "sync:\n  extra_flags: [\"--s3-upload-cutoff\", \"5M\", \"--s3-chunk-size\", \"5M\"]\n",
    );
    let src = s.b.sources[0].clone();
    let big: Vec<u8> = (0..30u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let local = s.dir.path().join("big.bin");
    std::fs::write(&local, &big).unwrap();
    rclone_ok(&[
        "copyto",
        local.to_str().unwrap(),
        &format!("{}/big.bin", s.b.source(0)),
        "--s3-upload-cutoff",
        "5M",
        "--s3-chunk-size",
        "5M",
        "--s3-disable-checksum",
    ]);
    put(&format!("{}/small.txt", s.b.source(0)), b"small");
    assert_eq!(s.run(&["sync"]).code, 0);

    let o = s.run(&["verify", "--mode", "full", "--output", "json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc = o.json();
    let v = verify_of(&doc, &src);
    assert_eq!(
        (
            v["checked"].as_u64(),
            v["matched"].as_u64(),
            v["by_download"].as_u64(),
            v["unverifiable"].as_u64()
        ),
        (Some(2), Some(2), Some(1), Some(0)),
        "{v}"
    );

    // Corrupt the replica's ciphertext (same size).
    let raw = s.raw_path(&src, "big.bin");
    let mut bytes = cat(&raw);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    let tmpf = s.dir.path().join("corrupt.bin");
    std::fs::write(&tmpf, &bytes).unwrap();
    rclone_ok(&[
        "copyto",
        tmpf.to_str().unwrap(),
        &raw,
        "--s3-upload-cutoff",
        "5M",
        "--s3-chunk-size",
        "5M",
        "--s3-disable-checksum",
    ]);

    // Plain cryptcheck passes it: it could not hash it.
    let plain = s.plain(&[
        "cryptcheck",
        &format!("source:{src}"),
        &format!("offsite:data/{src}"),
    ]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(
        plain.status.success(),
        "plain cryptcheck was expected to pass: {stderr}"
    );
    assert!(stderr.contains("1 hashes could not be checked"), "{stderr}");

    // offsite does not.
    let o = s.run(&["verify", "--mode", "full", "--output", "json"]);
    assert_eq!(o.code, 6, "{}", o.stderr);
    let doc = o.json();
    let v = verify_of(&doc, &src);
    assert_eq!(v["differ"], 1, "{v}");
    assert_eq!(v["problems"][0]["object"], "big.bin");
    // Sample mode always includes replicas without MD5.
    let o = s.run(&["verify", "--mode", "sample", "--output", "json"]);
    assert_eq!(o.code, 6, "{}", o.stderr);
}

#[test]
fn wrong_key_is_refused_not_reported_as_missing() {
    let s = setup(1, "");
    fill(&s, 3);
    assert_eq!(s.run(&["sync"]).code, 0);
    write_secret(s.dir.path(), PASSWORD_FILE, &random_secret(40));
    let o = s.run(&["verify", "--mode", "full", "--output", "json"]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    assert!(o.json()["error"].as_str().unwrap().contains("key canary"));
}
