//! A Gitaly client that dials and fetches exactly as GitLab's gitlab-shell and
//! workhorse do: a backchannel connection (the 11 bytes `backchannel`, yamux, gRPC on
//! the first stream; refvote-sidechannel's client, checked against hashicorp-yamux
//! and grpc-go in that crate's interop test), a registered sidechannel per fetch, and
//! the fetch's bytes moved over it:
//!
//! - [`GitlabClient::ssh_upload_pack`] is gitlab-shell's `UploadPackWithSidechannel`:
//!   stdin goes up chunked and ends with `0000`; what comes back is side-band-64k,
//!   band 1 to stdout and band 2 to stderr; the session is over when the server ends
//!   its data, whether or not stdin ended (Gitaly's `ProxyPktLine`).
//! - [`GitlabClient::http_upload_pack`] is workhorse's `UploadPackWithSidechannel`: the
//!   request body goes up, then `0000`; the answer comes back raw.
//!
//! Either returns the RPC's own error first and a sidechannel failure only when the
//! call succeeded, as Gitaly's client does.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use refvote_auth::{Secret, Signed};
use refvote_proto::gitaly::smart_http_service_client::SmartHttpServiceClient;
use refvote_proto::gitaly::ssh_service_client::SshServiceClient;
use refvote_proto::gitaly::{
    InfoRefsRequest, PackfileNegotiationStatistics, PostUploadPackWithSidechannelRequest,
    Repository, SshUploadPackWithSidechannelRequest,
};
use refvote_sidechannel::client::{ClientSidechannel, TlsClient};
use refvote_sidechannel::{BackchannelClient, DialOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// One backchannel connection, as gitlab-shell and workhorse keep one per Gitaly
/// address.
#[derive(Clone)]
pub struct GitlabClient {
    conn: BackchannelClient,
    secret: Option<Arc<Secret>>,
    /// The storage name requests carry.
    pub storage: String,
}

/// A fetch's result: the statistics, or the call's error.
pub type Fetched = Result<PackfileNegotiationStatistics, Status>;

impl GitlabClient {
    /// Dials `addr` with the backchannel handshake, over TLS trusting the CA
    /// certificate `ca_pem` if given, signing every call with `secret` (Gitaly's v2
    /// token) if given.
    pub async fn dial(
        addr: SocketAddr,
        ca_pem: Option<&Path>,
        secret: Option<&str>,
    ) -> anyhow::Result<GitlabClient> {
        let tls = match ca_pem {
            Some(ca) => {
                let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                let connector = refvote_sidechannel::tls::connector_from_pem(&pem, None)
                    .map_err(|(k, why)| anyhow::anyhow!("{k}: {why}"))?;
                Some(TlsClient {
                    connector,
                    server_name: addr.ip().into(),
                })
            }
            None => None,
        };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
        let conn = refvote_sidechannel::dial(
            endpoint,
            DialOptions {
                tls,
                ..DialOptions::default()
            },
        )
        .await
        .with_context(|| format!("dialling {addr} with the backchannel handshake"))?;
        let secret = secret.and_then(Secret::new).map(Arc::new);
        Ok(GitlabClient {
            conn,
            secret,
            storage: "default".into(),
        })
    }

    /// The connection (its yamux session, its sidechannel registry).
    pub fn connection(&self) -> &BackchannelClient {
        &self.conn
    }

    /// The gRPC channel over the backchannel, signed.
    pub fn channel(&self) -> Signed<Channel> {
        Signed::new(self.conn.channel(), self.secret.clone())
    }

    fn repository(&self, relative: &str) -> Repository {
        Repository {
            storage_name: self.storage.clone(),
            relative_path: relative.to_owned(),
            gl_repository: "project-1".into(),
            ..Default::default()
        }
    }

    /// gitlab-shell's fetch: `SSHUploadPackWithSidechannel` with `stdin`'s bytes up
    /// and the side-band answer demultiplexed into `stdout` and `stderr`.
    pub async fn ssh_upload_pack<I, O, E>(
        &self,
        relative: &str,
        git_protocol: &str,
        stdin: I,
        stdout: O,
        stderr: E,
    ) -> Fetched
    where
        I: AsyncRead + Unpin + Send,
        O: AsyncWrite + Unpin + Send,
        E: AsyncWrite + Unpin + Send,
    {
        let waiter = self.conn.register();
        let mut request = Request::new(SshUploadPackWithSidechannelRequest {
            repository: Some(self.repository(relative)),
            git_config_options: Vec::new(),
            git_protocol: git_protocol.to_owned(),
        });
        waiter.attach(request.metadata_mut());
        let mut ssh = SshServiceClient::new(self.channel());
        let (answer, side) = waiter
            .serve(ssh.ssh_upload_pack_with_sidechannel(request), |sc| {
                proxy_pkt_lines(sc, stdin, stdout, stderr)
            })
            .await;
        let stats = answer?.into_inner().packfile_negotiation_statistics;
        if let Some(Err(e)) = side {
            return Err(Status::unknown(format!("sidechannel: {e:#}")));
        }
        Ok(stats.unwrap_or_default())
    }

    /// workhorse's fetch: `PostUploadPackWithSidechannel` with `body` up (then `0000`)
    /// and the raw answer into `out`.
    pub async fn http_upload_pack<B, O>(
        &self,
        relative: &str,
        git_protocol: &str,
        body: B,
        out: O,
    ) -> Fetched
    where
        B: AsyncRead + Unpin + Send,
        O: AsyncWrite + Unpin + Send,
    {
        let waiter = self.conn.register();
        let mut request = Request::new(PostUploadPackWithSidechannelRequest {
            repository: Some(self.repository(relative)),
            git_config_options: Vec::new(),
            git_protocol: git_protocol.to_owned(),
        });
        waiter.attach(request.metadata_mut());
        let mut http = SmartHttpServiceClient::new(self.channel());
        let (answer, side) = waiter
            .serve(http.post_upload_pack_with_sidechannel(request), |sc| {
                request_response(sc, body, out)
            })
            .await;
        let stats = answer?.into_inner().packfile_negotiation_statistics;
        if let Some(Err(e)) = side {
            return Err(Status::unknown(format!("sidechannel: {e:#}")));
        }
        Ok(stats.unwrap_or_default())
    }

    /// `InfoRefsUploadPack` (plain gRPC over the same connection): the advertisement.
    pub async fn info_refs(&self, relative: &str, git_protocol: &str) -> Result<Vec<u8>, Status> {
        let mut http = SmartHttpServiceClient::new(self.channel());
        let mut stream = http
            .info_refs_upload_pack(InfoRefsRequest {
                repository: Some(self.repository(relative)),
                git_config_options: Vec::new(),
                git_protocol: git_protocol.to_owned(),
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.next().await {
            out.extend_from_slice(&m?.data);
        }
        Ok(out)
    }
}

/// Gitaly's `ProxyPktLine`: stdin up (ended with `0000` at its end) while the
/// side-band answer comes down; done when the answer ends.
async fn proxy_pkt_lines<I, O, E>(
    sc: ClientSidechannel,
    mut stdin: I,
    mut stdout: O,
    mut stderr: E,
) -> anyhow::Result<()>
where
    I: AsyncRead + Unpin + Send,
    O: AsyncWrite + Unpin + Send,
    E: AsyncWrite + Unpin + Send,
{
    let (mut down, mut up) = tokio::io::split(sc);
    let request = async {
        tokio::io::copy(&mut stdin, &mut up)
            .await
            .context("copy request")?;
        up.shutdown().await.context("close request")?;
        anyhow::Ok(())
    };
    let response = async {
        let mut header = [0u8; 4];
        loop {
            match down.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e).context("copy response"),
            }
            let len = match refvote_pktline::decode::header(&header, 0)
                .context("copy response: side-band header")?
            {
                refvote_pktline::Header::Data(n) if n > 0 => n,
                other => anyhow::bail!("copy response: unexpected {} pkt-line", other.kind()),
            };
            let mut packet = vec![0u8; len];
            down.read_exact(&mut packet)
                .await
                .context("copy response: side-band packet")?;
            match packet[0] {
                1 => stdout.write_all(&packet[1..]).await?,
                2 => stderr.write_all(&packet[1..]).await?,
                band => anyhow::bail!("copy response: unexpected band: {band}"),
            }
            stdout.flush().await?;
        }
        anyhow::Ok(())
    };
    tokio::pin!(request, response);
    let mut request_done = false;
    loop {
        tokio::select! {
            r = &mut response => return r,
            r = &mut request, if !request_done => {
                r?;
                request_done = true;
            }
        }
    }
}

/// workhorse's request and response: the body up and closed, the answer down raw.
async fn request_response<B, O>(
    sc: ClientSidechannel,
    mut body: B,
    mut out: O,
) -> anyhow::Result<()>
where
    B: AsyncRead + Unpin + Send,
    O: AsyncWrite + Unpin + Send,
{
    let (mut down, mut up) = tokio::io::split(sc);
    let request = async {
        tokio::io::copy(&mut body, &mut up)
            .await
            .context("copy request")?;
        up.shutdown().await.context("close request")?;
        anyhow::Ok(())
    };
    let response = async {
        tokio::io::copy(&mut down, &mut out)
            .await
            .context("copy response")?;
        out.flush().await?;
        anyhow::Ok(())
    };
    let (req, resp) = tokio::join!(request, response);
    resp?;
    req
}
