//! The long soak: the same fault run as CI's, for as long as asked, printing the
//! report RELIABILITY.md is written from. Exits non-zero on any violation.
//!
//! `fault-soak [--seconds N] [--seed S] [--nodes 3|5] [--writers W] [--readers R]
//! [--kinds kill-node,crash-after-decision,...]` (`--kinds` limits the schedule to those
//! kinds; an unknown name lists the known ones).

use std::time::Duration;

use refvote_tests::chaos::schedule::FaultKind;
use refvote_tests::chaos::{ChaosConfig, run};

fn main() -> anyhow::Result<()> {
    let mut config = ChaosConfig {
        seed: ChaosConfig::seed_from_env(),
        duration: Duration::from_secs(600),
        nodes: 3,
        writers: 4,
        readers: 2,
        kinds: FaultKind::all(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--kinds" {
            let list = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--kinds needs a value"))?;
            config.kinds = FaultKind::parse_list(&list).map_err(anyhow::Error::msg)?;
            continue;
        }
        let mut value = || -> anyhow::Result<u64> {
            let v = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
            v.parse()
                .map_err(|_| anyhow::anyhow!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--seconds" => config.duration = Duration::from_secs(value()?),
            "--seed" => config.seed = value()?,
            "--nodes" => config.nodes = value()? as usize,
            "--writers" => config.writers = value()? as usize,
            "--readers" => config.readers = value()? as usize,
            other => anyhow::bail!("unknown argument {other}; see the file header for usage"),
        }
    }
    eprintln!(
        "soak: seed {}, {} s of faults, {} nodes",
        config.seed,
        config.duration.as_secs(),
        config.nodes
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(run(&config))?;
    println!("{}", report.summary());
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
