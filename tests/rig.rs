//! Proves the test rig itself: two distinct Garage servers reachable through the raw rclone
//! helper (with the rclone of this pass), and the helpers in `common`.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn rig_two_distinct_garage_servers() {
    let b = bucket_pair(2);
    let src = &b.sources[0];

    let data: Vec<u8> = b"hello offsite rig\n\x00\x01\xfe\xff"
        .iter()
        .copied()
        .chain((0..70_000u32).map(|i| (i * 7 % 251) as u8))
        .collect();
    put(&format!("primary:{src}/dir/hello.bin"), &data);
    put(&format!("primary:{src}/empty"), b"");

    let primary = buckets("primary:");
    let secondary = buckets("secondary:");
    for s in &b.sources {
        assert!(primary.contains(s), "primary lacks {s}: {primary:?}");
        assert!(!secondary.contains(s), "secondary shows source bucket {s}");
    }
    assert!(
        secondary.contains(&b.destination),
        "secondary lacks {}: {secondary:?}",
        b.destination
    );
    assert!(
        !primary.contains(&b.destination),
        "primary shows the destination bucket"
    );

    assert_eq!(cat(&format!("primary:{src}/dir/hello.bin")), data);
    assert_eq!(cat(&format!("primary:{src}/empty")), b"");
    assert_eq!(
        ls(&b.source(0)),
        vec![
            ("dir/hello.bin".to_string(), data.len() as u64),
            ("empty".to_string(), 0)
        ]
    );
    assert_eq!(ls(&b.source(1)), vec![]);
    assert_eq!(ls(&b.dest()), vec![]);

    delete(&format!("primary:{src}/empty"));
    assert_eq!(
        ls(&b.source(0)),
        vec![("dir/hello.bin".to_string(), data.len() as u64)]
    );
}

#[test]
fn rig_regions_are_enforced() {
    // Garage checks the signing region: the rig's regions really are sto1 and fra1.
    let r = rig();
    assert_eq!(r.primary.region, "sto1");
    assert_eq!(r.secondary.region, "fra1");
    assert_ne!(r.primary.endpoint, r.secondary.endpoint);
    let name = unique("region");
    let p = &r.primary;
    let remote = format!(
        ":s3,provider=Other,env_auth=false,region=fra1,force_path_style=true,\
         endpoint='{}',access_key_id='{}',secret_access_key='{}':{name}",
        p.endpoint, p.key_id, p.secret
    );
    let out = rclone(&["mkdir", &remote]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "primary accepted a request signed for fra1"
    );
    assert!(
        stderr.contains("AuthorizationHeaderMalformed"),
        "unexpected failure: {stderr}"
    );
    assert!(!buckets("primary:").contains(&name));
}

#[test]
fn rig_unique_names_are_bucket_safe() {
    let mut seen = std::collections::HashSet::new();
    for prefix in [
        "src",
        "dst",
        "A Very_Long.Prefix-With UPPER case and more",
        "",
        "-x-",
    ] {
        for _ in 0..50 {
            let n = unique(prefix);
            assert!(n.len() >= 3 && n.len() <= 40, "{n}");
            assert!(n
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
            assert!(!n.starts_with('-') && !n.ends_with('-'), "{n}");
            assert!(seen.insert(n.clone()), "duplicate {n}");
        }
    }
}

#[test]
fn rig_policy_is_well_formed() {
    let dir = tempdir();
    let b = Buckets {
        sources: vec!["a-bucket".into(), "b-bucket".into()],
        destination: "d".into(),
    };
    let path = s3_policy(dir.path(), &b);
    let v: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["version"].as_u64(), Some(1));
    assert_eq!(v["source"]["region"].as_str(), Some("sto1"));
    assert_eq!(v["destination"]["region"].as_str(), Some("fra1"));
    assert_eq!(v["destination"]["bucket"].as_str(), Some("d"));
    assert_eq!(v["destination"]["prefix"].as_str(), Some("replica"));
    assert_eq!(
        v["source"]["options"]["force_path_style"].as_bool(),
        Some(true)
    );
    assert_eq!(v["compliance"]["require_tls"].as_bool(), Some(false));
    assert_eq!(v["buckets"][1].as_str(), Some("b-bucket"));

    let read = |p: &serde_yaml_ng::Value| {
        let p = std::path::PathBuf::from(p["file"].as_str().expect("{file: ..} reference"));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
        std::fs::read_to_string(p).unwrap()
    };
    let password = read(&v["encryption"]["password"]);
    let salt = read(&v["encryption"]["salt"]);
    assert_eq!(
        read(&v["source"]["secret_access_key"]),
        rig().primary.secret
    );
    assert_eq!(
        read(&v["destination"]["access_key_id"]),
        rig().secondary.key_id
    );
    assert_ne!(password, salt);
    for s in [&password, &salt] {
        assert_eq!(s.len(), 40);
        let mut c: Vec<char> = s.chars().collect();
        c.sort_unstable();
        c.dedup();
        assert!(c.len() >= 10);
    }

    // Overrides replace whole sections, add new ones, and keep the crypt key files.
    let path = s3_policy_with(
        dir.path(),
        &b,
        "guards:\n  max_delete_percent: 50\ncompliance:\n  require_tls: false\n  forbid_same_region: false\n",
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(v["guards"]["max_delete_percent"].as_u64(), Some(50));
    assert_eq!(v["compliance"]["forbid_same_region"].as_bool(), Some(false));
    assert_eq!(text.matches("compliance:").count(), 1);
    assert_eq!(read(&v["encryption"]["password"]), password);
}

#[test]
fn rig_offsite_binary_runs() {
    // The helper finds the real binary; a bare `--help` must not touch any storage.
    let out = offsite().arg("--help").output().unwrap();
    assert!(
        out.status.code().is_some(),
        "offsite --help was killed by a signal: {out:?}"
    );
}

#[test]
fn rig_policy_passes_offsite_check() {
    // The policy written by the helper must be valid for the product (only warnings, e.g.
    // require_tls: false), otherwise every end-to-end test would start from a broken policy.
    let dir = tempdir();
    let b = bucket_pair(1);
    let path = s3_policy(dir.path(), &b);
    let out = offsite()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    // Shown with `-- --nocapture`.
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        out.status.code(),
        Some(0),
        "offsite check rejected the rig policy:\n{}\n--- stdout:\n{}\n--- stderr:\n{}",
        std::fs::read_to_string(&path).unwrap(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
