//! Evidence and monitoring for `run` (policy.md `reporting`, cli.md "Metrics"): Prometheus
//! metrics written atomically to `reporting.metrics_file` and pushed to
//! `reporting.pushgateway_url`, and one attestation record per run, written to
//! `reporting.attestation_file` and, encrypted, to `.offsite/attestations/<run-id>.json`.
//!
//! Everything here is built from the run's JSON document, so the three views (stdout,
//! metrics, attestation) cannot disagree. No secret is ever an input.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};

use crate::policy::Policy;

/// Metric names (cli.md; fixed).
const LAST_RUN: &str = "offsite_last_run_timestamp_seconds";
const LAST_SUCCESS: &str = "offsite_last_success_timestamp_seconds";
const EXIT_CODE: &str = "offsite_run_exit_code";
const DURATION: &str = "offsite_run_duration_seconds";
const COPIED: &str = "offsite_bucket_copied_objects";
const COPIED_BYTES: &str = "offsite_bucket_copied_bytes";
const DELETED: &str = "offsite_bucket_deleted_objects";
const ERRORS: &str = "offsite_bucket_errors";
const VERIFY_DIFF: &str = "offsite_bucket_verify_differences";
const GUARD_REFUSED: &str = "offsite_guard_refused";

/// A label value in the exposition format: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What one run says, for the metrics.
pub struct RunFacts<'a> {
    pub policy: &'a str,
    pub doc: &'a Value,
    pub started_unix: f64,
    pub finished_unix: f64,
}

/// The Prometheus text exposition of a run. `previous_success` is the last success timestamp
/// to keep when this run failed (the gauge is only updated on success).
pub fn exposition(f: &RunFacts, previous_success: Option<f64>) -> String {
    let p = label(f.policy);
    let code = f.doc["exit_code"].as_i64().unwrap_or(1);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, f64)]| {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let pol = format!("policy=\"{p}\"");
    gauge(
        LAST_RUN,
        "Unix time the last offsite run finished.",
        &[(pol.clone(), f.finished_unix.floor())],
    );
    let success = if code == 0 {
        Some(f.finished_unix.floor())
    } else {
        previous_success
    };
    if let Some(t) = success {
        gauge(
            LAST_SUCCESS,
            "Unix time of the last successful offsite run.",
            &[(pol.clone(), t)],
        );
    }
    gauge(
        EXIT_CODE,
        "Exit code of the last offsite run (cli.md).",
        &[(pol.clone(), code as f64)],
    );
    gauge(
        DURATION,
        "Wall time of the last offsite run.",
        &[(
            pol.clone(),
            ((f.finished_unix - f.started_unix) * 1000.0).round() / 1000.0,
        )],
    );
    let buckets = f.doc["buckets"].as_array().cloned().unwrap_or_default();
    let per = |field: &str| -> Vec<(String, f64)> {
        buckets
            .iter()
            .filter_map(|b| {
                let name = b["name"].as_str()?;
                Some((
                    format!("{pol},bucket=\"{}\"", label(name)),
                    b[field].as_f64().unwrap_or(0.0),
                ))
            })
            .collect()
    };
    gauge(
        COPIED,
        "Objects copied to the replica by the last run.",
        &per("copied"),
    );
    gauge(
        COPIED_BYTES,
        "Plaintext bytes copied to the replica by the last run.",
        &per("copied_bytes"),
    );
    gauge(
        DELETED,
        "Objects removed from the replica by the last run (kept in deleted/ when configured).",
        &per("deleted"),
    );
    gauge(
        ERRORS,
        "Errors rclone reported for the bucket in the last run.",
        &per("errors"),
    );
    let diffs: Vec<(String, f64)> = buckets
        .iter()
        .filter_map(|b| {
            let v = b.get("verify")?;
            let n = [
                "differ",
                "missing_on_destination",
                "missing_on_source",
                "unverifiable",
            ]
            .iter()
            .map(|k| v[*k].as_f64().unwrap_or(0.0))
            .sum::<f64>();
            Some((
                format!("{pol},bucket=\"{}\"", label(b["name"].as_str()?)),
                n,
            ))
        })
        .collect();
    gauge(
        VERIFY_DIFF,
        "Objects the last verification found different, missing or unverifiable.",
        &diffs,
    );
    // One series per guard that can refuse: 1 when it refused in the last run, else 0.
    let guards = f.doc["guards"].as_array().cloned().unwrap_or_default();
    let error = f.doc["error"].as_str().unwrap_or("");
    let refused = |g: &str| -> f64 {
        let by_doc = guards
            .iter()
            .any(|d| d["guard"] == g && d["result"] == "refused");
        let by_error = match g {
            "key_canary" => error.starts_with("key canary"),
            "lock" => code == 8,
            _ => false,
        };
        f64::from(u8::from(by_doc || by_error))
    };
    let g: Vec<(String, f64)> = ["key_canary", "refuse_empty_source", "max_delete", "lock"]
        .iter()
        .map(|name| (format!("{pol},guard=\"{name}\""), refused(name)))
        .collect();
    gauge(
        GUARD_REFUSED,
        "1 when the guard refused in the last run (lock: another run held it).",
        &g,
    );
    out
}

/// The last success timestamp in an existing metrics file, to carry over a failed run.
pub fn previous_success(text: &str, policy: &str) -> Option<f64> {
    let want = format!("{LAST_SUCCESS}{{policy=\"{}\"}} ", label(policy));
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
}

/// Write `text` to `path` atomically: a temp file in the same directory, then rename, so the
/// node exporter never reads half a file.
pub fn write_atomic(path: &Path, text: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".offsite-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(text)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Push to a Pushgateway under job `offsite`, grouping label `policy`. POST replaces only the
/// metric names sent, so a failed run (which does not send the last-success gauge) keeps the
/// previous success timestamp there too.
pub fn push(url: &str, policy: &str, body: &str) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/');
    if !base.starts_with("http://") {
        anyhow::bail!(
            "reporting.pushgateway_url: only http:// is supported (offsite carries no TLS stack for the push); use an in-cluster http URL"
        );
    }
    // The grouping value in the path: policy names are [a-z0-9-], safe as a path segment.
    let target = format!("{base}/metrics/job/offsite/policy/{policy}");
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .new_agent();
    agent
        .post(&target)
        .header("Content-Type", "text/plain; version=0.0.4")
        .send(body)
        .map_err(|e| anyhow::anyhow!("pushing metrics to {target}: {e}"))?;
    Ok(())
}

/// The attestation record of a run: what was done, with what, under which crypto, and what
/// the guards and verification decided. No secret, and no secret's origin beyond its kind.
pub fn attestation(
    policy: &Policy,
    policy_file: &Path,
    doc: &Value,
    rclone_sha256: Option<&str>,
) -> Value {
    use sha2::Digest;
    let policy_sha = std::fs::read(policy_file).ok().map(|b| {
        sha2::Sha256::digest(&b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    });
    let enc = &policy.encryption;
    json!({
        "attestation_version": 1,
        "offsite_version": env!("CARGO_PKG_VERSION"),
        "run_id": doc["run_id"],
        "command": doc["command"],
        "policy": {"name": policy.name.0, "file": policy_file, "sha256": policy_sha},
        "rclone": {"path": doc["rclone"]["path"], "version": doc["rclone"]["version"], "sha256": rclone_sha256},
        "crypto": {
            "data": "XSalsa20-Poly1305 (NaCl secretbox), 64 KiB blocks",
            "names": format!(
                "AES-256-EME, filename_encryption {}, directory_name_encryption {}, encoding {}",
                enc.filename_encryption.as_str(),
                enc.directory_name_encryption,
                enc.filename_encoding.as_str()
            ),
            "kdf": "scrypt N=16384 r=8 p=1",
            "custom_salt": true,
        },
        "source": {"type": policy.source.kind(), "endpoint": policy.source.endpoint(), "region": policy.source.region()},
        "destination": {
            "type": policy.destination.kind(),
            "endpoint": policy.destination.endpoint(),
            "region": policy.destination.region(),
            "crypt_root": crate::render::crypt_root(policy),
        },
        "started": doc["started"],
        "finished": doc["finished"],
        "status": doc["status"],
        "exit_code": doc["exit_code"],
        "changed": doc["changed"],
        "error": doc.get("error"),
        "findings": doc["findings"],
        "guards": doc["guards"],
        "buckets": doc["buckets"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(code: i64) -> Value {
        json!({
            "exit_code": code,
            "buckets": [{"name": "harbor", "copied": 3, "copied_bytes": 10, "deleted": 1, "errors": 0,
                          "verify": {"differ": 1, "missing_on_destination": 0, "missing_on_source": 0, "unverifiable": 0}}],
            "guards": [{"guard": "max_delete", "bucket": "harbor", "result": "refused"}],
        })
    }

    #[test]
    fn exposition_has_every_name_and_labels() {
        let d = doc(0);
        let f = RunFacts {
            policy: "prod-sc",
            doc: &d,
            started_unix: 100.0,
            finished_unix: 160.5,
        };
        let t = exposition(&f, None);
        for n in [
            LAST_RUN,
            LAST_SUCCESS,
            EXIT_CODE,
            DURATION,
            COPIED,
            COPIED_BYTES,
            DELETED,
            ERRORS,
            VERIFY_DIFF,
            GUARD_REFUSED,
        ] {
            assert!(
                t.contains(&format!("# TYPE {n} gauge")),
                "{n} missing:\n{t}"
            );
        }
        assert!(t.contains("offsite_bucket_copied_objects{policy=\"prod-sc\",bucket=\"harbor\"} 3"));
        assert!(t.contains("offsite_guard_refused{policy=\"prod-sc\",guard=\"max_delete\"} 1"));
        assert!(t.contains("offsite_run_duration_seconds{policy=\"prod-sc\"} 60.5"));
        assert!(t.contains("offsite_last_success_timestamp_seconds{policy=\"prod-sc\"} 160"));
    }

    #[test]
    fn failed_run_keeps_previous_success() {
        let d = doc(5);
        let f = RunFacts {
            policy: "p",
            doc: &d,
            started_unix: 1.0,
            finished_unix: 2.0,
        };
        let t = exposition(&f, Some(42.0));
        assert_eq!(previous_success(&t, "p"), Some(42.0));
        assert!(t.contains("offsite_run_exit_code{policy=\"p\"} 5"));
        assert!(!exposition(&f, None).contains(LAST_SUCCESS));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
