//! The command line: `produce`, `consume`, `list`, `keygen` and `check`, as `votingctl
//! partition-sync` and the `refvote-psync` binary offer them. Parses nothing itself
//! beyond the arguments: the config is validated first (exit 64 naming the key), one
//! run per role and cache dir at a time (a lock file), then the run, its output in the
//! mode asked for, the status and metrics files, and the exit status
//! ([`crate::report`] lists them).

use std::path::{Path, PathBuf};

use crate::catalog;
use crate::config::{Role as ConfigRole, SyncConfig, TargetKind};
use crate::consume::{self, Target};
use crate::context::Context;
use crate::crypto::MasterKey;
use crate::git::Git;
use crate::git_target::GitTarget;
use crate::keys::Keys;
use crate::metrics;
use crate::produce;
use crate::progress::{Mode, Progress};
pub use crate::report::Refused;
use crate::report::{self, Role, Summary};
use crate::store::Bucket;

/// The partition-sync commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Upload the next sequence of every chosen repository that changed: a full
    /// bundle the first time, then what is new; sealed; the manifest last.
    Produce(ProduceArgs),
    /// Apply every new sequence in the bucket to the target, in order, each verified
    /// and applied atomically, then recorded.
    Consume(ConsumeArgs),
    /// What the bucket holds: per repository, its sequences and their sizes.
    List(CommonArgs),
    /// Print a new random key for a key file (64 hex digits; keep it at mode 600).
    Keygen,
    /// Check the configuration for every side it has (`[source]`: the producer,
    /// `[target]`: the consumer) and exit; 64 naming the key when it is wrong. Reads
    /// no key file and touches neither the bucket nor git.
    Check {
        #[arg(long, short, default_value = "/etc/refvote/partition-sync.toml")]
        config: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// The partition-sync configuration.
    #[arg(long, short, default_value = "/etc/refvote/partition-sync.toml")]
    pub config: PathBuf,
    /// Read and plan, change nothing (neither the bucket nor the target).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the run's summary as JSON on stdout, nothing else.
    #[arg(long)]
    pub json: bool,
    /// Print only failures (for timers).
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Write a full bundle for this repository whatever the last sequence was
    /// (repeatable): bridges a gap on the consumer side.
    #[arg(long = "full", value_name = "REPOSITORY")]
    pub full: Vec<String>,
    /// Only these repositories (each must be in the config's list).
    pub repositories: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Only these repositories.
    pub repositories: Vec<String>,
}

/// Exit status when another run of the same role holds the cache dir.
pub const EXIT_BUSY: i32 = 75;

/// Holds the run lock until dropped.
pub struct RunLock(#[allow(dead_code)] std::fs::File);

/// Takes `<cache_dir>/<role>.lock`, or says which process has it.
pub fn lock(cache_dir: &Path, role: Role) -> Result<RunLock, Refused> {
    std::fs::create_dir_all(cache_dir).map_err(|e| Refused {
        code: report::EXIT_CONFIG,
        message: format!("cache_dir: cannot create {}: {e}", cache_dir.display()),
    })?;
    let path = cache_dir.join(format!("{}.lock", role.as_str()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Refused {
            code: report::EXIT_CONFIG,
            message: format!("{}: {e}", path.display()),
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            use std::io::Write;
            let mut f = &file;
            let _ = f.set_len(0);
            let _ = writeln!(f, "{}", std::process::id());
            Ok(RunLock(file))
        }
        Err(_) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            Err(Refused {
                code: EXIT_BUSY,
                message: format!(
                    "another partition-sync {} is running (pid {}, lock {}); try again when it ends",
                    role.as_str(),
                    pid.trim(),
                    path.display()
                ),
            })
        }
    }
}

/// Loads the config for `role` and builds the run's context.
pub fn prepare(common: &CommonArgs, role: Role) -> Result<(Context, RunLock), Refused> {
    let config_role = match role {
        Role::Produce => ConfigRole::Produce,
        Role::Consume => ConfigRole::Consume,
    };
    let config = SyncConfig::load(&common.config, config_role)?;
    let keys = Keys::load(&config.encryption, role == Role::Produce)?;
    let bucket = Bucket::open(&config.store)?;
    let run_lock = lock(&config.cache_dir, role)?;
    let mode = if common.json {
        Mode::Json
    } else if common.quiet {
        Mode::Quiet
    } else {
        Mode::Lines
    };
    let git = Git {
        timeout: std::time::Duration::from_secs(config.git_timeout_secs),
        ..Git::default()
    };
    // Leftover temporary bundles of a run that died.
    let _ = std::fs::remove_dir_all(config.cache_dir.join("tmp"));
    let ctx = Context {
        layout: config.layout(),
        patterns: config.ref_patterns(),
        config,
        bucket,
        keys,
        git,
        progress: Progress::new(mode),
        dry_run: common.dry_run,
    };
    Ok((ctx, run_lock))
}

/// Prints the summary, records status and metrics, and returns the exit status.
pub fn finish(ctx: &Context, summary: &Summary) -> i32 {
    ctx.progress.finish();
    match ctx.progress.mode() {
        Mode::Json => println!(
            "{}",
            serde_json::to_string_pretty(summary).expect("serializable")
        ),
        Mode::Lines | Mode::Quiet if summary.error.is_some() => {
            let e = summary.error.as_deref().unwrap_or_default();
            eprintln!("partition-sync {}: {e}", summary.role.as_str());
        }
        Mode::Lines => println!("{}", summary.line()),
        Mode::Quiet => {}
    }
    if !summary.dry_run
        && let Err(e) = metrics::record(&ctx.config.cache_dir, &ctx.config.metrics_dir, summary)
    {
        eprintln!("partition-sync: cannot write the status or metrics file: {e}");
    }
    summary.exit_code
}

/// The repositories a producer run carries: the config's paths, its prefixes resolved
/// by `found` (or, for a local source, by looking), narrowed to `only`.
pub fn producer_repositories(
    config: &SyncConfig,
    found: Option<Vec<String>>,
    only: &[String],
) -> Result<Vec<String>, Refused> {
    let r = &config.repositories;
    let found = match found {
        Some(f) => f,
        None if r.prefixes.is_empty() => Vec::new(),
        None => {
            let url = &config.source.as_ref().expect("validated").url;
            let Some(dir) = catalog::local_dir(url) else {
                return Err(Refused {
                    code: report::EXIT_CONFIG,
                    message: "repositories.prefixes: a source that is not a local directory resolves prefixes through the source cluster's registry: run `votingctl partition-sync produce` on a node of it, or list exact paths".into(),
                });
            };
            catalog::list_local(&dir, &r.prefixes).map_err(|e| Refused {
                code: report::EXIT_UNAVAILABLE,
                message: format!("source.url: cannot list {}: {e}", dir.display()),
            })?
        }
    };
    let all = catalog::resolve(r, &found);
    if only.is_empty() {
        return Ok(all);
    }
    for o in only {
        if !all.contains(o) {
            return Err(Refused {
                code: report::EXIT_CONFIG,
                message: format!(
                    "{o} is not among the config's repositories (repositories.paths and .prefixes)"
                ),
            });
        }
    }
    Ok(only.to_vec())
}

/// What `votingctl partition-sync` adds to a run: the source cluster's registry and
/// credentials, and the refvote target. This crate talks to neither etcd nor gRPC;
/// [`Standalone`] (the `refvote-psync` binary) has none of it.
#[allow(async_fn_in_trait)]
pub trait Cluster {
    /// Before a producer run with `[source] node_config`: the registered repositories
    /// of the source cluster (for `repositories.prefixes`), and whatever `ctx.git`
    /// needs to read through its router.
    async fn source(&self, ctx: &mut Context) -> Result<Vec<String>, Refused>;

    /// Runs the consumer into the refvote target the config names; the exit status.
    async fn consume(&self, ctx: &mut Context, only: &[String]) -> Result<i32, Refused>;
}

/// No cluster client: sources are read as plain git URLs or directories, and refvote
/// targets are refused with a pointer to `votingctl`.
pub struct Standalone;

impl Cluster for Standalone {
    async fn source(&self, _: &mut Context) -> Result<Vec<String>, Refused> {
        Err(Refused {
            code: report::EXIT_CONFIG,
            message: "source.node_config: the source cluster's registry is read by `votingctl partition-sync produce`".into(),
        })
    }

    async fn consume(&self, _: &mut Context, _: &[String]) -> Result<i32, Refused> {
        Err(Refused {
            code: report::EXIT_CONFIG,
            message: "target.kind: \"refvote\" targets are consumed by `votingctl partition-sync consume`".into(),
        })
    }
}

/// Logs to stderr: warnings by default (a timer's journal), `RUST_LOG` otherwise; the
/// TLS verifier's own error lines are left out (the run's error says the same with
/// what to do about it); plain text off a terminal.
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,rustls_platform_verifier=off")
            }),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Runs a command; returns the exit status. Targets of kind `refvote` need
/// `votingctl partition-sync`, which brings the cluster client.
pub fn run(command: Command) -> i32 {
    run_with(command, &Standalone)
}

/// [`run`] with a cluster client.
pub fn run_with(command: Command, cluster: &impl Cluster) -> i32 {
    match &command {
        Command::Keygen => {
            println!("{}", MasterKey::generate_hex());
            return 0;
        }
        Command::Check { config } => {
            return match check(config) {
                Ok(roles) => {
                    println!("{}: valid for {roles}", config.display());
                    0
                }
                Err(r) => {
                    eprintln!("partition-sync: {}", r.message);
                    r.code
                }
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("partition-sync: cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async {
        match execute(command, cluster).await {
            Ok(code) => code,
            Err(r) => {
                eprintln!("partition-sync: {}", r.message);
                r.code
            }
        }
    })
}

/// Validates `path` for each side it configures; names them.
fn check(path: &Path) -> Result<String, Refused> {
    let config = SyncConfig::load(path, ConfigRole::Inspect)?;
    let mut roles = Vec::new();
    if config.source.is_some() {
        config.validate(ConfigRole::Produce)?;
        roles.push("produce");
    }
    if config.target.is_some() {
        config.validate(ConfigRole::Consume)?;
        roles.push("consume");
    }
    if roles.is_empty() {
        roles.push("list");
    }
    Ok(roles.join(" and "))
}

async fn execute(command: Command, cluster: &impl Cluster) -> Result<i32, Refused> {
    match command {
        Command::Keygen | Command::Check { .. } => Ok(0),
        Command::Produce(args) => {
            let (mut ctx, _lock) = prepare(&args.common, Role::Produce)?;
            let source = ctx.config.source.as_ref().expect("validated");
            let found = match source.node_config {
                Some(_) => Some(cluster.source(&mut ctx).await?),
                None => None,
            };
            let repositories = producer_repositories(&ctx.config, found, &args.repositories)?;
            for f in &args.full {
                if !repositories.contains(f) {
                    return Err(Refused {
                        code: report::EXIT_CONFIG,
                        message: format!("--full {f}: not among the repositories this run carries"),
                    });
                }
            }
            let options = produce::Options {
                source: ctx.config.source.as_ref().expect("validated").url.clone(),
                repositories,
                full: args.full,
            };
            let summary = produce::run(&ctx, &options).await;
            Ok(finish(&ctx, &summary))
        }
        Command::Consume(args) => {
            let (mut ctx, _lock) = prepare(&args.common, Role::Consume)?;
            let target = ctx.config.target.clone().expect("validated");
            match target.kind {
                TargetKind::Git => {
                    let t = GitTarget::new(
                        &target.url,
                        &ctx.config.state_file(),
                        &ctx.config.cache_dir.join("target"),
                        ctx.git.clone(),
                        ctx.patterns.clone(),
                    );
                    Ok(consume_into(&ctx, &t, &args.repositories).await)
                }
                TargetKind::Refvote => cluster.consume(&mut ctx, &args.repositories).await,
            }
        }
        Command::List(common) => {
            let (ctx, _lock) = prepare_list(&common)?;
            crate::listing::print(&ctx, common.json).await
        }
    }
}

/// Runs the consumer into `target` and finishes the run.
pub async fn consume_into<T: Target>(ctx: &Context, target: &T, only: &[String]) -> i32 {
    let summary = consume::run(ctx, target, only).await;
    finish(ctx, &summary)
}

fn prepare_list(common: &CommonArgs) -> Result<(Context, ()), Refused> {
    let config = SyncConfig::load(&common.config, ConfigRole::Inspect)?;
    let keys = Keys::load(&config.encryption, false)?;
    let bucket = Bucket::open(&config.store)?;
    let ctx = Context {
        layout: config.layout(),
        patterns: config.ref_patterns(),
        git: Git::default(),
        config,
        bucket,
        keys,
        progress: Progress::new(Mode::Quiet),
        dry_run: true,
    };
    Ok((ctx, ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_sides_a_config_has_and_the_bad_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sync.toml");
        let example = include_str!("../partition-sync.toml");
        std::fs::write(&path, example).unwrap();
        assert_eq!(check(&path).unwrap(), "produce and consume");
        std::fs::write(
            &path,
            example.replace("part_size_mib = 16", "part_size_mib = 1"),
        )
        .unwrap();
        let r = check(&path).unwrap_err();
        assert_eq!(r.code, report::EXIT_CONFIG);
        assert!(r.message.contains("store.part_size_mib"), "{}", r.message);
        let producer_only = example.replace("[target]\n", "[x]\n");
        std::fs::write(&path, producer_only.split("[x]").next().unwrap()).unwrap();
        assert_eq!(check(&path).unwrap(), "produce");
    }
}
