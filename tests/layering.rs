//! Layering: which module may name which. Every `.rs` file under `src/` and `converters/src/` is scanned for the
//! paths it names (`use` trees expanded, `crate::`/`super::`/`self::` resolved against the file's module and its
//! inline `mod` blocks, external crates by name), with comments and string literals left out; each rule in
//! [`RULES`] forbids some of those paths to some modules. A violation fails the test with `file:line`, the path
//! named and the rule's reason. The converters' manifest is checked too (a forbidden crate cannot sneak in as a
//! dependency), and so are the converters' messages (they never name a command-line flag).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One layering rule: modules matching `from` never name a path matching one of `forbid`.
///
/// Patterns are `::`-separated segments matched as a prefix of the path (`imgshift::cli` matches
/// `imgshift::cli::TrustArgs`); a segment ending in `*` matches segments starting with what precedes it
/// (`aws_*`); a trailing `$` matches that module only, not its children. `{target}` in `from` stands for each
/// target (a folder under `src/targets/`), `{other}` in `forbid` for every target but that one, and `{shared}`
/// for what the targets share (`src/targets/mod.rs` and the files beside it).
struct Rule {
    from: &'static str,
    forbid: &'static [&'static str],
    why: &'static str,
}

/// The crates that are a CLI, a cloud, libvirt or guest inspection: none belongs in the converters library.
const NOT_CONVERTERS: &[&str] = &[
    "imgshift",
    "clap",
    "indicatif",
    "aws_*",
    "azure_*",
    "reqwest",
    "tokio",
    "virt",
    "gpt",
    "mbrman",
    "ext4_view",
    "fatfs",
    "ntfs",
];

const RULES: &[Rule] = &[
    Rule {
        from: "imgshift_converters",
        forbid: NOT_CONVERTERS,
        why: "the converters library knows no CLI, cloud, libvirt or guest: its errors say what is wrong (the CLI \
              adds the hint), so any program can embed it",
    },
    Rule {
        from: "imgshift::targets::{target}",
        forbid: &["imgshift::cli", "imgshift::commands", "imgshift::runner"],
        why: "a target is the lower layer: the commands and the job runner call it with plain settings, it never \
              reaches up into them or into the CLI's types",
    },
    Rule {
        from: "imgshift::targets::{target}",
        forbid: &["imgshift::targets::{other}"],
        why: "targets never import each other: what two targets share (retry classification, read-back maps) \
              lives in a shared module under src/targets/",
    },
    Rule {
        from: "imgshift::targets::{shared}",
        forbid: &[
            "imgshift::targets::{other}",
            "imgshift::cli",
            "imgshift::commands",
            "imgshift::runner",
        ],
        why: "what the targets share depends on no one target (nor on the layers above the targets)",
    },
    Rule {
        from: "imgshift::guest",
        forbid: &[
            "imgshift::targets",
            "imgshift::commands",
            "imgshift::cli",
            "imgshift::runner",
            "imgshift::job",
        ],
        why: "guest inspection reads a disk and states facts (partitions, ESP, boot mode, OS); the targets and \
              commands use those facts, never the other way round",
    },
    Rule {
        from: "imgshift::runner",
        forbid: &["imgshift::commands", "imgshift::cli"],
        why: "the job runner is below the commands: it takes a target and plain settings; what both need \
              (opening sources, naming) lives in a module below both",
    },
    Rule {
        from: "imgshift::job",
        forbid: &[
            "imgshift::runner",
            "imgshift::targets",
            "imgshift::commands",
            "imgshift::cli",
        ],
        why: "a job (its journal, disks and the Target trait every target implements) is below the targets and \
              the runner: it names no target and no runner",
    },
    Rule {
        from: "imgshift::journal",
        forbid: &[
            "imgshift::job",
            "imgshift::runner",
            "imgshift::targets",
            "imgshift::commands",
            "imgshift::cli",
        ],
        why: "the journal stores a job's state; it knows nothing above it",
    },
];

/// Violations known and being fixed elsewhere: (file, path prefix named). Each entry must still be violated
/// (a stale entry fails the test, so the list only shrinks).
const KNOWN_EXCEPTIONS: &[(&str, &str)] = &[];

/// A path named in a file, at a line.
#[derive(Debug)]
struct Named {
    line: usize,
    path: Vec<String>,
}

// ---- lexing -------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Sep, // ::
    Punct(char),
}

/// A string literal's contents and the line it starts on.
type StringLit = (usize, String);

/// Tokens of Rust source with their lines: comments, string/char literals and lifetimes are dropped (string
/// literals are returned separately with their lines).
fn lex(src: &str) -> (Vec<(usize, Tok)>, Vec<StringLit>) {
    let c: Vec<char> = src.chars().collect();
    let (mut toks, mut strings) = (Vec::new(), Vec::new());
    let (mut i, mut line) = (0usize, 1usize);
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if (ch == 'r' || (ch == 'b' && at(i + 1) == 'r'))
            && matches!(at(i + 1 + usize::from(ch == 'b')), '#' | '"')
            && !prev_is_ident(&c, i)
        {
            // raw string r"…", r#"…"#, br"…"
            let mut j = i + 1 + usize::from(ch == 'b');
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                // r#ident (a raw identifier)
                let start = j;
                while at(j).is_alphanumeric() || at(j) == '_' {
                    j += 1;
                }
                toks.push((line, Tok::Ident(c[start..j].iter().collect())));
                i = j;
                continue;
            }
            j += 1;
            let start_line = line;
            let start = j;
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#') {
                    break;
                }
                if c[j] == '\n' {
                    line += 1;
                }
                j += 1;
            }
            strings.push((start_line, c[start..j.min(c.len())].iter().collect()));
            i = j + 1 + hashes;
        } else if ch == '"' || (ch == 'b' && at(i + 1) == '"') {
            let mut j = i + 1 + usize::from(ch == 'b');
            let start_line = line;
            let mut s = String::new();
            while j < c.len() && c[j] != '"' {
                if c[j] == '\\' {
                    s.push(c[j]);
                    j += 1;
                }
                if j < c.len() {
                    if c[j] == '\n' {
                        line += 1;
                    }
                    s.push(c[j]);
                }
                j += 1;
            }
            strings.push((start_line, s));
            i = j + 1;
        } else if ch == '\'' {
            // a char literal ('x', '\n', '\u{..}') or a lifetime ('a)
            if at(i + 1) == '\\' {
                let mut j = i + 3;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            toks.push((line, Tok::Ident(c[start..i].iter().collect())));
        } else if ch == ':' && at(i + 1) == ':' {
            toks.push((line, Tok::Sep));
            i += 2;
        } else {
            toks.push((line, Tok::Punct(ch)));
            i += 1;
        }
    }
    (toks, strings)
}

fn prev_is_ident(c: &[char], i: usize) -> bool {
    i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_')
}

// ---- paths named ------------------------------------------------------------------------------------------------

/// Expands the use tree starting at `toks[*i]` under `prefix`, pushing every full path; stops after the tree.
fn use_tree(toks: &[(usize, Tok)], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Named>) {
    let mut path = prefix;
    let line = toks.get(*i).map_or(0, |t| t.0);
    loop {
        match toks.get(*i).map(|t| &t.1) {
            Some(Tok::Ident(s)) => {
                if s != "self" {
                    path.push(s.clone());
                }
                *i += 1;
                if let Some(Tok::Ident(a)) = toks.get(*i).map(|t| &t.1)
                    && a == "as"
                {
                    *i += 2; // `as name`
                }
            }
            Some(Tok::Sep) => *i += 1,
            Some(Tok::Punct('*')) => {
                *i += 1;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                loop {
                    match toks.get(*i).map(|t| &t.1) {
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        None => return,
                        _ => use_tree(toks, i, path.clone(), out),
                    }
                }
            }
            _ => break,
        }
    }
    if !path.is_empty() {
        out.push(Named { line, path });
    }
}

/// Every path a file names, resolved: `crate`/`super`/`self` against `module` (and the inline `mod` blocks the
/// path sits in); other paths as written (their first segment is an external crate, a local item or an import,
/// and only crate names matter to the rules).
fn named_paths(toks: &[(usize, Tok)], krate: &str, module: &[String]) -> Vec<Named> {
    let mut out = Vec::new();
    // inline modules: (name, brace depth at which it closes)
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let here = |inline: &Vec<(String, usize)>| -> Vec<String> {
        let mut m = module.to_vec();
        m.extend(inline.iter().map(|(n, _)| n.clone()));
        m
    };
    while i < toks.len() {
        match &toks[i].1 {
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(k) if k == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Punct('{'))) =
                    (toks.get(i + 1).map(|t| &t.1), toks.get(i + 2).map(|t| &t.1))
                {
                    inline.push((name.clone(), depth + 1));
                }
                i += 1;
            }
            Tok::Ident(k) if k == "use" => {
                i += 1;
                let mut raw = Vec::new();
                if toks.get(i).map(|t| &t.1) == Some(&Tok::Sep) {
                    i += 1; // `use ::crate_name`
                }
                use_tree(toks, &mut i, Vec::new(), &mut raw);
                let m = here(&inline);
                out.extend(raw.into_iter().filter_map(|n| {
                    Some(Named {
                        line: n.line,
                        path: resolve(&n.path, krate, &m)?,
                    })
                }));
            }
            Tok::Ident(first) => {
                let prev_sep = i > 0 && toks[i - 1].1 == Tok::Sep;
                let mut path = vec![first.clone()];
                let line = toks[i].0;
                let mut j = i + 1;
                while toks.get(j).map(|t| &t.1) == Some(&Tok::Sep) {
                    match toks.get(j + 1).map(|t| &t.1) {
                        Some(Tok::Ident(s)) => {
                            path.push(s.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                if !prev_sep
                    && path.len() > 1
                    && let Some(p) = resolve(&path, krate, &here(&inline))
                {
                    out.push(Named { line, path: p });
                }
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// `path` made absolute when it starts with `crate`, `super` or `self`; as written otherwise.
fn resolve(path: &[String], krate: &str, module: &[String]) -> Option<Vec<String>> {
    let mut p = path.iter().peekable();
    let mut base: Vec<String> = match p.peek().map(|s| s.as_str()) {
        Some("crate") => {
            p.next();
            vec![krate.to_string()]
        }
        Some("self") => {
            p.next();
            module.to_vec()
        }
        Some("super") => {
            let mut m = module.to_vec();
            while p.peek().map(|s| s.as_str()) == Some("super") {
                p.next();
                m.pop();
            }
            m
        }
        Some(_) => Vec::new(),
        None => return None,
    };
    base.extend(p.cloned());
    Some(base)
}

// ---- the rules ----------------------------------------------------------------------------------------------------

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `.rs` files under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module a file is (`src/targets/aws/mod.rs` → `imgshift::targets::aws`).
fn module_of(krate: &str, src_dir: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src_dir).unwrap().with_extension("");
    let mut m = vec![krate.to_string()];
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for (k, part) in parts.iter().enumerate() {
        let last = k + 1 == parts.len();
        if last && (part == "mod" || part == "main" || part == "lib") {
            break;
        }
        m.push(part.clone());
    }
    m
}

/// Does `path` match `pattern` (see [`Rule`])?
fn matches(pattern: &str, path: &[String]) -> bool {
    let (pattern, exact) = match pattern.strip_suffix('$') {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    let segs: Vec<&str> = pattern.split("::").collect();
    if path.len() < segs.len() || (exact && path.len() != segs.len()) {
        return false;
    }
    segs.iter()
        .zip(path)
        .all(|(s, p)| match s.strip_suffix('*') {
            Some(prefix) => p.starts_with(prefix),
            None => s == p,
        })
}

/// The rules with `{target}`, `{other}` and `{shared}` expanded: (from, forbidden, why).
fn expanded_rules(
    targets: &[String],
    shared: &[String],
) -> Vec<(String, Vec<String>, &'static str)> {
    let mut out = Vec::new();
    for r in RULES {
        let froms: Vec<(String, Option<&String>)> = if r.from.contains("{target}") {
            targets
                .iter()
                .map(|t| (r.from.replace("{target}", t), Some(t)))
                .collect()
        } else if r.from.contains("{shared}") {
            let mut v = vec![(r.from.replace("::{shared}", "$"), None)];
            v.extend(shared.iter().map(|s| (r.from.replace("{shared}", s), None)));
            v
        } else {
            vec![(r.from.to_string(), None)]
        };
        for (from, own) in froms {
            let mut forbid = Vec::new();
            for f in r.forbid {
                if f.contains("{other}") {
                    forbid.extend(
                        targets
                            .iter()
                            .filter(|t| Some(*t) != own)
                            .map(|t| f.replace("{other}", t)),
                    );
                } else {
                    forbid.push(f.to_string());
                }
            }
            out.push((from, forbid, r.why));
        }
    }
    out
}

#[test]
fn modules_name_only_what_their_layer_may() {
    let targets_dir = root().join("src/targets");
    let (mut targets, mut shared) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(&targets_dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            targets.push(name);
        } else if let Some(stem) = name.strip_suffix(".rs")
            && stem != "mod"
        {
            shared.push(stem.to_string());
        }
    }
    targets.sort();
    assert!(
        ["aws", "azure", "libvirt"]
            .iter()
            .all(|t| targets.iter().any(|x| x == t)),
        "the targets under src/targets/ are not found: {targets:?}"
    );
    let rules = expanded_rules(&targets, &shared);

    let mut violations = Vec::new();
    let mut excused = BTreeSet::new();
    let mut files = 0;
    // Every rule must guard some module: one whose modules were renamed away would pass vacuously.
    let mut guarding = BTreeSet::new();
    for (krate, src) in [
        ("imgshift", root().join("src")),
        ("imgshift_converters", root().join("converters/src")),
    ] {
        for file in rust_files(&src) {
            files += 1;
            let rel = file
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&file).unwrap();
            let module = module_of(krate, &src, &file);
            let (toks, _) = lex(&text);
            for (from, _, _) in &rules {
                if matches(from, &module) {
                    guarding.insert(from.clone());
                }
            }
            for named in named_paths(&toks, krate, &module) {
                for (from, forbid, why) in &rules {
                    if !matches(from, &module) {
                        continue;
                    }
                    let Some(f) = forbid.iter().find(|f| matches(f, &named.path)) else {
                        continue;
                    };
                    if let Some(k) = KNOWN_EXCEPTIONS
                        .iter()
                        .find(|(ef, ep)| *ef == rel && matches(ep, &named.path))
                    {
                        excused.insert(*k);
                        continue;
                    }
                    violations.push(format!(
                        "{rel}:{}: {} names {} (forbidden: {f}): {why}",
                        named.line,
                        module.join("::"),
                        named.path.join("::")
                    ));
                }
            }
        }
    }
    assert!(files > 50, "only {files} source files found");
    let idle: Vec<&String> = rules
        .iter()
        .map(|(from, _, _)| from)
        .filter(|f| !guarding.contains(*f))
        .collect();
    assert!(
        idle.is_empty(),
        "rules that match no module (renamed? update RULES): {idle:?}"
    );
    let stale: Vec<String> = KNOWN_EXCEPTIONS
        .iter()
        .filter(|k| !excused.contains(*k))
        .map(|(f, p)| format!("{f} no longer names {p}: remove it from KNOWN_EXCEPTIONS"))
        .collect();
    assert!(
        violations.is_empty() && stale.is_empty(),
        "{} layering violation(s):\n{}\n{}",
        violations.len(),
        violations.join("\n"),
        stale.join("\n")
    );
}

/// The converters' manifest lists none of the crates its code may not name.
#[test]
fn converters_depend_on_no_cli_cloud_or_guest_crate() {
    let manifest = std::fs::read_to_string(root().join("converters/Cargo.toml")).unwrap();
    let mut bad = Vec::new();
    let mut section = String::new();
    for (n, line) in manifest.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            section = l.to_string();
            continue;
        }
        if !section.contains("dependencies") || section.contains("dev-dependencies") {
            continue;
        }
        let Some(name) = l.split(['=', ' ', '.']).next().filter(|s| !s.is_empty()) else {
            continue;
        };
        let name = name.replace('-', "_");
        if NOT_CONVERTERS
            .iter()
            .any(|p| matches(p, std::slice::from_ref(&name)))
        {
            bad.push(format!("converters/Cargo.toml:{}: {l}", n + 1));
        }
    }
    assert!(
        bad.is_empty(),
        "the converters library depends on a CLI, cloud or guest crate ({}):\n{}",
        RULES[0].why,
        bad.join("\n")
    );
}

/// The converters' messages say what is wrong; a hint naming a command-line flag is the CLI's to add.
#[test]
fn converters_messages_name_no_command_line_flag() {
    let mut bad = Vec::new();
    for file in rust_files(&root().join("converters/src")) {
        let rel = file.strip_prefix(root()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may spell out what the CLI shows.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (line, s) in lex(code).1 {
            let flag = s.match_indices("--").find(|(k, _)| {
                s[k + 2..].starts_with(|c: char| c.is_ascii_lowercase())
                    && (*k == 0 || !s[..*k].ends_with(|c: char| c.is_alphanumeric()))
            });
            if flag.is_some() {
                bad.push(format!("{rel}:{line}: {s:?}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "the converters library names command-line flags in its messages (it says what is wrong; the CLI adds \
         the hint):\n{}",
        bad.join("\n")
    );
}

/// The scanner itself: use trees, relative paths, inline modules, comments and strings.
#[test]
fn the_scanner_resolves_what_it_reads() {
    let src = r##"
        use crate::cli::{self, TrustArgs as T, sub::{A, B}};
        use super::retry::Policy;
        // use crate::commands::gate;
        /* use crate::migrate; */
        fn f() { let s = "crate::commands::x"; let r = r#"crate::commands::y"#; let c = '"'; crate::journal::save(); }
        mod tests {
            use super::*;
            fn g() { super::super::sibling::h(); aws_sdk_ec2::Client::new(); }
        }
    "##;
    let m: Vec<String> = ["imgshift", "targets", "azure", "retry"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (toks, strings) = lex(src);
    let got: Vec<String> = named_paths(&toks, "imgshift", &m)
        .iter()
        .map(|n| format!("{}:{}", n.line, n.path.join("::")))
        .collect();
    assert_eq!(
        got,
        [
            "2:imgshift::cli",
            "2:imgshift::cli::TrustArgs",
            "2:imgshift::cli::sub::A",
            "2:imgshift::cli::sub::B",
            "3:imgshift::targets::azure::retry::Policy",
            "6:imgshift::journal::save",
            "8:imgshift::targets::azure::retry",
            "9:imgshift::targets::azure::sibling::h",
            "9:aws_sdk_ec2::Client::new",
        ]
    );
    assert_eq!(strings.len(), 2, "{strings:?}");
    assert!(matches("imgshift::targets$", &m[..2]));
    assert!(!matches("imgshift::targets$", &m));
    assert!(matches("aws_*", &["aws_sdk_ebs".to_string()]));
    assert!(!matches("imgshift", &["imgshift_converters".to_string()]));
}
