//! The ops web: the site an operator opens first, served by every router on its own
//! `admin_listen_addr` (off by default) for the accounts of `[ops_web]`.
//!
//! Server-rendered HTML pages, each also as JSON under `/api/` (the same fields as
//! `votingctl --json` where both show the same thing): the overview (etcd members,
//! nodes and routers with their leases, repositories by state, open transactions,
//! the repair queue, the background verifiers' progress), a node, a repository (its replicas and the admin jobs as
//! buttons), repairs and data loss, and a search by path prefix that reads one page
//! of keys from etcd, never every repository.
//!
//! The admin jobs (synchronize, verify, add or remove a replica, remove the
//! repository) call the router's admin service in-process, with its locks and
//! fencing; the pages never write etcd. Destructive ones need the repository's name
//! typed as confirmation; every one is logged with who ran it (target
//! `refvote_router::ops_web::audit`) and listed at `/api/actions`.
//!
//! Safety: login sessions in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure` under
//! TLS), a CSRF token in every form, viewers see no buttons and their POSTs get 403,
//! request bodies over [`MAX_BODY`] get 413, and every answer carries a
//! Content-Security-Policy that allows no script at all.
//!
//! The files: `settings` (the config section), `auth` (accounts, sessions, CSRF),
//! `login` (logging in and out), `respond` (answers, errors, the gate every handler
//! passes), `html` (escaping and the page shell), `data` (what the pages read),
//! `pages` (the routes and GET handlers), `actions` (the repository page's admin
//! jobs), `verify` (the checksum comparison), `listener` (HTTP/1.1, TLS when
//! `[tls]` is set, the security headers).
//!
//! Not here yet: live refresh, charts, per-repository transaction history, the
//! accept-data-loss flow (issue 17). The background verifier is `crate::verifier`.

mod actions;
mod auth;
mod data;
mod html;
mod listener;
mod login;
mod pages;
mod respond;
mod settings;
mod verify;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use refvote_cluster::Store;
use serde::Serialize;

use crate::admin::Admin;
use crate::forward::Forwarder;
use crate::pool::Pool;

pub use listener::OpsWebServer;
pub use settings::Settings;

/// The largest request body accepted (every form is far smaller).
pub const MAX_BODY: usize = 16 * 1024;
/// Admin actions remembered for `/api/actions` (the log keeps them all).
const AUDIT_KEPT: usize = 200;

/// One admin job as run from the site.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub unix_ms: u64,
    pub user: String,
    pub action: String,
    pub repo: String,
    /// The node it named, if any.
    pub node: String,
    /// `ok`, or the error.
    pub outcome: String,
}

/// What the handlers share.
pub(crate) struct OpsWeb {
    store: Store,
    forwarder: Arc<Forwarder>,
    admin: Arc<Admin>,
    pool: Arc<Pool>,
    auth: auth::Auth,
    /// The virtual storages: the search's choice.
    storages: Vec<String>,
    audit: Mutex<VecDeque<AuditEntry>>,
}

impl OpsWeb {
    pub(crate) fn new(
        settings: &Settings,
        secure: bool,
        store: Store,
        forwarder: Arc<Forwarder>,
        admin: Arc<Admin>,
        pool: Arc<Pool>,
        storages: Vec<String>,
    ) -> OpsWeb {
        OpsWeb {
            store,
            forwarder,
            admin,
            pool,
            auth: auth::Auth::new(settings, secure),
            storages,
            audit: Mutex::new(VecDeque::new()),
        }
    }

    fn record(&self, entry: AuditEntry) {
        tracing::info!(
            target: "refvote_router::ops_web::audit",
            user = %entry.user,
            action = %entry.action,
            repo = %entry.repo,
            node = %entry.node,
            outcome = %entry.outcome,
            "admin job from the ops web"
        );
        let mut audit = self.audit.lock().expect("audit");
        if audit.len() >= AUDIT_KEPT {
            audit.pop_front();
        }
        audit.push_back(entry);
    }

    fn recent_actions(&self) -> Vec<AuditEntry> {
        self.audit
            .lock()
            .expect("audit")
            .iter()
            .rev()
            .cloned()
            .collect()
    }
}
