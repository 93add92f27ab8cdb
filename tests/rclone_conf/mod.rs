//! How rclone reads a rendered rclone.conf, and the check that it reads exactly what the policy
//! asked for. Shared by `tests/fuzz_policy.rs` and `tests/hostile_policy.rs`
//! (`mod rclone_conf;`).
//!
//! [`read`] follows rclone's INI reader, github.com/unknwon/goconfig (`read.go` and
//! `GetValue` in `conf.go`), used by rclone 1.60.1 and 1.75.2 alike (checked with `rclone config
//! dump` on both): lines split at `\n` only and trimmed of Unicode white space; `#`/`;` comment
//! lines; `[name]` sections; a key ends at the first `=` or `:`; a value in backquotes or
//! triple double quotes loses them; and `GetValue` replaces every `%(key)s` in a value with
//! that key's value (depth 200), so such a value is not what was written.
#![allow(dead_code)]

use offsite::policy::{Policy, Secret, Side};
use offsite::render::Secrets;

/// rclone's public obscure key (fs/config/obscure/obscure.go), to reveal rendered passwords.
const OBSCURE_KEY: [u8; 32] = [
    0x9c, 0x93, 0x5b, 0x48, 0x73, 0x0a, 0x55, 0x4d, 0x6b, 0xfd, 0x7c, 0x63, 0xc8, 0x86, 0xa9, 0x2b,
    0xd3, 0x90, 0x19, 0x8e, 0xb8, 0x12, 0x8a, 0xfb, 0xf4, 0xde, 0x16, 0x2b, 0x8b, 0x95, 0xf6, 0x38,
];

pub type Section = (String, Vec<(String, String)>);

/// `%(name)s` as goconfig's `varPattern` (`%\(([^\)]+)\)s`) finds it.
pub fn has_var_ref(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while let Some(start) = v[i..].find("%(").map(|p| p + i) {
        if let Some(close) = v[start + 2..].find(')').map(|p| p + start + 2) {
            if close > start + 2 && b.get(close + 1) == Some(&b's') {
                return true;
            }
        }
        i = start + 1;
    }
    false
}

/// Reads `text` as rclone does. Sections and keys in file order, duplicates kept (goconfig
/// would let a later one win: any duplicate is an injection). Errors where goconfig fails, and
/// where rclone would read a value other than the one written (`%(..)s`).
pub fn read(text: &str) -> Result<Vec<Section>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out: Vec<Section> = Vec::new();
    for raw in text.split('\n') {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') && line.len() >= 2 {
            out.push((line[1..line.len() - 1].trim().to_string(), Vec::new()));
            continue;
        }
        let Some(section) = out.last_mut() else {
            return Err(format!("key line before any section: {line:?}"));
        };
        if line.starts_with(['"', '`']) {
            return Err(format!("quoted key: {line:?}"));
        }
        let i = line
            .find(['=', ':'])
            .filter(|&i| i > 0)
            .ok_or_else(|| format!("goconfig cannot parse line {line:?}"))?;
        let key = line[..i].trim().to_string();
        let right = line[i + 1..].trim();
        let value = if right.len() >= 2 && right.starts_with('`') {
            let inner = &right[1..];
            let end = inner
                .rfind('`')
                .ok_or_else(|| format!("unclosed backquote: {line:?}"))?;
            inner[..end].to_string()
        } else if right.len() >= 6 && right.starts_with("\"\"\"") {
            let inner = &right[3..];
            let end = inner
                .rfind("\"\"\"")
                .ok_or_else(|| format!("unclosed triple quote: {line:?}"))?;
            inner[..end].to_string()
        } else {
            right.to_string()
        };
        if key == "-" {
            return Err(format!("auto-increment key: {line:?}"));
        }
        if has_var_ref(&value) {
            return Err(format!("rclone would expand %(..)s in {key} = {value:?}"));
        }
        section.1.push((key, value));
    }
    Ok(out)
}

/// Undoes rclone's `obscure`.
pub fn reveal(obscured: &str) -> Result<String, String> {
    use aes::cipher::{KeyIvInit, StreamCipher};
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(obscured)
        .map_err(|e| format!("obscured value {obscured:?} is not base64url: {e}"))?;
    if bytes.len() < 16 {
        return Err(format!(
            "obscured value {obscured:?} is shorter than its IV"
        ));
    }
    let (iv, ct) = bytes.split_at(16);
    let mut buf = ct.to_vec();
    ctr::Ctr128BE::<aes::Aes256>::new(&OBSCURE_KEY.into(), iv.into()).apply_keystream(&mut buf);
    String::from_utf8(buf).map_err(|_| "revealed password is not UTF-8".to_string())
}

/// What the `key = value` lines of one remote must be, derived from the validated policy (not
/// from the renderer): the template's keys for the backend type, then the policy's `options:`.
/// A secret value is `None`: compared by [`check`] according to the mode.
fn side_lines(side: &Side) -> Vec<(String, Option<String>, Option<&Secret>)> {
    let plain = |k: &str, v: &str| (k.to_string(), Some(v.to_string()), None);
    let mut lines = Vec::new();
    match side {
        Side::S3(s) => {
            lines.push(plain("type", "s3"));
            lines.push(plain("provider", &s.provider.0));
            lines.push(plain("env_auth", "false"));
            lines.push(("access_key_id".into(), None, Some(&s.access_key_id)));
            lines.push(("secret_access_key".into(), None, Some(&s.secret_access_key)));
            lines.push(plain("endpoint", &s.endpoint.0));
            if let Some(r) = &s.region {
                lines.push(plain("region", &r.0));
            }
            for (k, v) in &s.options {
                lines.push(plain(k, v));
            }
        }
        Side::Local { path } => {
            lines.push(plain("type", "alias"));
            lines.push(plain("remote", &path.to_string_lossy()));
        }
        Side::Other { kind, options, .. } => {
            lines.push(plain("type", kind));
            for (k, v) in options {
                lines.push(plain(k, v));
            }
        }
    }
    lines
}

fn crypt_root(p: &Policy) -> String {
    let (bucket, prefix) = match &p.destination {
        Side::S3(s) => (s.bucket.as_ref(), s.prefix.as_ref()),
        Side::Other { bucket, prefix, .. } => (bucket.as_ref(), prefix.as_ref()),
        Side::Local { .. } => (None, None),
    };
    match (bucket, prefix) {
        (Some(b), Some(pre)) => format!("destination:{}/{}", b.0, pre.0),
        (Some(b), None) => format!("destination:{}", b.0),
        _ => "destination:".to_string(),
    }
}

/// Checks a rendered config against the policy: exactly the sections `source`, `destination`
/// and `offsite`, in that order; in each exactly the keys the policy asked for, in order; every
/// value exactly what the policy says (secrets redacted, raw, or obscured as `mode` says), as
/// rclone reads it; and no control character anywhere in the text but the line ends.
pub fn check(text: &str, p: &Policy, mode: &Secrets) -> Result<(), String> {
    if let Some(c) = text.chars().find(|&c| c.is_control() && c != '\n') {
        return Err(format!("control character {c:?} in the rendered config"));
    }
    let sections = read(text)?;
    let names: Vec<&str> = sections.iter().map(|(n, _)| n.as_str()).collect();
    if names != ["source", "destination", "offsite"] {
        return Err(format!("sections {names:?}"));
    }
    let enc = &p.encryption;
    let crypt: Vec<(String, Option<String>, Option<&Secret>)> = vec![
        ("type".into(), Some("crypt".into()), None),
        ("remote".into(), Some(crypt_root(p)), None),
        ("password".into(), None, Some(&enc.password)),
        ("password2".into(), None, Some(&enc.salt)),
        (
            "filename_encryption".into(),
            Some(enc.filename_encryption.as_str().into()),
            None,
        ),
        (
            "directory_name_encryption".into(),
            Some(enc.directory_name_encryption.to_string()),
            None,
        ),
        (
            "filename_encoding".into(),
            Some(enc.filename_encoding.as_str().into()),
            None,
        ),
    ];
    let expected = [side_lines(&p.source), side_lines(&p.destination), crypt];
    for ((name, got), want) in sections.iter().zip(expected) {
        let got_keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        let want_keys: Vec<&str> = want.iter().map(|(k, _, _)| k.as_str()).collect();
        if got_keys != want_keys {
            return Err(format!(
                "[{name}] keys {got_keys:?}, expected {want_keys:?}"
            ));
        }
        for ((key, value), (_, plain, secret)) in got.iter().zip(&want) {
            let ok = match (plain, secret) {
                (Some(v), _) => value == v,
                (None, Some(s)) => match mode {
                    Secrets::Redacted => *value == format!("<redacted: {}>", s.origin),
                    Secrets::Real if name == "offsite" => reveal(value)? == s.expose(),
                    Secrets::Real => value == s.expose(),
                },
                (None, None) => false,
            };
            if !ok {
                return Err(format!(
                    "[{name}] {key} = {value:?}: not what the policy says"
                ));
            }
        }
    }
    Ok(())
}
