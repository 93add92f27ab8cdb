//! Hostile policy input, property-tested (issue 8, item 4; docs/reliability.md).
//!
//! Two generators, both run through what the binary runs: the policy is written to a file with
//! its `{file: ..}` secret files beside it, then `policy::load` → `compliance::check` →
//! `render::render` with redacted (`plan`) and real (`render --to`, every sync) secrets.
//! - `structured_policies`: a policy skeleton whose every string field (name, type, endpoints,
//!   regions, provider, bucket names, prefix, option keys and values, local paths, bucket
//!   names and excludes, extra_flags, bwlimit, allowed regions, reporting paths, secret file
//!   paths and contents, env names) is either valid or hostile (INI and YAML syntax, `%(key)s`,
//!   control characters, Unicode line and space characters, path traversal, long strings), and
//!   is written double-quoted with escapes, single-quoted, or raw.
//! - `mutated_yaml`: valid policies with raw byte mutations (inserted payloads, random bytes,
//!   deletions, duplicated lines, truncation, CRLF, BOM).
//!
//! Properties: nothing panics; a failure is an exit-2 error (via `exit::code_of`) on one line,
//! free of control characters, naming the file (parse) or the field (render); a success renders
//! an rclone.conf that rclone reads (see `rclone_conf`) as exactly the sections `source`,
//! `destination`, `offsite` with exactly the keys and values the policy asked for. Where every
//! field was written quoted, the parsed policy must also hold exactly the generated values.
//!
//! Budget: a few hundred cases by default (a few seconds). `OFFSITE_FUZZ_SECONDS=600` runs each
//! property for that long instead (release mode: `cargo test --release --test fuzz_policy`);
//! `PROPTEST_CASES=N` sets the cases per round; `OFFSITE_FUZZ_SEED=N` replays a seed (printed
//! with every run and failure).

mod rclone_conf;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use offsite::compliance;
use offsite::exit::{code_of, Code};
use offsite::policy::{self, Policy, Secret, SecretOrigin, Side};
use offsite::render::{self, Secrets};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Building blocks of hostile strings.
const PAYLOADS: &[&str] = &[
    "\n[evil]\ntype = local\n",
    "\r\n[evil]\r\n",
    "x\ntype = local",
    "\nremote = /",
    "\n",
    "\r",
    "\t",
    "\0",
    "\x0b",
    "\x0c",
    "\x1b[31m",
    "\x7f",
    "\u{85}",
    "\u{a0}",
    "\u{2028}",
    "\u{2029}",
    "\u{feff}",
    "\u{202e}",
    "\u{3000}",
    "\u{1f600}",
    " ",
    "\"",
    "'",
    "`",
    "\"\"\"",
    "``",
    "#",
    ";",
    "[",
    "]",
    "[source]",
    "=",
    ":",
    " = ",
    "%(type)s",
    "%(secret_access_key)s",
    "%(password)s",
    "%((remote)s",
    "%()s",
    "${HOME}",
    "$HOME",
    "~",
    "..",
    "../",
    "../../etc/passwd",
    "/etc/passwd",
    "./",
    "//",
    "\\",
    "C:\\Windows",
    "{{ 7*7 }}",
    "{% raw %}",
    "*a",
    "&a",
    "!!binary",
    "!tag",
    "- ",
    ": ",
    "? ",
    "{",
    "}",
    ",",
    "|",
    ">",
    "%YAML 1.1",
    "---",
    "...",
    "@",
    "null",
    "true",
    "0x1F",
    ".inf",
    "1e999",
    "<<",
    "destination:",
    "offsite:data",
    "s3",
    "local",
    "crypt",
    "https://",
    "http://",
    "https://[::1]",
    "https://[::1] x",
    "--config=/tmp/x",
    "-vv",
    "--dump=auth",
    "a.b",
    "-",
    "_",
];

#[derive(Clone, Copy, Debug)]
enum Enc {
    /// Double-quoted, every non-printable-ASCII character escaped: reaches the field exactly.
    Double,
    /// Single-quoted (when the value allows it): reaches the field exactly.
    Single,
    /// Written raw: may change the YAML structure itself.
    Plain,
}

/// A string field's value and how it is written.
#[derive(Clone, Debug)]
struct Str {
    v: String,
    enc: Enc,
}

fn double_quoted(v: &str) -> String {
    let mut o = String::with_capacity(v.len() + 2);
    o.push('"');
    for c in v.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            ' '..='~' => o.push(c),
            c if (c as u32) <= 0xff => write!(o, "\\x{:02X}", c as u32).unwrap(),
            c if (c as u32) <= 0xffff => write!(o, "\\u{:04X}", c as u32).unwrap(),
            c => write!(o, "\\U{:08X}", c as u32).unwrap(),
        }
    }
    o.push('"');
    o
}

thread_local! {
    /// Whether the model being written may write fields raw ([`Model::raw`]).
    static RAW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Str {
    fn yaml(&self) -> String {
        let single_ok = !self
            .v
            .chars()
            .any(|c| c.is_control() || matches!(c, '\u{feff}' | '\u{2028}' | '\u{2029}'));
        match self.enc {
            Enc::Plain if RAW.get() => self.v.clone(),
            Enc::Single if single_ok => format!("'{}'", self.v.replace('\'', "''")),
            _ => double_quoted(&self.v),
        }
    }
}

#[derive(Clone, Debug)]
enum SecretM {
    /// A file written next to the policy; `reference` replaces its name in the policy.
    File {
        reference: Option<Str>,
        content: Vec<u8>,
        mode: u32,
    },
    Inline(Str),
    Env(Str),
}

#[derive(Clone, Debug)]
enum SideM {
    S3 {
        endpoint: Str,
        region: Option<Str>,
        provider: Option<Str>,
        key_id: SecretM,
        secret: SecretM,
        options: Vec<(Str, Str)>,
        bucket: Option<Str>,
        prefix: Option<Str>,
    },
    Local {
        path: Str,
    },
    Other {
        kind: Str,
        options: Vec<(Str, Str)>,
        bucket: Option<Str>,
        prefix: Option<Str>,
    },
}

#[derive(Clone, Debug)]
struct Model {
    /// Fields marked [`Enc::Plain`] are written raw. Otherwise every field is quoted, and the
    /// parsed policy must hold exactly the generated values.
    raw: bool,
    name: Str,
    source: SideM,
    destination: SideM,
    password: SecretM,
    salt: SecretM,
    filename_encryption: &'static str,
    /// `None`: `buckets: all`.
    buckets: Option<Vec<(Str, Vec<Str>)>>,
    extra_flags: Vec<Str>,
    bwlimit: Option<Str>,
    require_tls: bool,
    allow_inline_secrets: bool,
    allowed_regions: Option<Vec<Str>>,
    metrics_file: Option<Str>,
    pushgateway_url: Option<Str>,
    /// One numeric field written raw: (section, key, token).
    number: Option<(&'static str, &'static str, &'static str)>,
}

// ---- strategies ---------------------------------------------------------------------------
//
// A case is a valid policy model plus a few injections (a hostile string in one field, hostile
// bytes in one secret file, a hostile secret reference, a raw numeric token). Hostile values in
// every field at once would almost never get past the parser, so the renderer would go untested.

fn payload() -> impl Strategy<Value = String> {
    prop::sample::select(PAYLOADS).prop_map(str::to_string)
}

fn hostile() -> BoxedStrategy<String> {
    prop_oneof![
        6 => payload(),
        3 => prop::collection::vec(payload(), 2..5).prop_map(|v| v.concat()),
        3 => any::<String>(),
        2 => "[ -~]{0,40}",
        1 => (payload(), 1usize..20_000).prop_map(|(p, n)| p.repeat(n)),
        // Over the 1 MiB policy limit once written.
        1 => Just("A".repeat(1_100_000)),
    ]
    .boxed()
}

fn enc() -> impl Strategy<Value = Enc> {
    prop_oneof![
        3 => Just(Enc::Double),
        1 => Just(Enc::Single),
        1 => Just(Enc::Plain),
    ]
}

/// A valid field value, double-quoted.
fn field(valid: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Str> {
    valid
        .prop_map(|v| Str {
            v,
            enc: Enc::Double,
        })
        .boxed()
}

/// `prop::option::weighted`, which refuses probabilities of 0 and 1.
fn maybe<S: Strategy + 'static>(p: f64, s: S) -> BoxedStrategy<Option<S::Value>>
where
    S::Value: Clone,
{
    if p <= 0.0 {
        Just(None).boxed()
    } else if p >= 1.0 {
        s.prop_map(Some).boxed()
    } else {
        prop::option::weighted(p, s).boxed()
    }
}

fn one_of(values: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(values).prop_map(str::to_string)
}

fn secret_content() -> impl Strategy<Value = Vec<u8>> {
    "[A-Za-z0-9]{32,48}(\n|\r\n)?".prop_map(String::into_bytes)
}

fn secret() -> BoxedStrategy<SecretM> {
    prop_oneof![
        8 => secret_content().prop_map(|content| SecretM::File {
            reference: None,
            content,
            mode: 0o600,
        }),
        1 => field("[A-Za-z0-9]{32,40}").prop_map(SecretM::Inline),
        1 => field(Just("HOME".to_string())).prop_map(SecretM::Env),
    ]
    .boxed()
}

/// A hostile secret: bytes for a file, a reference to an odd path, an odd variable name.
fn hostile_secret() -> BoxedStrategy<SecretM> {
    let content = prop_oneof![
        3 => hostile().prop_map(String::into_bytes),
        2 => ("[A-Za-z0-9]{32}", hostile()).prop_map(|(v, h)| (v + &h).into_bytes()),
        2 => (hostile(), "[A-Za-z0-9]{32}").prop_map(|(h, v)| (h + &v + "\n").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => Just(vec![b'k'; 70_000]),
        1 => Just(Vec::new()),
    ];
    let mode = prop_oneof![4 => Just(0o600u32), 1 => Just(0o644u32), 1 => Just(0o640u32)];
    let path = prop_oneof![
        3 => hostile(),
        1 => one_of(&["/dev/null", "/etc/passwd", "/", "../../../../etc/shadow", "missing"]),
    ];
    prop_oneof![
        4 => (content, mode).prop_map(|(content, mode)| SecretM::File {
            reference: None,
            content,
            mode,
        }),
        2 => (path, enc()).prop_map(|(v, enc)| SecretM::File {
            reference: Some(Str { v, enc }),
            content: b"unused-but-valid-secret-value-0123456789".to_vec(),
            mode: 0o600,
        }),
        1 => (hostile(), enc()).prop_map(|(v, enc)| SecretM::Inline(Str { v, enc })),
        1 => (
            prop_oneof![hostile(), Just("OFFSITE_FUZZ_SURELY_UNSET".to_string())],
            enc()
        )
            .prop_map(|(v, enc)| SecretM::Env(Str { v, enc })),
    ]
    .boxed()
}

fn options() -> BoxedStrategy<Vec<(Str, Str)>> {
    let key = field(prop_oneof![
        6 => "[a-z_]{1,16}",
        1 => one_of(&["force_path_style", "acl", "type", "remote", "endpoint", "password", "env_auth"]),
    ]);
    let value = field(prop_oneof![
        3 => "[a-z0-9]{1,10}",
        1 => one_of(&["true", "false", "10M", "private"]),
    ]);
    prop::collection::vec((key, value), 0..4).boxed()
}

fn endpoint() -> impl Strategy<Value = String> {
    one_of(&[
        "https://s3.sto1.example.com",
        "https://s3.fra1.example.com/path",
        "https://[::1]:9000",
        "http://127.0.0.1:3900",
        "https://s3.example.com:443",
    ])
}

fn bucket() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9-]{1,20}[a-z0-9]"
}

fn side(destination: bool) -> BoxedStrategy<SideM> {
    let (bucket_p, prefix_p) = if destination { (1.0, 0.6) } else { (0.0, 0.0) };
    let s3 = (
        field(endpoint()),
        maybe(0.9, field("[a-z0-9]{2,6}")),
        maybe(0.3, field(one_of(&["Other", "Minio", "AWS"]))),
        secret(),
        secret(),
        options(),
        maybe(bucket_p, field(bucket())),
        maybe(prefix_p, field("[a-z0-9]{1,6}(/[a-z0-9_.-]{1,6}){0,2}")),
    )
        .prop_map(
            |(endpoint, region, provider, key_id, secret, options, bucket, prefix)| SideM::S3 {
                endpoint,
                region,
                provider,
                key_id,
                secret,
                options,
                bucket,
                prefix,
            },
        );
    let local = field(prop_oneof![
        "/srv/[a-z]{1,8}(/[a-z0-9 ._-]{1,8}){0,2}",
        "[a-z]{1,8}/[a-z]{1,8}",
    ])
    .prop_map(|path| SideM::Local { path });
    let other = (
        field(one_of(&["swift", "azureblob", "gcs", "S3", "sftp"])),
        options(),
        maybe(bucket_p, field(bucket())),
        maybe(prefix_p / 2.0, field("[a-z0-9]{1,6}")),
    )
        .prop_map(|(kind, options, bucket, prefix)| SideM::Other {
            kind,
            options,
            bucket,
            prefix,
        });
    prop_oneof![6 => s3, 3 => local, 1 => other].boxed()
}

/// A valid policy model (it may still be noncompliant: findings are not errors here).
fn model() -> impl Strategy<Value = Model> {
    let buckets = maybe(
        0.9,
        prop::collection::vec(
            (
                field(bucket()),
                prop::collection::vec(field("\\*\\*/\\*\\.[a-z]{1,4}"), 0..3),
            ),
            1..4,
        )
        // Bucket names are unique (a repeated one is an error of its own).
        .prop_map(|mut v| {
            let mut seen = std::collections::HashSet::new();
            v.retain(|(n, _)| seen.insert(n.v.clone()));
            v
        }),
    );
    let flags = prop::collection::vec(
        field(prop_oneof![
            4 => "--[a-z-]{2,16}(=[a-z0-9]{1,5})?",
            1 => one_of(&["--fast-list", "--checksum", "-vv", "--log-level", "DEBUG", "--config=x"]),
        ]),
        0..4,
    );
    (
        (
            field("[a-z0-9][a-z0-9-]{0,20}"),
            side(false),
            side(true),
            secret(),
            secret(),
        ),
        (
            prop::sample::select(&["standard", "standard", "standard", "off", "obfuscate"][..]),
            buckets,
            flags,
            maybe(
                0.3,
                field(one_of(&["50M", "10M:100k", "08:00,512k 19:00,off"])),
            ),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            maybe(0.3, prop::collection::vec(field("[a-z0-9]{2,6}"), 0..3)),
            maybe(0.2, field("/var/lib/[a-z]{1,8}\\.prom")),
            maybe(0.2, field(endpoint())),
        ),
    )
        .prop_map(
            |(
                (name, source, destination, password, salt),
                (filename_encryption, buckets, extra_flags, bwlimit),
                (require_tls, allow_inline_secrets, allowed_regions, metrics_file, pushgateway_url),
            )| Model {
                raw: false,
                name,
                source,
                destination,
                password,
                salt,
                filename_encryption,
                buckets,
                extra_flags,
                bwlimit,
                require_tls,
                allow_inline_secrets,
                allowed_regions,
                metrics_file,
                pushgateway_url,
                number: None,
            },
        )
}

#[derive(Clone, Copy, Debug)]
enum How {
    Replace,
    Prefix,
    Suffix,
}

#[derive(Clone, Debug)]
enum Injection {
    /// A hostile value in the `index`-th string field (mod their number).
    Field {
        index: usize,
        value: String,
        how: How,
        enc: Enc,
    },
    /// The `index`-th secret replaced by a hostile one.
    Secret { index: usize, secret: SecretM },
    /// A raw token as one numeric field.
    Number(&'static str, &'static str, &'static str),
}

fn injection() -> impl Strategy<Value = Injection> {
    let how = prop_oneof![Just(How::Replace), Just(How::Prefix), Just(How::Suffix)];
    prop_oneof![
        6 => (any::<usize>(), hostile(), how, enc())
            .prop_map(|(index, value, how, enc)| Injection::Field { index, value, how, enc }),
        2 => (any::<usize>(), hostile_secret())
            .prop_map(|(index, secret)| Injection::Secret { index, secret }),
        1 => (
            prop::sample::select(&[
                ("sync", "transfers"),
                ("guards", "max_delete_percent"),
                ("verify", "sample_percent"),
                ("compliance", "min_secret_length"),
            ][..]),
            prop::sample::select(
                &[
                    "0", "-1", "1e999", ".nan", ".inf", "-.inf", "99999999999999999999", "0x10",
                    "1.5", "'8'", "~", "true", "[]", "{}", "8", "*a", "!!str 8",
                ][..],
            ),
        )
            .prop_map(|((s, k), v)| Injection::Number(s, k, v)),
    ]
}

impl SideM {
    fn strs_mut(&mut self) -> Vec<&mut Str> {
        let mut v: Vec<&mut Str> = Vec::new();
        let (options, bucket, prefix) = match self {
            SideM::S3 {
                endpoint,
                region,
                provider,
                options,
                bucket,
                prefix,
                ..
            } => {
                v.push(endpoint);
                v.extend(region.as_mut());
                v.extend(provider.as_mut());
                (options, bucket, prefix)
            }
            SideM::Local { path } => return vec![path],
            SideM::Other {
                kind,
                options,
                bucket,
                prefix,
            } => {
                v.push(kind);
                (options, bucket, prefix)
            }
        };
        for (k, val) in options.iter_mut() {
            v.push(k);
            v.push(val);
        }
        v.extend(bucket.as_mut());
        v.extend(prefix.as_mut());
        v
    }

    fn secrets_mut(&mut self) -> Vec<&mut SecretM> {
        match self {
            SideM::S3 { key_id, secret, .. } => vec![key_id, secret],
            _ => vec![],
        }
    }
}

impl Model {
    /// Every string field, in a fixed order.
    fn strs_mut(&mut self) -> Vec<&mut Str> {
        let mut v: Vec<&mut Str> = vec![&mut self.name];
        v.extend(self.source.strs_mut());
        v.extend(self.destination.strs_mut());
        for (name, exclude) in self.buckets.iter_mut().flatten() {
            v.push(name);
            v.extend(exclude.iter_mut());
        }
        v.extend(self.extra_flags.iter_mut());
        v.extend(self.bwlimit.as_mut());
        v.extend(self.allowed_regions.iter_mut().flatten());
        v.extend(self.metrics_file.as_mut());
        v.extend(self.pushgateway_url.as_mut());
        for s in [&mut self.password, &mut self.salt] {
            match s {
                SecretM::Inline(x) | SecretM::Env(x) => v.push(x),
                SecretM::File {
                    reference: Some(x), ..
                } => v.push(x),
                SecretM::File { .. } => {}
            }
        }
        v
    }

    fn inject(mut self, injections: &[Injection]) -> Model {
        for i in injections {
            match i {
                Injection::Field {
                    index,
                    value,
                    how,
                    enc,
                } => {
                    let mut fields = self.strs_mut();
                    let n = fields.len();
                    let f = &mut fields[index % n];
                    f.v = match how {
                        How::Replace => value.clone(),
                        How::Prefix => format!("{value}{}", f.v),
                        How::Suffix => format!("{}{value}", f.v),
                    };
                    f.enc = *enc;
                }
                Injection::Secret { index, secret } => {
                    let mut secrets = self.source.secrets_mut();
                    secrets.extend(self.destination.secrets_mut());
                    secrets.push(&mut self.password);
                    secrets.push(&mut self.salt);
                    let n = secrets.len();
                    *secrets[index % n] = secret.clone();
                }
                Injection::Number(s, k, v) => self.number = Some((s, k, v)),
            }
        }
        // A raw field may change the YAML structure: then only the render is checked.
        let raw = self.strs_mut().iter().any(|s| matches!(s.enc, Enc::Plain));
        let raw_secret = [&self.password, &self.salt]
            .into_iter()
            .chain(secret_refs(&self.source))
            .chain(secret_refs(&self.destination))
            .any(|s| match s {
                SecretM::Inline(x) | SecretM::Env(x) => matches!(x.enc, Enc::Plain),
                SecretM::File {
                    reference: Some(x), ..
                } => matches!(x.enc, Enc::Plain),
                SecretM::File { .. } => false,
            });
        self.raw = raw || raw_secret;
        self
    }
}

fn secret_refs(s: &SideM) -> Vec<&SecretM> {
    match s {
        SideM::S3 { key_id, secret, .. } => vec![key_id, secret],
        _ => vec![],
    }
}

/// A valid model with up to four injections.
fn structured() -> impl Strategy<Value = Model> {
    (model(), prop::collection::vec(injection(), 0..5))
        .prop_map(|(m, injections)| m.inject(&injections))
}

// ---- writing a model ------------------------------------------------------------------------

/// Writes `m`'s secret files into `dir` and returns the policy text.
fn policy_text(m: &Model, dir: &Path) -> String {
    RAW.set(m.raw);
    let mut files = 0usize;
    let mut secret = |s: &SecretM| -> String {
        match s {
            SecretM::File {
                reference,
                content,
                mode,
            } => {
                let name = format!("secret{files}");
                files += 1;
                let path = dir.join(&name);
                std::fs::write(&path, content).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
                match reference {
                    None => format!("{{file: {name}}}"),
                    Some(r) => format!("{{file: {}}}", r.yaml()),
                }
            }
            SecretM::Inline(v) => v.yaml(),
            SecretM::Env(v) => format!("{{env: {}}}", v.yaml()),
        }
    };
    let mut y = String::from("version: 1\n");
    writeln!(y, "name: {}", m.name.yaml()).unwrap();
    for (label, side) in [("source", &m.source), ("destination", &m.destination)] {
        writeln!(y, "{label}:").unwrap();
        let opts = |y: &mut String, options: &[(Str, Str)]| {
            if !options.is_empty() {
                y.push_str("  options:\n");
                for (k, v) in options {
                    writeln!(y, "    {}: {}", k.yaml(), v.yaml()).unwrap();
                }
            }
        };
        let place = |y: &mut String, bucket: &Option<Str>, prefix: &Option<Str>| {
            if let Some(b) = bucket {
                writeln!(y, "  bucket: {}", b.yaml()).unwrap();
            }
            if let Some(p) = prefix {
                writeln!(y, "  prefix: {}", p.yaml()).unwrap();
            }
        };
        match side {
            SideM::S3 {
                endpoint,
                region,
                provider,
                key_id,
                secret: sk,
                options,
                bucket,
                prefix,
            } => {
                y.push_str("  type: s3\n");
                writeln!(y, "  endpoint: {}", endpoint.yaml()).unwrap();
                if let Some(r) = region {
                    writeln!(y, "  region: {}", r.yaml()).unwrap();
                }
                if let Some(p) = provider {
                    writeln!(y, "  provider: {}", p.yaml()).unwrap();
                }
                writeln!(y, "  access_key_id: {}", secret(key_id)).unwrap();
                writeln!(y, "  secret_access_key: {}", secret(sk)).unwrap();
                opts(&mut y, options);
                place(&mut y, bucket, prefix);
            }
            SideM::Local { path } => {
                writeln!(y, "  type: local\n  path: {}", path.yaml()).unwrap();
            }
            SideM::Other {
                kind,
                options,
                bucket,
                prefix,
            } => {
                writeln!(y, "  type: {}", kind.yaml()).unwrap();
                opts(&mut y, options);
                place(&mut y, bucket, prefix);
            }
        }
    }
    writeln!(
        y,
        "encryption:\n  password: {}\n  salt: {}\n  filename_encryption: {}",
        secret(&m.password),
        secret(&m.salt),
        m.filename_encryption
    )
    .unwrap();
    match &m.buckets {
        None => y.push_str("buckets: all\n"),
        Some(list) => {
            y.push_str("buckets:\n");
            for (i, (name, exclude)) in list.iter().enumerate() {
                if exclude.is_empty() && i % 2 == 0 {
                    writeln!(y, "  - {}", name.yaml()).unwrap();
                } else {
                    let ex: Vec<String> = exclude.iter().map(Str::yaml).collect();
                    writeln!(
                        y,
                        "  - name: {}\n    exclude: [{}]",
                        name.yaml(),
                        ex.join(", ")
                    )
                    .unwrap();
                }
            }
        }
    }
    let number = |y: &mut String, section: &str| {
        if let Some((s, k, v)) = m.number {
            if s == section {
                writeln!(y, "  {k}: {v}").unwrap();
            }
        }
    };
    y.push_str("sync:\n");
    let flags: Vec<String> = m.extra_flags.iter().map(Str::yaml).collect();
    writeln!(y, "  extra_flags: [{}]", flags.join(", ")).unwrap();
    if let Some(b) = &m.bwlimit {
        writeln!(y, "  bwlimit: {}", b.yaml()).unwrap();
    }
    number(&mut y, "sync");
    y.push_str("guards:\n  key_canary: true\n");
    number(&mut y, "guards");
    y.push_str("verify:\n  after_sync: changed\n");
    number(&mut y, "verify");
    writeln!(
        y,
        "compliance:\n  require_tls: {}\n  allow_inline_secrets: {}",
        m.require_tls, m.allow_inline_secrets
    )
    .unwrap();
    if let Some(list) = &m.allowed_regions {
        let l: Vec<String> = list.iter().map(Str::yaml).collect();
        writeln!(y, "  allowed_destination_regions: [{}]", l.join(", ")).unwrap();
    }
    number(&mut y, "compliance");
    y.push_str("reporting:\n");
    if let Some(f) = &m.metrics_file {
        writeln!(y, "  metrics_file: {}", f.yaml()).unwrap();
    }
    if let Some(u) = &m.pushgateway_url {
        writeln!(y, "  pushgateway_url: {}", u.yaml()).unwrap();
    }
    y
}

// ---- the properties -------------------------------------------------------------------------

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

/// A message a person reads on a terminal: one line, no control characters (no escape
/// sequences from the policy reach the terminal).
fn one_clean_line(what: &str, msg: &str) -> Result<(), TestCaseError> {
    if let Some(c) = msg.chars().find(|c| c.is_control()) {
        return Err(fail(format!("{what} contains {c:?}: {msg:?}")));
    }
    Ok(())
}

thread_local! {
    /// Outcomes in this test's thread: refused by the parser, parsed, configs rendered,
    /// renders refused.
    static OUTCOMES: std::cell::Cell<[u64; 4]> = const { std::cell::Cell::new([0; 4]) };
}

fn count(i: usize) {
    let mut o = OUTCOMES.get();
    o[i] += 1;
    OUTCOMES.set(o);
}

/// The binary's pipeline on one policy file, with every property checked. Returns the policy
/// when it parsed.
fn pipeline(path: &Path) -> Result<Option<Policy>, TestCaseError> {
    let shown = path.display().to_string();
    let p = match policy::load(path) {
        Ok(p) => p,
        Err(e) => {
            count(0);
            let msg = format!("{e:#}");
            if code_of(&e) != Code::Invalid {
                return Err(fail(format!("load error maps to {:?}: {msg}", code_of(&e))));
            }
            one_clean_line("load error", &msg)?;
            if !msg.starts_with(&shown) {
                return Err(fail(format!("load error does not name the file: {msg}")));
            }
            return Ok(None);
        }
    };
    count(1);
    for f in compliance::check(&p) {
        one_clean_line("finding", &format!("{} {}: {}", f.id, f.field, f.message))?;
    }
    for mode in [Secrets::Redacted, Secrets::Real] {
        match render::render(&p, &mode) {
            Ok(text) => {
                count(2);
                rclone_conf::check(&text, &p, &mode)
                    .map_err(|e| fail(format!("unsafe render: {e}\n{text}")))?
            }
            Err(e) => {
                count(3);
                let msg = format!("{e:#}");
                if code_of(&e) != Code::Invalid {
                    return Err(fail(format!(
                        "render error maps to {:?}: {msg}",
                        code_of(&e)
                    )));
                }
                one_clean_line("render error", &msg)?;
                let field = msg.split(':').next().unwrap_or("");
                if !["source", "destination", "encryption"]
                    .iter()
                    .any(|s| field.starts_with(s))
                {
                    return Err(fail(format!("render error names no field: {msg}")));
                }
            }
        }
    }
    Ok(Some(p))
}

/// The value a `{file: ..}` secret with these bytes must have (policy.md), if it is valid.
fn file_secret(content: &[u8]) -> Option<String> {
    if content.len() > 64 * 1024 {
        return None;
    }
    let mut v = String::from_utf8(content.to_vec()).ok()?;
    if v.ends_with('\n') {
        v.pop();
        if v.ends_with('\r') {
            v.pop();
        }
    }
    (!v.is_empty() && !v.chars().any(char::is_control)).then_some(v)
}

fn same_secret(what: &str, m: &SecretM, s: &Secret) -> Result<(), String> {
    let want = match m {
        SecretM::File {
            reference: None,
            content,
            ..
        } => Some(file_secret(content).ok_or("an invalid secret file was accepted")?),
        SecretM::Inline(v) => Some(v.v.clone()),
        SecretM::Env(v) if v.v == "HOME" => std::env::var("HOME").ok(),
        _ => None,
    };
    match want {
        Some(w) if w != s.expose() => Err(format!("{what}: secret value differs")),
        _ => Ok(()),
    }
}

fn same_str(what: &str, m: &Str, got: &str) -> Result<(), String> {
    if m.v != got {
        return Err(format!("{what}: {got:?}, generated {:?}", m.v));
    }
    Ok(())
}

fn same_opt(what: &str, m: &Option<Str>, got: Option<&str>) -> Result<(), String> {
    match (m, got) {
        (Some(m), Some(g)) => same_str(what, m, g),
        (None, None) => Ok(()),
        _ => Err(format!("{what}: present {:?}, generated {:?}", got, m)),
    }
}

fn same_options(
    what: &str,
    m: &[(Str, Str)],
    got: &BTreeMap<String, String>,
) -> Result<(), String> {
    let want: BTreeMap<String, String> =
        m.iter().map(|(k, v)| (k.v.clone(), v.v.clone())).collect();
    if &want != got {
        return Err(format!("{what}.options: {got:?}, generated {want:?}"));
    }
    Ok(())
}

fn same_side(what: &str, m: &SideM, got: &Side, base: &Path) -> Result<(), String> {
    match (m, got) {
        (
            SideM::S3 {
                endpoint,
                region,
                provider,
                key_id,
                secret,
                options,
                bucket,
                prefix,
            },
            Side::S3(s),
        ) => {
            same_str(&format!("{what}.endpoint"), endpoint, &s.endpoint.0)?;
            same_opt(
                &format!("{what}.region"),
                region,
                s.region.as_ref().map(|r| r.0.as_str()),
            )?;
            match provider {
                Some(pr) => same_str(&format!("{what}.provider"), pr, &s.provider.0)?,
                None if s.provider.0 != "Other" => return Err(format!("{what}.provider")),
                None => {}
            }
            same_secret(&format!("{what}.access_key_id"), key_id, &s.access_key_id)?;
            same_secret(
                &format!("{what}.secret_access_key"),
                secret,
                &s.secret_access_key,
            )?;
            same_options(what, options, &s.options)?;
            same_opt(
                &format!("{what}.bucket"),
                bucket,
                s.bucket.as_ref().map(|b| b.0.as_str()),
            )?;
            same_opt(
                &format!("{what}.prefix"),
                prefix,
                s.prefix.as_ref().map(|b| b.0.as_str()),
            )
        }
        (SideM::Local { path }, Side::Local { path: got }) => {
            let want = if Path::new(&path.v).is_absolute() {
                PathBuf::from(&path.v)
            } else {
                base.join(&path.v)
            };
            if &want != got {
                return Err(format!("{what}.path: {got:?}, generated {want:?}"));
            }
            Ok(())
        }
        (
            SideM::Other {
                kind,
                options,
                bucket,
                prefix,
            },
            Side::Other {
                kind: k,
                options: o,
                bucket: b,
                prefix: p,
            },
        ) => {
            same_str(&format!("{what}.type"), kind, k)?;
            same_options(what, options, o)?;
            same_opt(
                &format!("{what}.bucket"),
                bucket,
                b.as_ref().map(|b| b.0.as_str()),
            )?;
            same_opt(
                &format!("{what}.prefix"),
                prefix,
                p.as_ref().map(|b| b.0.as_str()),
            )
        }
        _ => Err(format!(
            "{what}: backend type differs from the generated one"
        )),
    }
}

/// The parsed policy holds exactly the generated values (a model written without raw fields).
fn same_as_model(m: &Model, p: &Policy, base: &Path) -> Result<(), String> {
    same_str("name", &m.name, &p.name.0)?;
    same_side("source", &m.source, &p.source, base)?;
    same_side("destination", &m.destination, &p.destination, base)?;
    same_secret("encryption.password", &m.password, &p.encryption.password)?;
    same_secret("encryption.salt", &m.salt, &p.encryption.salt)?;
    if p.encryption.filename_encryption.as_str() != m.filename_encryption {
        return Err("encryption.filename_encryption".into());
    }
    if let Some(list) = &m.buckets {
        let got = p.listed_buckets();
        if list.len() != got.len() {
            return Err(format!(
                "buckets: {} parsed, {} generated",
                got.len(),
                list.len()
            ));
        }
        for ((name, exclude), b) in list.iter().zip(got) {
            same_str("buckets[].name", name, &b.name.0)?;
            if exclude.len() != b.exclude.len() {
                return Err("buckets[].exclude: length".into());
            }
            for (e, g) in exclude.iter().zip(&b.exclude) {
                same_str("buckets[].exclude[]", e, g)?;
            }
        }
    }
    let got: Vec<&str> = p.sync.extra_flags.iter().map(|f| f.0.as_str()).collect();
    let want: Vec<&str> = m.extra_flags.iter().map(|f| f.v.as_str()).collect();
    if got != want {
        return Err(format!("sync.extra_flags: {got:?}, generated {want:?}"));
    }
    same_opt(
        "sync.bwlimit",
        &m.bwlimit,
        p.sync.bwlimit.as_ref().map(|b| b.0.as_str()),
    )?;
    if p.compliance.require_tls != m.require_tls {
        return Err("compliance.require_tls".into());
    }
    Ok(())
}

/// One structured case: write it, run the pipeline, compare with the model.
fn structured_case(m: Model) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy_text(&m, dir.path())).unwrap();
    if let Some(p) = pipeline(&path)? {
        let base = std::fs::canonicalize(dir.path()).unwrap();
        if !m.raw {
            same_as_model(&m, &p, &base)
                .map_err(|e| fail(format!("parsed policy differs: {e}")))?;
        }
        // Relative secret paths resolve against the policy's directory, not the cwd.
        for (field, s) in p.secrets() {
            if let SecretOrigin::File(f) = &s.origin {
                if !f.is_absolute() {
                    return Err(fail(format!("{field}: file secret resolved to {f:?}")));
                }
            }
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Mutation {
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Flip(usize, u8),
    DuplicateLine(usize),
    Truncate(usize),
    Crlf,
    Bom,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), payload().prop_map(String::into_bytes))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<usize>().prop_map(Mutation::DuplicateLine),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => Just(Mutation::Crlf),
        1 => Just(Mutation::Bom),
    ]
}

fn mutate(mut text: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Insert(i, b) => {
                let i = at(*i, text.len());
                text.splice(i..i, b.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = at(*i, text.len());
                let end = (i + n).min(text.len());
                text.drain(i..end);
            }
            Mutation::Flip(i, b) if !text.is_empty() => {
                let i = i % text.len();
                text[i] = *b;
            }
            Mutation::Flip(..) => {}
            Mutation::DuplicateLine(i) => {
                let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
                if !lines.is_empty() {
                    let k = i % lines.len();
                    let mut out = Vec::with_capacity(text.len() * 2);
                    for (j, l) in lines.iter().enumerate() {
                        out.extend_from_slice(l);
                        if j == k {
                            out.extend_from_slice(l);
                        }
                    }
                    text = out;
                }
            }
            Mutation::Truncate(i) => {
                let i = at(*i, text.len());
                text.truncate(i);
            }
            Mutation::Crlf => {
                let mut out = Vec::with_capacity(text.len() * 2);
                for &b in &text {
                    if b == b'\n' {
                        out.push(b'\r');
                    }
                    out.push(b);
                }
                text = out;
            }
            Mutation::Bom => {
                text.splice(0..0, *b"\xEF\xBB\xBF");
            }
        }
    }
    text
}

/// A valid model, for the byte mutations to start from.
fn valid_model() -> impl Strategy<Value = Model> {
    model().prop_filter("valid start", |m| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, policy_text(m, dir.path())).unwrap();
        policy::load(&path).is_ok()
    })
}

fn mutated_case((m, ms): (Model, Vec<Mutation>)) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let text = policy_text(&m, dir.path()).into_bytes();
    std::fs::write(&path, mutate(text, &ms)).unwrap();
    pipeline(&path).map(|_| ())
}

// ---- the runner ---------------------------------------------------------------------------

/// Runs `test` over `strategy`: `default_cases` cases, or rounds of cases until
/// `OFFSITE_FUZZ_SECONDS` have passed. Prints cases, time and seed.
fn fuzz<S>(
    name: &str,
    strategy: S,
    default_cases: u32,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let budget = std::env::var("OFFSITE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let seed: u64 = std::env::var("OFFSITE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let base = Config::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() {
        base.cases
    } else if budget.is_some() {
        500
    } else {
        default_cases
    };
    let start = Instant::now();
    let mut total = 0u64;
    let mut round = 0u64;
    loop {
        let config = Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 4096,
            ..base.clone()
        };
        let round_seed = seed.wrapping_add(round);
        let mut bytes = [0u8; 32];
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(
                &(round_seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes(),
            );
        }
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let mut runner = TestRunner::new_with_rng(config, rng);
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: OFFSITE_FUZZ_SEED={round_seed} reproduces it: {e}");
        }
        total += u64::from(cases);
        round += 1;
        match budget {
            Some(b) if start.elapsed() < b => continue,
            _ => break,
        }
    }
    let [refused, parsed, rendered, render_refused] = OUTCOMES.get();
    eprintln!(
        "{name}: {total} cases in {:.1} s, no failure (seed {seed}, {round} round(s)); \
         pipeline runs: {refused} refused by the parser, {parsed} parsed, {rendered} configs \
         rendered and read back, {render_refused} renders refused",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn structured_policies() {
    fuzz("structured_policies", structured(), 150, structured_case);
}

#[test]
fn mutated_yaml() {
    fuzz(
        "mutated_yaml",
        (valid_model(), prop::collection::vec(mutation(), 1..8)),
        150,
        mutated_case,
    );
}
