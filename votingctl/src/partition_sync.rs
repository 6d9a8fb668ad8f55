//! `votingctl partition-sync`: partition sync ([`refvote_psync`]) with the cluster
//! client it does not carry itself. On the source side, `repositories.prefixes` are
//! resolved against the source cluster's registry in etcd (`[source] node_config`) and
//! the router's git HTTP is read with the cluster's `[auth]` secret; reads through the
//! router go to an up-to-date replica. On the target side, [`target::ClusterTarget`]
//! applies each sequence through the target cluster's router as one voted write and
//! keeps the record of what was applied in that cluster's etcd, one consumer per
//! target storage at a time ([`claim`]).
//!
//! What it does not do: write to any node directly, or anything the `refvote-psync`
//! binary does not also do (the commands, their flags and exit codes are the crate's).

pub mod claim;
pub mod target;

use std::sync::Arc;

use refvote_cluster::RepoId;
use refvote_psync::cli::{self, Refused};
use refvote_psync::context::Context;
use refvote_psync::git::Authorization;
use refvote_psync::git_target::GitTarget;
use refvote_psync::report;

use crate::connect::{Ctl, Target};

/// The cluster client partition sync runs with.
pub struct Clusters;

impl cli::Cluster for Clusters {
    async fn source(&self, ctx: &mut Context) -> Result<Vec<String>, Refused> {
        let source = ctx.config.source.as_ref().expect("validated");
        let config = source.node_config.clone().expect("asked for with one");
        let ctl = connect(&config, "source.node_config").await?;
        let authorization = authorization(&ctl);
        ctx.git.authorization = authorization;
        registered(&ctl, &source.virtual_storage).await
    }

    async fn consume(&self, ctx: &mut Context, only: &[String]) -> Result<i32, Refused> {
        let target = ctx.config.target.clone().expect("validated");
        let config = target.node_config.clone().expect("validated");
        let ctl = Ctl {
            router: target.router.clone(),
            ..connect(&config, "target.node_config").await?
        };
        ctx.git.authorization = authorization(&ctl);
        let remote = GitTarget::remote(
            &target.url,
            &ctx.config.cache_dir.join("target"),
            ctx.git.clone(),
            ctx.patterns.clone(),
        );
        let claim = claim::Claim::take(&ctl.store, &target.virtual_storage).await?;
        let t = target::ClusterTarget::new(
            ctl,
            &target.virtual_storage,
            &target.url,
            remote,
            std::time::Duration::from_secs(ctx.config.git_timeout_secs),
            &claim,
        );
        let code = cli::consume_into(ctx, &t, only).await;
        claim.release().await;
        Ok(code)
    }
}

/// Connects to the cluster a votingd.toml names (its etcd, `[auth]` and `[tls]`).
async fn connect(config: &std::path::Path, key: &str) -> Result<Ctl, Refused> {
    Ctl::connect(&Target::from_config(config))
        .await
        .map_err(|e| Refused {
            code: report::EXIT_UNAVAILABLE,
            message: format!("{key}: {e:#}"),
        })
}

/// The header git sends to a router with `[auth]`: a fresh v2 token per git run.
fn authorization(ctl: &Ctl) -> Option<Authorization> {
    let secret = ctl.secret.clone()?;
    Some(Authorization(Arc::new(move || secret.bearer_now())))
}

/// The relative paths registered in `virtual_storage`, from one etcd read.
async fn registered(ctl: &Ctl, virtual_storage: &str) -> Result<Vec<String>, Refused> {
    let keys = ctl.store.keys();
    let (entries, _) = ctl
        .store
        .get_prefix(&keys.repos())
        .await
        .map_err(|e| Refused {
            code: report::EXIT_UNAVAILABLE,
            message: format!("source.node_config: reading the registry: {e}; check that a majority of etcd members run"),
        })?;
    let prefix = keys.repos();
    Ok(entries
        .iter()
        .filter_map(|e| {
            let id = RepoId::from_key_segment(e.key.strip_prefix(&prefix)?).ok()?;
            (id.virtual_storage == virtual_storage).then_some(id.relative_path)
        })
        .collect())
}
