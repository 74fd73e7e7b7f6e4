//! `imgshift completions SHELL`, `imgshift man` and `--version`: generated output that the shells and groff
//! accept, and a version that names the commit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn imgshift(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_imgshift"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imgshift {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn bash_completion_parses_and_knows_the_commands() {
    let out = imgshift(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("imgshift.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["convert", "upload", "libvirt", "migrate", "--connect"] {
        assert!(text.contains(word), "no {word} in the bash completion");
    }
}

#[test]
fn other_shells_get_their_scripts() {
    for (shell, marker) in [
        ("zsh", "#compdef imgshift"),
        ("fish", "complete -c imgshift"),
        ("powershell", "Register-ArgumentCompleter"),
        ("elvish", "edit:completion:arg-completer[imgshift]"),
    ] {
        let out = imgshift(&["completions", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: no '{marker}'");
        assert!(text.contains("migrate"), "{shell}: no subcommands");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_imgshift"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_page_renders_with_groff() {
    let out = imgshift(&["man"]);
    let roff = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        roff.starts_with(".ie \\n(.g") || roff.contains(".TH imgshift"),
        "{roff:.200}"
    );
    let mut groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run groff ({e}): install groff-base"));
    {
        use std::io::Write;
        groff.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    }
    let r = groff.wait_with_output().unwrap();
    // grotty marks bold and underline by overstriking ("N\x08N"): keep the last character of each.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&r.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    assert!(
        r.status.success(),
        "groff: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        r.stderr.is_empty(),
        "groff warnings: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    for word in [
        "NAME",
        "SYNOPSIS",
        "imgshift",
        "convert",
        "migrate",
        "completions",
    ] {
        assert!(
            text.contains(word),
            "no {word} in the rendered page:\n{text}"
        );
    }
}

#[test]
fn version_names_the_commit_in_a_git_checkout() {
    let out = imgshift(&["--version"]);
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.starts_with(&format!("imgshift {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(h) if h.status.success() => {
            let h = String::from_utf8_lossy(&h.stdout).trim().to_string();
            assert!(
                v.contains(&format!("({h})")),
                "'{v}' does not name commit {h}"
            );
        }
        // Not a git checkout (a source tarball): the version alone.
        _ => assert_eq!(v.trim(), format!("imgshift {}", env!("CARGO_PKG_VERSION"))),
    }
}
