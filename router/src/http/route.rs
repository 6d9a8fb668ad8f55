//! Which git smart HTTP request a URL is: its repository and service.

use tonic::codegen::http::{Method, StatusCode};

use super::respond::Refusal;

/// One request's target, parsed from its method, path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    InfoRefs { relative: String, service: Service },
    UploadPack { relative: String },
    ReceivePack { relative: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Service {
    UploadPack,
    ReceivePack,
}

impl Route {
    /// The `Content-Type` a POST must carry (git's own), `None` for a GET.
    pub(super) fn content_type(&self) -> Option<&'static str> {
        match self {
            Route::InfoRefs { .. } => None,
            Route::UploadPack { .. } => Some("application/x-git-upload-pack-request"),
            Route::ReceivePack { .. } => Some("application/x-git-receive-pack-request"),
        }
    }

    /// Whether the request belongs to a push (its advertisement or the push itself).
    pub(super) fn writes(&self) -> bool {
        matches!(
            self,
            Route::ReceivePack { .. }
                | Route::InfoRefs {
                    service: Service::ReceivePack,
                    ..
                }
        )
    }
}

/// Parses `/<path>/info/refs?service=…`, `/<path>/git-upload-pack` and
/// `/<path>/git-receive-pack`. A path without `.git` gets it appended, as GitLab does.
pub(super) fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Route, Refusal> {
    let path = percent_decode(path).ok_or_else(|| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "the URL path is not valid percent-encoded UTF-8",
        )
    })?;
    let not_git = || {
        Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "{path} is not a git smart HTTP URL (expected /<repository>.git/info/refs, \
                 /<repository>.git/git-upload-pack or /<repository>.git/git-receive-pack; \
                 git's dumb HTTP protocol is not served)"
            ),
        )
    };
    let (repo, tail) = ["/info/refs", "/git-upload-pack", "/git-receive-pack"]
        .iter()
        .find_map(|tail| path.strip_suffix(tail).map(|repo| (repo, *tail)))
        .ok_or_else(not_git)?;
    let repo = repo.strip_prefix('/').ok_or_else(not_git)?;
    if repo.is_empty() {
        return Err(not_git());
    }
    let relative = if repo.ends_with(".git") {
        repo.to_owned()
    } else {
        format!("{repo}.git")
    };
    // HEAD is answered as GET is, without the body (hyper leaves it out).
    let want = |m: &Method, allow: &'static str| {
        if method == m || (*m == Method::GET && method == Method::HEAD) {
            Ok(())
        } else {
            Err(Refusal {
                allow: Some(allow),
                ..Refusal::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{tail} takes {allow}, not {method}"),
                )
            })
        }
    };
    match tail {
        "/info/refs" => {
            want(&Method::GET, "GET, HEAD")?;
            let service = query
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("service="));
            let service = match service {
                Some("git-upload-pack") => Service::UploadPack,
                Some("git-receive-pack") => Service::ReceivePack,
                Some(other) => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "unknown service {other:?}: use git-upload-pack or git-receive-pack"
                        ),
                    ));
                }
                // The dumb protocol's advertisement: not served, so not found (as
                // its other paths, HEAD and objects/…, are).
                None => {
                    return Err(Refusal::new(
                        StatusCode::NOT_FOUND,
                        "info/refs without ?service=: git's dumb HTTP protocol is not served; \
                         use a git client that speaks smart HTTP (unset GIT_SMART_HTTP=0)",
                    ));
                }
            };
            Ok(Route::InfoRefs { relative, service })
        }
        "/git-upload-pack" => {
            want(&Method::POST, "POST")?;
            Ok(Route::UploadPack { relative })
        }
        _ => {
            want(&Method::POST, "POST")?;
            Ok(Route::ReceivePack { relative })
        }
    }
}

/// `%XX` sequences decoded; `None` if one is malformed or the result is not UTF-8.
pub(super) fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, query: Option<&str>) -> Result<Route, Refusal> {
        route(&Method::GET, path, query)
    }

    #[test]
    fn routes_the_three_smart_http_urls() {
        assert_eq!(
            get("/group/p.git/info/refs", Some("service=git-upload-pack")).unwrap(),
            Route::InfoRefs {
                relative: "group/p.git".into(),
                service: Service::UploadPack
            }
        );
        assert_eq!(
            get("/p/info/refs", Some("x=1&service=git-receive-pack")).unwrap(),
            Route::InfoRefs {
                relative: "p.git".into(),
                service: Service::ReceivePack
            }
        );
        assert_eq!(
            route(&Method::POST, "/a/b%20c.git/git-receive-pack", None).unwrap(),
            Route::ReceivePack {
                relative: "a/b c.git".into()
            }
        );
        assert_eq!(
            route(&Method::POST, "/a.git/git-upload-pack", None).unwrap(),
            Route::UploadPack {
                relative: "a.git".into()
            }
        );
    }

    #[test]
    fn refuses_what_is_not_smart_http() {
        assert_eq!(get("/", None).unwrap_err().status, StatusCode::NOT_FOUND);
        assert_eq!(
            get("/info/refs", Some("service=git-upload-pack"))
                .unwrap_err()
                .status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get("/p.git/info/refs", None).unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get("/p.git/info/refs", Some("service=git-frob"))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let e = get("/p.git/git-receive-pack", None).unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(e.allow, Some("POST"));
        assert_eq!(
            get("/p%zz.git/info/refs", None).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
