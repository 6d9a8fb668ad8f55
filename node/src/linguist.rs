//! What kind of file a path is, as GitLab sees it through Gitaly's linguist (go-enry,
//! a port of GitHub's linguist): its language (with linguist's name, colour and id),
//! and whether it is vendored, documentation or generated. No I/O.
//!
//! This is our own, smaller table: the ~60 languages GitLab projects mostly hold,
//! found by file name, extension or `#!` interpreter, with the values linguist gives
//! them; the vendored and documentation path rules are the common part of linguist's;
//! the generated-file rules are linguist's name rules plus its content rules for
//! minified JavaScript/CSS, source maps and the "Code generated"/"DO NOT EDIT"
//! headers of Go, protobuf and Dart. Where go-enry would need its content heuristics
//! or classifier (a `.h` that is C++, a `.m` that is MATLAB), this table takes the
//! most common language; a language it does not know is not counted.

use std::sync::LazyLock;

use regex::Regex;

/// linguist's kind of language; only programming and markup are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Programming,
    Markup,
    Data,
    Prose,
}

#[derive(Debug)]
pub struct Language {
    pub name: &'static str,
    pub color: &'static str,
    pub id: i64,
    pub kind: Kind,
    extensions: &'static [&'static str],
    filenames: &'static [&'static str],
    interpreters: &'static [&'static str],
}

macro_rules! lang {
    ($name:expr, $color:expr, $id:expr, $kind:ident, [$($ext:expr),*], [$($file:expr),*], [$($int:expr),*]) => {
        Language {
            name: $name,
            color: $color,
            id: $id,
            kind: Kind::$kind,
            extensions: &[$($ext),*],
            filenames: &[$($file),*],
            interpreters: &[$($int),*],
        }
    };
}

/// Name, colour and id as linguist's `languages.yml` has them.
static LANGUAGES: &[Language] = &[
    lang!(
        "Assembly",
        "#6E4C13",
        24,
        Programming,
        [".asm", ".nasm", ".s"],
        [],
        []
    ),
    lang!(
        "Batchfile",
        "#C1F12E",
        29,
        Programming,
        [".bat", ".cmd"],
        [],
        []
    ),
    lang!("C", "#555555", 41, Programming, [".c", ".h"], [], ["tcc"]),
    lang!("C#", "#178600", 42, Programming, [".cs", ".csx"], [], []),
    lang!(
        "C++",
        "#f34b7d",
        43,
        Programming,
        [
            ".cpp", ".cc", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp", ".tpp"
        ],
        [],
        []
    ),
    lang!(
        "CMake",
        "#DA3434",
        47,
        Programming,
        [".cmake"],
        ["CMakeLists.txt"],
        []
    ),
    lang!("CSS", "#663399", 50, Markup, [".css"], [], []),
    lang!(
        "Clojure",
        "#db5855",
        62,
        Programming,
        [".clj", ".cljc", ".cljs", ".edn"],
        [],
        []
    ),
    lang!(
        "CoffeeScript",
        "#244776",
        63,
        Programming,
        [".coffee"],
        ["Cakefile"],
        ["coffee"]
    ),
    lang!(
        "Crystal",
        "#000100",
        72,
        Programming,
        [".cr"],
        [],
        ["crystal"]
    ),
    lang!("D", "#ba595e", 80, Programming, [".d", ".di"], [], []),
    lang!("Dart", "#00B4AB", 87, Programming, [".dart"], [], ["dart"]),
    lang!(
        "Dockerfile",
        "#384d54",
        89,
        Programming,
        [".dockerfile"],
        ["Dockerfile", "Containerfile"],
        []
    ),
    lang!(
        "Elixir",
        "#6e4a7e",
        100,
        Programming,
        [".ex", ".exs"],
        ["mix.lock"],
        ["elixir"]
    ),
    lang!("Elm", "#60B5CC", 101, Programming, [".elm"], [], []),
    lang!(
        "Emacs Lisp",
        "#c065db",
        102,
        Programming,
        [".el"],
        [".emacs"],
        []
    ),
    lang!(
        "Erlang",
        "#B83998",
        104,
        Programming,
        [".erl", ".hrl"],
        ["rebar.config"],
        ["escript"]
    ),
    lang!(
        "F#",
        "#b845fc",
        105,
        Programming,
        [".fs", ".fsi", ".fsx"],
        [],
        []
    ),
    lang!(
        "Fortran",
        "#4d41b1",
        107,
        Programming,
        [".f", ".f90", ".for"],
        [],
        []
    ),
    lang!("Gherkin", "#5B2063", 76, Programming, [".feature"], [], []),
    lang!("Go", "#00ADD8", 132, Programming, [".go"], [], []),
    lang!(
        "Groovy",
        "#4298b8",
        142,
        Programming,
        [".groovy", ".gradle"],
        ["Jenkinsfile"],
        ["groovy"]
    ),
    lang!(
        "HCL",
        "#844FBA",
        144,
        Programming,
        [".hcl", ".tf", ".tfvars"],
        [],
        []
    ),
    lang!(
        "HTML",
        "#e34c26",
        146,
        Markup,
        [".html", ".htm", ".xhtml"],
        [],
        []
    ),
    lang!("Haml", "#ece2a9", 154, Markup, [".haml"], [], []),
    lang!(
        "Handlebars",
        "#f7931e",
        155,
        Markup,
        [".handlebars", ".hbs"],
        [],
        []
    ),
    lang!(
        "Haskell",
        "#5e5086",
        157,
        Programming,
        [".hs", ".hs-boot", ".hsc"],
        [],
        ["runghc", "runhaskell"]
    ),
    lang!("JSON", "#292929", 174, Data, [".json"], [], []),
    lang!("Java", "#b07219", 181, Programming, [".java"], [], []),
    lang!(
        "JavaScript",
        "#f1e05a",
        183,
        Programming,
        [".js", ".cjs", ".mjs", ".jsx"],
        ["Jakefile"],
        ["node", "nodejs"]
    ),
    lang!("Julia", "#a270ba", 184, Programming, [".jl"], [], ["julia"]),
    lang!(
        "Jupyter Notebook",
        "#DA5B0B",
        185,
        Markup,
        [".ipynb"],
        [],
        []
    ),
    lang!(
        "Kotlin",
        "#A97BFF",
        189,
        Programming,
        [".kt", ".kts", ".ktm"],
        [],
        []
    ),
    lang!("Less", "#1d365d", 198, Markup, [".less"], [], []),
    lang!("Lua", "#000080", 213, Programming, [".lua"], [], ["lua"]),
    lang!(
        "Makefile",
        "#427819",
        220,
        Programming,
        [".mk", ".mak"],
        ["Makefile", "makefile", "GNUmakefile"],
        ["make"]
    ),
    lang!(
        "Markdown",
        "#083fa1",
        222,
        Prose,
        [".md", ".markdown"],
        [],
        []
    ),
    lang!("Nim", "#ffc200", 249, Programming, [".nim"], [], []),
    lang!("Nix", "#7e7eff", 252, Programming, [".nix"], [], []),
    lang!(
        "OCaml",
        "#ef7a08",
        255,
        Programming,
        [".ml", ".mli"],
        [],
        ["ocaml"]
    ),
    lang!("Objective-C", "#438eff", 257, Programming, [".m"], [], []),
    lang!(
        "PHP",
        "#4F5D95",
        272,
        Programming,
        [".php", ".phtml"],
        [],
        ["php"]
    ),
    lang!(
        "Pascal",
        "#E3F171",
        281,
        Programming,
        [".pas", ".pp"],
        [],
        []
    ),
    lang!(
        "Perl",
        "#0298c3",
        282,
        Programming,
        [".pl", ".pm", ".t"],
        [],
        ["perl"]
    ),
    lang!(
        "PowerShell",
        "#012456",
        293,
        Programming,
        [".ps1", ".psd1", ".psm1"],
        [],
        ["pwsh"]
    ),
    lang!("Protocol Buffer", "", 297, Data, [".proto"], [], []),
    lang!(
        "Python",
        "#3572A5",
        303,
        Programming,
        [".py", ".pyi", ".pyw"],
        ["SConstruct", "SConscript"],
        ["python", "python2", "python3"]
    ),
    lang!("R", "#198CE7", 307, Programming, [".r"], [], ["Rscript"]),
    lang!(
        "Roff",
        "#ecdebe",
        141,
        Markup,
        [".roff", ".1", ".man"],
        [],
        []
    ),
    lang!(
        "Ruby",
        "#701516",
        326,
        Programming,
        [".rb", ".rake", ".gemspec", ".ru", ".rbw"],
        [
            "Gemfile",
            "Rakefile",
            "Guardfile",
            "Vagrantfile",
            "Podfile",
            "Fastfile"
        ],
        ["ruby", "jruby"]
    ),
    lang!(
        "Rust",
        "#dea584",
        327,
        Programming,
        [".rs"],
        [],
        ["rust-script"]
    ),
    lang!("SCSS", "#c6538c", 329, Markup, [".scss"], [], []),
    lang!("SQL", "#e38c00", 333, Data, [".sql"], [], []),
    lang!("Sass", "#a53b70", 340, Markup, [".sass"], [], []),
    lang!(
        "Scala",
        "#c22d40",
        341,
        Programming,
        [".scala", ".sc", ".sbt"],
        [],
        ["scala"]
    ),
    lang!(
        "Shell",
        "#89e051",
        346,
        Programming,
        [".sh", ".bash", ".zsh", ".ksh"],
        [".bashrc", ".zshrc", ".profile"],
        ["bash", "sh", "zsh", "ksh", "dash", "ash"]
    ),
    lang!("Slim", "#2b2b2b", 350, Markup, [".slim"], [], []),
    lang!("Smarty", "#f0c040", 353, Programming, [".tpl"], [], []),
    lang!("Svelte", "#ff3e00", 928734530, Markup, [".svelte"], [], []),
    lang!("Swift", "#F05138", 362, Programming, [".swift"], [], []),
    lang!("TSX", "#3178c6", 94901924, Programming, [".tsx"], [], []),
    lang!(
        "TeX",
        "#3D6117",
        369,
        Markup,
        [".tex", ".sty", ".cls"],
        [],
        []
    ),
    lang!("Twig", "#c1d026", 377, Markup, [".twig"], [], []),
    lang!(
        "TypeScript",
        "#3178c6",
        378,
        Programming,
        [".ts", ".cts", ".mts"],
        [],
        ["deno", "ts-node"]
    ),
    lang!(
        "Vim Script",
        "#199f4b",
        388,
        Programming,
        [".vim", ".vimrc"],
        [".vimrc", "_vimrc"],
        []
    ),
    lang!("Vue", "#41b883", 391, Markup, [".vue"], [], []),
    lang!(
        "XSLT",
        "#EB8CEB",
        404,
        Programming,
        [".xsl", ".xslt"],
        [],
        []
    ),
    lang!(
        "YAML",
        "#cb171e",
        407,
        Data,
        [".yml", ".yaml"],
        [".clang-format"],
        []
    ),
    lang!("Zig", "#ec915c", 646424281, Programming, [".zig"], [], []),
];

pub fn by_name(name: &str) -> Option<&'static Language> {
    LANGUAGES.iter().find(|l| l.name.eq_ignore_ascii_case(name))
}

/// The language of `path`: by file name, then extension (longest first, case-blind),
/// then by the `#!` line of `content`.
pub fn language(path: &str, content: &[u8]) -> Option<&'static Language> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if let Some(l) = LANGUAGES.iter().find(|l| l.filenames.contains(&name)) {
        return Some(l);
    }
    let lower = name.to_ascii_lowercase();
    let by_ext = LANGUAGES
        .iter()
        .flat_map(|l| l.extensions.iter().map(move |e| (*e, l)))
        .filter(|(e, _)| lower.ends_with(e) && lower.len() > e.len())
        .max_by_key(|(e, _)| e.len());
    if let Some((_, l)) = by_ext {
        return Some(l);
    }
    let interpreter = shebang(content)?;
    LANGUAGES
        .iter()
        .find(|l| l.interpreters.contains(&interpreter.as_str()))
}

/// The interpreter a `#!` line names (`#!/usr/bin/env python3` is `python3`).
fn shebang(content: &[u8]) -> Option<String> {
    let line = content.strip_prefix(b"#!")?;
    let line = line.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    let mut program = words.next()?.rsplit('/').next()?.to_owned();
    if program == "env" {
        program = words.find(|w| !w.starts_with('-'))?.to_owned();
    }
    Some(program)
}

static VENDOR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(^|/)cache/|^[Dd]ependencies/|(^|/)dist/|^deps/|(^|/)configure$|(^|/)config\.(guess|sub)$",
        r"|(^|/)node_modules/|(^|/)bower_components/|(^|/)\.yarn/(releases|plugins|sdks|versions|unplugged)/",
        r"|(^|/)testdata/|(\.|-)min\.(js|css)$|(3rd|[Tt]hird)[-_]?[Pp]arty/|(^|/)vendors?/",
        r"|(^|/)[Ee]xtern(als?)?/|(^|/)[Vv]+endor/|^debian/|(^|/)jquery([^.]*)\.js$",
        r"|(^|/)bootstrap([^/.]*)(\..*)?\.(js|css|less|scss|styl)$|(^|/)font-?awesome\.(css|less|scss|styl)$",
        r"|(^|/)normalize\.(css|less|scss|styl)$|(.*?)\.d\.ts$|(^|/)\.vscode/|(^|/)\.github/",
        r"|(^|/)\.gitattributes$|(^|/)\.gitignore$|(^|/)\.gitmodules$|(^|/)gradlew(\.bat)?$",
        r"|(^|/)gradle/wrapper/|(^|/)mvnw(\.cmd)?$|(^|/)\.mvn/wrapper/|(^|/)[Tt]ests?/fixtures/",
        r"|(^|/)[Ss]pecs?/fixtures/|(^|/)Vagrantfile$|(^|/)\.[Dd][Ss]_[Ss]tore$|(^|/)Jenkinsfile$",
        r"|(^|/)Godeps/_workspace/|(^|/)Carthage/|(^|/)docs?/_?(build|themes?|templates?|static)/",
        r"|(^|/)env/|(^|/)angular([^.]*)\.js$|(^|/)react(-[^.]*)?\.js$|(^|/)d3(\.v\d+)?([^.]*)\.js$"
    ))
    .expect("a valid pattern")
});

static DOCUMENTATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"^[Dd]ocs?/|(^|/)[Dd]ocumentation/|(^|/)[Gg]roovydoc/|(^|/)[Jj]avadoc/|^[Mm]an/",
        r"|^[Ee]xamples/|^[Dd]emos?/|(^|/)inst/doc/|(^|/)CITATION(\.cff|(S)?(\.(bib|md))?)$",
        r"|(^|/)CHANGE(S|LOG)?(\.|$)|(^|/)CONTRIBUTING(\.|$)|(^|/)COPYING(\.|$)|(^|/)INSTALL(\.|$)",
        r"|(^|/)LICEN[CS]E(\.|$)|(^|/)[Ll]icen[cs]e(\.|$)|(^|/)README(\.|$)|(^|/)[Rr]eadme(\.|$)",
        r"|^[Ss]amples?/"
    ))
    .expect("a valid pattern")
});

pub fn is_vendored(path: &str) -> bool {
    VENDOR.is_match(path)
}

pub fn is_documentation(path: &str) -> bool {
    DOCUMENTATION.is_match(path)
}

static GENERATED_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?:^|/)\.idea/|(^Pods|/Pods)/|(^|/)Carthage/Build/|(?i:\.designer\.(cs|vb)$)",
        r"|(?i:\.feature\.cs$)|node_modules/|vendor/([-0-9A-Za-z]+\.)+(com|edu|gov|in|me|net|org|fm|io)",
        r"|(Gopkg|glide|poetry|pdm|uv|deno|composer|Cargo|Pipfile)\.lock$|(^|/)(\w+\.)?esy\.lock$",
        r"|npm-shrinkwrap\.json$|package-lock\.json$|pnpm-lock\.yaml$|(^|/)\.pnp\..*$|Godeps/",
        r"|.\.zep\.(?:c|h|php)$|Cargo\.toml\.orig$|(^|/)flake\.lock$|(^|/)MODULE\.bazel\.lock$",
        r"|(?:^|/)\.terraform\.lock\.hcl$|__generated__/|(?i:_tlb\.pas$)|(?:^|/)htmlcov/",
        r"|(?:^|.*/)\.sqlx/query-.+\.json$"
    ))
    .expect("a valid pattern")
});

static SOURCE_MAP_REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^/[*/][#@] source(?:Mapping)?URL|sourceURL=").expect("a valid pattern")
});

/// linguist's `IsGenerated` for `path` whose first bytes are `content`.
pub fn is_generated(path: &str, content: &[u8]) -> bool {
    let ext = extension(path);
    if matches!(ext.as_str(), ".nib" | ".xcworkspacedata" | ".xcuserstate") {
        return true;
    }
    if GENERATED_NAME.is_match(path) {
        return true;
    }
    let path = path.to_ascii_lowercase();
    let lines: Vec<&[u8]> = content.split(|b| *b == b'\n').collect();
    let minifiable = ext == ".js" || ext == ".css";
    if minifiable {
        // Minified: more than 110 characters per line on average.
        let chars: usize = lines.iter().map(|l| l.len()).sum();
        if !lines.is_empty() && chars / lines.len() > 110 {
            return true;
        }
        let tail = lines.iter().rev().take(2);
        if tail
            .filter_map(|l| std::str::from_utf8(l).ok())
            .any(|l| SOURCE_MAP_REFERENCE.is_match(l))
        {
            return true;
        }
    }
    if path.ends_with(".js.map") || path.ends_with(".css.map") {
        return true;
    }
    let first = lines.first().copied().unwrap_or_default();
    if first.starts_with(b"{\"version\":") || first.starts_with(b"/** Begin line maps. **/{") {
        return true;
    }
    let contains = |n: usize, needle: &[u8]| {
        lines.len() > 1
            && lines
                .iter()
                .take(n)
                .any(|l| l.windows(needle.len()).any(|w| w == needle))
    };
    match ext.as_str() {
        ".go" => contains(40, b"Code generated by"),
        ".py" | ".java" | ".h" | ".cc" | ".cpp" | ".m" | ".rb" | ".php" => contains(
            3,
            b"Generated by the protocol buffer compiler.  DO NOT EDIT!",
        ),
        ".dart" => {
            let text = String::from_utf8_lossy(content).to_ascii_lowercase();
            text.lines()
                .take(3)
                .any(|l| l.contains("generated code") && l.contains("do not modify"))
        }
        _ => false,
    }
}

/// The extension of the base name, lowercase, with its dot (Go's `filepath.Ext`).
fn extension(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.rfind('.') {
        Some(i) => name[i..].to_ascii_lowercase(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_by_name_extension_and_interpreter() {
        assert_eq!(language("lib/a.rb", b"").unwrap().name, "Ruby");
        assert_eq!(language("Gemfile", b"").unwrap().name, "Ruby");
        assert_eq!(language("src/main.RS", b"").unwrap().name, "Rust");
        assert_eq!(language("x.d.ts", b"").unwrap().name, "TypeScript");
        assert_eq!(
            language("bin/run", b"#!/usr/bin/env python3\n")
                .unwrap()
                .name,
            "Python"
        );
        assert_eq!(language("bin/run", b"#!/bin/bash\n").unwrap().name, "Shell");
        assert!(language("data.bin", b"\0\0").is_none());
        let go = by_name("go").unwrap();
        assert_eq!(
            (go.color, go.id, go.kind),
            ("#00ADD8", 132, Kind::Programming)
        );
    }

    #[test]
    fn vendored_documentation_and_generated_paths() {
        assert!(is_vendored("node_modules/x/index.js"));
        assert!(is_vendored("app/vendor/lib.rb"));
        assert!(is_vendored("public/app.min.js"));
        assert!(!is_vendored("app/models/user.rb"));
        assert!(is_documentation("docs/intro.md"));
        assert!(is_documentation("README.md"));
        assert!(!is_documentation("src/docs.rs"));
        assert!(is_generated("Cargo.lock", b""));
        assert!(is_generated("web/package-lock.json", b""));
        assert!(is_generated(
            "a.go",
            b"// Code generated by protoc. DO NOT EDIT.\npackage a\n"
        ));
        assert!(!is_generated("a.go", b"package a\n"));
        let minified = format!("{}\n", "x".repeat(500));
        assert!(is_generated("app.js", minified.as_bytes()));
        assert!(is_generated("app.js.map", b""));
        assert!(!is_generated("app.js", b"let a = 1;\nlet b = 2;\n"));
    }
}
