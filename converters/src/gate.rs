//! `OpenGate`: the only way to open a file named *inside* an image (qcow2 backing file, VMDK extent or parent,
//! VHD/VHDX parent locator). Names in images are attacker-controlled, so by default only files inside the
//! referring image's own folder are followed: no absolute paths outside it, no `..` escape, no symlink out, no
//! `json:`/protocol pseudo-filenames (CVE-2024-4467), chains at most `MAX_CHAIN_DEPTH` deep and loop-free. Only
//! regular files are opened, never blocking on a FIFO, and only at the path checked (`FileStorage::open_named`).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{FileStorage, Storage};

/// Longest backing chain followed (VMware allows 32 snapshots in a chain; qemu has no fixed cap).
pub const MAX_CHAIN_DEPTH: u32 = 32;

/// Which files named inside images may be opened, and the chain walked so far.
#[derive(Debug, Clone, Default)]
pub struct OpenGate {
    /// Extra folders (canonical) whose files may be opened even when outside the image's folder.
    allowed_dirs: Vec<PathBuf>,
    /// Refuse every named file (used by `info` on untrusted input when asked, and by unit tests).
    deny_all: bool,
    /// Canonical paths of the images already open in this chain (loop detection).
    chain: Vec<PathBuf>,
}

impl OpenGate {
    /// The default policy: only the referring image's own folder.
    pub fn new() -> Self {
        OpenGate::default()
    }

    /// A gate that refuses every named file.
    pub fn deny_all() -> Self {
        OpenGate {
            deny_all: true,
            ..OpenGate::default()
        }
    }

    /// Also allow files inside `dir` (a folder the user explicitly trusts).
    pub fn allow_dir(mut self, dir: &Path) -> Result<Self> {
        let canon = dir
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve allowed folder", dir, e))?;
        self.allowed_dirs.push(canon);
        Ok(self)
    }

    /// Depth of the chain opened so far (0 for the top image).
    pub fn depth(&self) -> u32 {
        self.chain.len().saturating_sub(1) as u32
    }

    /// Records the top-level image the user named (trusted), for loop detection.
    pub fn enter_top(&self, path: &Path) -> Self {
        let mut g = self.clone();
        if let Ok(c) = path.canonicalize() {
            g.chain.push(c);
        }
        g
    }

    /// Resolves `name`, found inside the image stored at `referrer`, to a path this gate allows, without
    /// opening it.
    pub fn resolve(&self, referrer: &Path, name: &str, what: &str) -> Result<PathBuf> {
        if self.deny_all {
            return Err(Error::denied(format!(
                "{what} '{name}' refused: opening files named inside images is disabled"
            )));
        }
        if name.is_empty() {
            return Err(Error::invalid("image", format!("empty {what} name")));
        }
        if name.contains('\0') {
            return Err(Error::denied(format!("{what} name contains a NUL byte")));
        }
        if is_pseudo_filename(name) {
            return Err(Error::denied(format!(
                "{what} '{name}' refused: protocol and json: pseudo-filenames are never followed"
            )));
        }
        let base = referrer
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let base = base
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve folder", base, e))?;
        let named = Path::new(name);
        // Rule: without a trusted folder (`allow_dir`), absolute names and `..` can never pass, so refuse them before asking the file
        // system: the message then says why even when the named file does not exist.
        let escapes = named.is_absolute()
            || named
                .components()
                .any(|c| matches!(c, Component::ParentDir));
        if escapes && self.allowed_dirs.is_empty() {
            return Err(Error::untrusted(format!(
                "{what} '{name}' refused: it is outside the image's folder {}",
                base.display()
            )));
        }
        let joined = if named.is_absolute() {
            named.to_path_buf()
        } else {
            base.join(named)
        };
        let canon = joined.canonicalize().map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("{what} '{name}' (resolved to {}): {e}", joined.display()),
            )
        })?;
        let inside_base = canon.starts_with(&base)
            && !named.is_absolute()
            && !named
                .components()
                .any(|c| matches!(c, Component::ParentDir));
        let inside_allowed = self.allowed_dirs.iter().any(|d| canon.starts_with(d));
        if !(inside_base || inside_allowed) {
            return Err(Error::untrusted(format!(
                "{what} '{name}' refused: it is outside the image's folder {}{}",
                base.display(),
                if self.allowed_dirs.is_empty() {
                    ""
                } else {
                    " and the folders trusted"
                }
            )));
        }
        if self.chain.iter().any(|c| c == &canon) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{what} '{name}' makes a loop in the backing chain"),
            ));
        }
        if self.chain.len() as u32 > MAX_CHAIN_DEPTH {
            return Err(Error::limit(
                "image",
                format!("backing chain deeper than {MAX_CHAIN_DEPTH}"),
            ));
        }
        Ok(canon)
    }

    /// Opens `name` (named inside the image at `referrer`) read-only. Returns the storage and the gate to use
    /// for whatever that file names in turn.
    pub fn open(
        &self,
        referrer: &Path,
        name: &str,
        what: &str,
    ) -> Result<(Arc<dyn Storage>, OpenGate)> {
        let canon = self.resolve(referrer, name, what)?;
        let storage = open_checked(&canon, name, what)?;
        let mut child = self.clone();
        child.chain.push(canon);
        Ok((Arc::new(storage), child))
    }

    /// Whether the canonical path `canon` lies inside a folder the user trusted (`allow_dir`). Formats
    /// with rules stricter than "the image's own folder" (VMDK extent names) let such files pass them.
    pub fn is_in_allowed_dir(&self, canon: &Path) -> bool {
        self.allowed_dirs.iter().any(|d| canon.starts_with(d))
    }
}

/// Opens the file `resolve` checked at `canon` without following a symlink swapped in since, without blocking
/// on a FIFO, and only if it is a regular file.
fn open_checked(canon: &Path, name: &str, what: &str) -> Result<FileStorage> {
    FileStorage::open_named(canon).map_err(|e| e.context(format!("{what} '{name}'")))
}

/// `json:{...}`, `nbd://`, `file:foo`, `http:`...: anything with a protocol prefix before the first `/`.
fn is_pseudo_filename(name: &str) -> bool {
    let head = name.split('/').next().unwrap_or("");
    match head.find(':') {
        Some(i) => {
            let proto = &head[..i];
            !proto.is_empty()
                && proto
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("img");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(dir.path().join("outside"), b"x").unwrap();
        std::fs::write(sub.join("base"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), sub.join("link")).unwrap();
        let top = sub.join("top");
        std::fs::write(&top, b"x").unwrap();
        let g = OpenGate::new().enter_top(&top);
        assert!(g.resolve(&top, "base", "backing file").is_ok());
        assert!(g.resolve(&top, "./base", "backing file").is_ok());
        for bad in [
            "/etc/passwd",
            "../outside",
            "link",
            "json:{\"file\":\"/etc/passwd\"}",
            "nbd://x/y",
            "top",
            "",
        ] {
            assert!(
                g.resolve(&top, bad, "backing file").is_err(),
                "{bad} must be refused"
            );
        }
        // refused for the rule, not for a missing file
        let e = g.resolve(&top, "../not-there", "backing file").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
        assert!(e.to_string().contains("outside the image's folder"), "{e}");
        assert!(e.is_untrusted(), "{e}");
        let g2 = OpenGate::new().allow_dir(dir.path()).unwrap();
        assert!(g2.resolve(&top, "../outside", "backing file").is_ok());
        assert!(
            OpenGate::deny_all()
                .resolve(&top, "base", "backing file")
                .is_err()
        );
    }

    #[test]
    fn pseudo_filenames() {
        assert!(is_pseudo_filename("json:{}"));
        assert!(is_pseudo_filename("file:foo"));
        assert!(!is_pseudo_filename("dir/a:b"));
        assert!(!is_pseudo_filename("plain.qcow2"));
    }
}
