//! What this machine offers a cluster: free loopback ports, and refvote's programs
//! beside the running executable or on PATH.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// `n` distinct ports on `ip` that were free a moment ago. All listeners are held until
/// every port is chosen, so the kernel cannot hand out the same port twice.
pub fn free_ports(ip: Ipv4Addr, n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| {
            TcpListener::bind((ip, 0))
                .with_context(|| format!("binding {ip}:0 to find a free port"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A program next to this executable (where `cargo build` and the packages put
/// refvote's binaries), else from PATH.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    on_path(name).with_context(|| {
        format!("{name} is neither next to votingctl nor on PATH (build the workspace: cargo build --workspace --bins)")
    })
}

/// `name` in a directory of PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}
