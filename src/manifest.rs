//! `offsite manifest kubernetes [--shards N]` (issue 7; docs/kubernetes.md): the policy as a
//! ConfigMap, a Secret skeleton with empty values, and a hardened CronJob — with N > 1 its
//! jobTemplate is an Indexed Job whose pods run `offsite run --shards N`.
//!
//! This module owns the deployment decisions: where every file the policy names lands in the
//! pod, which volumes that takes, and the flags' defaults. `templates/kubernetes/` only lays
//! the values out. Every `{{ }}` of those templates goes through [`yaml_formatter`]: strings
//! come out as escaped double-quoted YAML scalars (numbers and booleans as themselves), so no
//! flag, path or policy text can end a line, start a key or change the document structure.
//! The rendered stream is parsed back and checked before it is printed.
//!
//! The policy is read with [`policy::load_unresolved`]: the machine rendering manifests need not
//! hold the secrets, and no secret value can reach the output.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Component, Path};

use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::{policy_path, Cli, Ctx, Done};
use crate::compliance::{self, Finding, Severity};
use crate::exit::{fail, Code};
use crate::policy::{self, Policy, SecretOrigin, Side};

const CONFIGMAP_TEMPLATE: &str = include_str!("../templates/kubernetes/configmap.yaml.j2");
const SECRET_TEMPLATE: &str = include_str!("../templates/kubernetes/secret.yaml.j2");
const CRONJOB_TEMPLATE: &str = include_str!("../templates/kubernetes/cronjob.yaml.j2");

/// Where the policy file lives in the pod. Relative `{file: ..}` references resolve against
/// its directory, exactly as they do next to the policy on a host (README, "Choices the spec
/// left open").
const CONFIG_DIR: &str = "/etc/offsite";
/// The policy's ConfigMap key and its file name in [`CONFIG_DIR`].
const POLICY_KEY: &str = "offsite.yaml";
/// `$TMPDIR` (and `$HOME`) in the pod: a memory-backed emptyDir, because offsite writes its
/// private rclone.conf there (README, "Temp files") and the root filesystem is read-only.
const TMP_DIR: &str = "/tmp";
/// Where the init container sees the Secret (and the policy, when it copies it). Only the init
/// container mounts it.
const STAGING_DIR: &str = "/offsite-staging";
/// The user and group offsite runs as: the conventional "nonroot" id (distroless), also the
/// user of the Containerfile's image.
const RUN_AS: u32 = 65532;
/// offsite's SIGTERM path: rclone gets 5 s (signals::GRACE), the lease release 10 s
/// (rclone::output_cleanup), then reporting; Kubernetes' default 30 s is too tight for all of it.
const TERMINATION_GRACE_SECONDS: u32 = 60;
const STARTING_DEADLINE_SECONDS: u32 = 3600;
/// The init container's program. Paths come as positional arguments (`mode src dst` triples),
/// never inside the script, so no path is ever parsed by the shell. `umask 077` keeps the
/// directories `install -D` creates private.
const INIT_SCRIPT: &str = r#"set -eu; umask 077; while [ "$#" -ge 3 ]; do install -D -m "$1" "$2" "$3"; shift 3; done; [ "$#" -eq 0 ]"#;

/// Kubernetes' own ceiling for an Indexed Job's parallelism; offsite adds none of its own.
const MAX_SHARDS: u32 = 100_000;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ManifestCommand {
    /// CronJob, policy ConfigMap, Secret skeleton; an Indexed Job with --shards N > 1
    Kubernetes(KubernetesArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct KubernetesArgs {
    /// Split the buckets over N pods of an Indexed Job (each runs `offsite run --shards N`)
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// Cron schedule (5 fields or @daily etc.), read in --time-zone; default: daily at 03:17,
    /// after the usual nightly backup window and off the full hour
    #[arg(long, default_value = "17 3 * * *")]
    pub schedule: String,
    /// Time zone of the schedule (IANA name)
    #[arg(long, default_value = "Etc/UTC")]
    pub time_zone: String,
    /// Container image with offsite, rclone, /bin/sh and install (see Containerfile)
    #[arg(long, default_value = concat!("localhost/offsite:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// Namespace of every object
    #[arg(long, default_value = "offsite")]
    pub namespace: String,
    /// Name of the CronJob (at most 52 characters, fewer with 11 or more shards); the ConfigMap
    /// and Secret get -policy and -secrets [default: offsite-<policy name>]
    #[arg(long)]
    pub name: Option<String>,
    /// Hard limit for one run, in seconds (SIGTERM, then exit 143); default 6 h, well inside
    /// a daily schedule
    #[arg(long, default_value_t = 21600)]
    pub active_deadline_seconds: u32,
    /// CPU request of the offsite container
    #[arg(long, default_value = "250m")]
    pub cpu_request: String,
    /// CPU limit of the offsite container
    #[arg(long, default_value = "2")]
    pub cpu_limit: String,
    /// Memory request and limit [default: 320Mi + 40Mi per concurrent transfer
    /// (sync.transfers × sync.parallel_buckets)]
    #[arg(long)]
    pub memory: Option<String>,
    /// Leave the Secret skeleton out (re-applying it would empty the filled Secret)
    #[arg(long)]
    pub no_secret: bool,
}

pub fn command(cli: &Cli, ctx: &Ctx, cmd: &ManifestCommand) -> anyhow::Result<Done> {
    match cmd {
        ManifestCommand::Kubernetes(args) => kubernetes(cli, ctx, args),
    }
}

fn kubernetes(cli: &Cli, ctx: &Ctx, args: &KubernetesArgs) -> anyhow::Result<Done> {
    let path = policy_path(cli);
    // The ConfigMap must hold the text that was checked: read it on both sides of the parse
    // and refuse if it changed. The parser reports every problem with the file itself.
    let before = read_policy_text(&path);
    let policy = policy::load_unresolved(&path)?;
    let text = match (before, read_policy_text(&path)) {
        (Some(a), Some(b)) if a == b => b,
        _ => {
            return Err(fail(
                Code::Invalid,
                format!(
                    "{}: the policy file changed while it was being read; run again",
                    path.display()
                ),
            ))
        }
    };
    let findings = compliance_without_secrets(&policy);
    crate::commands::refuse_noncompliant(&path, ctx, &findings)?;
    let rendered = render(&policy, &text, args)?;
    if !ctx.quiet {
        for n in &rendered.notes {
            eprintln!("offsite manifest: note: {n}");
        }
    }
    if !ctx.json {
        print!("{}", rendered.yaml);
    }
    Ok(Done {
        doc: json!({
            "command": "manifest",
            "policy": policy.name.0,
            "status": "ok",
            "exit_code": 0,
            "kubernetes": {
                "name": rendered.name,
                "namespace": args.namespace,
                "shards": args.shards,
                "schedule": args.schedule,
                "time_zone": args.time_zone,
                "image": args.image,
                "policy_path": format!("{CONFIG_DIR}/{POLICY_KEY}"),
            },
            "manifests": rendered.documents,
            "yaml": rendered.yaml,
            "notes": rendered.notes,
            "findings": findings,
        }),
        code: Code::Ok,
    })
}

/// The policy file's text, read no further than the parser's size limit; `None` for anything
/// [`policy::load_unresolved`] refuses anyway.
fn read_policy_text(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(policy::MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > policy::MAX_POLICY_BYTES {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// The compliance rules that can run without the secret values. C003 and C004 judge values, so
/// they are kept only for inline secrets (the only ones `load_unresolved` reads); C012 judges
/// file modes on this machine, which says nothing about the pod (there the init container
/// makes every file 0400). A password and salt read from the same file or variable are equal
/// whatever they hold, so that C003 is known here too.
fn compliance_without_secrets(p: &Policy) -> Vec<Finding> {
    let inline = |s: &policy::Secret| s.origin == SecretOrigin::Inline;
    let enc = &p.encryption;
    let mut out: Vec<Finding> = compliance::check(p)
        .into_iter()
        .filter(|f| match f.id {
            "C003" => inline(&enc.password) && inline(&enc.salt),
            "C004" => p
                .secrets()
                .iter()
                .any(|(field, s)| *field == f.field && inline(s)),
            "C012" => false,
            _ => true,
        })
        .collect();
    if !inline(&enc.salt) && enc.salt.origin == enc.password.origin {
        out.push(Finding {
            id: "C003",
            severity: Severity::Error,
            field: "encryption.salt".into(),
            message: format!(
                "reads the same {} as encryption.password, so the salt equals the password; give it its own random value (offsite init makes one)",
                enc.salt.origin
            ),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

struct Rendered {
    name: String,
    yaml: String,
    documents: Vec<Value>,
    notes: Vec<String>,
}

#[derive(Serialize)]
struct SecretKey {
    key: String,
    note: String,
}

#[derive(Serialize)]
struct EnvVar {
    name: String,
    value: Option<String>,
    secret_key: Option<String>,
}

#[derive(Serialize, Clone)]
struct Mount {
    name: String,
    path: String,
    read_only: bool,
}

#[derive(Serialize)]
struct Item {
    key: String,
    path: String,
}

#[derive(Serialize)]
struct EmptyDir {
    memory: bool,
    size_limit: &'static str,
}

#[derive(Serialize)]
struct ConfigMapVolume {
    name: String,
    mode: u32,
    items: Vec<Item>,
}

#[derive(Serialize)]
struct Projected {
    mode: u32,
    secret_items: Vec<Item>,
    config_map_items: Vec<Item>,
}

#[derive(Serialize)]
struct Volume {
    name: String,
    note: Option<String>,
    empty_dir: Option<EmptyDir>,
    config_map: Option<ConfigMapVolume>,
    projected: Option<Projected>,
}

#[derive(Serialize)]
struct Resources {
    cpu_request: String,
    cpu_limit: String,
    memory: String,
}

#[derive(Serialize)]
struct Init {
    command: Vec<String>,
    mounts: Vec<Mount>,
    resources: Resources,
}

fn render(policy: &Policy, text: &str, args: &KubernetesArgs) -> anyhow::Result<Rendered> {
    let flags = Flags::check(policy, args)?;
    let layout = Layout::plan(policy, text)?;
    let mut notes = layout.notes.clone();
    notes.extend(shard_notes(policy, args.shards));

    let config_map = format!("{}-policy", flags.name);
    let secret = format!("{}-secrets", flags.name);
    let labels = vec![
        ("app.kubernetes.io/name".to_string(), "offsite".to_string()),
        ("app.kubernetes.io/instance".to_string(), flags.name.clone()),
    ];

    // Secret keys: one per distinct {file:} path, one per distinct {env:} name.
    let mut secret_keys: Vec<SecretKey> = layout
        .files
        .iter()
        .map(|f| SecretKey {
            key: f.key.clone(),
            note: format!("{} -> file {}", f.fields.join(", "), f.pod_path),
        })
        .collect();
    secret_keys.extend(layout.envs.iter().map(|e| SecretKey {
        key: e.name.clone(),
        note: format!("{} -> env {}", e.fields.join(", "), e.name),
    }));

    let mut env = vec![
        EnvVar {
            name: "TMPDIR".into(),
            value: Some(TMP_DIR.into()),
            secret_key: None,
        },
        // rclone derives its cache and config defaults from $HOME; give it the writable one.
        EnvVar {
            name: "HOME".into(),
            value: Some(TMP_DIR.into()),
            secret_key: None,
        },
    ];
    env.extend(layout.envs.iter().map(|e| EnvVar {
        name: e.name.clone(),
        value: None,
        secret_key: Some(e.name.clone()),
    }));

    // Volumes and mounts.
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        note: None,
        empty_dir: Some(EmptyDir {
            memory: true,
            size_limit: "64Mi",
        }),
        config_map: None,
        projected: None,
    }];
    let mut mounts = vec![Mount {
        name: "tmp".into(),
        path: TMP_DIR.into(),
        read_only: false,
    }];
    if !layout.policy_copied {
        volumes.push(Volume {
            name: "policy".into(),
            note: None,
            empty_dir: None,
            config_map: Some(ConfigMapVolume {
                name: config_map.clone(),
                mode: 0o444,
                items: vec![Item {
                    key: POLICY_KEY.into(),
                    path: POLICY_KEY.into(),
                }],
            }),
            projected: None,
        });
        mounts.push(Mount {
            name: "policy".into(),
            path: CONFIG_DIR.into(),
            read_only: true,
        });
    }
    let mut init_mounts = Vec::new();
    let mut init_command: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        INIT_SCRIPT.into(),
        "install-files".into(),
    ];
    for f in &layout.files {
        init_command.extend([
            "0400".to_string(),
            format!("{STAGING_DIR}/{}", f.key),
            f.pod_path.clone(),
        ]);
    }
    if layout.policy_copied {
        init_command.extend([
            "0444".to_string(),
            format!("{STAGING_DIR}/{POLICY_KEY}"),
            format!("{CONFIG_DIR}/{POLICY_KEY}"),
        ]);
    }
    for (i, root) in layout.roots.iter().enumerate() {
        let name = format!("files-{i}");
        let note = root.report.then(|| {
            format!(
                "{}: an emptyDir ends with the pod (docs/kubernetes.md, \"Where the files land\")",
                root.report_fields.join(", ")
            )
        });
        volumes.push(Volume {
            name: name.clone(),
            note,
            empty_dir: Some(EmptyDir {
                // Secrets stay in memory, never on the node's disk.
                memory: root.secret,
                size_limit: if root.report { "64Mi" } else { "1Mi" },
            }),
            config_map: None,
            projected: None,
        });
        mounts.push(Mount {
            name: name.clone(),
            path: root.path.clone(),
            read_only: !root.report,
        });
        if root.secret || root.policy {
            init_mounts.push(Mount {
                name,
                path: root.path.clone(),
                read_only: false,
            });
        }
    }
    let init = if layout.files.is_empty() && !layout.policy_copied {
        None
    } else {
        volumes.push(Volume {
            name: "staging".into(),
            note: None,
            empty_dir: None,
            config_map: None,
            projected: Some(Projected {
                mode: 0o440,
                secret_items: layout
                    .files
                    .iter()
                    .map(|f| Item {
                        key: f.key.clone(),
                        path: f.key.clone(),
                    })
                    .collect(),
                config_map_items: if layout.policy_copied {
                    vec![Item {
                        key: POLICY_KEY.into(),
                        path: POLICY_KEY.into(),
                    }]
                } else {
                    vec![]
                },
            }),
        });
        init_mounts.insert(
            0,
            Mount {
                name: "staging".into(),
                path: STAGING_DIR.into(),
                read_only: true,
            },
        );
        Some(Init {
            command: init_command,
            mounts: init_mounts,
            resources: Resources {
                cpu_request: "10m".into(),
                cpu_limit: "100m".into(),
                memory: "32Mi".into(),
            },
        })
    };

    let mut run_args = vec![
        "-c".to_string(),
        format!("{CONFIG_DIR}/{POLICY_KEY}"),
        // One JSON document on stdout at the end (README, "Operations"); progress lines and
        // diagnostics go to stderr, both end up in the pod log.
        "--output".into(),
        "json".into(),
        "run".into(),
    ];
    if args.shards > 1 {
        run_args.extend(["--shards".to_string(), args.shards.to_string()]);
    }

    let env_ctx = environment()?;
    let common = minijinja::context! {
        version => env!("CARGO_PKG_VERSION"),
        policy => policy.name.0,
        name => flags.name,
        namespace => args.namespace,
        labels => labels,
        config_map => config_map,
        secret => secret,
        with_secret => !args.no_secret,
    };
    let render_one = |template: &str, extra: minijinja::Value| -> anyhow::Result<String> {
        let ctx = minijinja::context! { ..common.clone(), ..extra };
        env_ctx
            .get_template(template)
            .and_then(|t| t.render(ctx))
            .with_context(|| format!("rendering templates/kubernetes/{template}"))
    };
    let mut docs = vec![render_one(
        "configmap.yaml.j2",
        minijinja::context! {
            policy_key => POLICY_KEY,
            policy_path => format!("{CONFIG_DIR}/{POLICY_KEY}"),
            policy_text => text,
        },
    )?];
    if !args.no_secret {
        docs.push(render_one(
            "secret.yaml.j2",
            minijinja::context! { secret_keys => secret_keys },
        )?);
    }
    docs.push(render_one(
        "cronjob.yaml.j2",
        minijinja::context! {
            schedule => args.schedule,
            time_zone => args.time_zone,
            starting_deadline_seconds => STARTING_DEADLINE_SECONDS,
            indexed => args.shards > 1,
            shards => args.shards,
            active_deadline_seconds => args.active_deadline_seconds,
            termination_grace_seconds => TERMINATION_GRACE_SECONDS,
            uid => RUN_AS,
            image => args.image,
            init => init,
            command => vec!["offsite"],
            args => run_args,
            working_dir => CONFIG_DIR,
            env => env,
            resources => Resources {
                cpu_request: args.cpu_request.clone(),
                cpu_limit: args.cpu_limit.clone(),
                memory: flags.memory.clone(),
            },
            mounts => mounts,
            volumes => volumes,
        },
    )?);
    let yaml = docs
        .iter()
        .map(|d| format!("{}\n", d.trim_end()))
        .collect::<Vec<_>>()
        .join("---\n");
    let documents = parse_back(&yaml, text, !args.no_secret)?;
    Ok(Rendered {
        name: flags.name,
        yaml,
        documents,
        notes,
    })
}

/// The template environment: strict about undefined names, and every `{{ }}` through
/// [`yaml_formatter`].
fn environment() -> anyhow::Result<minijinja::Environment<'static>> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_formatter(yaml_formatter);
    env.add_filter("block", block_filter);
    env.add_filter("comment", comment_filter);
    env.add_filter("octal", |mode: u32| {
        minijinja::Value::from_safe_string(format!("{mode:04o}"))
    });
    for (name, src) in [
        ("configmap.yaml.j2", CONFIGMAP_TEMPLATE),
        ("secret.yaml.j2", SECRET_TEMPLATE),
        ("cronjob.yaml.j2", CRONJOB_TEMPLATE),
    ] {
        env.add_template(name, src)
            .with_context(|| format!("loading templates/kubernetes/{name}"))?;
    }
    Ok(env)
}

/// How a `{{ value }}` is written: strings as escaped double-quoted scalars, whole numbers and
/// booleans as themselves; values a filter of this module produced (marked safe) as they are;
/// anything else is a template bug.
fn yaml_formatter(
    out: &mut minijinja::Output,
    _state: &minijinja::State,
    value: &minijinja::Value,
) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let bad = |what: String| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, what);
    let text = match value.kind() {
        ValueKind::String if value.is_safe() => value.as_str().unwrap_or_default().to_string(),
        ValueKind::String => yaml_quote(value.as_str().unwrap_or_default()),
        ValueKind::Bool => value.is_true().to_string(),
        ValueKind::Number => match i64::try_from(value.clone()) {
            Ok(n) => n.to_string(),
            Err(_) => return Err(bad(format!("{value} is not a whole number"))),
        },
        kind => return Err(bad(format!("cannot write a {kind} into YAML"))),
    };
    out.write_str(&text).map_err(minijinja::Error::from)
}

/// A YAML double-quoted scalar for any string: `"` and `\` escaped, and everything outside
/// printable ASCII written as an escape. No input can end the scalar or the line, and YAML 1.1
/// (kubectl's parser, PyYAML) and 1.2 read it the same (U+2028 is a line break to YAML 1.1).
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08X}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

/// `{{ text|block(n) }}` for a mapping value whose key sits at column `n`: a literal block
/// scalar (`|2`, content indented by n + 2), so the policy in the ConfigMap reads like the
/// file. Used only when it round-trips exactly: one final newline, and only characters every
/// YAML parser takes literally inside a block (no CR, no control characters, no Unicode line
/// separators or BOM). Anything else is written as a quoted scalar, which is always exact.
fn block_filter(text: &str, key_indent: usize) -> minijinja::Value {
    minijinja::Value::from_safe_string(yaml_block(text, key_indent))
}

pub fn yaml_block(text: &str, key_indent: usize) -> String {
    let literal_ok = |c: char| {
        c == '\n'
            || c == '\t'
            || (!c.is_control() && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{FEFF}'))
                && !matches!(c, '\u{FFFE}' | '\u{FFFF}')
    };
    let fits = text.ends_with('\n') && !text.ends_with("\n\n") && text.chars().all(literal_ok);
    if !fits {
        return yaml_quote(text);
    }
    let pad = " ".repeat(key_indent + 2);
    let mut out = String::from("|2");
    for line in text.split_terminator('\n') {
        out.push('\n');
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(line);
        }
    }
    out
}

/// `# {{ x|comment }}`: text for a YAML comment, built by this module from checked parts;
/// refused (a bug) if it could end the comment line.
fn comment_filter(text: &str) -> Result<minijinja::Value, minijinja::Error> {
    if text.chars().any(|c| !(' '..='~').contains(&c)) {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("{text:?} cannot go into a YAML comment"),
        ));
    }
    Ok(minijinja::Value::from_safe_string(text.to_string()))
}

/// Parse the stream back and check it says what was meant: the documents and their kinds,
/// the policy byte for byte, no value in the Secret. A failure here is a bug (exit 1), never
/// output.
fn parse_back(yaml: &str, policy_text: &str, with_secret: bool) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for d in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = Value::deserialize(d).context("the rendered manifests do not parse as YAML")?;
        docs.push(v);
    }
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    let expected: &[&str] = if with_secret {
        &["ConfigMap", "Secret", "CronJob"]
    } else {
        &["ConfigMap", "CronJob"]
    };
    anyhow::ensure!(
        kinds == expected && docs.len() == expected.len(),
        "rendered manifests have kinds {kinds:?}, expected {expected:?}"
    );
    anyhow::ensure!(
        docs[0]["data"][POLICY_KEY].as_str() == Some(policy_text),
        "the rendered ConfigMap does not hold the policy file exactly"
    );
    if with_secret {
        let data = docs[1]["stringData"].as_object();
        anyhow::ensure!(
            data.is_some_and(|m| m.values().all(|v| v.as_str() == Some(""))),
            "the rendered Secret skeleton holds a value"
        );
    }
    Ok(docs)
}

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

struct Flags {
    name: String,
    memory: String,
}

impl Flags {
    fn check(policy: &Policy, a: &KubernetesArgs) -> anyhow::Result<Flags> {
        let bad = |m: String| fail(Code::Invalid, m);
        if a.shards == 0 || a.shards > MAX_SHARDS {
            return Err(bad(format!(
                "--shards {}: must be between 1 and {MAX_SHARDS}",
                a.shards
            )));
        }
        let name = match &a.name {
            Some(n) => n.clone(),
            None => format!("offsite-{}", policy.name),
        };
        // 52: Kubernetes' limit for a CronJob name (the controller appends an 11-character
        // suffix to name its Jobs). An Indexed Job's pods are also named by hostname
        // `<job>-<index>`, at most 63 characters, and a CronJob's Job is `<name>-<minutes
        // since 1970, 8 digits>`; so with shards the name leaves room for the index.
        let index_digits = (a.shards - 1).to_string().len();
        let max = if a.shards > 1 {
            52.min(53 - index_digits)
        } else {
            52
        };
        dns_label(&name, max).map_err(|e| {
            bad(match &a.name {
                Some(_) => format!("--name {name:?}: {e}"),
                None => {
                    format!("the default name {name:?} (offsite-<policy name>) {e}; pass --name")
                }
            })
        })?;
        dns_label(&a.namespace, 63)
            .map_err(|e| bad(format!("--namespace {:?}: {e}", a.namespace)))?;
        check_schedule(&a.schedule)
            .map_err(|e| bad(format!("--schedule {:?}: {e}", a.schedule)))?;
        let tz_ok = !a.time_zone.is_empty()
            && a.time_zone.len() <= 64
            && a.time_zone.split('/').all(|s| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-'))
            });
        if !tz_ok {
            return Err(bad(format!(
                "--time-zone {:?}: expected an IANA time zone name such as Etc/UTC or Europe/Stockholm",
                a.time_zone
            )));
        }
        let image_ok = !a.image.is_empty()
            && a.image.len() <= 512
            && a.image
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && a.image.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@')
            });
        if !image_ok {
            return Err(bad(format!(
                "--image {:?}: expected an image reference such as registry.example.com/offsite:0.1.0",
                a.image
            )));
        }
        if a.active_deadline_seconds < 60 {
            return Err(bad(format!(
                "--active-deadline-seconds {}: must be at least 60",
                a.active_deadline_seconds
            )));
        }
        let req = cpu_millis(&a.cpu_request).ok_or_else(|| {
            bad(format!(
                "--cpu-request {:?}: expected a CPU quantity such as 250m or 2",
                a.cpu_request
            ))
        })?;
        let lim = cpu_millis(&a.cpu_limit).ok_or_else(|| {
            bad(format!(
                "--cpu-limit {:?}: expected a CPU quantity such as 500m or 2",
                a.cpu_limit
            ))
        })?;
        if req > lim {
            return Err(bad(format!(
                "--cpu-request {} is more than --cpu-limit {}; Kubernetes refuses that",
                a.cpu_request, a.cpu_limit
            )));
        }
        let memory = match &a.memory {
            Some(m) => {
                let bytes = memory_bytes(m).ok_or_else(|| {
                    bad(format!(
                        "--memory {m:?}: expected a memory quantity such as 512Mi or 2Gi"
                    ))
                })?;
                // The memory-backed temp and secret volumes count against this limit.
                if bytes < 128 << 20 {
                    return Err(bad(format!("--memory {m}: at least 128Mi (rclone, and the memory-backed temp directory, need it)")));
                }
                m.clone()
            }
            None => default_memory(policy),
        };
        Ok(Flags { name, memory })
    }
}

/// rclone holds, per transfer, a read buffer (`--buffer-size`, 16 MiB) and the S3 multipart
/// chunks in flight (4 × 5 MiB); 40 MiB each, plus 320 MiB for rclone itself, offsite and the
/// memory-backed temp directory. Listings are extra: about 1 KB per object with --fast-list.
fn default_memory(p: &Policy) -> String {
    let transfers = u64::from(p.sync.transfers.0) * u64::from(p.sync.parallel_buckets.0);
    let mib = 320 + 40 * transfers;
    format!("{}Mi", mib.div_ceil(64) * 64)
}

fn dns_label(v: &str, max: usize) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1-{max} of a-z 0-9 -, starting and ending with a letter or digit"
        ))
    }
}

fn check_schedule(s: &str) -> Result<(), String> {
    const MACROS: &[&str] = &[
        "@yearly",
        "@annually",
        "@monthly",
        "@weekly",
        "@daily",
        "@midnight",
        "@hourly",
    ];
    if MACROS.contains(&s) {
        return Ok(());
    }
    let fields: Vec<&str> = s.split(' ').filter(|f| !f.is_empty()).collect();
    let chars_ok = s.bytes().all(|b| {
        b == b' ' || b.is_ascii_alphanumeric() || matches!(b, b'*' | b'/' | b',' | b'-' | b'?')
    });
    if fields.len() == 5 && chars_ok {
        Ok(())
    } else {
        Err("expected five cron fields (minute hour day month weekday), e.g. \"17 3 * * *\", or @daily; the time zone goes in --time-zone".into())
    }
}

/// A CPU quantity in millicores: `250m`, `2`, `0.5`.
fn cpu_millis(v: &str) -> Option<u64> {
    if let Some(m) = v.strip_suffix('m') {
        return m
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| m.parse().ok())
            .flatten()
            .filter(|&n| n > 0);
    }
    let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 3 {
        return None;
    }
    let w: u64 = whole.parse().ok()?;
    let f: u64 = format!("{frac:0<3}").parse().ok()?;
    Some(w.checked_mul(1000)? + f).filter(|&n| n > 0)
}

/// A memory quantity in bytes: digits with an optional Ki/Mi/Gi/Ti or k/M/G/T suffix.
fn memory_bytes(v: &str) -> Option<u64> {
    const UNITS: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (num, unit) = UNITS
        .iter()
        .find_map(|(s, u)| v.strip_suffix(s).map(|n| (n, *u)))
        .unwrap_or((v, 1));
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(unit)
}

fn shard_notes(p: &Policy, shards: u32) -> Vec<String> {
    if shards <= 1 {
        return vec![];
    }
    let listed = p.listed_buckets();
    if listed.is_empty() {
        return vec![format!(
            "buckets: all: the {shards} shards split the source's buckets by name at run time"
        )];
    }
    let used: BTreeSet<u32> = listed
        .iter()
        .map(|b| crate::sync::shard_of(&b.name.0, shards))
        .collect();
    let idle: Vec<String> = (0..shards)
        .filter(|i| !used.contains(i))
        .map(|i| i.to_string())
        .collect();
    if idle.is_empty() {
        return vec![];
    }
    vec![format!(
        "shard(s) {} own none of the {} listed buckets (buckets are assigned by name); their pods start and find nothing to do",
        idle.join(", "),
        listed.len()
    )]
}

// ---------------------------------------------------------------------------------------------
// Layout: where every file the policy names lands in the pod
// ---------------------------------------------------------------------------------------------

/// A `{file: ..}` secret as the pod sees it.
struct SecretFile {
    /// The Secret key: the first field that names this path (`source.access_key_id`).
    key: String,
    /// Every field that names it.
    fields: Vec<String>,
    /// Where offsite opens it in the pod.
    pod_path: String,
}

struct SecretEnv {
    name: String,
    fields: Vec<String>,
}

/// A directory that gets an emptyDir of its own. No root lies inside another.
struct Root {
    path: String,
    secret: bool,
    report: bool,
    /// The policy file is copied here too (its directory is inside this root).
    policy: bool,
    fields: Vec<String>,
    report_fields: Vec<String>,
}

struct Layout {
    files: Vec<SecretFile>,
    envs: Vec<SecretEnv>,
    roots: Vec<Root>,
    /// The policy directory lies in an emptyDir root, so the init container copies the policy
    /// there; otherwise the ConfigMap is mounted read-only at [`CONFIG_DIR`].
    policy_copied: bool,
    notes: Vec<String>,
}

/// Why a directory needs a volume.
#[derive(Clone, Copy)]
enum Need {
    Policy,
    Secret,
    Report,
}

/// Environment variables the pod sets or offsite reads for itself: a secret under one of these
/// names would collide or change what offsite does.
const RESERVED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "HOSTNAME",
    "JOB_COMPLETION_INDEX",
    "OFFSITE_CONFIG",
    "OFFSITE_RCLONE",
    "OFFSITE_LOCK_TTL_SECONDS",
    "AWS_CA_BUNDLE",
];

/// Image paths a volume must not hide: the binaries, their libraries, the CA bundle rclone
/// trusts, the files the container runtime provides, and this module's own mounts.
const PROTECTED: &[&str] = &[
    "/usr/local/bin",
    "/usr/bin",
    "/bin",
    "/usr/sbin",
    "/sbin",
    "/usr/lib",
    "/lib",
    "/lib64",
    "/usr/lib64",
    "/etc/ssl",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/dev/termination-log",
    "/var/run/secrets/kubernetes.io",
    "/run/secrets/kubernetes.io",
    TMP_DIR,
    STAGING_DIR,
];

impl Layout {
    fn plan(policy: &Policy, text: &str) -> anyhow::Result<Layout> {
        let raw: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text.strip_prefix('\u{FEFF}').unwrap_or(text))
                .context("re-reading the policy for its raw {file: ..} paths")?;
        let mut files: Vec<SecretFile> = Vec::new();
        let mut envs: Vec<SecretEnv> = Vec::new();
        let bad = |m: String| fail(Code::Invalid, m);
        for (field, secret) in policy.secrets() {
            match &secret.origin {
                SecretOrigin::Env(name) => {
                    let valid = !name.is_empty()
                        && name.bytes().next().is_some_and(|b| !b.is_ascii_digit())
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if !valid {
                        return Err(bad(format!(
                            "{field}: {{env: {name:?}}} is not a usable variable name ([A-Za-z_][A-Za-z0-9_]*)"
                        )));
                    }
                    if RESERVED_ENV.contains(&name.as_str()) {
                        return Err(bad(format!(
                            "{field}: {{env: {name}}}: the pod sets {name} itself (or offsite reads it); name the variable differently"
                        )));
                    }
                    match envs.iter_mut().find(|e| &e.name == name) {
                        Some(e) => e.fields.push(field),
                        None => envs.push(SecretEnv {
                            name: name.clone(),
                            fields: vec![field],
                        }),
                    }
                }
                SecretOrigin::File(_) => {
                    // The resolved path is this machine's; the pod resolves the policy's own
                    // text against CONFIG_DIR, so read that.
                    let arg = field
                        .split('.')
                        .try_fold(&raw, |v, k| v.get(k))
                        .and_then(|v| v.get("file"))
                        .and_then(|v| v.as_str())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "{field}: cannot find its {{file: ..}} in the policy text"
                            )
                        })?;
                    let pod_path = pod_path(arg)
                        .map_err(|e| bad(format!("{field}: {{file: {arg:?}}}: {e}")))?;
                    match files.iter_mut().find(|f| f.pod_path == pod_path) {
                        Some(f) => f.fields.push(field),
                        None => files.push(SecretFile {
                            key: field.clone(),
                            fields: vec![field],
                            pod_path,
                        }),
                    }
                }
                SecretOrigin::Inline => {
                    return Err(fail(
                        Code::Noncompliant,
                        format!("{field}: an inline secret would be written into the policy ConfigMap; move it to {{file: PATH}} or {{env: NAME}} (C005)"),
                    ));
                }
            }
        }

        let mut reports: Vec<(String, String)> = Vec::new();
        for (field, value) in [
            ("reporting.metrics_file", &policy.reporting.metrics_file),
            (
                "reporting.attestation_file",
                &policy.reporting.attestation_file,
            ),
        ] {
            if let Some(v) = value {
                let p = pod_path(&v.0).map_err(|e| bad(format!("{field}: {:?}: {e}", v.0)))?;
                reports.push((field.to_string(), p));
            }
        }

        // No path may be used twice, or be both a file and a directory.
        let policy_file = format!("{CONFIG_DIR}/{POLICY_KEY}");
        let mut all: Vec<(String, &str)> = vec![("the policy file".into(), policy_file.as_str())];
        all.extend(files.iter().map(|f| (f.key.clone(), f.pod_path.as_str())));
        all.extend(reports.iter().map(|(f, p)| (f.clone(), p.as_str())));
        for (i, (fa, pa)) in all.iter().enumerate() {
            for (fb, pb) in &all[i + 1..] {
                let clash = if pa == pb {
                    Some(format!("{fb}: {pb} is also the path of {fa}"))
                } else if is_within(pb, pa) {
                    Some(format!("{fb}: {pb} lies inside {pa}, the file of {fa}"))
                } else if is_within(pa, pb) {
                    Some(format!("{fa}: {pa} lies inside {pb}, the file of {fb}"))
                } else {
                    None
                };
                if let Some(m) = clash {
                    return Err(bad(format!("{m}; give each its own path")));
                }
            }
        }

        // Directories that need a volume, merged so that none lies inside another (a mount
        // inside a read-only mount cannot be created).
        let mut needs: Vec<(String, Need, String)> = Vec::new(); // (dir, why, field)
        needs.push((CONFIG_DIR.into(), Need::Policy, "the policy file".into()));
        for f in &files {
            needs.push((parent(&f.pod_path), Need::Secret, f.key.clone()));
        }
        for (field, p) in &reports {
            needs.push((parent(p), Need::Report, field.clone()));
        }
        needs.sort_by_key(|(d, _, _)| (Path::new(d).components().count(), d.clone()));
        let mut roots: Vec<Root> = Vec::new();
        for (dir, kind, field) in needs {
            let i = match roots.iter().position(|r| is_within(&dir, &r.path)) {
                Some(i) => i,
                None => {
                    roots.push(Root {
                        path: dir.clone(),
                        secret: false,
                        report: false,
                        policy: false,
                        fields: vec![],
                        report_fields: vec![],
                    });
                    roots.len() - 1
                }
            };
            let r = &mut roots[i];
            match kind {
                Need::Secret => r.secret = true,
                Need::Report => {
                    r.report = true;
                    r.report_fields.push(field.clone());
                }
                Need::Policy => r.policy = true,
            }
            r.fields.push(field);
        }
        roots.sort_by(|a, b| a.path.cmp(&b.path));
        // The policy directory alone is the ConfigMap mount, not an emptyDir.
        let mut policy_copied = false;
        roots.retain(|r| {
            if r.policy && !r.secret && !r.report {
                return false;
            }
            policy_copied |= r.policy;
            true
        });
        for r in &roots {
            let depth = Path::new(&r.path).components().count() - 1;
            let hides = PROTECTED
                .iter()
                .find(|p| is_within(p, &r.path) || is_within(&r.path, p));
            let system = ["/proc", "/sys", "/dev"]
                .iter()
                .any(|s| is_within(&r.path, s));
            if depth < 2 || hides.is_some() || system {
                let what = match hides {
                    Some(p) if *p == TMP_DIR || *p == STAGING_DIR => {
                        format!("{p} is the pod's own mount")
                    }
                    Some(p) => format!("it would hide or overlap {p}"),
                    None => "that is a system directory".into(),
                };
                return Err(bad(format!(
                    "{}: in the pod {} would need a volume of its own, and {what}; keep these files in a directory of their own such as /run/secrets/offsite/…",
                    r.fields.join(", "),
                    r.path
                )));
            }
        }

        let mut notes = Vec::new();
        for (field, side) in [
            ("source", &policy.source),
            ("destination", &policy.destination),
        ] {
            match side {
                Side::Local { .. } => {
                    let at = raw
                        .get(field)
                        .and_then(|v| v.get("path"))
                        .and_then(|v| v.as_str())
                        .and_then(|p| pod_path(p).ok())
                        .map(|p| format!(" at {p}"))
                        .unwrap_or_default();
                    notes.push(format!(
                        "{field} is type local: add a volume (e.g. a PersistentVolumeClaim){at}; relative paths resolve against {CONFIG_DIR}"
                    ))
                }
                Side::Other { kind, .. } => notes.push(format!(
                    "{field} is type {kind}: files its options name need volumes you add yourself"
                )),
                Side::S3(_) => {}
            }
        }
        for r in roots.iter().filter(|r| r.report) {
            notes.push(format!(
                "{}: written to an emptyDir at {} that ends with the pod; prefer reporting.pushgateway_url in Kubernetes, or swap the volume for a PersistentVolumeClaim (hostPath is not allowed under the restricted Pod Security Standard)",
                r.report_fields.join(", "),
                r.path
            ));
        }
        Ok(Layout {
            files,
            envs,
            roots,
            policy_copied,
            notes,
        })
    }
}

/// Where `arg` (a path as written in the policy) is in the pod: relative to [`CONFIG_DIR`],
/// normalised, and restricted to characters a volume mount path takes safely.
fn pod_path(arg: &str) -> Result<String, String> {
    let p = Path::new(arg);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new(CONFIG_DIR).join(p)
    };
    let mut parts: Vec<String> = Vec::new();
    for c in joined.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                parts.pop();
            }
            Component::Normal(s) => {
                let s = s.to_str().unwrap_or("");
                let ok = !s.is_empty()
                    && s.len() <= 255
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                if !ok {
                    return Err(
                        "in Kubernetes this path must be made of [A-Za-z0-9._-] segments".into(),
                    );
                }
                parts.push(s.to_string());
            }
            Component::Prefix(_) => return Err("not a Unix path".into()),
        }
    }
    if parts.is_empty() {
        return Err("names the root directory".into());
    }
    Ok(format!("/{}", parts.join("/")))
}

fn parent(p: &str) -> String {
    Path::new(p)
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into())
}

/// `inner` is `outer` or lies below it (by path components).
fn is_within(inner: &str, outer: &str) -> bool {
    Path::new(inner).starts_with(Path::new(outer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_hostile_strings() {
        for s in [
            "plain",
            "a\"b\\c",
            "line\nkind: Secret",
            "tab\there",
            "sep\u{2028}kind: Pod",
            "nel\u{85}x",
            "bom\u{feff}",
            "emoji 🦀",
            "yes",
            "0400",
            "- item",
            "# not a comment",
            "{a: b}",
            "",
        ] {
            let yaml = format!("k: {}\n", yaml_quote(s));
            let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
            assert_eq!(v["k"].as_str(), Some(s), "{yaml}");
            assert_eq!(yaml.lines().count(), 1, "{yaml}");
        }
    }

    #[test]
    fn block_is_used_only_when_exact() {
        let plain = "version: 1\n# comment ä\n\n  indented: x\n\tTab\n---\n...\n";
        let b = yaml_block(plain, 2);
        assert!(b.starts_with("|2\n"), "{b}");
        for text in [
            plain,
            "  leading blanks\nx\n",
            "no final newline",
            "two final newlines\n\n",
            "crlf\r\nx\r\n",
            "sep\u{2028}kind: Pod\n",
            "\u{feff}bom: 1\n",
        ] {
            let yaml = format!("data:\n  k: {}\nafter: 1\n", yaml_block(text, 2));
            let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
            assert_eq!(v["data"]["k"].as_str(), Some(text), "{yaml}");
            assert_eq!(v["after"].as_i64(), Some(1), "{yaml}");
        }
    }

    #[test]
    fn pod_paths() {
        assert_eq!(pod_path("secrets/pw").unwrap(), "/etc/offsite/secrets/pw");
        assert_eq!(pod_path("/run/secrets//a/./b").unwrap(), "/run/secrets/a/b");
        assert_eq!(pod_path("../x").unwrap(), "/etc/x");
        assert!(pod_path("/a b/c").is_err());
        assert!(pod_path("/a\n/c").is_err());
        assert!(pod_path("/..").is_err());
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("250m"), Some(250));
        assert_eq!(cpu_millis("2"), Some(2000));
        assert_eq!(cpu_millis("0.5"), Some(500));
        assert_eq!(cpu_millis("0"), None);
        assert_eq!(cpu_millis("1.2345"), None);
        assert_eq!(cpu_millis("x"), None);
        assert_eq!(memory_bytes("512Mi"), Some(512 << 20));
        assert_eq!(memory_bytes("1G"), Some(1_000_000_000));
        assert_eq!(memory_bytes("1.5Gi"), None);
        assert_eq!(memory_bytes("Mi"), None);
    }

    #[test]
    fn schedules() {
        assert!(check_schedule("17 3 * * *").is_ok());
        assert!(check_schedule("*/15 1-5 * * MON-FRI").is_ok());
        assert!(check_schedule("@daily").is_ok());
        assert!(check_schedule("TZ=UTC 0 3 * * *").is_err());
        assert!(check_schedule("0 3 * *").is_err());
        assert!(check_schedule("0 3 * * *\nkind: Pod").is_err());
    }
}
