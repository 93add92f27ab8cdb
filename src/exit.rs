//! Exit codes (cli.md, "Exit codes"): the one table Ansible and CronJob alerting depend on.
//!
//! Every failure that should not end as exit 1 is raised as an [`Exit`] error somewhere in the
//! `anyhow` chain; `main` finds it with `downcast_ref` and uses its code.

use std::fmt;

/// The documented process exit codes. Never pass rclone's own codes through raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Code {
    Ok = 0,
    Internal = 1,
    Invalid = 2,
    Noncompliant = 3,
    GuardRefused = 4,
    Failed = 5,
    VerifyFailed = 6,
    Rclone = 7,
    Locked = 8,
    Interrupted = 130,
    Terminated = 143,
}

impl Code {
    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// The `status` word of the JSON document for this code.
    pub fn status(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::Internal | Code::Failed | Code::Rclone | Code::Locked => "failed",
            Code::Invalid => "invalid",
            Code::Noncompliant => "noncompliant",
            Code::GuardRefused => "guard_refused",
            Code::VerifyFailed => "verify_failed",
            Code::Interrupted | Code::Terminated => "interrupted",
        }
    }
}

/// An error that carries the exit code it must end the process with.
#[derive(Debug)]
pub struct Exit {
    pub code: Code,
    pub message: String,
}

impl Exit {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Exit {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Shorthand: `return Err(fail(Code::Invalid, "..."))`.
pub fn fail(code: Code, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Exit::new(code, message))
}

/// The exit code an error chain asks for: the first [`Exit`] in it, else 1.
pub fn code_of(err: &anyhow::Error) -> Code {
    err.chain()
        .find_map(|e| e.downcast_ref::<Exit>())
        .map(|e| e.code)
        .unwrap_or(Code::Internal)
}
