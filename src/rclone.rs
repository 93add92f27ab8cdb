//! The rclone process: finding the binary, checking its version (rule C013), and the only place
//! in offsite that spawns it.
//!
//! Every invocation has an explicit argv (no shell), a scrubbed environment, secrets only in
//! the 0600 config file or on stdin (never argv), both output pipes drained, and the child reaped
//! on every path (duct kills and waits on drop). While a child runs, its pid is registered with
//! [`crate::signals`] so SIGTERM/SIGINT reach it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::Context;

use crate::compliance::C013;
use crate::exit::{fail, Code};

/// The oldest rclone offsite supports (Debian stable's; rclone-facts.md).
pub const MIN_VERSION: Version = Version {
    major: 1,
    minor: 60,
    patch: 0,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// Parse the first line of `rclone version`: `rclone v1.60.1-DEV`, `rclone v1.75.2`,
    /// `rclone v1.70.0-beta.8595.f0e5b3e1b`. Suffixes are ignored: a beta of 1.70 behaves as
    /// 1.70 for everything offsite cares about.
    pub fn parse(output: &str) -> Option<Version> {
        let first = output.lines().find(|l| !l.trim().is_empty())?;
        let rest = first.trim().strip_prefix("rclone ")?;
        let rest = rest.trim().strip_prefix('v').unwrap_or(rest.trim());
        let core = rest.split(['-', '+', ' ']).next()?;
        let mut it = core.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = it.next().map(|p| p.parse().ok()).unwrap_or(Some(0))?;
        Some(Version {
            major,
            minor,
            patch,
        })
    }
}

/// A checked rclone binary.
#[derive(Clone, Debug)]
pub struct Rclone {
    pub path: PathBuf,
    pub version: Version,
    /// The first line of `rclone version`, as printed.
    pub version_line: String,
    /// CA bundle inherited through `AWS_CA_BUNDLE`, passed as `--ca-cert` instead (see
    /// [`child_env`]).
    ca_cert: Option<PathBuf>,
}

/// Where to find rclone: `--rclone`, then `OFFSITE_RCLONE`, then `rclone` on PATH.
pub fn locate(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("OFFSITE_RCLONE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    which::which("rclone").map_err(|_| {
        fail(
            Code::Rclone,
            format!(
                "{C013}: rclone not found on PATH; install rclone >= 1.60.0 or pass --rclone PATH"
            ),
        )
    })
}

/// The environment rclone runs with: nothing inherited but PATH, HOME, TMPDIR and the locale.
///
/// - No `RCLONE_*`: in 1.75 `RCLONE_CRYPT_PASSWORD` from the environment overrides the
///   per-remote password of the rendered config (rclone-facts.md, "Environment precedence"),
///   and any `RCLONE_*` flag could switch off what the compliance rules checked.
/// - No `AWS_*`: credentials come from the rendered config only (`env_auth = false`), and
///   rclone < 1.68 fails completely whenever `AWS_CA_BUNDLE` is set (LoadCustomCABundleError).
///   An inherited `AWS_CA_BUNDLE` becomes `--ca-cert` for every version, which means the same
///   (trust exactly that bundle) and works on 1.60 too.
pub fn child_env() -> Vec<(OsString, OsString)> {
    const KEEP: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ", "USER"];
    std::env::vars_os()
        .filter(|(k, _)| k.to_str().is_some_and(|k| KEEP.contains(&k)))
        .collect()
}

fn inherited_ca_bundle() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("AWS_CA_BUNDLE").filter(|v| !v.is_empty())?);
    p.is_file().then_some(p)
}

/// How the files an rclone run creates on the local disk are permitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Files {
    /// umask 077: what offsite's own runs download into its private directory (the decrypted
    /// canary, lease and state, which names objects) is 0600 in its own right, not only
    /// behind the 0700 directory.
    Private,
    /// The caller's umask: a restore into a directory writes the admin's files.
    UserUmask,
}

/// The base expression for every rclone run: explicit argv, scrubbed environment, and the
/// child bound to offsite's life.
fn command(program: &Path, args: &[OsString]) -> duct::Expression {
    command_with(program, args, Files::Private)
}

fn command_with(program: &Path, args: &[OsString], files: Files) -> duct::Expression {
    duct::cmd(program, args)
        .full_env(child_env())
        .before_spawn(move |cmd| {
            die_with_parent(cmd, files);
            Ok(())
        })
}

/// Ask the kernel to SIGKILL rclone if offsite dies without stopping it (SIGKILL, OOM kill).
/// Without this an orphaned rclone would go on writing to the secondary after the run's lock
/// lease expired, next to the next run.
/// Also sets the child's umask ([`Files`]).
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut std::process::Command, files: Files) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes the prctl(2) and
    // umask(2) system calls, which are async-signal-safe; it allocates nothing and takes no
    // lock.
    unsafe {
        cmd.pre_exec(move || {
            if files == Files::Private {
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            }
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

impl Rclone {
    /// Find rclone and check it runs and is new enough (C013, exit 7).
    pub fn probe(flag: Option<&Path>) -> anyhow::Result<Rclone> {
        Rclone::probe_at(locate(flag)?)
    }

    /// rclone at `path` before its version is checked: only for read-only requests that run
    /// while [`Rclone::probe_at`] checks it (each rclone start costs ~70-120 ms, and a
    /// changed-only verify is a handful of them). Its `version` reads as the minimum.
    pub fn unchecked(path: PathBuf) -> Rclone {
        Rclone {
            version_line: String::new(),
            path,
            version: MIN_VERSION,
            ca_cert: inherited_ca_bundle(),
        }
    }

    /// [`Rclone::probe`] of a located binary.
    pub fn probe_at(path: PathBuf) -> anyhow::Result<Rclone> {
        let out = command(&path, &["version".into()])
            .stdin_null()
            .stdout_capture()
            .stderr_capture()
            .unchecked()
            .run()
            .map_err(|e| {
                fail(
                    Code::Rclone,
                    format!("{C013}: cannot run rclone at {}: {e}", path.display()),
                )
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = Version::parse(&text)
            .filter(|_| out.status.success())
            .ok_or_else(|| {
                fail(
                    Code::Rclone,
                    format!(
                        "{C013}: {} did not report an rclone version (exit {:?}); is it rclone?",
                        path.display(),
                        out.status.code()
                    ),
                )
            })?;
        if version < MIN_VERSION {
            return Err(fail(
                Code::Rclone,
                format!(
                    "{C013}: rclone {version} at {} is older than {MIN_VERSION}; install a newer rclone",
                    path.display()
                ),
            ));
        }
        Ok(Rclone {
            version_line: text.lines().next().unwrap_or("").trim().to_string(),
            path,
            version,
            ca_cert: inherited_ca_bundle(),
        })
    }

    /// Global arguments for offsite's own small requests (guards, state, listings): fail in
    /// seconds, not minutes, when a side is unreachable; rclone's defaults (3 retries × 10
    /// low-level retries with back-off) are meant for transfers.
    pub fn meta_args(&self, config: &Path) -> Vec<OsString> {
        let mut a = self.global_args(config);
        a.extend(
            [
                "--retries",
                "1",
                "--low-level-retries",
                "2",
                "--contimeout",
                "15s",
                "--timeout",
                "60s",
            ]
            .map(OsString::from),
        );
        a
    }

    /// Global arguments every invocation gets: the rendered config, and the CA bundle.
    pub fn global_args(&self, config: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--config".into(), config.into()];
        if let Some(ca) = &self.ca_cert {
            a.push("--ca-cert".into());
            a.push(ca.into());
        }
        a
    }

    /// The summed sizes of `objects` under the remote path `path` (copied objects whose size
    /// the log of rclone < 1.63 does not give), with one `rclone lsjson -R` and `flags`. With
    /// `list` (a scratch file path) rclone looks up just those objects (`--files-from-raw`,
    /// the file removed afterwards); without, it lists all of `path` and the wanted ones are
    /// summed.
    pub fn sum_sizes(
        &self,
        config: &Path,
        path: &str,
        objects: &[String],
        list: Option<&Path>,
        flags: &[&str],
    ) -> anyhow::Result<u64> {
        let mut args = self.meta_args(config);
        args.extend(
            [
                "lsjson",
                "-R",
                "--files-only",
                "--no-mimetype",
                "--no-modtime",
            ]
            .iter()
            .chain(flags)
            .map(OsString::from),
        );
        if let Some(list) = list {
            let mut text = objects.join("\n");
            text.push('\n');
            crate::render::write_scratch(list, text.as_bytes())?;
            args.push("--files-from-raw".into());
            args.push(list.into());
        }
        args.push(path.into());
        let out = self.output(&args, None);
        if let Some(list) = list {
            let _ = std::fs::remove_file(list);
        }
        let out = out?;
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(rename = "Path")]
            path: String,
            #[serde(rename = "Size")]
            size: i64,
        }
        let entries: Vec<Entry> = serde_json::from_slice(&out.stdout)?;
        let wanted: std::collections::HashSet<&str> = match list {
            Some(_) => Default::default(),
            None => objects.iter().map(String::as_str).collect(),
        };
        Ok(entries
            .iter()
            .filter(|e| list.is_some() || wanted.contains(e.path.as_str()))
            .map(|e| e.size.max(0) as u64)
            .sum())
    }

    /// Run to completion, capturing both pipes (duct drains each on its own thread, so a full
    /// stderr pipe cannot deadlock the child). `stdin` carries secrets when needed.
    pub fn output(&self, args: &[OsString], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
        crate::signals::check()?;
        let mut expr = command(&self.path, args)
            .stdout_capture()
            .stderr_capture()
            .unchecked();
        expr = match stdin {
            Some(b) => expr.stdin_bytes(b.to_vec()),
            None => expr.stdin_null(),
        };
        let handle = expr
            .start()
            .with_context(|| format!("starting {}", self.path.display()))?;
        let _guard = crate::signals::Child::register(handle.pids());
        let out = handle
            .into_output()
            .with_context(|| format!("waiting for {}", self.path.display()))?;
        crate::signals::check()?;
        Ok(out)
    }

    /// Run and hand every output line (stdout and stderr merged, as rclone logs to stderr) to
    /// `on_line` as it arrives. Returns rclone's exit code (None when killed by a signal).
    pub fn stream(
        &self,
        args: &[OsString],
        on_line: impl FnMut(&[u8]),
    ) -> anyhow::Result<Option<i32>> {
        self.stream_with(args, Files::Private, on_line)
    }

    /// [`Rclone::stream`], choosing how the files rclone creates are permitted.
    pub fn stream_with(
        &self,
        args: &[OsString],
        files: Files,
        mut on_line: impl FnMut(&[u8]),
    ) -> anyhow::Result<Option<i32>> {
        crate::signals::check()?;
        let reader = command_with(&self.path, args, files)
            .stdin_null()
            .stderr_to_stdout()
            .unchecked()
            .reader()
            .with_context(|| format!("starting {}", self.path.display()))?;
        let _guard = crate::signals::Child::register(reader.pids());
        let mut buf = BufReader::with_capacity(64 * 1024, &reader);
        let mut line = Vec::with_capacity(1024);
        loop {
            line.clear();
            // Cap a line at 1 MiB so hostile output cannot grow memory without bound; the rest
            // of an over-long line is skipped.
            let n = (&mut buf)
                .take(1024 * 1024)
                .read_until(b'\n', &mut line)
                .context("reading rclone output")?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') && n == 1024 * 1024 {
                let mut sink = Vec::new();
                buf.read_until(b'\n', &mut sink).ok();
            }
            on_line(&line);
        }
        let status = reader
            .try_wait()
            .context("waiting for rclone")?
            .map(|o| o.status.code())
            .unwrap_or(None);
        crate::signals::check()?;
        Ok(status)
    }

    /// Run until the first stdout line and stop: a cheap "is there anything?" probe that costs
    /// one listing page however big the bucket (rclone `lsf` prints as it lists). stderr is
    /// drained by duct on its own thread; dropping the reader kills and reaps rclone.
    pub fn first_line(&self, args: &[OsString]) -> anyhow::Result<FirstLine> {
        crate::signals::check()?;
        let reader = command(&self.path, args)
            .stdin_null()
            .stderr_capture()
            .unchecked()
            .reader()
            .with_context(|| format!("starting {}", self.path.display()))?;
        let _guard = crate::signals::Child::register(reader.pids());
        let mut buf = BufReader::new(&reader);
        let mut line = Vec::new();
        (&mut buf)
            .take(64 * 1024)
            .read_until(b'\n', &mut line)
            .context("reading rclone output")?;
        if !line.is_empty() {
            drop(buf);
            let _ = reader.kill();
            // Read to EOF: duct then waits on (reaps) the killed child.
            let _ = std::io::copy(&mut &reader, &mut std::io::sink());
            return Ok(FirstLine::Line);
        }
        drop(buf);
        let out = reader.try_wait().context("waiting for rclone")?;
        crate::signals::check()?;
        Ok(match out {
            Some(o) if o.status.success() => FirstLine::Empty,
            Some(o) => FirstLine::Failed {
                code: o.status.code(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            },
            None => FirstLine::Failed {
                code: None,
                stderr: String::new(),
            },
        })
    }

    /// Like [`Rclone::output`], for cleanup after a signal (releasing the run lock): it runs
    /// even when a signal is pending, is not stopped by the signal watcher, and is bounded in
    /// time.
    pub fn output_cleanup(&self, args: &[OsString], stdin: Option<&[u8]>) -> Option<Output> {
        let mut expr = command(&self.path, args)
            .stdout_capture()
            .stderr_capture()
            .unchecked();
        expr = match stdin {
            Some(b) => expr.stdin_bytes(b.to_vec()),
            None => expr.stdin_null(),
        };
        let handle = expr.start().ok()?;
        match handle.wait_timeout(std::time::Duration::from_secs(10)) {
            Ok(Some(o)) => Some(o.clone()),
            _ => {
                let _ = handle.kill();
                None
            }
        }
    }

    /// sha256 of the binary, for doctor and attestations.
    pub fn sha256(&self) -> anyhow::Result<String> {
        use sha2::Digest;
        let mut f = std::fs::File::open(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut f, &mut h)
            .with_context(|| format!("hashing {}", self.path.display()))?;
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// The result of [`Rclone::first_line`].
#[derive(Debug)]
pub enum FirstLine {
    /// rclone printed at least one line.
    Line,
    /// rclone exited 0 without output.
    Empty,
    /// rclone exited non-zero (3 is "directory not found") or was killed.
    Failed { code: Option<i32>, stderr: String },
}

/// Quote an argv for display (plan, logs): shell-style, for copy and paste.
pub fn display_argv(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| {
            let s = a.to_string_lossy();
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b))
            {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<(u32, u32, u32)> {
        Version::parse(s).map(|v| (v.major, v.minor, v.patch))
    }

    #[test]
    fn parses_real_version_outputs() {
        let debian = "rclone v1.60.1-DEV\n- os/version: debian 12.11 (64 bit)\n- os/kernel: 6.1.0 (x86_64)\n- os/type: linux\n- os/arch: amd64\n- go/version: go1.19.8\n- go/linking: dynamic\n- go/tags: none\n";
        assert_eq!(v(debian), Some((1, 60, 1)));
        assert_eq!(v("rclone v1.69.0\n- os/version: x\n"), Some((1, 69, 0)));
        assert_eq!(
            v("rclone v1.75.2\n- os/version: debian 12.11 (64 bit)\n"),
            Some((1, 75, 2))
        );
        assert_eq!(
            v("rclone v1.70.0-beta.8595.f0e5b3e1b.fix-123\n"),
            Some((1, 70, 0))
        );
        assert_eq!(v("rclone v1.66.0-DEV\n"), Some((1, 66, 0)));
        assert_eq!(v("rclone 1.58\n"), Some((1, 58, 0)));
        assert_eq!(v("\nrclone v1.59.2\n"), Some((1, 59, 2)));
        assert_eq!(v("bash: rclone: command not found"), None);
        assert_eq!(v("rclone vX.Y"), None);
        assert_eq!(v(""), None);
    }

    #[test]
    fn minimum_is_enforced_by_ordering() {
        let old = Version::parse("rclone v1.59.2").unwrap();
        let new = Version::parse("rclone v1.60.0").unwrap();
        assert!(old < MIN_VERSION && new >= MIN_VERSION);
        assert!(Version::parse("rclone v2.0.0").unwrap() > MIN_VERSION);
    }

    #[test]
    fn argv_display_quotes() {
        let s = display_argv(
            Path::new("/usr/bin/rclone"),
            &[
                "sync".into(),
                "source:a b".into(),
                "--exclude".into(),
                "**/*.tmp".into(),
            ],
        );
        assert_eq!(s, "/usr/bin/rclone sync 'source:a b' --exclude '**/*.tmp'");
    }
}
