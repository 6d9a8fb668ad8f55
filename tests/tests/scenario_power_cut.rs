//! DESIGN.md §5, scenario 7: a power cut on two of three replicas right after an
//! acknowledgement, with the writes not yet fsynced dropped: the acknowledged ref
//! survives on both, and the cluster serves it from them.
//!
//! The power cut is real, not modelled. Two nodes keep their storage on a small ext4
//! filesystem on a loop device backed by an image file, mounted with `commit=600` so
//! the journal commits only when something calls fsync: whatever git did not fsync
//! stays in the page cache and never reaches the image. Right after the push is
//! acknowledged both nodes are frozen and killed (votingd and every process it
//! started), and the image files are copied at once: the copies hold what the disks
//! held. The originals are unmounted and the copies mounted in their place (ext4
//! replays its journal, as after a reboot), then the nodes restart.
//!
//! A control in the same test proves the method drops unsynced writes: a file written
//! without fsync just before the cut must be missing from the copy, one written with
//! fsync must be there. If the control fails, the test fails.
//!
//! Needs root, `losetup`, `mkfs.ext4` and `mount` (CI runs as root on a machine with
//! them). Every loop device and mount is undone when the test ends, however it ends.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use refvote_cluster::RepoId;
use refvote_proto::gitaly::ref_service_client::RefServiceClient;
use refvote_proto::gitaly::repository_service_client::RepositoryServiceClient;
use refvote_proto::gitaly::{CreateRepositoryRequest, FindBranchRequest, Repository};
use refvote_tests::etcd::Etcd;
use refvote_tests::git::{self, WorkRepo};
use refvote_tests::node::{Node, NodeOptions};
use refvote_tests::proc::wait_for;
use refvote_tests::router::{Router, RouterOptions};

const REPO: &str = "power/cut.git";
/// Size of each node's filesystem image (sparse; ext4 needs a few MiB of it).
const IMAGE_MIB: u64 = 64;
/// A push, clone or ls-remote that takes longer is abandoned.
const GIT_DEADLINE: Duration = Duration::from_secs(30);

/// A system tool by name, also where root's tools live when they are not on `PATH`.
fn tool(program: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// Runs a system tool; fails with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(tool(program))
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn utf8(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("path is not UTF-8")
}

/// An ext4 filesystem on a loop device, mounted at `mount`. Dropping it unmounts and
/// detaches, whatever state the test left it in.
struct LoopDisk {
    name: String,
    mount: PathBuf,
    image: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl LoopDisk {
    /// Makes a fresh filesystem in `image` and mounts it at `mount` with a journal
    /// that commits only on fsync (within the test's lifetime).
    fn create(name: &str, image: &Path, mount: &Path) -> anyhow::Result<LoopDisk> {
        std::fs::File::create(image)?.set_len(IMAGE_MIB << 20)?;
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                utf8(image)?,
            ],
        )?;
        std::fs::create_dir_all(mount)?;
        let mut disk = LoopDisk {
            name: name.to_owned(),
            mount: mount.to_owned(),
            image: image.to_owned(),
            device: None,
            mounted: false,
        };
        disk.attach_and_mount(image)?;
        Ok(disk)
    }

    /// Attaches `image` to a free loop device and mounts it (the guard records each
    /// step as soon as it is done, so Drop undoes exactly what happened).
    fn attach_and_mount(&mut self, image: &Path) -> anyhow::Result<()> {
        self.image = image.to_owned();
        let dev = run("losetup", &["--find", "--show", utf8(image)?])?;
        ensure!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.device = Some(dev.clone());
        run(
            "mount",
            &["-t", "ext4", "-o", "commit=600", &dev, utf8(&self.mount)?],
        )?;
        self.mounted = true;
        Ok(())
    }

    fn unmount_and_detach(&mut self) -> anyhow::Result<()> {
        if self.mounted {
            run("umount", &[utf8(&self.mount)?])?;
            self.mounted = false;
        }
        if let Some(dev) = self.device.take() {
            run("losetup", &["--detach", &dev])?;
        }
        Ok(())
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if self.mounted && self.unmount_and_detach().is_ok() {
            return;
        }
        // Something still holds the mount (or the clean path failed): detach lazily,
        // so neither the mount nor the loop device outlives the test.
        if self.mounted {
            let _ = Command::new(tool("umount"))
                .arg("--lazy")
                .arg(&self.mount)
                .status();
            self.mounted = false;
        }
        if let Some(dev) = self.device.take() {
            let status = Command::new(tool("losetup"))
                .args(["--detach", &dev])
                .status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("{}: could not detach {dev}", self.name);
            }
        }
    }
}

/// Every process whose parent chain leads to `root` (read from `/proc`).
fn descendants(root: u32) -> BTreeSet<u32> {
    let mut parent: BTreeMap<u32, u32> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, &pp) in &parent {
            if pp == p && out.insert(child) {
                frontier.push(child);
            }
        }
    }
    out
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The pids are the test's own
    // children (not reaped) or their descendants, frozen before they were listed.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Writes `name` in `dir` with `content`, fsyncing it and the directory when `sync`.
fn write_control(dir: &Path, name: &str, content: &str, sync: bool) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(dir.join(name))?;
    f.write_all(content.as_bytes())?;
    if sync {
        f.sync_all()?;
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `git` with a deadline, for clients talking to the router.
async fn git_client(dir: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(GIT_DEADLINE, cmd.output())
        .await
        .with_context(|| format!("git {args:?} did not finish within {GIT_DEADLINE:?}"))?
        .with_context(|| format!("running git {args:?}"))
}

async fn push(work: &WorkRepo, url: &str, refspec: &str) -> anyhow::Result<()> {
    let out = git_client(&work.path, &["push", "--porcelain", url, refspec]).await?;
    ensure!(
        out.status.success(),
        "push {refspec} through the router was not acknowledged: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Every file under `dir` with its size, for error messages.
fn listing(dir: &Path) -> String {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            out.push(format!("{} (unreadable)", dir.display()));
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let rel = path
                .strip_prefix(base)
                .unwrap_or(&path)
                .display()
                .to_string();
            match e.metadata() {
                Ok(m) if m.is_dir() => walk(&path, base, out),
                Ok(m) => out.push(format!("{rel} ({} bytes)", m.len())),
                Err(err) => out.push(format!("{rel} ({err})")),
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out.join(", ")
}

/// What a replica's storage holds for the repository, read with git alone.
fn check_replica(node: &str, repo: &Path, tip: &str, earlier: &str) -> anyhow::Result<()> {
    let got = git::rev(repo, "refs/heads/main");
    ensure!(
        got.as_deref() == Some(tip),
        "{node}: after the power cut refs/heads/main is {got:?}, the acknowledged push set \
         {tip}; the repository holds: {}",
        listing(repo)
    );
    for oid in [tip, earlier] {
        git::git(repo, &["cat-file", "-e", &format!("{oid}^{{commit}}")])
            .with_context(|| format!("{node}: commit {oid} is missing after the power cut"))?;
    }
    git::git(repo, &["fsck", "--full", "--strict", "--no-dangling"])
        .with_context(|| format!("{node}: git fsck after the power cut"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_ref_survives_a_power_cut_on_two_replicas() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "this test mounts loop devices and must run as root (euid {euid})"
    );
    let dir = tempfile::Builder::new()
        .prefix("refvote-power-cut-")
        .tempdir()?;
    let root = dir.path();

    // Declared before the processes, so they are dropped (killed) first and the
    // filesystems are free to unmount.
    let mut disks = Vec::new();
    for name in ["node1", "node2"] {
        let storage = root.join(name).join("storage");
        disks.push(
            LoopDisk::create(name, &root.join(format!("{name}.img")), &storage)
                .with_context(|| format!("{name}'s ext4 image"))?,
        );
    }

    let etcd = Etcd::start(1).await?;
    let opts = NodeOptions::default();
    let mut nodes = Vec::new();
    for name in ["node1", "node2", "node3"] {
        nodes.push(Node::start(name, root, &etcd.endpoints(), &opts).await?);
    }
    let router = Router::start_with(
        "router1",
        root,
        &etcd.endpoints(),
        &RouterOptions {
            http: true,
            replication_factor: Some(3),
            ..RouterOptions::default()
        },
    )
    .await?;
    let store = etcd.store().await?;
    let repository = Repository {
        storage_name: "default".into(),
        relative_path: REPO.into(),
        ..Default::default()
    };
    RepositoryServiceClient::new(router.channel().await?)
        .create_repository(CreateRepositoryRequest {
            repository: Some(repository.clone()),
            ..Default::default()
        })
        .await
        .context("CreateRepository through the router")?;
    let repo_id = RepoId::new("default", REPO)?;

    // Everything below happens within seconds: with commit=600 nothing of it reaches
    // the images unless someone fsyncs it.
    let url = router.http_url(REPO);
    let work = WorkRepo::new(&root.join("work"))?;
    let first = work.commit("main", "first")?;
    push(&work, &url, "HEAD:refs/heads/main").await?;
    let tip = work.commit("main", "second")?;
    push(&work, &url, "HEAD:refs/heads/main").await?;

    // The acknowledgement promised both replicas about to lose power hold the write.
    let view = store.repo_view(&repo_id).await?;
    for name in ["node1", "node2"] {
        ensure!(
            view.replicas
                .get(name)
                .is_some_and(|(r, _)| r.is_up_to_date(&view.record)),
            "{name} was not promoted by the acknowledged push: {:?}",
            view.replicas.get(name)
        );
    }

    // The power cut. Freeze both nodes first (so nothing new is started), then kill
    // every process they started (git runs in its own process group) and the nodes.
    let cut: Vec<usize> = vec![0, 1];
    let mut frozen = Vec::new();
    for &i in &cut {
        let pid = nodes[i].pid().context("node is running")?;
        signal(pid, libc::SIGSTOP);
        frozen.push(pid);
    }
    for &pid in &frozen {
        for child in descendants(pid) {
            signal(child, libc::SIGSTOP);
            signal(child, libc::SIGKILL);
        }
    }
    for &i in &cut {
        nodes[i].kill()?;
    }
    // The control, written last of all on each disk: one file made durable with
    // fsync, then one left in the page cache.
    for (disk, name) in disks.iter().zip(["node1", "node2"]) {
        let control = disk.mount.join("power-cut-control");
        std::fs::create_dir_all(&control)?;
        std::fs::File::open(disk.mount.as_path())?.sync_all()?;
        write_control(&control, "synced", &format!("{name} synced\n"), true)?;
        write_control(&control, "unsynced", &format!("{name} unsynced\n"), false)?;
        ensure!(
            std::fs::read_to_string(control.join("unsynced"))? == format!("{name} unsynced\n"),
            "{name}: the control file was not written"
        );
    }
    // What the disks held at this instant.
    let mut copies = Vec::new();
    for disk in &disks {
        let copy = disk.image.with_extension("cut.img");
        std::fs::copy(&disk.image, &copy)
            .with_context(|| format!("copying {}", disk.image.display()))?;
        copies.push(copy);
    }
    // "Reboot": the originals go away, the copies are mounted in their place (ext4
    // replays its journal).
    for (disk, copy) in disks.iter_mut().zip(&copies) {
        disk.unmount_and_detach()
            .with_context(|| format!("{}: unmounting the original", disk.name))?;
        disk.attach_and_mount(copy)
            .with_context(|| format!("{}: mounting the copy", disk.name))?;
    }

    // The control: the method drops exactly what was not fsynced.
    for (disk, name) in disks.iter().zip(["node1", "node2"]) {
        let control = disk.mount.join("power-cut-control");
        let synced = std::fs::read_to_string(control.join("synced")).unwrap_or_default();
        ensure!(
            synced == format!("{name} synced\n"),
            "control failed on {name}: a file written with fsync before the cut reads {synced:?} after it"
        );
        let unsynced = std::fs::read_to_string(control.join("unsynced")).ok();
        ensure!(
            unsynced.as_deref() != Some(&format!("{name} unsynced\n")),
            "control failed on {name}: a file written without fsync survived the cut, so this \
             power cut does not drop unsynced writes and proves nothing"
        );
        eprintln!(
            "{name}: control passed: the synced file survived, the unsynced one is {}",
            match unsynced {
                None => "gone".to_owned(),
                Some(text) => format!("left as {text:?}"),
            }
        );
        std::fs::remove_dir_all(&control)?;
    }

    // The claim: the acknowledged ref, and everything it needs, is on both disks.
    for &i in &cut {
        let node = &nodes[i];
        check_replica(&node.name, &node.repo(REPO), &tip, &first)?;
    }

    // The nodes come back on the disks that survived, and the cluster serves the ref
    // from them: the third replica is stopped, so every read is theirs.
    for &i in &cut {
        nodes[i].launch().await?;
    }
    nodes[2].stop()?;
    let refs = RefServiceClient::new(router.channel().await?);
    let served = wait_for(
        "the router serves main from the replicas that lost power",
        Duration::from_secs(15),
        || {
            let mut refs = refs.clone();
            let repository = repository.clone();
            async move {
                let branch = refs
                    .find_branch(FindBranchRequest {
                        repository: Some(repository),
                        name: b"main".to_vec(),
                    })
                    .await?
                    .into_inner()
                    .branch
                    .and_then(|b| b.target_commit)
                    .map(|c| c.id);
                branch.context("no main branch")
            }
        },
    )
    .await?;
    assert_eq!(
        served, tip,
        "FindBranch through the router after the power cut"
    );
    // A real clone through the router reads every object from one of them.
    let clone = root.join("clone");
    let out = git_client(root, &["clone", "--quiet", &url, utf8(&clone)?]).await?;
    ensure!(
        out.status.success(),
        "clone through the router after the power cut: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        git::rev(&clone, "refs/remotes/origin/main").as_deref(),
        Some(tip.as_str()),
        "the clone's main"
    );
    // Both replicas are still up to date in etcd: nothing they acknowledged was lost,
    // so nothing needed repair.
    let view = store.repo_view(&repo_id).await?;
    for name in ["node1", "node2"] {
        ensure!(
            view.replicas
                .get(name)
                .is_some_and(|(r, _)| r.is_up_to_date(&view.record)),
            "{name} is not up to date after the power cut: {:?}",
            view.replicas.get(name)
        );
    }
    for &i in &cut {
        let node = &nodes[i];
        check_replica(&node.name, &node.repo(REPO), &tip, &first)?;
    }

    // Processes first, then the filesystems (the order Drop would use too).
    drop(router);
    for mut n in nodes {
        n.stop()?;
    }
    drop(etcd);
    for mut d in disks {
        d.unmount_and_detach()?;
    }
    Ok(())
}
