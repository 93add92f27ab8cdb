//! `offsite manifest kubernetes [--shards N]` (issue 7): Kubernetes manifests rendered from
//! `templates/`.

use crate::cli::{Cli, Ctx, Done};
use crate::exit::{fail, Code};

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ManifestCommand {
    /// CronJob, policy ConfigMap, Secret skeleton; an Indexed Job with --shards N > 1
    Kubernetes(KubernetesArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct KubernetesArgs {
    /// Split the buckets over N pods of an Indexed Job
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
}

pub fn command(_cli: &Cli, _ctx: &Ctx, _cmd: &ManifestCommand) -> anyhow::Result<Done> {
    Err(fail(
        Code::Internal,
        "manifest is not implemented yet (issue 7)",
    ))
}
