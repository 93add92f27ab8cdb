//! Command-line interface (cli.md): argument parsing, dispatch, and the one place that turns a
//! command's result or error into stdout, stderr and an exit code. Commands are thin
//! compositions of the concern modules.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::compliance::{self, Finding, Severity};
use crate::exit::{self, fail, Code};
use crate::policy::{self, Policy};

#[derive(Parser, Debug)]
#[command(
    name = "offsite",
    version,
    about = "Replicate backup buckets to a second object storage, encrypted with rclone crypt",
    propagate_version = true
)]
pub struct Cli {
    /// Policy file [env: OFFSITE_CONFIG] [default: ./offsite.yaml]
    #[arg(short = 'c', long = "config", global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// rclone binary [env: OFFSITE_RCLONE] [default: rclone on PATH]
    #[arg(long, global = true, value_name = "PATH")]
    pub rclone: Option<PathBuf>,
    /// Output format: text for people, json for one document on stdout
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// No progress bars or periodic progress lines
    #[arg(long, global = true)]
    pub no_progress: bool,
    /// Less log output on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More log output on stderr
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a commented example policy and fresh random secrets (0600 files)
    Init {
        /// Directory to write offsite.yaml and secrets/ into
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Parse the policy and run the compliance rules (exit 0, 2 or 3)
    Check,
    /// Show the rendered rclone.conf (secrets redacted) and every rclone command `run` executes
    Plan,
    /// Write a working rclone.conf (0600, secrets obscured) for use with plain rclone
    Render {
        /// File to write (replaced atomically if it exists)
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Check rclone, reachability of both sides and the destination bucket (read-only)
    Doctor,
    /// Replicate each bucket to data/<bucket> under the crypt root, behind the guards
    Sync(SyncArgs),
    /// The scheduled job: sync, verify (verify.after_sync), prune old kept deletions, report
    Run(SyncArgs),
    /// Kept deletions (deleted/<run-id>/<bucket>/ under the crypt root)
    #[command(subcommand)]
    Deleted(DeletedCommand),
    /// Decrypt data/<bucket> (or a kept generation) into a directory or a bucket, then check it
    Restore(crate::restore::RestoreArgs),
    /// Check the replica against the source (cryptcheck, and download where it cannot hash)
    Verify(VerifyArgs),
    /// Print deployment manifests for the policy
    #[command(subcommand)]
    Manifest(crate::manifest::ManifestCommand),
}

#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Only this bucket (repeatable)
    #[arg(long = "bucket", value_name = "B")]
    pub buckets: Vec<String>,
    /// What to check [default: verify.after_sync of the policy, full when that is none]
    #[arg(long, value_enum)]
    pub mode: Option<crate::verify::Mode>,
    /// Seed for sample mode (the JSON output reports the one used, to repeat a run)
    #[arg(long)]
    pub seed: Option<u64>,
    /// How many differing/missing object names to report per bucket
    #[arg(long, default_value_t = 10)]
    pub show: usize,
}

#[derive(Subcommand, Debug)]
pub enum DeletedCommand {
    /// List the kept generations with object counts and age
    List,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct SyncArgs {
    /// Only this bucket (repeatable)
    #[arg(long = "bucket", value_name = "B")]
    pub buckets: Vec<String>,
    /// Show what would be copied and deleted; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Let a bucket that is empty at the source empty its replica (deletions are kept)
    #[arg(long)]
    pub allow_empty_source: bool,
    /// Only the buckets of shard I of N (I counts from 0, like JOB_COMPLETION_INDEX)
    #[arg(long, value_name = "I/N", conflicts_with = "shards")]
    pub shard: Option<String>,
    /// Split into N shards and take the one JOB_COMPLETION_INDEX names (Kubernetes Indexed Job)
    #[arg(long, value_name = "N")]
    pub shards: Option<u32>,
}

impl SyncArgs {
    /// The shard this run handles, `(index, count)`, from `--shard I/N` or `--shards N` with
    /// `JOB_COMPLETION_INDEX`.
    pub fn shard(&self) -> anyhow::Result<Option<(u32, u32)>> {
        let bad = |m: String| fail(Code::Invalid, m);
        let (i, n) = match (&self.shard, self.shards) {
            (None, None) => return Ok(None),
            (Some(s), _) => {
                let (i, n) = s
                    .split_once('/')
                    .ok_or_else(|| bad(format!("--shard {s}: expected I/N, e.g. 0/3")))?;
                let i: u32 = i
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("--shard {s}: I is not a number")))?;
                let n: u32 = n
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("--shard {s}: N is not a number")))?;
                (i, n)
            }
            (None, Some(n)) => {
                let v = std::env::var("JOB_COMPLETION_INDEX").map_err(|_| {
                    bad(format!("--shards {n}: JOB_COMPLETION_INDEX is not set (it is set in the pods of a Kubernetes Indexed Job); use --shard I/{n} elsewhere"))
                })?;
                let i: u32 = v
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("JOB_COMPLETION_INDEX={v} is not a number")))?;
                (i, n)
            }
        };
        if n == 0 || i >= n {
            return Err(bad(format!("shard {i}/{n}: need 0 <= I < N")));
        }
        Ok(Some((i, n)))
    }
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Init { .. } => "init",
            Command::Check => "check",
            Command::Plan => "plan",
            Command::Render { .. } => "render",
            Command::Doctor => "doctor",
            Command::Sync(_) => "sync",
            Command::Run(_) => "run",
            Command::Deleted(_) => "deleted",
            Command::Restore(_) => "restore",
            Command::Verify(_) => "verify",
            Command::Manifest(_) => "manifest",
        }
    }
}

/// Entry point used by `main`: parse arguments, run, print, return the exit code.
pub fn main() -> Code {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let is_info = matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            );
            let _ = e.print();
            return if is_info { Code::Ok } else { Code::Invalid };
        }
    };
    let ctx = Ctx::new(&cli);
    let command = cli.command.name();
    match run(&cli, &ctx) {
        Ok(done) => {
            if ctx.json {
                print_json(&done.doc);
            }
            done.code
        }
        Err(err) => {
            let code = exit::code_of(&err);
            // One line, once (style.md): the chain joined with ": ".
            let msg = format!("{err:#}").replace('\n', " ");
            eprintln!("offsite {command}: error: {msg}");
            if ctx.json {
                print_json(&json!({
                    "command": command,
                    "status": code.status(),
                    "exit_code": code.as_i32(),
                    "error": msg,
                }));
            }
            code
        }
    }
}

fn print_json(doc: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, doc);
    let _ = writeln!(out);
}

/// What a command produced: the JSON document (printed in json mode) and the exit code. Text
/// output is printed by the command itself as it goes.
pub struct Done {
    pub doc: Value,
    pub code: Code,
}

/// Settings every command shares, resolved once.
pub struct Ctx {
    pub json: bool,
    pub quiet: bool,
    pub verbose: u8,
    pub no_progress: bool,
}

impl Ctx {
    fn new(cli: &Cli) -> Ctx {
        Ctx {
            json: cli.output == Output::Json,
            quiet: cli.quiet,
            verbose: cli.verbose,
            no_progress: cli.no_progress,
        }
    }

    /// Human output: stdout in text mode; stderr in json mode (stdout holds only the document).
    pub fn say(&self, line: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        if self.json {
            eprintln!("{}", line.as_ref());
        } else {
            println!("{}", line.as_ref());
        }
    }
}

pub fn policy_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .or_else(|| std::env::var_os("OFFSITE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("offsite.yaml"))
}

fn run(cli: &Cli, ctx: &Ctx) -> anyhow::Result<Done> {
    match &cli.command {
        Command::Init { dir } => init(ctx, dir),
        Command::Check => check(cli, ctx),
        Command::Plan => crate::commands::plan(cli, ctx),
        Command::Render { to } => crate::commands::render_to(cli, ctx, to),
        Command::Doctor => crate::commands::doctor(cli, ctx),
        Command::Sync(a) => crate::commands::sync(cli, ctx, a),
        Command::Run(a) => crate::commands::run(cli, ctx, a),
        Command::Deleted(DeletedCommand::List) => crate::commands::deleted_list(cli, ctx),
        Command::Restore(a) => crate::restore::command(cli, ctx, a),
        Command::Verify(a) => crate::commands::verify_cmd(cli, ctx, a),
        Command::Manifest(m) => crate::manifest::command(cli, ctx, m),
    }
}

/// Load the policy and run compliance; report findings. Returns the policy and findings, or an
/// error (exit 2) when it does not parse.
pub fn load_checked(cli: &Cli) -> anyhow::Result<(Policy, Vec<Finding>)> {
    let path = policy_path(cli);
    let policy = policy::load(&path)?;
    let findings = compliance::check(&policy);
    Ok((policy, findings))
}

pub fn findings_json(f: &[Finding]) -> Value {
    serde_json::to_value(f).unwrap_or(Value::Null)
}

pub fn print_findings(ctx: &Ctx, f: &[Finding]) {
    for x in f {
        let sev = match x.severity {
            Severity::Error => "error  ",
            Severity::Warning => "warning",
        };
        let line = format!("  {sev} {} {}: {}", x.id, x.field, x.message);
        // Findings are diagnostics: stderr unless this command's job is to print them.
        ctx.say(line);
    }
}

fn check(cli: &Cli, ctx: &Ctx) -> anyhow::Result<Done> {
    let path = policy_path(cli);
    let (policy, findings) = load_checked(cli)?;
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    let code = if errors > 0 {
        Code::Noncompliant
    } else {
        Code::Ok
    };
    ctx.say(format!(
        "{}: policy {} ({} source, {} destination)",
        path.display(),
        policy.name,
        policy.source.kind(),
        policy.destination.kind()
    ));
    print_findings(ctx, &findings);
    ctx.say(format!(
        "{}: {errors} error(s), {warnings} warning(s)",
        if errors > 0 { "noncompliant" } else { "ok" }
    ));
    Ok(Done {
        doc: json!({
            "command": "check",
            "policy": policy.name.0,
            "status": code.status(),
            "exit_code": code.as_i32(),
            "findings": findings_json(&findings),
        }),
        code,
    })
}

/// Characters for generated secrets: alphanumeric, so they survive YAML, shells and env vars
/// unquoted. 48 of them from the OS CSPRNG is ~285 bits.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const GENERATED_LEN: usize = 48;

pub fn random_secret() -> anyhow::Result<String> {
    let mut out = String::with_capacity(GENERATED_LEN);
    let mut buf = [0u8; 64];
    while out.len() < GENERATED_LEN {
        getrandom::fill(&mut buf)
            .map_err(|e| anyhow::anyhow!("OS random generator failed: {e}"))?;
        // Rejection sampling keeps the distribution uniform: 248 = 4 * 62.
        for b in buf {
            if b < 248 && out.len() < GENERATED_LEN {
                out.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    Ok(out)
}

/// Create `path` with mode 0600 and write `content`; refuse to overwrite.
pub fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            fail(
                Code::Invalid,
                format!("cannot create {}: {e}", path.display()),
            )
        })?;
    f.write_all(content.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

const INIT_POLICY: &str = include_str!("../templates/init-policy.yaml");

fn init(ctx: &Ctx, dir: &Path) -> anyhow::Result<Done> {
    use std::os::unix::fs::DirBuilderExt;
    let policy_file = dir.join("offsite.yaml");
    let secrets = dir.join("secrets");
    if policy_file.exists() {
        return Err(fail(
            Code::Invalid,
            format!(
                "{} already exists; not overwriting it",
                policy_file.display()
            ),
        ));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&secrets)
        .map_err(|e| {
            fail(
                Code::Invalid,
                format!("cannot create {}: {e}", secrets.display()),
            )
        })?;
    let files = [
        ("password", random_secret()?),
        ("salt", random_secret()?),
        (
            "primary_access_key_id",
            "REPLACE-with-primary-access-key-id".to_string(),
        ),
        (
            "primary_secret_access_key",
            "REPLACE-with-primary-secret-key".to_string(),
        ),
        (
            "secondary_access_key_id",
            "REPLACE-with-secondary-access-key-id".to_string(),
        ),
        (
            "secondary_secret_access_key",
            "REPLACE-with-secondary-secret-key".to_string(),
        ),
    ];
    for (name, value) in &files {
        write_private(&secrets.join(name), &format!("{value}\n"))?;
    }
    write_private(&policy_file, INIT_POLICY)?;
    ctx.say(format!("wrote {}", policy_file.display()));
    ctx.say(format!(
        "wrote {}/{{password,salt}}: fresh random secrets (mode 0600). Back them up somewhere safe",
        secrets.display()
    ));
    ctx.say("      and apart from the replica: without both, the replica cannot be decrypted.");
    ctx.say(format!(
        "wrote {}/*_access_key_id, *_secret_access_key: placeholders; put the real S3 keys there.",
        secrets.display()
    ));
    ctx.say("The policy references them as {file: secrets/NAME}, relative to the policy file.");
    ctx.say(format!(
        "Next: edit endpoints, regions and buckets, then `offsite -c {} check`.",
        policy_file.display()
    ));
    Ok(Done {
        doc: json!({
            "command": "init",
            "status": "ok",
            "exit_code": 0,
            "policy_file": policy_file,
            "secret_files": files.iter().map(|(n, _)| secrets.join(n)).collect::<Vec<_>>(),
        }),
        code: Code::Ok,
    })
}
