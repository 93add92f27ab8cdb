//! Disaster recovery: `offsite restore` (issue 6). Decrypts `data/<bucket>` (or a kept
//! generation) into a local directory, a bucket on the source storage, or a remote of the
//! rendered config, then checks the target against the replica by download.

use crate::cli::{Cli, Ctx, Done};
use crate::exit::{fail, Code};

#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// Bucket to restore (repeatable)
    #[arg(long = "bucket", value_name = "B")]
    pub buckets: Vec<String>,
    /// Restore every bucket of the policy
    #[arg(long)]
    pub all: bool,
    /// Target: a local directory, `source:<bucket>`, or a remote of `offsite render`'s config
    #[arg(long, value_name = "TARGET")]
    pub to: String,
    /// Show what would be copied; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Restore into a non-empty target (restore never deletes at the target)
    #[arg(long)]
    pub force: bool,
    /// Restore the generation kept by run RUN_ID (deleted/<RUN_ID>/<bucket>)
    #[arg(long, value_name = "RUN_ID")]
    pub from_deleted: Option<String>,
}

pub fn command(_cli: &Cli, _ctx: &Ctx, _args: &RestoreArgs) -> anyhow::Result<Done> {
    Err(fail(Code::Internal, "restore is not implemented yet (issue 6)"))
}
