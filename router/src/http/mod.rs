//! Plain git over HTTP (git's smart HTTP protocol) on its own port, so `git clone`,
//! `git fetch` and `git push` work against the cluster without GitLab in front.
//!
//! Each request becomes the Gitaly call Workhorse would make —
//! `GET /<path>.git/info/refs?service=git-upload-pack|git-receive-pack` is
//! InfoRefsUploadPack / InfoRefsReceivePack, `POST /<path>.git/git-upload-pack`
//! PostUploadPack, `POST /<path>.git/git-receive-pack` PostReceivePack — on the
//! repository `{storage "default", relative_path "<path>.git"}`, and goes through the
//! router's own gRPC handler ([`Forwarder::handle`]) in-process. Reads, voted writes and
//! repository creation therefore follow exactly the gRPC paths; nothing is routed here.
//!
//! What this module adds is HTTP: statuses (404 unknown repository, 503 no quorum or
//! no replica, 400 bad request, 405 wrong method), `text/plain` error bodies git shows
//! as `remote: …`, gzip request bodies, streaming both ways with backpressure, and for
//! a refused push a report-status git understands (`! [remote rejected] main -> main
//! (reason)`), because git shows nothing of an HTTP error body on a POST. With
//! `create_on_push`, the ref advertisement before a push creates an unknown repository
//! through CreateRepository (placement, registration, voted creation).
//!
//! With `[auth]` set, every request must carry either Gitaly's v2 token
//! (`Authorization: Bearer v2.…`, what GitLab's own components send) or, for plain git
//! clients, HTTP Basic credentials whose password is the shared secret (any user name;
//! git asks for it, or takes it from a credential helper). Anything else gets 401 with
//! `WWW-Authenticate: Basic`, before any gRPC call is made (the check itself is
//! [`refvote_auth::git_http`]).
//!
//! A request reads top to bottom through the files: `listener` accepts it, `serve`
//! routes it (`route`), checks its credentials, wraps its body (`body`) and calls the
//! service — `advertise` (info/refs, creation on push), `upload_pack` or
//! `receive_pack` — whose gRPC answer streams back (`answer`); `respond` makes the
//! HTTP refusals, `push_refusal` the report-status of a push refused as a whole.

mod advertise;
mod answer;
mod body;
mod listener;
mod probe;
mod push_refusal;
mod receive_pack;
mod respond;
mod route;
mod serve;
mod upload_pack;

use std::collections::HashMap;
use std::sync::Arc;

use refvote_proto::gitaly::Repository;
use tokio::sync::{Mutex, watch};

use crate::forward::Forwarder;
use body::BodyReader;
use respond::Response;
use route::Route;

pub use listener::HttpServer;

/// The virtual storage plain git clients address (DESIGN.md §7).
pub const VIRTUAL_STORAGE: &str = "default";

/// What one request carries into the gRPC call.
struct Request {
    route: Route,
    /// The client's `Git-Protocol` header (`version=2`), passed to git on the node.
    git_protocol: String,
    body: Arc<Mutex<BodyReader>>,
    /// Becomes true when reading the body failed.
    broken: watch::Receiver<bool>,
}

/// The front's shared state, one per HTTP listener.
struct GitHttp {
    forwarder: Arc<Forwarder>,
    create_on_push: bool,
    /// The shared secret requests must prove, when `[auth]` is set.
    auth: Option<refvote_auth::AuthPolicy>,
    /// Creations on push in flight, by relative path: concurrent first pushes through
    /// this router wait for the one creating the repository, so none of them reaches a
    /// replica whose creation has not finished yet.
    creating: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// `/-/readiness` and `/-/liveness` answer from it; while draining every answer
    /// closes its connection.
    health: Arc<crate::health::Health>,
    /// Body size and slow-client bounds (`[limits]`).
    limits: crate::limit::LimitSettings,
}

/// The repository a URL names, in the virtual storage.
fn repository(relative: &str) -> Repository {
    Repository {
        storage_name: VIRTUAL_STORAGE.into(),
        relative_path: relative.into(),
        ..Default::default()
    }
}
