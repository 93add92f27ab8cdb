//! The policy file (spec: policy.md, version 1): reading it safely, the serde schema, secret
//! references, and the validated [`Policy`] the rest of the program works with.
//!
//! Raw YAML becomes a validated object here, so no other module sees raw input (the ripgrep
//! `LowArgs` → `HiArgs` pattern). Validation that belongs to one field runs inside that field's
//! `Deserialize` (via `try_from` newtypes), so its error carries the YAML line and column.
//! Errors read `FILE:LINE:COL: field.path: reason`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::exit::{fail, Code};

/// Policies are small; anything bigger is a mistake or an attack (a 50 MB file must not be
/// parsed). Read at most this many bytes.
pub const MAX_POLICY_BYTES: u64 = 1024 * 1024;
/// Secret files hold one token; refuse anything larger instead of reading a whole disk image.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Reading and error formatting
// ---------------------------------------------------------------------------------------------

/// Parse and validate the policy at `path`. Every failure is an `Exit` with code 2 whose
/// message is one line: `FILE:LINE:COL: field.path: reason` (or `FILE: reason`).
pub fn load(path: &Path) -> anyhow::Result<Policy> {
    load_with(path, true)
}

/// Like [`load`], without reading any secret: `{env: ..}` and `{file: ..}` keep only their
/// origin (values empty). For commands that describe a deployment elsewhere (`manifest`),
/// where the secret files and variables exist only inside the pod. Never use the result to
/// run rclone.
pub fn load_unresolved(path: &Path) -> anyhow::Result<Policy> {
    load_with(path, false)
}

fn load_with(path: &Path, resolve_secrets: bool) -> anyhow::Result<Policy> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| {
        fail(
            Code::Invalid,
            format!("{shown}: cannot read policy file: {e}"),
        )
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            fail(
                Code::Invalid,
                format!("{shown}: cannot read policy file: {e}"),
            )
        })?;
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(fail(
            Code::Invalid,
            format!("{shown}: policy file is larger than {MAX_POLICY_BYTES} bytes; refusing to parse it"),
        ));
    }
    // Absolute, so a rendered config (`render --to`) works from any directory.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
    RESOLVE_SECRETS.with(|r| r.set(resolve_secrets));
    let parsed = parse(&shown, &bytes, &base);
    RESOLVE_SECRETS.with(|r| r.set(true));
    parsed
}

/// Parse policy bytes. `shown` names the file in errors; relative `{file: ..}` secrets and
/// local paths resolve against `base` (the policy file's directory).
pub fn parse(shown: &str, bytes: &[u8], base: &Path) -> anyhow::Result<Policy> {
    // A UTF-8 BOM is legal YAML; editors on Windows add it.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, col) = line_col(bytes, e.valid_up_to());
        fail(
            Code::Invalid,
            format!("{shown}:{line}:{col}: policy file is not valid UTF-8"),
        )
    })?;
    if let Some(pos) = text.find(|c: char| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        let (line, col) = line_col(bytes, pos);
        return Err(fail(
            Code::Invalid,
            format!("{shown}:{line}:{col}: control character in policy file"),
        ));
    }
    if let Some(pos) = deep_flow_nesting(text) {
        let (line, col) = line_col(bytes, pos);
        return Err(fail(
            Code::Invalid,
            format!("{shown}:{line}:{col}: `[`/`{{` nested more than {MAX_FLOW_DEPTH} deep; refusing to parse"),
        ));
    }
    if text.trim().is_empty()
        || text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(fail(
            Code::Invalid,
            format!("{shown}: policy file is empty; `offsite init` writes an example"),
        ));
    }
    let raw: PolicyFile = BASE_DIR
        .with(|b| {
            *b.borrow_mut() = base.to_path_buf();
            serde_yaml_ng::from_str(text)
        })
        .map_err(|e| fail(Code::Invalid, format_yaml_error(shown, &e)))?;
    Ok(Policy::from_raw(raw))
}

/// No policy nests flow collections (`[..]`, `{..}`) more than a few levels deep.
const MAX_FLOW_DEPTH: usize = 64;

/// The offset of the first `[` or `{` that opens more than [`MAX_FLOW_DEPTH`] levels. libyaml's
/// scanner (unsafe-libyaml, under serde_yaml_ng) looks at every open flow level for each token,
/// so deep nesting costs quadratic time: 40,000 brackets (80 KB) took 19 s and a 1 MiB file
/// would take many minutes, before the deserialiser's own recursion limit is reached. Brackets
/// are counted everywhere, quotes and comments included: tracking quoting here would let a
/// mis-tracked quote hide a bomb, and a real policy never comes near the limit.
fn deep_flow_nesting(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

thread_local! {
    /// The policy file's directory while it is being deserialised: relative `{file: ..}` secret
    /// paths and local paths resolve against it, not against the working directory, so the
    /// same policy works from cron, Ansible and a shell.
    static BASE_DIR: std::cell::RefCell<PathBuf> = std::cell::RefCell::new(PathBuf::from("."));
    /// False while [`load_unresolved`] parses: secret references are recorded, not read.
    static RESOLVE_SECRETS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

fn resolve(p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        BASE_DIR.with(|b| b.borrow().join(p))
    }
}

fn line_col(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// serde_yaml_ng renders `path: message at line L column C`; we want
/// `FILE:L:C: path: message` on one line.
fn format_yaml_error(shown: &str, e: &serde_yaml_ng::Error) -> String {
    let mut msg = e.to_string();
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    // Some messages (recursion/alias limits) carry their own prose; keep one line. Values and
    // keys from the file appear in messages raw (serde's `unknown field`, a secret's path), so
    // escape their control characters: no escape sequence from a policy reaches a terminal.
    let mut clean = String::with_capacity(msg.len());
    for c in msg.replace('\n', " ").chars() {
        if c.is_control() {
            clean.extend(c.escape_debug());
        } else {
            clean.push(c);
        }
    }
    let msg = field_first(&clean);
    match e.location() {
        Some(loc) => format!("{shown}:{}:{}: {msg}", loc.line(), loc.column()),
        None => format!("{shown}: {msg}"),
    }
}

/// serde names the parent map and puts the field in the message
/// (`destination: missing field `bucket``); policy.md wants the field path first
/// (`destination.bucket: missing field`).
fn field_first(msg: &str) -> String {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(
            r"^(?:([^\s:]+): )?(missing field|unknown field|duplicate field|field) `([^`]+)`(.*)$",
        )
        .expect("static regex")
    });
    match re.captures(msg) {
        Some(c) => {
            let path = match c.get(1) {
                Some(p) => format!("{}.{}", p.as_str(), &c[3]),
                None => c[3].to_string(),
            };
            let what = if &c[2] == "field" { "" } else { &c[2] };
            let rest = c[4].trim_start_matches([',', ' ']);
            let rest = rest.trim_end();
            match (what.is_empty(), rest.is_empty()) {
                (true, _) => format!("{path}: {rest}"),
                (false, true) => format!("{path}: {what}"),
                (false, false) if rest.starts_with('(') => format!("{path}: {what} {rest}"),
                (false, false) => format!("{path}: {what}, {rest}"),
            }
        }
        None => msg.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Where a secret came from. This, never the value, is what messages name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretOrigin {
    Env(String),
    File(PathBuf),
    Inline,
}

impl fmt::Display for SecretOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretOrigin::Env(n) => write!(f, "env {n}"),
            SecretOrigin::File(p) => write!(f, "file {}", p.display()),
            SecretOrigin::Inline => f.write_str("inline"),
        }
    }
}

/// A resolved secret. `Debug` and `Display` never show the value.
#[derive(Clone)]
pub struct Secret {
    pub origin: SecretOrigin,
    value: String,
    /// For `{file: ..}`: the file is readable by group or others (rule C012).
    pub group_or_other_readable: bool,
}

impl Secret {
    /// The secret value. Callers pass it to rclone's config file or stdin, never to argv,
    /// logs or output.
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}, <redacted>)", self.origin)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a secret reference {env: NAME} or {file: PATH} (or an inline string)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                if v.is_empty() {
                    return Err(E::custom("secret is empty"));
                }
                check_secret_chars(v).map_err(E::custom)?;
                Ok(Secret {
                    origin: SecretOrigin::Inline,
                    value: v.to_string(),
                    group_or_other_readable: false,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
                let key: String = map.next_key()?.ok_or_else(|| {
                    de::Error::custom("empty secret reference; use {env: NAME} or {file: PATH}")
                })?;
                let arg: String = map.next_value()?;
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(
                        "a secret reference has exactly one key: env or file",
                    ));
                }
                // Checked in both modes: the name or path is shown in messages and manifests.
                if arg.chars().any(char::is_control) {
                    return Err(de::Error::custom(format!(
                        "the {} reference contains a control character",
                        key.escape_debug()
                    )));
                }
                match key.as_str() {
                    "env" if !RESOLVE_SECRETS.with(|r| r.get()) => Ok(Secret {
                        origin: SecretOrigin::Env(arg),
                        value: String::new(),
                        group_or_other_readable: false,
                    }),
                    "file" if !RESOLVE_SECRETS.with(|r| r.get()) => Ok(Secret {
                        origin: SecretOrigin::File(resolve(&arg)),
                        value: String::new(),
                        group_or_other_readable: false,
                    }),
                    "env" => read_env(&arg).map_err(de::Error::custom),
                    "file" => read_file(&arg).map_err(de::Error::custom),
                    other => Err(de::Error::custom(format!(
                        "unknown secret reference `{other}`; use env or file"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn check_secret_chars(v: &str) -> Result<(), String> {
    // rclone.conf is line-based INI; a newline in a secret would inject keys.
    if v.chars().any(|c| c.is_control()) {
        return Err("secret contains a control character (newline?)".into());
    }
    Ok(())
}

fn read_env(name: &str) -> Result<Secret, String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("`{name}` is not a valid environment variable name"));
    }
    let value = match std::env::var(name) {
        Ok(v) => v,
        Err(std::env::VarError::NotPresent) => {
            return Err(format!("environment variable {name} is not set"))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(format!("environment variable {name} is not valid UTF-8"))
        }
    };
    if value.is_empty() {
        return Err(format!("environment variable {name} is empty"));
    }
    check_secret_chars(&value).map_err(|e| format!("environment variable {name}: {e}"))?;
    Ok(Secret {
        origin: SecretOrigin::Env(name.to_string()),
        value,
        group_or_other_readable: false,
    })
}

fn read_file(arg: &str) -> Result<Secret, String> {
    if arg.is_empty() {
        return Err("empty secret file path".into());
    }
    let path = resolve(arg);
    let shown = path.display();
    // Non-blocking, so that a FIFO (or another special file) is refused below instead of
    // hanging in open(2), where not even SIGTERM gets through; regular files ignore the flag.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
        .map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat secret file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("secret file {shown} is not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!(
            "secret file {shown} is larger than {MAX_SECRET_BYTES} bytes"
        ));
    }
    let mut value =
        String::from_utf8(bytes).map_err(|_| format!("secret file {shown} is not valid UTF-8"))?;
    // One trailing newline is stripped (policy.md); `echo x > file` writes one.
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(format!("secret file {shown} is empty"));
    }
    check_secret_chars(&value).map_err(|e| format!("secret file {shown}: {e}"))?;
    Ok(Secret {
        origin: SecretOrigin::File(path.clone()),
        value,
        group_or_other_readable: meta.permissions().mode() & 0o077 != 0,
    })
}

// ---------------------------------------------------------------------------------------------
// Validated scalar newtypes: their errors carry the YAML position.
// ---------------------------------------------------------------------------------------------

macro_rules! validated_string {
    ($(#[$m:meta])* $name:ident, $check:expr) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub String);
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(v: String) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(&v)?;
                Ok($name(v))
            }
        }
        // Validated inside the scalar's own deserialisation (not serde's `try_from`), so the
        // YAML error carries this value's line, column and field path.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::try_from(v.to_string()).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// Implement `Deserialize` for `$target` by deserialising the derived `$raw` from the same map
/// and then running `$convert`. The conversion's error is raised while the map is being read,
/// so it carries the map's line, column and path (serde's `try_from` would lose them).
macro_rules! checked_map {
    ($target:ty, $raw:ty, $convert:expr) => {
        impl<'de> Deserialize<'de> for $target {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $target;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a mapping")
                    }
                    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<$target, A::Error> {
                        let raw = <$raw>::deserialize(de::value::MapAccessDeserializer::new(map))?;
                        let convert: fn($raw) -> Result<$target, String> = $convert;
                        convert(raw).map_err(de::Error::custom)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

fn no_controls(v: &str) -> Result<(), String> {
    if v.chars().any(char::is_control) {
        return Err("contains a control character (newline?)".into());
    }
    Ok(())
}

validated_string!(
    /// `name`: labels metrics, locks and attestations.
    PolicyName,
    |v| {
        let ok = !v.is_empty()
            && v.len() <= 63
            && v.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok { Ok(()) } else { Err(format!("`{}` must match [a-z0-9][a-z0-9-]{{0,62}}", v.escape_debug())) }
    }
);

validated_string!(
    /// A bucket name (source buckets, destination bucket). S3's rules, minus the legacy
    /// upper-case/underscore forms; also keeps path traversal and INI syntax out.
    BucketName,
    |v| {
        let ok = (3..=63).contains(&v.len())
            && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
            && !v.contains("..");
        if ok { Ok(()) } else {
            Err(format!("`{}` is not a valid bucket name (3-63 of a-z 0-9 . -, starting and ending with a letter or digit)", v.escape_debug()))
        }
    }
);

validated_string!(
    /// `destination.prefix`: a relative path inside the destination bucket.
    Prefix,
    |v| {
        no_controls(v)?;
        let ok = !v.is_empty()
            && !v.starts_with('/')
            && !v.ends_with('/')
            && v.split('/').all(|s| !s.is_empty() && s != "." && s != ".."
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')));
        if ok { Ok(()) } else {
            Err(format!("`{}` must be a relative path of [A-Za-z0-9._-] segments, without `..` or empty segments", v.escape_debug()))
        }
    }
);

validated_string!(
    /// An endpoint URL: `http(s)://host[:port][/path]`, no whitespace.
    Endpoint,
    |v| {
        no_controls(v)?;
        let rest = v.strip_prefix("https://").or_else(|| v.strip_prefix("http://"));
        let ok = rest.is_some_and(|r| {
            let host = r.split('/').next().unwrap_or("");
            // Brackets only around an IPv6 literal host (`https://[::1]:9000`); the rest of the
            // URL obeys the same rules as any other.
            let ipv6 = host.starts_with('[') && (host.ends_with(']') || host.contains("]:"));
            let r = if ipv6 { r.replacen('[', "", 1).replacen(']', "", 1) } else { r.to_string() };
            !host.is_empty()
                && r.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b'[' | b']' | b'<' | b'>' | b'`' | b'{' | b'}'))
        });
        if ok { Ok(()) } else {
            Err(format!("`{}` must be an http:// or https:// URL without spaces", v.escape_debug()))
        }
    }
);

validated_string!(
    /// A region or an rclone provider name.
    Token,
    |v| {
        let ok = !v.is_empty() && v.len() <= 64
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok { Ok(()) } else { Err(format!("`{}` must be [A-Za-z0-9._-], at most 64 characters", v.escape_debug())) }
    }
);

validated_string!(
    /// `sync.bwlimit`: rclone's bandwidth syntax (`50M`, `10M:100k`, `08:00,512k 19:00,off`).
    BwLimit,
    |v| {
        let ok = !v.is_empty() && v.len() <= 256
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b',' | b'|' | b' ' | b'-'));
        if ok { Ok(()) } else { Err(format!("`{}` is not an rclone bandwidth limit", v.escape_debug())) }
    }
);

validated_string!(
    /// A filesystem path given in the policy (local backends, reporting files).
    PathStr,
    |v| {
        no_controls(v)?;
        if v.is_empty() { Err("empty path".into()) } else { Ok(()) }
    }
);

validated_string!(
    /// A backend option key for `options:` (rendered as `key = value` in rclone.conf).
    OptionKey,
    |v| {
        let ok = !v.is_empty() && v.len() <= 64
            && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok { Ok(()) } else { Err(format!("option name `{}` must be [a-z0-9_]", v.escape_debug())) }
    }
);

/// A backend option value: a YAML scalar, rendered as text. No newlines (INI injection).
#[derive(Clone, Debug, PartialEq)]
pub struct OptionValue(pub String);

impl<'de> Deserialize<'de> for OptionValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = OptionValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OptionValue, E> {
                no_controls(v).map_err(E::custom)?;
                if v.len() > 4096 {
                    return Err(E::custom("option value longer than 4096 characters"));
                }
                Ok(OptionValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `options:`. A key given twice is an error: a map would silently keep the last one, so a
/// second `acl:` further down could override the first unseen.
#[derive(Default)]
struct Options(BTreeMap<OptionKey, OptionValue>);

impl<'de> Deserialize<'de> for Options {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Options;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of rclone backend options")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Options, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<OptionKey>()? {
                    let value: OptionValue = map.next_value()?;
                    if out.contains_key(&key) {
                        return Err(de::Error::custom(format!(
                            "option `{}` is set twice",
                            key.0
                        )));
                    }
                    out.insert(key, value);
                }
                Ok(Options(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Deserialise a number and check it inside the scalar's own visitor, so an error carries the
/// value's line, column and field path.
fn checked_number<'de, D, T>(d: D, check: impl Fn(f64) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<F>(F);
    impl<T, F: Fn(f64) -> Result<T, String>> Visitor<'_> for V<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            (self.0)(v as f64).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            (self.0)(v as f64).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
    }
    d.deserialize_any(V(check))
}

/// An integer that must lie in `LO..=HI`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounded<const LO: u32, const HI: u32>(pub u32);

impl<'de, const LO: u32, const HI: u32> Deserialize<'de> for Bounded<LO, HI> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_number(d, |v| {
            if v.fract() != 0.0 || v < f64::from(LO) || v > f64::from(HI) {
                Err(format!(
                    "must be a whole number between {LO} and {HI}, found {v}"
                ))
            } else {
                Ok(Bounded(v as u32))
            }
        })
    }
}

/// `version`: only 1 exists.
struct Version;

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_number(d, |v| {
            if v == 1.0 {
                Ok(Version)
            } else {
                Err(format!("only version 1 is supported (found {v})"))
            }
        })
    }
}

/// `verify.sample_percent`: in (0, 100].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_number(d, |v| {
            if v > 0.0 && v <= 100.0 {
                Ok(Percent(v))
            } else {
                Err(format!("must be in (0, 100], found {v}"))
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The schema (serde). Field names are the contract of policy.md.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[allow(dead_code)] // validated while parsing; nothing else to keep
    version: Version,
    name: PolicyName,
    source: SourceSide,
    destination: DestinationSide,
    encryption: Encryption,
    buckets: BucketsSpec,
    #[serde(default)]
    sync: SyncOpts,
    #[serde(default)]
    guards: Guards,
    #[serde(default)]
    verify: VerifyOpts,
    #[serde(default)]
    compliance: ComplianceOpts,
    #[serde(default)]
    reporting: Reporting,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSide {
    #[serde(rename = "type")]
    kind: Token,
    endpoint: Option<Endpoint>,
    region: Option<Token>,
    provider: Option<Token>,
    access_key_id: Option<Secret>,
    secret_access_key: Option<Secret>,
    #[serde(default)]
    options: Options,
    bucket: Option<BucketName>,
    prefix: Option<Prefix>,
    path: Option<PathStr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilenameEncryption {
    Standard,
    Obfuscate,
    Off,
}

impl FilenameEncryption {
    pub fn as_str(self) -> &'static str {
        match self {
            FilenameEncryption::Standard => "standard",
            FilenameEncryption::Obfuscate => "obfuscate",
            FilenameEncryption::Off => "off",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilenameEncoding {
    Base32,
    Base64,
    Base32768,
}

impl FilenameEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            FilenameEncoding::Base32 => "base32",
            FilenameEncoding::Base64 => "base64",
            FilenameEncoding::Base32768 => "base32768",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub password: Secret,
    pub salt: Secret,
    #[serde(default = "standard")]
    pub filename_encryption: FilenameEncryption,
    #[serde(default = "yes")]
    pub directory_name_encryption: bool,
    #[serde(default = "base32")]
    pub filename_encoding: FilenameEncoding,
}

fn standard() -> FilenameEncryption {
    FilenameEncryption::Standard
}
fn base32() -> FilenameEncoding {
    FilenameEncoding::Base32
}
fn yes() -> bool {
    true
}

/// One entry of `buckets:`: a name, or `{name, exclude}`.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketSpec {
    pub name: BucketName,
    pub exclude: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BucketMap {
    name: BucketName,
    #[serde(default)]
    exclude: Vec<FilterPattern>,
}

validated_string!(
    /// An rclone filter pattern for `exclude`.
    FilterPattern,
    |v| {
        no_controls(v)?;
        if v.is_empty() { Err("empty filter pattern".into()) } else { Ok(()) }
    }
);

impl<'de> Deserialize<'de> for BucketSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BucketSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a bucket name or {name: .., exclude: [..]}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BucketSpec, E> {
                Ok(BucketSpec {
                    name: BucketName::try_from(v.to_string()).map_err(E::custom)?,
                    exclude: vec![],
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BucketSpec, A::Error> {
                let m = BucketMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BucketSpec {
                    name: m.name,
                    exclude: m.exclude.into_iter().map(|p| p.0).collect(),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `buckets:`: every source bucket, or an explicit non-empty list.
#[derive(Clone, Debug, PartialEq)]
pub enum BucketsSpec {
    All,
    List(Vec<BucketSpec>),
}

impl<'de> Deserialize<'de> for BucketsSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BucketsSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-empty list of buckets, or \"all\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BucketsSpec, E> {
                if v == "all" {
                    Ok(BucketsSpec::All)
                } else {
                    Err(E::custom(format!(
                        "`{}`: expected a list of buckets or the string \"all\"",
                        v.escape_debug()
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BucketsSpec, A::Error> {
                let mut out: Vec<BucketSpec> = Vec::new();
                while let Some(b) = seq.next_element::<BucketSpec>()? {
                    if out.iter().any(|o| o.name == b.name) {
                        return Err(de::Error::custom(format!(
                            "bucket `{}` is listed twice",
                            b.name
                        )));
                    }
                    out.push(b);
                }
                if out.is_empty() {
                    return Err(de::Error::custom("the bucket list is empty"));
                }
                Ok(BucketsSpec::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncOpts {
    pub transfers: Bounded<1, 256>,
    pub checkers: Bounded<1, 1024>,
    pub parallel_buckets: Bounded<1, 64>,
    pub bwlimit: Option<BwLimit>,
    pub extra_flags: Vec<FlagArg>,
}

validated_string!(
    /// One element of `sync.extra_flags`: one argv element, passed to rclone as is.
    FlagArg,
    |v| {
        no_controls(v)?;
        if v.is_empty() { Err("empty flag".into()) } else { Ok(()) }
    }
);

impl Default for SyncOpts {
    fn default() -> Self {
        SyncOpts {
            transfers: Bounded(8),
            checkers: Bounded(16),
            parallel_buckets: Bounded(1),
            bwlimit: None,
            extra_flags: vec![],
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Guards {
    pub key_canary: bool,
    pub refuse_empty_source: bool,
    pub max_delete_percent: Bounded<0, 100>,
    pub keep_deleted_days: Bounded<0, 36500>,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            key_canary: true,
            refuse_empty_source: true,
            max_delete_percent: Bounded(10),
            keep_deleted_days: Bounded(30),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    None,
    Changed,
    Sample,
    Full,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyOpts {
    pub after_sync: VerifyMode,
    pub sample_percent: Percent,
}

impl Default for VerifyOpts {
    fn default() -> Self {
        VerifyOpts {
            after_sync: VerifyMode::Changed,
            sample_percent: Percent(5.0),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComplianceOpts {
    pub require_tls: bool,
    pub forbid_same_region: bool,
    pub allowed_destination_regions: Option<Vec<Token>>,
    pub min_secret_length: Bounded<1, 4096>,
    pub allow_inline_secrets: bool,
}

impl Default for ComplianceOpts {
    fn default() -> Self {
        ComplianceOpts {
            require_tls: true,
            forbid_same_region: true,
            allowed_destination_regions: None,
            min_secret_length: Bounded(32),
            allow_inline_secrets: false,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reporting {
    pub metrics_file: Option<PathStr>,
    pub pushgateway_url: Option<Endpoint>,
    pub attestation_file: Option<PathStr>,
}

// ---------------------------------------------------------------------------------------------
// The validated policy
// ---------------------------------------------------------------------------------------------

/// One side of the replication, validated per backend type.
#[derive(Clone, Debug)]
pub enum Side {
    S3(S3Side),
    Local {
        path: PathBuf,
    },
    /// Another rclone backend (swift, azureblob, gcs): options rendered verbatim; built and
    /// tested for s3 and local only.
    Other {
        kind: String,
        options: BTreeMap<String, String>,
        bucket: Option<BucketName>,
        prefix: Option<Prefix>,
    },
}

#[derive(Clone, Debug)]
pub struct S3Side {
    pub endpoint: Endpoint,
    pub region: Option<Token>,
    pub provider: Token,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub options: BTreeMap<String, String>,
    /// Destination only: the bucket holding the crypt root, and the path inside it.
    pub bucket: Option<BucketName>,
    pub prefix: Option<Prefix>,
}

impl Side {
    pub fn kind(&self) -> &str {
        match self {
            Side::S3(_) => "s3",
            Side::Local { .. } => "local",
            Side::Other { kind, .. } => kind,
        }
    }
    pub fn region(&self) -> Option<&str> {
        match self {
            Side::S3(s) => s.region.as_ref().map(|r| r.0.as_str()),
            _ => None,
        }
    }
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Side::S3(s) => Some(s.endpoint.0.as_str()),
            _ => None,
        }
    }
    /// The secrets this side holds, with their field names.
    pub fn secrets(&self, side: &str) -> Vec<(String, &Secret)> {
        match self {
            Side::S3(s) => vec![
                (format!("{side}.access_key_id"), &s.access_key_id),
                (format!("{side}.secret_access_key"), &s.secret_access_key),
            ],
            _ => vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub name: PolicyName,
    pub source: Side,
    pub destination: Side,
    pub encryption: Encryption,
    pub buckets: BucketsSpec,
    pub sync: SyncOpts,
    pub guards: Guards,
    pub verify: VerifyOpts,
    pub compliance: ComplianceOpts,
    pub reporting: Reporting,
}

impl Policy {
    fn from_raw(raw: PolicyFile) -> Policy {
        Policy {
            name: raw.name,
            source: raw.source.0,
            destination: raw.destination.0,
            encryption: raw.encryption,
            buckets: raw.buckets,
            sync: raw.sync,
            guards: raw.guards,
            verify: raw.verify,
            compliance: raw.compliance,
            reporting: raw.reporting,
        }
    }

    /// Every secret with its field path, for compliance and redaction.
    pub fn secrets(&self) -> Vec<(String, &Secret)> {
        let mut v = self.source.secrets("source");
        v.extend(self.destination.secrets("destination"));
        v.push(("encryption.password".into(), &self.encryption.password));
        v.push(("encryption.salt".into(), &self.encryption.salt));
        v
    }

    /// The explicitly listed buckets (empty for `buckets: all`).
    pub fn listed_buckets(&self) -> &[BucketSpec] {
        match &self.buckets {
            BucketsSpec::All => &[],
            BucketsSpec::List(l) => l,
        }
    }
}

/// `source:` and `destination:` validated per backend type while the map is read.
struct SourceSide(Side);
struct DestinationSide(Side);
checked_map!(SourceSide, RawSide, |r| side_from_raw(r, false)
    .map(SourceSide));
checked_map!(DestinationSide, RawSide, |r| side_from_raw(r, true)
    .map(DestinationSide));

fn side_from_raw(raw: RawSide, is_destination: bool) -> Result<Side, String> {
    let options: BTreeMap<String, String> =
        raw.options.0.into_iter().map(|(k, v)| (k.0, v.0)).collect();
    let unexpected = |field: &str, present: bool, kind: &str| -> Result<(), String> {
        if present {
            Err(format!("field `{field}` is not allowed for type {kind}"))
        } else {
            Ok(())
        }
    };
    let missing = |field: &str| format!("missing field `{field}` (required for this type)");
    match raw.kind.0.as_str() {
        "s3" => {
            unexpected("path", raw.path.is_some(), "s3")?;
            if !is_destination {
                unexpected(
                    "bucket",
                    raw.bucket.is_some(),
                    "s3 source (list buckets under `buckets:`)",
                )?;
                unexpected("prefix", raw.prefix.is_some(), "s3 source")?;
            } else if raw.bucket.is_none() {
                return Err(missing("bucket"));
            }
            Ok(Side::S3(S3Side {
                endpoint: raw.endpoint.ok_or_else(|| missing("endpoint"))?,
                region: raw.region,
                provider: raw.provider.unwrap_or_else(|| Token("Other".into())),
                access_key_id: raw.access_key_id.ok_or_else(|| missing("access_key_id"))?,
                secret_access_key: raw
                    .secret_access_key
                    .ok_or_else(|| missing("secret_access_key"))?,
                options,
                bucket: raw.bucket,
                prefix: raw.prefix,
            }))
        }
        "local" => {
            for (f, p) in [
                ("endpoint", raw.endpoint.is_some()),
                ("region", raw.region.is_some()),
                ("provider", raw.provider.is_some()),
                ("access_key_id", raw.access_key_id.is_some()),
                ("secret_access_key", raw.secret_access_key.is_some()),
                ("bucket", raw.bucket.is_some()),
                ("prefix", raw.prefix.is_some()),
                // A local side is rendered as an alias remote, which has no place for them:
                // refused rather than silently dropped.
                ("options", !options.is_empty()),
            ] {
                unexpected(f, p, "local")?;
            }
            let path = raw.path.ok_or_else(|| missing("path"))?;
            Ok(Side::Local {
                path: resolve(&path.0),
            })
        }
        other => {
            if is_destination && raw.bucket.is_none() {
                return Err(missing("bucket"));
            }
            if raw.access_key_id.is_some()
                || raw.secret_access_key.is_some()
                || raw.endpoint.is_some()
            {
                return Err(format!(
                    "type {other} takes its settings under `options:` (endpoint and keys are s3 fields)"
                ));
            }
            Ok(Side::Other {
                kind: other.to_string(),
                options,
                bucket: raw.bucket,
                prefix: raw.prefix,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(yaml: &str) -> anyhow::Result<Policy> {
        parse("t.yaml", yaml.as_bytes(), Path::new("/nonexistent"))
    }

    fn err(yaml: &str) -> String {
        format!("{:#}", p(yaml).unwrap_err())
    }

    const LOCAL: &str = "version: 1\nname: t\nsource: {type: local, path: /a}\ndestination: {type: local, path: /b}\nencryption:\n  password: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n  salt: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\nbuckets: [one]\n";

    #[test]
    fn defaults_apply() {
        let pol = p(LOCAL).unwrap();
        assert_eq!(pol.sync.transfers.0, 8);
        assert_eq!(pol.sync.checkers.0, 16);
        assert_eq!(pol.sync.parallel_buckets.0, 1);
        assert!(pol.guards.key_canary && pol.guards.refuse_empty_source);
        assert_eq!(pol.guards.max_delete_percent.0, 10);
        assert_eq!(pol.guards.keep_deleted_days.0, 30);
        assert_eq!(pol.verify.after_sync, VerifyMode::Changed);
        assert_eq!(
            pol.encryption.filename_encryption,
            FilenameEncryption::Standard
        );
        assert!(pol.encryption.directory_name_encryption);
        assert_eq!(pol.encryption.filename_encoding, FilenameEncoding::Base32);
        assert!(pol.compliance.require_tls);
        assert_eq!(pol.compliance.min_secret_length.0, 32);
    }

    #[test]
    fn unknown_key_is_located() {
        let e = err(&LOCAL.replace(
            "buckets: [one]",
            "buckets: [one]\nguards: {key_canary: true, foo: 1}",
        ));
        assert!(
            e.starts_with("t.yaml:9:28: guards.foo: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn version_two_rejected() {
        let e = err(&LOCAL.replace("version: 1", "version: 2"));
        assert!(e.contains("version: only version 1"), "{e}");
    }

    #[test]
    fn buckets_all_and_mixed_list() {
        let pol = p(&LOCAL.replace("buckets: [one]", "buckets: all")).unwrap();
        assert_eq!(pol.buckets, BucketsSpec::All);
        let pol = p(&LOCAL.replace(
            "buckets: [one]",
            "buckets:\n  - harbor\n  - name: velero\n    exclude: [\"**/*.tmp\"]",
        ))
        .unwrap();
        assert_eq!(
            pol.listed_buckets()[1].exclude,
            vec!["**/*.tmp".to_string()]
        );
        assert!(err(&LOCAL.replace("buckets: [one]", "buckets: []")).contains("empty"));
        assert!(err(&LOCAL.replace("buckets: [one]", "buckets: some")).contains("\"all\""));
        assert!(err(&LOCAL.replace("buckets: [one]", "buckets: [one, one]")).contains("twice"));
    }

    #[test]
    fn missing_env_names_variable_not_value() {
        let e = err(&LOCAL.replace(
            "password: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "password: {env: OFFSITE_TEST_SURELY_UNSET_VAR}",
        ));
        assert!(
            e.contains("encryption.password")
                && e.contains("OFFSITE_TEST_SURELY_UNSET_VAR is not set"),
            "{e}"
        );
    }

    #[test]
    fn bad_names_rejected() {
        assert!(err(&LOCAL.replace("name: t", "name: Prod_SC")).contains("name"));
        assert!(err(&LOCAL.replace("[one]", "[\"../etc\"]")).contains("not a valid bucket name"));
    }

    #[test]
    fn secret_debug_is_redacted() {
        let pol = p(LOCAL).unwrap();
        let dbg = format!("{pol:?}");
        assert!(!dbg.contains("aaaaaaaaaa"), "{dbg}");
    }

    /// Billion laughs: serde_yaml_ng stops alias expansion ("repetition limit exceeded") even
    /// where a type would accept any structure; the strict schema rejects it even earlier.
    #[test]
    fn alias_bomb_is_bounded() {
        let mut b = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            b += &format!("a{i}: &a{i} [{refs}]\n");
        }
        let start = std::time::Instant::now();
        let r: Result<serde_yaml_ng::Value, _> = serde_yaml_ng::from_str(&b);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("repetition limit"), "{e}");
        assert!(start.elapsed().as_secs() < 5);
        let bomb = LOCAL.replace(
            "buckets: [one]",
            &format!(
                "buckets:\n{}",
                b.lines()
                    .map(|l| format!("  - {}", l.split_once(": ").unwrap().1))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        );
        assert!(err(&bomb).contains("t.yaml:"));
    }

    /// Found by tests/fuzz_policy.rs: keys and secret paths from the file reached error
    /// messages raw, escape sequences included.
    #[test]
    fn control_characters_in_messages_are_escaped() {
        for (from, to, want) in [
            (
                "buckets: [one]",
                "buckets: [one]\nguards: {\"\\e[2J\\rx\": 1}",
                "guards.\\u{1b}[2J\\rx: unknown field",
            ),
            (
                "path: /a}",
                "path: /a, options: {\"a\\x07\": 1}}",
                "option name `a\\u{7}` must be",
            ),
        ] {
            let e = err(&LOCAL.replace(from, to));
            assert!(!e.chars().any(char::is_control), "{e:?}");
            assert!(e.contains(want), "{e}");
        }
        let e = err(&LOCAL.replace(
            "password: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "password: {file: \"x\\r\\e[2Jy\"}",
        ));
        assert!(
            e.contains("encryption.password: the file reference contains a control character"),
            "{e}"
        );
        assert!(!e.chars().any(char::is_control), "{e:?}");
    }

    /// Found while writing tests/fuzz_policy.rs: an IPv6 host skipped every other check of
    /// the URL (`||` bound looser than intended).
    #[test]
    fn ipv6_endpoints_are_checked_like_others() {
        let with = |ep: &str| {
            LOCAL.replace(
                "source: {type: local, path: /a}",
                &format!("source: {{type: s3, endpoint: \"{ep}\", access_key_id: a, secret_access_key: b}}"),
            )
        };
        for ok in ["https://[::1]:9000", "https://[fd00::1]/x", "http://[::1]"] {
            p(&with(ok)).unwrap_or_else(|e| panic!("{ok}: {e:#}"));
        }
        for bad in [
            "https://[::1] x",
            "https://[::1]/a b",
            "https://[::1]/\\u00a0",
            "https://[::1]/[x]",
            "https://[x/]",
        ] {
            assert!(err(&with(bad)).contains("source.endpoint"), "{bad}");
        }
    }

    /// Found by tests/hostile_policy.rs: a FIFO as a secret file blocked `check` in open(2),
    /// deaf to SIGTERM.
    #[test]
    fn a_fifo_secret_is_refused_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pw");
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let e = format!(
            "{:#}",
            parse(
                "t.yaml",
                LOCAL
                    .replace(
                        "password: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                        "password: {file: pw}",
                    )
                    .as_bytes(),
                dir.path(),
            )
            .unwrap_err()
        );
        assert!(e.contains("is not a regular file"), "{e}");
    }

    #[test]
    fn local_options_are_refused_not_dropped() {
        let e = err(&LOCAL.replace("path: /a}", "path: /a, options: {copy_links: true}}"));
        assert!(
            e.contains("t.yaml:3:9: source.options: is not allowed for type local"),
            "{e}"
        );
        p(&LOCAL.replace("path: /a}", "path: /a, options: {}}")).unwrap();
    }

    /// Found by tests/hostile_policy.rs: the second of two equal `options:` keys won silently.
    #[test]
    fn a_duplicate_option_is_refused() {
        let s3 = "source: {type: s3, endpoint: \"https://a\", access_key_id: a, secret_access_key: b, options: {acl: private, acl: public-read}}";
        let e = err(&LOCAL.replace("source: {type: local, path: /a}", s3));
        assert!(
            e.contains("source.options: option `acl` is set twice"),
            "{e}"
        );
    }

    /// Found by tests/hostile_policy.rs: deep `[[[..` took quadratic time in libyaml's scanner.
    #[test]
    fn deep_flow_nesting_is_refused_at_once() {
        let start = std::time::Instant::now();
        let n = 400_000;
        let bomb = format!("buckets: {}{}", "[".repeat(n), "]".repeat(n));
        let e = err(&LOCAL.replace("buckets: [one]", &bomb));
        assert!(
            e.starts_with("t.yaml:8:74: `[`/`{` nested more than 64 deep"),
            "{e}"
        );
        assert!(start.elapsed().as_secs() < 2);
        // Balanced brackets in strings and ordinary flow maps are fine.
        p(&LOCAL.replace("path: /a}", "path: \"/a[b]{c}\"}")).unwrap();
    }

    #[test]
    fn bom_and_crlf_accepted() {
        let text = format!("\u{feff}{}", LOCAL.replace('\n', "\r\n"));
        p(&text).unwrap();
    }
}
