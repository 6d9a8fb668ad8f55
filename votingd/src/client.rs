//! A synchronous client for votingd's socket (its [`Status`] document), for votingctl,
//! the local-cluster launcher and tests: here, beside the document it reads, so each
//! of them can use it without depending on the others.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use prost::Message;
use refvote_proto::hook::{self, Request, Response, StatusQuery, request, response};

use crate::status::Status;

/// Asks votingd for its status.
pub fn status(socket: &Path) -> anyhow::Result<Status> {
    let request = Request {
        kind: Some(request::Kind::Status(StatusQuery {})),
    };
    match call(socket, &request, Duration::from_secs(10))? {
        response::Kind::StatusJson(json) => Ok(serde_json::from_str(&json)?),
        response::Kind::Error(e) => anyhow::bail!("votingd refused: {}", e.message),
        response::Kind::Decision(_) => anyhow::bail!("votingd sent an unexpected answer"),
    }
}

/// Sends one request and reads one response.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> anyhow::Result<response::Kind> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&hook::encode_frame(request))?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header)?;
    let mut body = vec![0u8; hook::frame_len(header)?];
    stream.read_exact(&mut body)?;
    Response::decode(body.as_slice())?
        .kind
        .ok_or_else(|| anyhow::anyhow!("votingd sent an empty answer"))
}
