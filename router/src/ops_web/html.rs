//! HTML for the ops web: escaping, the page shell (title, navigation, who is logged
//! in, the stylesheet served from `/static/`), tables and the small building blocks
//! the pages share. Pure string building, no I/O; every value that came from etcd,
//! a URL or a form goes through [`esc`] (text) or [`attr`] (attribute values).
//!
//! No page carries script: the Content-Security-Policy the listener sends forbids it,
//! and everything works with JavaScript off.

use std::fmt::Write;

/// The stylesheet, served as `/static/ops.css` (the policy allows no inline style).
pub const STYLESHEET: &str = include_str!("ops.css");

/// `s` escaped for HTML text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` escaped for a double-quoted attribute value.
pub fn attr(s: &str) -> String {
    esc(s)
}

/// `s` percent-encoded for one URL path segment or query value.
pub fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The URL of a repository's page: `/repos/<storage>/<path>`, each path segment
/// encoded on its own so the slashes stay.
pub fn repo_url(repo: &str) -> String {
    let encoded: Vec<String> = repo.split('/').map(url_part).collect();
    format!("/repos/{}", encoded.join("/"))
}

/// A link to a repository's page.
pub fn repo_link(repo: &str) -> String {
    format!("<a href=\"{}\">{}</a>", attr(&repo_url(repo)), esc(repo))
}

/// A link to a node's page.
pub fn node_link(node: &str) -> String {
    format!(
        "<a href=\"/nodes/{}\">{}</a>",
        attr(&url_part(node)),
        esc(node)
    )
}

/// Who is looking, for the page header.
pub struct Viewer<'a> {
    pub user: &'a str,
    pub role: &'a str,
    /// The session's CSRF token, for the logout form.
    pub csrf: &'a str,
}

/// A whole page: `body` is already HTML.
pub fn page(title: &str, viewer: Option<&Viewer<'_>>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    let _ = write!(
        out,
        "<title>{} · refvote</title><link rel=\"stylesheet\" href=\"/static/ops.css\"></head><body>",
        esc(title)
    );
    out.push_str("<header><nav><a class=\"brand\" href=\"/\">refvote</a>");
    if let Some(v) = viewer {
        out.push_str(
            "<a href=\"/\">Overview</a><a href=\"/repairs\">Repairs and data loss</a>\
             <a href=\"/search\">Search</a>",
        );
        let _ = write!(
            out,
            "<span class=\"who\">{} ({})<form method=\"post\" action=\"/logout\">{}\
             <button type=\"submit\">Log out</button></form></span>",
            esc(v.user),
            esc(v.role),
            csrf_field(v.csrf)
        );
    }
    out.push_str("</nav></header><main>");
    let _ = write!(out, "<h1>{}</h1>", esc(title));
    out.push_str(body);
    out.push_str("</main></body></html>\n");
    out
}

/// The hidden field every form carries.
pub fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        attr(token)
    )
}

/// A table; `rows` are already HTML cells.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(
            out,
            "<tr><td colspan=\"{}\" class=\"none\">none</td></tr>",
            headers.len().max(1)
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// A state word in a coloured badge: `good`, `warn` or `bad`.
pub fn badge(kind: &str, text: &str) -> String {
    format!("<span class=\"badge {}\">{}</span>", attr(kind), esc(text))
}

/// A message box (`ok` or `error`).
pub fn notice(kind: &str, text: &str) -> String {
    format!("<p class=\"notice {}\">{}</p>", attr(kind), esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(url_part("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(
            repo_url("default/group/<x>.git"),
            "/repos/default/group/%3Cx%3E.git"
        );
        let link = repo_link("default/a\"b.git");
        assert!(link.contains("/repos/default/a%22b.git"), "{link}");
        assert!(link.contains(">default/a&quot;b.git<"), "{link}");
    }

    #[test]
    fn pages_carry_no_script_and_escape_the_title() {
        let v = Viewer {
            user: "<eve>",
            role: "viewer",
            csrf: "t\"k",
        };
        let p = page("<title>", Some(&v), "<p>body</p>");
        assert!(!p.contains("<script"), "{p}");
        assert!(p.contains("&lt;title&gt;"));
        assert!(p.contains("&lt;eve&gt;"));
        assert!(p.contains("value=\"t&quot;k\""));
        let t = table(&["A"], &[]);
        assert!(t.contains("none"));
    }
}
