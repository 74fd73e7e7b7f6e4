//! Sets `IMGSHIFT_VERSION` for `--version`: the package version, and the commit it was built from when the
//! source is a git checkout with git installed (`0.1.0 (1a2b3c4)`); just the version otherwise (a source
//! tarball, no git). `IMGSHIFT_GIT_COMMIT` overrides the commit (packagers).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=IMGSHIFT_GIT_COMMIT");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let commit = std::env::var("IMGSHIFT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]));
    // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs (worktrees keep HEAD in
    // their own git dir and refs in the common one).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) {
        let common = git(&["rev-parse", "--git-common-dir"])
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.clone());
        let head = dir.join("HEAD");
        let mut watch = vec![head.clone(), common.join("packed-refs")];
        if let Some(r) = std::fs::read_to_string(&head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_string()))
        {
            watch.push(common.join(r));
        }
        for p in watch.iter().filter(|p| Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    let full = match commit {
        Some(c) => format!("{version} ({c})"),
        None => version,
    };
    println!("cargo:rustc-env=IMGSHIFT_VERSION={full}");
}
