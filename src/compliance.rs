//! Compliance rules C001–C012 (policy.md, "Compliance rules"). C013 (rclone version) is checked
//! by the rclone module when rclone is needed; its id is reserved here.
//!
//! Rules only read the validated [`Policy`]; they never contact storage.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::policy::{FilenameEncryption, Policy, SecretOrigin, Side};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub id: &'static str,
    pub severity: Severity,
    pub field: String,
    pub message: String,
}

/// The reserved id of the rclone-version rule (checked in the rclone module, exit 7).
pub const C013: &str = "C013";

/// Flags `sync.extra_flags` may not carry (C009), with why. Long flags match exactly or with
/// `=value`; see [`forbidden_flag`].
const FORBIDDEN: &[(&str, &str)] = &[
    ("--no-check-certificate", "disables TLS verification"),
    ("--dump", "dumps requests, which can include secrets"),
    ("--dump-headers", "dumps headers, which include auth"),
    ("--dump-bodies", "dumps bodies"),
    ("--dump-auth", "dumps credentials"),
    ("--crypt-no-data-encryption", "turns off data encryption"),
    ("--crypt-pass-bad-blocks", "passes corrupted blocks as good"),
    (
        "--crypt-show-mapping",
        "logs plaintext-to-ciphertext name mapping",
    ),
    (
        "--crypt-server-side-across-configs",
        "can copy ciphertext between keys",
    ),
    (
        "--server-side-across-configs",
        "can copy ciphertext between keys",
    ),
    (
        "--crypt-password",
        "is managed by offsite (and would put a secret in argv)",
    ),
    (
        "--crypt-password2",
        "is managed by offsite (and would put a secret in argv)",
    ),
    (
        "--crypt-filename-encryption",
        "overrides encryption.filename_encryption",
    ),
    (
        "--crypt-directory-name-encryption",
        "overrides encryption.directory_name_encryption",
    ),
    ("--metadata", "copies metadata and xattrs in clear"),
    ("--metadata-set", "writes metadata in clear"),
    ("--ignore-errors", "makes sync delete despite I/O errors"),
    (
        "--s3-disable-checksum",
        "uploads without MD5, so nothing can verify them",
    ),
    ("--size-only", "skips content comparison"),
    ("--ignore-size", "skips size comparison"),
    ("--ignore-checksum", "skips checksum verification"),
    ("--checksum", "silently falls back to size-only under crypt"),
    ("--config", "is managed by offsite"),
    (
        "--backup-dir",
        "is managed by offsite (guards.keep_deleted_days)",
    ),
    (
        "--max-delete",
        "is managed by offsite (guards.max_delete_percent)",
    ),
    ("--password-command", "is managed by offsite"),
    // Backend flags apply to every remote of their type, so an S3 connection flag would point
    // source AND destination at one endpoint or one set of keys; the key flags also put a
    // secret in argv. Not in policy.md's list: offsite's own addition (docs/policy.md).
    (
        "--s3-endpoint",
        "overrides source.endpoint and destination.endpoint at once",
    ),
    ("--s3-region", "overrides both sides' region"),
    ("--s3-provider", "overrides both sides' provider"),
    (
        "--s3-access-key-id",
        "overrides both sides' keys (and puts them in argv)",
    ),
    (
        "--s3-secret-access-key",
        "overrides both sides' keys (and puts them in argv)",
    ),
    ("--s3-session-token", "puts a credential in argv"),
    (
        "--s3-env-auth",
        "takes credentials from the environment instead of the policy",
    ),
    (
        "--s3-profile",
        "takes credentials from a shared profile instead of the policy",
    ),
    (
        "--s3-shared-credentials-file",
        "takes credentials from a file instead of the policy",
    ),
    ("--s3-sse-customer-key", "puts an encryption key in argv"),
    (
        "--s3-sse-customer-key-base64",
        "puts an encryption key in argv",
    ),
];

/// Every `--crypt-*` flag overrides the crypt remote offsite renders from `encryption:` (its
/// remote, encodings, suffix, key): all of it is offsite's. The one exception only adds
/// checking (rclone >= 1.66: names that do not decrypt are errors, not skipped).
const CRYPT_PREFIX: &str = "--crypt-";
const CRYPT_ALLOWED: &[&str] = &["--crypt-strict-names"];

/// Why `flag` is forbidden, if it is. Handles `--flag`, `--flag=value`, the short forms
/// `-M` (metadata) and `-c` (checksum), `-vv`/`-vvv`, and `--log-level DEBUG` / `=DEBUG`
/// (1.60 prints obscured secrets at DEBUG). `next` is the following argv element.
pub fn forbidden_flag(flag: &str, next: Option<&str>) -> Option<&'static str> {
    let name = flag.split('=').next().unwrap_or(flag);
    // rclone accepts `_` for `-` in long flag names (pflag normalisation).
    let name = name.replace('_', "-").to_ascii_lowercase();
    if let Some((_, why)) = FORBIDDEN.iter().find(|(f, _)| *f == name) {
        return Some(why);
    }
    if name.starts_with(CRYPT_PREFIX) && !CRYPT_ALLOWED.contains(&name.as_str()) {
        return Some("overrides the crypt remote that offsite renders from encryption:");
    }
    if let Some(shorts) = flag.strip_prefix('-').filter(|s| !s.starts_with('-')) {
        // Combined short flags: `-Mv`, `-cv`, `-vv`.
        let shorts = shorts.split('=').next().unwrap_or(shorts);
        if shorts.contains('M') {
            return Some("copies metadata and xattrs in clear");
        }
        if shorts.contains('c') {
            return Some("silently falls back to size-only under crypt");
        }
        if shorts.chars().filter(|&c| c == 'v').count() >= 2 {
            return Some("DEBUG logging prints obscured secrets on rclone 1.60");
        }
    }
    if name == "--verbose" && flag.contains('=') {
        let n: u32 = flag
            .split('=')
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if n >= 2 {
            return Some("DEBUG logging prints obscured secrets on rclone 1.60");
        }
    }
    if name == "--log-level" || name == "--stats-log-level" {
        let value = flag.split_once('=').map(|(_, v)| v).or(next).unwrap_or("");
        if value.eq_ignore_ascii_case("debug") {
            return Some("DEBUG logging prints obscured secrets on rclone 1.60");
        }
    }
    None
}

/// Run rules C001–C012 over a parsed policy.
pub fn check(p: &Policy) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |id: &'static str, severity: Severity, field: &str, message: String| {
        out.push(Finding {
            id,
            severity,
            field: field.to_string(),
            message,
        })
    };
    use Severity::{Error, Warning};
    let enc = &p.encryption;

    if enc.filename_encryption != FilenameEncryption::Standard {
        push(
            "C001",
            Error,
            "encryption.filename_encryption",
            format!(
            "`{}` leaks object names to the secondary provider; set filename_encryption: standard",
            enc.filename_encryption.as_str()
        ),
        );
    }
    if !enc.directory_name_encryption {
        push("C002", Error, "encryption.directory_name_encryption",
            "directory names (bucket names, paths) would be stored in clear; set directory_name_encryption: true".into());
    }
    if enc.password.expose() == enc.salt.expose() {
        push("C003", Error, "encryption.salt",
            "the salt equals the password, which makes it no salt at all; generate a separate random salt (offsite init does)".into());
    }
    let min = p.compliance.min_secret_length.0 as usize;
    for (field, s) in [
        ("encryption.password", &enc.password),
        ("encryption.salt", &enc.salt),
    ] {
        let v = s.expose();
        let len = v.chars().count();
        let distinct = {
            let mut c: Vec<char> = v.chars().collect();
            c.sort_unstable();
            c.dedup();
            c.len()
        };
        if len < min {
            push("C004", Error, field, format!(
                "is {len} characters, shorter than compliance.min_secret_length ({min}); generate a longer random secret"
            ));
        } else if distinct < 10 {
            push("C004", Error, field, format!(
                "has only {distinct} distinct characters, which is trivially guessable; use a random secret"
            ));
        }
    }
    for (field, s) in p.secrets() {
        if s.origin == SecretOrigin::Inline {
            let (sev, advice) = if p.compliance.allow_inline_secrets {
                (Warning, "is written inline in the policy file (allowed by compliance.allow_inline_secrets); prefer {env: ..} or {file: ..}")
            } else {
                (
                    Error,
                    "is written inline in the policy file; move it to {env: NAME} or {file: PATH}",
                )
            };
            push("C005", sev, &field, advice.into());
        }
        if s.group_or_other_readable {
            if let SecretOrigin::File(path) = &s.origin {
                push(
                    "C012",
                    Error,
                    &field,
                    format!(
                        "secret file {} is readable by group or others; chmod 600 it",
                        path.display()
                    ),
                );
            }
        }
    }
    if p.compliance.require_tls {
        for (field, side) in [
            ("source.endpoint", &p.source),
            ("destination.endpoint", &p.destination),
        ] {
            if let Some(ep) = side.endpoint() {
                if ep.starts_with("http://") {
                    push(
                        "C006",
                        Error,
                        field,
                        format!(
                            "`{ep}` is plain http while compliance.require_tls is true; use https"
                        ),
                    );
                }
            }
        }
    } else {
        push("C006", Warning, "compliance.require_tls",
            "TLS is not required, so credentials and ciphertext may cross the network in clear; use https endpoints and require_tls: true".into());
    }
    if p.compliance.forbid_same_region {
        if let (Some(s), Some(d)) = (p.source.region(), p.destination.region()) {
            if s.eq_ignore_ascii_case(d) {
                push("C007", Error, "destination.region", format!(
                    "the destination is in the same region as the source ({d}), so one regional outage loses both copies; replicate to another region"
                ));
            }
        }
    }
    if let Some(allowed) = &p.compliance.allowed_destination_regions {
        let region = p.destination.region();
        if !region.is_some_and(|r| allowed.iter().any(|a| a.0 == r)) {
            let list: Vec<&str> = allowed.iter().map(|a| a.0.as_str()).collect();
            push("C008", Error, "destination.region", format!(
                "destination region {} is not in compliance.allowed_destination_regions [{}]; pick an allowed region or update the allow-list",
                region.unwrap_or("(unset)"), list.join(", ")
            ));
        }
    }
    let flags = &p.sync.extra_flags;
    for (i, f) in flags.iter().enumerate() {
        let next = flags.get(i + 1).map(|n| n.0.as_str());
        if let Some(why) = forbidden_flag(&f.0, next) {
            push(
                "C009",
                Error,
                &format!("sync.extra_flags[{i}]"),
                format!("`{}` is forbidden: it {why}; remove it", f.0),
            );
        }
    }
    if let Some(field) = same_storage(p) {
        push("C010", Error, field,
            "the destination is the same storage and bucket as a source bucket, so the replica would replicate into itself; use a separate bucket on another storage".into());
    }
    let g = &p.guards;
    if !g.key_canary {
        push("C011", Warning, "guards.key_canary",
            "without the key canary a wrong key silently re-uploads everything; set key_canary: true".into());
    }
    if !g.refuse_empty_source {
        push("C011", Warning, "guards.refuse_empty_source",
            "an emptied or wiped source bucket would delete the whole replica; set refuse_empty_source: true".into());
    }
    if g.max_delete_percent.0 >= 100 {
        push("C011", Warning, "guards.max_delete_percent",
            "the delete-storm breaker is off; a run may delete the whole replica. Set a limit such as 10".into());
    }
    out
}

/// C010: the destination bucket is one of the source buckets on the same storage.
fn same_storage(p: &Policy) -> Option<&'static str> {
    let listed: Vec<&str> = p
        .listed_buckets()
        .iter()
        .map(|b| b.name.0.as_str())
        .collect();
    let all = listed.is_empty();
    match (&p.source, &p.destination) {
        (Side::S3(s), Side::S3(d)) => {
            let norm = |e: &str| e.trim_end_matches('/').to_ascii_lowercase();
            if norm(&s.endpoint.0) != norm(&d.endpoint.0) {
                return None;
            }
            let db = d.bucket.as_ref()?.0.as_str();
            (all || listed.contains(&db)).then_some("destination.bucket")
        }
        (Side::Local { path: s }, Side::Local { path: d }) => {
            let s = normalize(s);
            let d = normalize(d);
            // The crypt root inside a source bucket directory (or the source root when every
            // subdirectory is a bucket) would be read back as source data.
            let inside_bucket = if all {
                d.starts_with(&s) && d != s
            } else {
                listed.iter().any(|b| d.starts_with(s.join(b)))
            };
            (inside_bucket || s.starts_with(&d)).then_some("destination.path")
        }
        _ => None,
    }
}

fn normalize(p: &Path) -> PathBuf {
    // Lexical only: the paths may not exist yet. `..` was not forbidden for local paths, so
    // fold it here.
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

pub fn has_errors(f: &[Finding]) -> bool {
    f.iter().any(|f| f.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::forbidden_flag;

    #[test]
    fn forbidden_forms() {
        for f in [
            "--no-check-certificate",
            "--dump=headers",
            "--dump-auth",
            "-vv",
            "-vvv",
            "-M",
            "--metadata",
            "--checksum",
            "-c",
            "--max-delete=5",
            "--backup_dir=x",
            "--log-level=DEBUG",
            "--crypt-password=abc",
            "--crypt-remote=destination:other",
            "--crypt-filename-encoding=base64",
            "--crypt_suffix=.bin",
            "--s3-endpoint=http://elsewhere",
            "--s3-env-auth",
            "--S3-Secret-Access-Key=x",
        ] {
            assert!(forbidden_flag(f, None).is_some(), "{f} should be forbidden");
        }
        assert!(forbidden_flag("--log-level", Some("DEBUG")).is_some());
        for f in [
            "--fast-list",
            "-v",
            "--retries=5",
            "--log-level=INFO",
            "--check-first",
            "--crypt-strict-names",
            "--s3-upload-concurrency=8",
        ] {
            assert!(forbidden_flag(f, None).is_none(), "{f} should be allowed");
        }
        assert!(forbidden_flag("--log-level", Some("INFO")).is_none());
    }
}
