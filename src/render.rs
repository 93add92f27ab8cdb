//! Rendering the private rclone.conf from `templates/rclone.conf.j2`.
//!
//! Remotes: `source` (the primary), `destination` (the secondary, raw) and `offsite` (crypt over
//! `destination:<bucket>/<prefix>`, the crypt root). Rust decides every key and value; the
//! template only lays them out. Every interpolated value is checked for INI injection (no
//! control characters, no surrounding blanks or quotes) even though the policy parser already
//! refused most of them: the config must never gain a section or key the policy did not ask for.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::exit::{fail, Code};
use crate::policy::{Policy, Secret, Side};

const TEMPLATE: &str = include_str!("../templates/rclone.conf.j2");

/// Backend options offsite sets itself; `options:` may not override them.
const MANAGED_KEYS: &[&str] = &[
    "type",
    "provider",
    "env_auth",
    "access_key_id",
    "secret_access_key",
    "endpoint",
    "region",
    "remote",
    "password",
    "password2",
    "filename_encryption",
    "directory_name_encryption",
    "filename_encoding",
];

#[derive(Serialize)]
struct Remote {
    name: &'static str,
    lines: Vec<(String, String)>,
}

/// How secrets appear in the rendered text.
pub enum Secrets {
    /// Real values, crypt passwords obscured (for running rclone, and `render --to`).
    Real,
    /// `<redacted: env NAME>` placeholders (for `plan`).
    Redacted,
}

fn secret_value(s: &Secret, mode: &Secrets, obscure_it: bool) -> anyhow::Result<String> {
    match mode {
        Secrets::Redacted => Ok(format!("<redacted: {}>", s.origin)),
        Secrets::Real if obscure_it => obscure(s.expose()),
        Secrets::Real => Ok(s.expose().to_string()),
    }
}

/// rclone's fixed, public "obscure" key (fs/config/obscure/obscure.go). Obscuring is not
/// encryption: it only keeps a password from being read over a shoulder. The config file's
/// protection is its 0600 mode in a 0700 directory.
const OBSCURE_KEY: [u8; 32] = [
    0x9c, 0x93, 0x5b, 0x48, 0x73, 0x0a, 0x55, 0x4d, 0x6b, 0xfd, 0x7c, 0x63, 0xc8, 0x86, 0xa9, 0x2b,
    0xd3, 0x90, 0x19, 0x8e, 0xb8, 0x12, 0x8a, 0xfb, 0xf4, 0xde, 0x16, 0x2b, 0x8b, 0x95, 0xf6, 0x38,
];

/// What `rclone obscure` does: a random 16-byte IV, AES-256-CTR (Go's `cipher.NewCTR`, a
/// big-endian 128-bit counter) under the fixed key, then unpadded base64url of IV‖ciphertext.
/// Done in-process because each rclone start costs ~70 ms, which matters for a no-change run;
/// tests check the result with the real `rclone reveal` of both supported versions.
pub fn obscure(secret: &str) -> anyhow::Result<String> {
    use aes::cipher::{KeyIvInit, StreamCipher};
    use base64::Engine;
    type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;
    let mut iv = [0u8; 16];
    getrandom::fill(&mut iv).map_err(|e| anyhow::anyhow!("OS random generator failed: {e}"))?;
    let mut buf = secret.as_bytes().to_vec();
    Aes256Ctr::new(&OBSCURE_KEY.into(), &iv.into()).apply_keystream(&mut buf);
    let mut out = iv.to_vec();
    out.extend_from_slice(&buf);
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out))
}

/// Check one INI value. rclone's config parser trims blanks around values and strips one pair of
/// surrounding quotes, so a value with those would not round-trip; a control character could
/// start a new line, i.e. a new key or section.
fn ini_value(field: &str, v: &str) -> anyhow::Result<String> {
    let bad = v.chars().any(char::is_control)
        || v != v.trim()
        || v.starts_with(['"', '\'', '`'])
        || v.is_empty();
    if bad {
        return Err(fail(
            Code::Invalid,
            format!("{field}: value cannot be written safely into rclone.conf (empty, control character, surrounding blanks or quotes)"),
        ));
    }
    if has_var_ref(v) {
        return Err(fail(
            Code::Invalid,
            format!("{field}: value contains `%(name)s`, which rclone's config reader replaces with the value of key `name`; it cannot be written into rclone.conf"),
        ));
    }
    Ok(v.to_string())
}

/// rclone reads rclone.conf with goconfig, whose `GetValue` replaces every match of
/// `%\(([^)]+)\)s` with the value of that key (of the same section, or "" if none), with no
/// escape (observed on 1.60.1 and 1.75.2 with `rclone config dump`). Such a value is not what
/// the policy says, and could copy one key's value (a secret) into another.
fn has_var_ref(v: &str) -> bool {
    let mut rest = v;
    while let Some(start) = rest.find("%(") {
        let after = &rest[start + 2..];
        if let Some(close) = after.find(')') {
            if close > 0 && after[close + 1..].starts_with('s') {
                return true;
            }
        }
        rest = &rest[start + 1..];
    }
    false
}

fn side_lines(field: &str, side: &Side, mode: &Secrets) -> anyhow::Result<Vec<(String, String)>> {
    let mut lines = Vec::new();
    let opts = |options: &std::collections::BTreeMap<String, String>,
                lines: &mut Vec<(String, String)>|
     -> anyhow::Result<()> {
        for (k, v) in options {
            if MANAGED_KEYS.contains(&k.as_str()) {
                return Err(fail(
                    Code::Invalid,
                    format!("{field}.options.{k}: set by offsite from the policy; remove it from options"),
                ));
            }
            lines.push((k.clone(), ini_value(&format!("{field}.options.{k}"), v)?));
        }
        Ok(())
    };
    match side {
        Side::S3(s) => {
            lines.push(("type".into(), "s3".into()));
            lines.push((
                "provider".into(),
                ini_value(&format!("{field}.provider"), &s.provider.0)?,
            ));
            // Credentials come from this file only, never from the environment or instance
            // metadata (the child environment is scrubbed as well).
            lines.push(("env_auth".into(), "false".into()));
            lines.push((
                "access_key_id".into(),
                ini_value(
                    &format!("{field}.access_key_id"),
                    &secret_value(&s.access_key_id, mode, false)?,
                )?,
            ));
            lines.push((
                "secret_access_key".into(),
                ini_value(
                    &format!("{field}.secret_access_key"),
                    &secret_value(&s.secret_access_key, mode, false)?,
                )?,
            ));
            lines.push((
                "endpoint".into(),
                ini_value(&format!("{field}.endpoint"), &s.endpoint.0)?,
            ));
            if let Some(r) = &s.region {
                lines.push((
                    "region".into(),
                    ini_value(&format!("{field}.region"), &r.0)?,
                ));
            }
            opts(&s.options, &mut lines)?;
        }
        Side::Local { path } => {
            // An alias remote makes `source:<bucket>` mean `<path>/<bucket>` for local
            // directories, exactly as it means a bucket on S3.
            lines.push(("type".into(), "alias".into()));
            lines.push((
                "remote".into(),
                ini_value(&format!("{field}.path"), &path.to_string_lossy())?,
            ));
        }
        Side::Other { kind, options, .. } => {
            lines.push(("type".into(), ini_value(&format!("{field}.type"), kind)?));
            opts(options, &mut lines)?;
        }
    }
    Ok(lines)
}

/// The path under the `destination` remote that holds the crypt root.
pub fn crypt_root(p: &Policy) -> String {
    let (bucket, prefix) = match &p.destination {
        Side::S3(s) => (s.bucket.as_ref(), s.prefix.as_ref()),
        Side::Other { bucket, prefix, .. } => (bucket.as_ref(), prefix.as_ref()),
        Side::Local { .. } => (None, None),
    };
    let mut root = String::from("destination:");
    if let Some(b) = bucket {
        root.push_str(&b.0);
        if let Some(pre) = prefix {
            root.push('/');
            root.push_str(&pre.0);
        }
    }
    root
}

/// Render the rclone.conf text.
pub fn render(p: &Policy, mode: &Secrets) -> anyhow::Result<String> {
    let enc = &p.encryption;
    let crypt = vec![
        ("type".to_string(), "crypt".to_string()),
        (
            "remote".to_string(),
            ini_value("destination", &crypt_root(p))?,
        ),
        // rclone.conf wants these obscured (rclone-facts.md): a plaintext value that happens to
        // be valid base64url would silently be taken as a different key.
        (
            "password".to_string(),
            ini_value(
                "encryption.password",
                &secret_value(&enc.password, mode, true)?,
            )?,
        ),
        (
            "password2".to_string(),
            ini_value("encryption.salt", &secret_value(&enc.salt, mode, true)?)?,
        ),
        (
            "filename_encryption".to_string(),
            enc.filename_encryption.as_str().to_string(),
        ),
        (
            "directory_name_encryption".to_string(),
            enc.directory_name_encryption.to_string(),
        ),
        (
            "filename_encoding".to_string(),
            enc.filename_encoding.as_str().to_string(),
        ),
    ];
    let remotes = vec![
        Remote {
            name: "source",
            lines: side_lines("source", &p.source, mode)?,
        },
        Remote {
            name: "destination",
            lines: side_lines("destination", &p.destination, mode)?,
        },
        Remote {
            name: "offsite",
            lines: crypt,
        },
    ];
    let mut env = minijinja::Environment::new();
    env.set_keep_trailing_newline(true);
    env.add_template("rclone.conf", TEMPLATE)
        .context("loading templates/rclone.conf.j2")?;
    let text = env
        .get_template("rclone.conf")
        .and_then(|t| {
            t.render(minijinja::context! {
                offsite_version => env!("CARGO_PKG_VERSION"),
                policy => p.name.0,
                remotes => remotes,
            })
        })
        .context("rendering rclone.conf")?;
    Ok(format!("{}\n", text.trim_end()))
}

/// A rendered config in a private temporary directory (0700) as a 0600 file. Dropping it
/// removes both, on every exit path that unwinds (errors, SIGTERM/SIGINT via
/// [`crate::signals`]); only SIGKILL can leave it, still 0600 in a 0700 directory.
pub struct PrivateConfig {
    // Its Drop removes the directory and everything in it.
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl PrivateConfig {
    pub fn new(p: &Policy) -> anyhow::Result<PrivateConfig> {
        let text = render(p, &Secrets::Real)?;
        // 0700 explicitly: tempfile applies the umask to directories.
        remove_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("offsite-{}-", std::process::id()))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("creating a private temp directory (set TMPDIR to a writable place)")?;
        let path = dir.path().join("rclone.conf");
        write_0600(&path, &text, false)?;
        Ok(PrivateConfig { _dir: dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The private directory, for the run's other scratch files (state, lock, filter lists):
    /// removed with the config.
    pub fn scratch(&self) -> &Path {
        self._dir.path()
    }

    /// A fresh subdirectory of [`PrivateConfig::scratch`], mode 0700 like its parent (rclone
    /// downloads decrypted `.offsite/` records into these).
    pub fn scratch_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self._dir.path().join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }
}

/// Write a scratch file in the private directory (object lists, records for the secondary),
/// mode 0600 whatever the umask: they name objects. Replaces an existing file.
pub fn write_scratch(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Remove private directories left by offsite processes that no longer exist (only SIGKILL
/// or a power cut leaves one: every other exit path removes its own). Their names carry the
/// owner's pid: `offsite-<pid>-XXXXXX`.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("offsite-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Write `text` to `path` with mode 0600. With `replace`, an existing file is replaced
/// atomically (temp file in the same directory, then rename) so it is never briefly readable
/// with wider permissions.
pub fn write_0600(path: &Path, text: &str, replace: bool) -> anyhow::Result<()> {
    if replace {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".offsite-render-")
            .tempfile_in(parent)
            .with_context(|| format!("creating a temp file in {}", parent.display()))?;
        // tempfile creates 0600 files.
        tmp.write_all(text.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error))?;
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(extra: &str) -> Policy {
        let y = format!(
            "version: 1\nname: t\nsource:\n  type: s3\n  endpoint: https://a.example\n  region: sto1\n  access_key_id: AKIA1\n  secret_access_key: sk1\n  options: {{force_path_style: true}}\ndestination:\n  type: s3\n  endpoint: https://b.example\n  region: fra1\n  bucket: rep\n  prefix: c/a\n  access_key_id: AKIA2\n  secret_access_key: sk2\nencryption:\n  password: {{env: PATH}}\n  salt: {{env: HOME}}\nbuckets: [one]\n{extra}"
        );
        crate::policy::parse("t.yaml", y.as_bytes(), Path::new("/")).unwrap()
    }

    #[test]
    fn golden_redacted_config() {
        let text = render(&policy(""), &Secrets::Redacted).unwrap();
        let want = format!(
            "# rclone.conf rendered by offsite {} for policy \"t\".
# Remotes: `source` (primary, plaintext), `destination` (secondary, raw ciphertext view) and
# `offsite` (the crypt root: use this one to read the replica, e.g. `rclone lsd offsite:data`).

[source]
type = s3
provider = Other
env_auth = false
access_key_id = <redacted: inline>
secret_access_key = <redacted: inline>
endpoint = https://a.example
region = sto1
force_path_style = true

[destination]
type = s3
provider = Other
env_auth = false
access_key_id = <redacted: inline>
secret_access_key = <redacted: inline>
endpoint = https://b.example
region = fra1

[offsite]
type = crypt
remote = destination:rep/c/a
password = <redacted: env PATH>
password2 = <redacted: env HOME>
filename_encryption = standard
directory_name_encryption = true
filename_encoding = base32
",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(text, want);
    }

    #[test]
    fn managed_option_keys_are_refused() {
        let mut p = policy("");
        if let Side::S3(s) = &mut p.source {
            s.options.insert("secret_access_key".into(), "x".into());
        }
        let e = render(&p, &Secrets::Redacted).unwrap_err();
        assert!(format!("{e:#}").contains("source.options.secret_access_key"));
    }

    #[test]
    fn injection_never_adds_a_section_or_key() {
        for evil in [
            "x\n[evil]",
            "x\r\ntype = local",
            " padded",
            "\"quoted\"",
            "",
        ] {
            assert!(ini_value("f", evil).is_err(), "{evil:?}");
        }
        let mut p = policy("");
        if let Side::S3(s) = &mut p.destination {
            s.options
                .insert("acl".into(), "private\n[evil]\ntype = local".into());
        }
        assert!(render(&p, &Secrets::Redacted).is_err());
    }

    /// Found by tests/fuzz_policy.rs: rclone expands `%(key)s` in config values.
    #[test]
    fn variable_references_are_refused() {
        for evil in [
            "%(secret_access_key)s",
            "a%(type)sb",
            "%((type)s",
            "%(%(x)s",
            "x %(a b)s",
        ] {
            assert!(has_var_ref(evil), "{evil}");
            let e = ini_value("source.options.acl", evil).unwrap_err();
            assert_eq!(crate::exit::code_of(&e), Code::Invalid);
            assert!(
                format!("{e:#}").starts_with("source.options.acl: "),
                "{e:#}"
            );
        }
        // What goconfig leaves alone.
        for fine in [
            "100%",
            "%()s",
            "%(type) s",
            "%(type)S",
            "%(type",
            "(x)s",
            "50%(x",
        ] {
            assert!(!has_var_ref(fine), "{fine}");
            assert!(ini_value("f", fine).is_ok(), "{fine}");
        }
        let mut p = policy("");
        if let Side::S3(s) = &mut p.destination {
            s.options
                .insert("acl".into(), "%(secret_access_key)s".into());
        }
        let e = render(&p, &Secrets::Real).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("destination.options.acl: "),
            "{e:#}"
        );
    }
}
