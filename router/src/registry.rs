//! Every Gitaly method the router serves, classified from the annotations in `proto/`
//! (as Gitaly's own proxy does): mutator, accessor or maintenance; its scope; and where
//! in the request the target repository sits. Built once at start-up from the
//! descriptor set `refvote-proto` embeds; a method that is not annotated, or a
//! repository-scoped one whose request has no target repository, fails start-up rather
//! than a request.

use std::collections::{BTreeMap, HashMap};

use crate::wire::{self, Field, Value};

/// Extension numbers of `refvote/annotations.proto` (the same as Gitaly's lint.proto).
const EXT_INTERCEPTED: u32 = 82302;
const EXT_OP_TYPE: u32 = 82303;
const EXT_REPOSITORY: u32 = 91234;
const EXT_TARGET_REPOSITORY: u32 = 91235;
const EXT_ADDITIONAL_REPOSITORY: u32 = 91236;

/// The message type every target path ends at.
const REPOSITORY_TYPE: &str = ".gitaly.Repository";

/// How deep the search for a nested target repository goes.
const MAX_DEPTH: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Changes a repository: voted, fanned out to every up-to-date replica.
    Mutator,
    /// Reads: served by one up-to-date replica.
    Accessor,
    /// Housekeeping: sent to every replica, outside transactions.
    Maintenance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Repository,
    Storage,
    Partition,
}

/// One method, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    /// The gRPC path, `/gitaly.RefService/FindBranch`.
    pub path: String,
    /// `None` for methods of an intercepted service, which the router answers itself.
    pub kind: Option<OpKind>,
    pub scope: Scope,
    /// Field numbers from the request down to the target `Repository` message (through
    /// a wrapper such as an object pool, whose inner field is marked `repository`).
    pub target: Option<Vec<u32>>,
    /// Likewise for a second repository the call reads (e.g. a fork source).
    pub additional: Option<Vec<u32>>,
    pub client_streaming: bool,
    pub server_streaming: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("the descriptor set is malformed")]
    Wire(#[from] wire::WireError),
    #[error(
        "{0} has no op_type annotation; annotate it in proto/ (mutator, accessor or maintenance)"
    )]
    Unannotated(String),
    #[error("{0} has an unknown op_type value {1}")]
    UnknownOp(String, u64),
    #[error("{0} is repository-scoped but its request has no field marked target_repository")]
    NoTarget(String),
    #[error("{method}: request type {type_name} is not in the descriptor set")]
    UnknownType { method: String, type_name: String },
}

#[derive(Debug, Clone)]
pub struct Registry {
    methods: HashMap<String, Method>,
}

/// What the registry needs of one message type.
#[derive(Debug, Default)]
struct MessageType {
    /// (field number, type name of a message field, target?, additional?)
    fields: Vec<(u32, Option<String>, bool, bool)>,
    /// The field marked `repository`: where a wrapper message (an object pool) that is
    /// itself a target or additional repository keeps its `Repository`.
    repository: Option<u32>,
}

fn bytes<'a>(f: &Field<'a>) -> Option<&'a [u8]> {
    match f.value {
        Value::Bytes(b) => Some(b),
        _ => None,
    }
}

fn string(f: &Field<'_>) -> String {
    bytes(f)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

fn varint(f: &Field<'_>) -> Option<u64> {
    match f.value {
        Value::Varint(v) => Some(v),
        _ => None,
    }
}

/// Whether a bool extension is set in an options message.
fn flag(options: &[u8], ext: u32) -> Result<bool, wire::WireError> {
    Ok(wire::fields(options)?
        .iter()
        .any(|f| f.number == ext && varint(f) == Some(1)))
}

impl Registry {
    /// The registry of the Gitaly subset refvote serves.
    pub fn gitaly() -> Result<Registry, RegistryError> {
        Registry::from_descriptor_set(refvote_proto::gitaly::FILE_DESCRIPTOR_SET)
    }

    pub fn from_descriptor_set(set: &[u8]) -> Result<Registry, RegistryError> {
        let files: Vec<&[u8]> = wire::fields(set)?
            .iter()
            .filter(|f| f.number == 1)
            .filter_map(bytes)
            .collect();
        // Every message type by full name (`.gitaly.FindBranchRequest`), nested ones too.
        let mut types: BTreeMap<String, MessageType> = BTreeMap::new();
        for file in &files {
            let fields = wire::fields(file)?;
            let package = fields
                .iter()
                .find(|f| f.number == 2)
                .map(string)
                .unwrap_or_default();
            for m in fields.iter().filter(|f| f.number == 4).filter_map(bytes) {
                collect_messages(m, &format!(".{package}"), &mut types)?;
            }
        }
        let mut methods = HashMap::new();
        for file in &files {
            let fields = wire::fields(file)?;
            let package = fields
                .iter()
                .find(|f| f.number == 2)
                .map(string)
                .unwrap_or_default();
            for service in fields.iter().filter(|f| f.number == 6).filter_map(bytes) {
                let sfields = wire::fields(service)?;
                let sname = sfields
                    .iter()
                    .find(|f| f.number == 1)
                    .map(string)
                    .unwrap_or_default();
                let intercepted = match sfields.iter().find(|f| f.number == 3).and_then(bytes) {
                    Some(opts) => flag(opts, EXT_INTERCEPTED)?,
                    None => false,
                };
                for m in sfields.iter().filter(|f| f.number == 2).filter_map(bytes) {
                    let method = classify(m, &package, &sname, intercepted, &types)?;
                    methods.insert(method.path.clone(), method);
                }
            }
        }
        Ok(Registry { methods })
    }

    pub fn get(&self, path: &str) -> Option<&Method> {
        self.methods.get(path)
    }

    pub fn len(&self) -> usize {
        self.methods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.methods.is_empty()
    }

    pub fn methods(&self) -> impl Iterator<Item = &Method> {
        self.methods.values()
    }
}

fn collect_messages(
    msg: &[u8],
    scope: &str,
    types: &mut BTreeMap<String, MessageType>,
) -> Result<(), RegistryError> {
    let fields = wire::fields(msg)?;
    let name = format!(
        "{scope}.{}",
        fields
            .iter()
            .find(|f| f.number == 1)
            .map(string)
            .unwrap_or_default()
    );
    let mut ty = MessageType::default();
    for field in fields.iter().filter(|f| f.number == 2).filter_map(bytes) {
        let ff = wire::fields(field)?;
        let number = ff
            .iter()
            .find(|f| f.number == 3)
            .and_then(varint)
            .unwrap_or(0) as u32;
        // type 11 is TYPE_MESSAGE.
        let is_message = ff.iter().find(|f| f.number == 5).and_then(varint) == Some(11);
        let type_name = is_message.then(|| {
            ff.iter()
                .find(|f| f.number == 6)
                .map(string)
                .unwrap_or_default()
        });
        let (target, additional, repository) =
            match ff.iter().find(|f| f.number == 8).and_then(bytes) {
                Some(opts) => (
                    flag(opts, EXT_TARGET_REPOSITORY)?,
                    flag(opts, EXT_ADDITIONAL_REPOSITORY)?,
                    flag(opts, EXT_REPOSITORY)?,
                ),
                None => (false, false, false),
            };
        if repository {
            ty.repository = Some(number);
        }
        ty.fields.push((number, type_name, target, additional));
    }
    for nested in fields.iter().filter(|f| f.number == 3).filter_map(bytes) {
        collect_messages(nested, &name, types)?;
    }
    types.insert(name, ty);
    Ok(())
}

/// The path of field numbers to the field marked `target_repository` (or, with
/// `additional`, `additional_repository`), searching nested message fields
/// breadth-first, as Gitaly does for requests whose repository sits in a header. When
/// the marked field is not a `Repository` but a wrapper (an `ObjectPool`), the path
/// goes on to the wrapper's field marked `repository`; a wrapper without one has no
/// usable path.
fn find(
    types: &BTreeMap<String, MessageType>,
    type_name: &str,
    additional: bool,
) -> Option<Vec<u32>> {
    let mut queue = vec![(type_name.to_owned(), Vec::new())];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for (name, path) in &queue {
            // A type outside the set (none today) holds no target; keep searching.
            let Some(ty) = types.get(name) else {
                continue;
            };
            for (number, nested, target, extra) in &ty.fields {
                if (!additional && *target) || (additional && *extra) {
                    let mut p = path.clone();
                    p.push(*number);
                    match nested.as_deref() {
                        Some(REPOSITORY_TYPE) | None => {}
                        Some(wrapper) => p.push(types.get(wrapper)?.repository?),
                    }
                    return Some(p);
                }
                if let Some(nested) = nested {
                    let mut p = path.clone();
                    p.push(*number);
                    next.push((nested.clone(), p));
                }
            }
        }
        queue = next;
    }
    None
}

fn classify(
    m: &[u8],
    package: &str,
    service: &str,
    intercepted: bool,
    types: &BTreeMap<String, MessageType>,
) -> Result<Method, RegistryError> {
    let fields = wire::fields(m)?;
    let name = fields
        .iter()
        .find(|f| f.number == 1)
        .map(string)
        .unwrap_or_default();
    let input = fields
        .iter()
        .find(|f| f.number == 2)
        .map(string)
        .unwrap_or_default();
    let path = format!("/{package}.{service}/{name}");
    let client_streaming = fields.iter().find(|f| f.number == 5).and_then(varint) == Some(1);
    let server_streaming = fields.iter().find(|f| f.number == 6).and_then(varint) == Some(1);
    let op = match fields.iter().find(|f| f.number == 4).and_then(bytes) {
        Some(opts) => match wire::fields(opts)?
            .iter()
            .find(|f| f.number == EXT_OP_TYPE)
            .and_then(bytes)
        {
            Some(op) => Some(wire::fields(op)?),
            None => None,
        },
        None => None,
    };
    let Some(op) = op else {
        if intercepted {
            return Ok(Method {
                path,
                kind: None,
                scope: Scope::Storage,
                target: None,
                additional: None,
                client_streaming,
                server_streaming,
            });
        }
        return Err(RegistryError::Unannotated(path));
    };
    let kind = match op
        .iter()
        .find(|f| f.number == 1)
        .and_then(varint)
        .unwrap_or(0)
    {
        1 => OpKind::Mutator,
        2 => OpKind::Accessor,
        3 => OpKind::Maintenance,
        other => return Err(RegistryError::UnknownOp(path, other)),
    };
    let scope = match op
        .iter()
        .find(|f| f.number == 2)
        .and_then(varint)
        .unwrap_or(0)
    {
        2 => Scope::Storage,
        3 => Scope::Partition,
        _ => Scope::Repository,
    };
    if !types.contains_key(&input) {
        return Err(RegistryError::UnknownType {
            method: path,
            type_name: input,
        });
    }
    let target = find(types, &input, false);
    let additional = find(types, &input, true);
    if scope == Scope::Repository && target.is_none() {
        return Err(RegistryError::NoTarget(path));
    }
    Ok(Method {
        path,
        kind: Some(kind),
        scope,
        target,
        additional,
        client_streaming,
        server_streaming,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_gitaly_subset() {
        let r = Registry::gitaly().unwrap();
        let m = r.get("/gitaly.SmartHTTPService/PostReceivePack").unwrap();
        assert_eq!(m.kind, Some(OpKind::Mutator));
        assert_eq!(m.target.as_deref(), Some(&[1][..]));
        assert!(m.client_streaming && m.server_streaming);
        let m = r.get("/gitaly.RefService/FindDefaultBranchName").unwrap();
        assert_eq!(m.kind, Some(OpKind::Accessor));
        assert!(!m.client_streaming && !m.server_streaming);
        // The repository of UserCommitFiles sits in the header message of the first frame.
        let m = r.get("/gitaly.OperationService/UserCommitFiles").unwrap();
        assert_eq!(m.kind, Some(OpKind::Mutator));
        assert_eq!(m.target.as_deref(), Some(&[1, 1][..]));
        // ServerService is intercepted: the router answers it itself.
        assert_eq!(
            r.get("/gitaly.ServerService/ServerInfo").unwrap().kind,
            None
        );
        // Every repository-scoped method found its target.
        for m in r.methods() {
            if m.kind.is_some() && m.scope == Scope::Repository {
                assert!(m.target.is_some(), "{}", m.path);
            }
        }
        assert!(r.len() >= 40, "{} methods", r.len());
    }

    /// A sample of methods classified as Gitaly's own protos classify them (read from
    /// Gitaly b229e9953e77, master of 2026-05-27): the registry must agree on kind, scope,
    /// streaming shape and where the target and additional repositories sit.
    #[test]
    fn classifies_as_gitaly_does() {
        use OpKind::{Accessor, Maintenance, Mutator};
        let r = Registry::gitaly().unwrap();
        // (path, kind, scope, target, additional, client streaming, server streaming)
        type Row = (
            &'static str,
            Option<OpKind>,
            Scope,
            Option<&'static [u32]>,
            Option<&'static [u32]>,
            bool,
            bool,
        );
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // Two-phase merge: a bidi stream whose first frame names the repository.
            ("/gitaly.OperationService/UserMergeBranch", Some(Mutator), Scope::Repository, Some(&[1]), None, true, true),
            // The rebase's repository sits in the header of its first frame.
            ("/gitaly.OperationService/UserRebaseConfirmable", Some(Mutator), Scope::Repository, Some(&[1, 1]), None, true, true),
            ("/gitaly.OperationService/UserApplyPatch", Some(Mutator), Scope::Repository, Some(&[1, 1]), None, true, false),
            ("/gitaly.OperationService/UserSquash", Some(Mutator), Scope::Repository, Some(&[1]), None, false, false),
            ("/gitaly.RepositoryService/GetArchive", Some(Accessor), Scope::Repository, Some(&[1]), None, false, true),
            ("/gitaly.RepositoryService/OptimizeRepository", Some(Maintenance), Scope::Repository, Some(&[1]), None, false, false),
            ("/gitaly.RepositoryService/PruneUnreachableObjects", Some(Maintenance), Scope::Repository, Some(&[1]), None, false, false),
            // The fork's source is deliberately not annotated: the node calls the
            // source's server with it unchanged.
            ("/gitaly.RepositoryService/CreateFork", Some(Mutator), Scope::Repository, Some(&[1]), None, false, false),
            // Storage-scoped: no repository, a storage name instead.
            ("/gitaly.RemoteService/FindRemoteRepository", Some(Accessor), Scope::Storage, None, None, false, false),
            // Pushes to a remote only: an accessor of the local repository.
            ("/gitaly.RemoteService/UpdateRemoteMirror", Some(Accessor), Scope::Repository, Some(&[1]), None, true, false),
            // Writes a language cache into the repository, so Gitaly calls it a mutator.
            ("/gitaly.CommitService/CommitLanguages", Some(Mutator), Scope::Repository, Some(&[1]), None, false, false),
            ("/gitaly.CommitService/CheckObjectsExist", Some(Accessor), Scope::Repository, Some(&[1]), None, true, true),
            ("/gitaly.DiffService/FindChangedPaths", Some(Accessor), Scope::Repository, Some(&[1]), None, false, true),
            ("/gitaly.AnalysisService/CheckBlobsGenerated", Some(Accessor), Scope::Repository, Some(&[1]), None, true, true),
            ("/gitaly.ConflictsService/ResolveConflicts", Some(Mutator), Scope::Repository, Some(&[1, 1]), None, true, false),
            ("/gitaly.CleanupService/RewriteHistory", Some(Mutator), Scope::Repository, Some(&[1]), None, true, false),
            // Object pools: the pool is reached through its inner `repository` field.
            ("/gitaly.ObjectPoolService/CreateObjectPool", Some(Mutator), Scope::Repository, Some(&[1, 1]), Some(&[2]), false, false),
            ("/gitaly.ObjectPoolService/LinkRepositoryToObjectPool", Some(Mutator), Scope::Repository, Some(&[2]), Some(&[1, 1]), false, false),
            ("/gitaly.ObjectPoolService/FetchIntoObjectPool", Some(Mutator), Scope::Repository, Some(&[2, 1]), Some(&[1]), false, false),
            ("/gitaly.ObjectPoolService/GetObjectPool", Some(Accessor), Scope::Repository, Some(&[1]), None, false, false),
            ("/gitaly.SSHService/SSHUploadPackWithSidechannel", Some(Accessor), Scope::Repository, Some(&[1]), None, false, false),
            // Intercepted services: the router answers them itself.
            ("/gitaly.ServerService/ReadinessCheck", None, Scope::Storage, None, None, false, false),
            ("/gitaly.PraefectInfoService/RepositoryReplicas", None, Scope::Storage, None, None, false, false),
        ];
        for &(path, kind, scope, target, additional, cs, ss) in rows {
            let m = r
                .get(path)
                .unwrap_or_else(|| panic!("{path} is not declared"));
            assert_eq!(m.kind, kind, "{path}");
            assert_eq!(m.scope, scope, "{path}");
            assert_eq!(m.target.as_deref(), target, "{path}");
            assert_eq!(m.additional.as_deref(), additional, "{path}");
            assert_eq!((m.client_streaming, m.server_streaming), (cs, ss), "{path}");
        }
        // The whole of every service GitLab's clients use is declared: 143 methods, the
        // plain upload-pack forms Gitaly has since removed included.
        assert_eq!(r.len(), 143, "{} methods", r.len());
    }

    /// A descriptor set with one service whose only method is not annotated.
    fn one_method_set(options: &[u8]) -> Vec<u8> {
        let mut field = Vec::new();
        wire::put_bytes_field(&mut field, 1, b"repository");
        field.extend_from_slice(&[3 << 3, 1, 5 << 3, 11]);
        wire::put_bytes_field(&mut field, 6, b".p.Repository");
        let mut req = Vec::new();
        wire::put_bytes_field(&mut req, 1, b"Req");
        wire::put_bytes_field(&mut req, 2, &field);
        let mut repo_msg = Vec::new();
        wire::put_bytes_field(&mut repo_msg, 1, b"Repository");
        let mut method = Vec::new();
        wire::put_bytes_field(&mut method, 1, b"Do");
        wire::put_bytes_field(&mut method, 2, b".p.Req");
        wire::put_bytes_field(&mut method, 3, b".p.Req");
        if !options.is_empty() {
            wire::put_bytes_field(&mut method, 4, options);
        }
        let mut service = Vec::new();
        wire::put_bytes_field(&mut service, 1, b"Svc");
        wire::put_bytes_field(&mut service, 2, &method);
        let mut file = Vec::new();
        wire::put_bytes_field(&mut file, 2, b"p");
        wire::put_bytes_field(&mut file, 4, &req);
        wire::put_bytes_field(&mut file, 4, &repo_msg);
        wire::put_bytes_field(&mut file, 6, &service);
        let mut set = Vec::new();
        wire::put_bytes_field(&mut set, 1, &file);
        set
    }

    #[test]
    fn an_unannotated_method_fails_start_up() {
        let err = Registry::from_descriptor_set(&one_method_set(&[])).unwrap_err();
        assert_eq!(err, RegistryError::Unannotated("/p.Svc/Do".into()));
        assert!(err.to_string().contains("annotate it in proto/"));
    }

    #[test]
    fn a_repository_scoped_method_without_a_target_fails_start_up() {
        let mut op = Vec::new();
        op.extend_from_slice(&[1 << 3, 1]); // MUTATOR, scope REPOSITORY
        let mut options = Vec::new();
        wire::put_bytes_field(&mut options, EXT_OP_TYPE, &op);
        let err = Registry::from_descriptor_set(&one_method_set(&options)).unwrap_err();
        assert_eq!(err, RegistryError::NoTarget("/p.Svc/Do".into()));
    }

    #[test]
    fn malformed_descriptors_are_an_error_not_a_panic() {
        assert!(Registry::from_descriptor_set(&[0x0a, 0x05, 0x01]).is_err());
    }
}
