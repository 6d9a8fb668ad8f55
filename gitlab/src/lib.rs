//! refvote-gitlab: GitLab's side of a push, as Gitaly runs it, for a storage node to
//! run once per transaction.
//!
//! - [`settings`]: the `[gitlab]` (`url`, `relative_url_root`, `secret_file`,
//!   `[gitlab.http-settings]`) and `[hooks]` (`custom_hooks_dir`) sections, with
//!   Gitaly's key names, checked with errors that name the key.
//! - [`api`]: the internal API client (`/allowed`, `/pre_receive`, `/post_receive`,
//!   `/check`) on reqwest with rustls (ring) or a Unix socket, signing each request
//!   with the `Gitlab-Shell-Api-Request` JWT ([`jwt`]); [`wire`] reads the answers
//!   as Gitaly does, apart from I/O; [`call`] names the calls and their failures.
//! - [`custom`]: custom server hooks — Gitaly's layout and order, environment,
//!   stdin and arguments, output streamed, a deadline that kills the process group.
//! - [`hooks`]: the three hooks in Gitaly's sequence (pre-receive: `/allowed`,
//!   custom hooks, `/pre_receive`; update; post-receive: `/post_receive` and its
//!   messages, custom hooks), producing a [`Verdict`] or a [`Refusal`] with the text
//!   the pusher sees and the fields Rails' structured errors need.
//! - [`context`]: the pure description of a call's GitLab side ([`HookContext`]),
//!   built from `SSHReceivePack`, `PostReceivePack` or an operation's `User`;
//!   [`changes`]: the `<old> <new> <ref>` lines.
//! - [`messages`]: `/post_receive` messages rendered as Gitaly prints them.
//!
//! It does not decide which replica runs the hooks, record verdicts, or touch git or
//! etcd: the node and the transaction protocol do (see the design note that goes with
//! this crate). It never retries `/allowed` or `/pre_receive` on its own, and retries
//! `/post_receive` only where GitLab cannot have acted on the failed call.
#![forbid(unsafe_code)]

pub mod api;
pub mod call;
pub mod changes;
pub mod context;
pub mod custom;
pub mod hooks;
pub mod jwt;
pub mod messages;
pub mod settings;
pub mod wire;

pub use api::{ApiError, Call, Client};
pub use changes::{Change, Changes};
pub use context::{GlId, HookContext, ObjectDirectories, Protocol};
pub use custom::{CustomHookError, CustomHooks, HookKind, OutputSink};
pub use hooks::{GitlabHooks, PostReceiveError, Refusal, RetryPolicy, Verdict};
pub use settings::{ApiConfig, GitlabSettings, HooksSettings, InvalidSetting};
