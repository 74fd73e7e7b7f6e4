//! Which files a VMDK descriptor may open as extents. qemu-img follows whatever an extent line names, and
//! services converting uploaded VMDKs with it handed out host files that way (CVE-2022-47951); here a
//! descriptor saved in a home folder could name `.ssh/id_rsa` or `.bash_history` and copy that file into the
//! converted or uploaded disk.
//!
//! Rule: by default an extent opens only when it is one of the image's disk files, as written and after
//! symlinks too:
//! - a plain file name: no path separator, not starting with '.', directly in the descriptor's own folder;
//! - named `*.vmdk` (any case), or `<stem>-<part><ext>` for the descriptor `<stem><ext>` (stem compared
//!   ignoring ASCII case; `<ext>` the descriptor's extension or `.vmdk`, either case) — the names qemu
//!   (block/vmdk.c `vmdk_co_do_create_for_extent`: "%s-flat%s", "%s-%c%03d%s" with 's' sparse, 'f' flat) and
//!   VMware (`disk-flat.vmdk`, `disk-s001.vmdk`, `disk-f001.vmdk`; `disk-000001-s001.vmdk` for snapshot link
//!   `disk-000001.vmdk`) give extents, and that [`super::writer`] writes;
//! - not the descriptor itself.
//!
//! Any `.vmdk` name passes because users rename descriptors (`Windows 10 x64.vmdk` to `win10.vmdk`, its
//! extents still `Windows 10 x64-s001.vmdk`) and copy images through case-insensitive file systems
//! (`Disk.vmdk` naming `disk-flat.vmdk`). A `.vmdk` file beside the descriptor is the user's own disk image,
//! which the user could convert directly anyway, not a host secret: keys, shell histories and documents are
//! not named `*.vmdk`, and dot files and subfolders stay out.
//!
//! A file inside a folder the user trusted (`OpenGate::allow_dir`) passes whatever its name. Either way each file
//! serves one extent line only: a real descriptor never names a file twice, and a repeated sparse extent would
//! load its grain directory again for every line.
//!
//! The parent of a snapshot link (`parentFileNameHint`) is another image, not an extent: it goes through the
//! gate's general rule, like a qcow2 backing file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::FMT;
use super::writer::split_name;
use crate::error::{Error, Result};
use crate::gate::OpenGate;
use crate::storage::{FileStorage, Storage};

/// Opens the extent files of one descriptor, enforcing the rule above.
pub(super) struct ExtentFiles {
    /// The descriptor's path as the caller gave it: relative names resolve beside it.
    given: PathBuf,
    /// Its canonical path.
    canonical: PathBuf,
    /// The canonical folder relative names resolve in (the gate's base).
    folder: PathBuf,
    /// The descriptor's file names (as given, and canonical when it differs) whose stems own extents start with.
    descriptor_names: Vec<String>,
    /// Canonical paths opened by earlier extent lines.
    opened: HashSet<PathBuf>,
}

impl ExtentFiles {
    /// The extent files of the descriptor stored at `descriptor`.
    pub(super) fn new(descriptor: &Path) -> Result<Self> {
        let canonical = descriptor
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve", descriptor, e))?;
        let parent = match descriptor.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let folder = parent
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve folder", parent, e))?;
        let mut descriptor_names = Vec::new();
        for p in [descriptor, canonical.as_path()] {
            if let Some(n) = p.file_name().and_then(|n| n.to_str())
                && !descriptor_names.iter().any(|d| d == n)
            {
                descriptor_names.push(n.to_string());
            }
        }
        Ok(ExtentFiles {
            given: descriptor.to_path_buf(),
            canonical,
            folder,
            descriptor_names,
            opened: HashSet::new(),
        })
    }

    /// Opens the extent file `name` of an extent line, read-only, through `gate`.
    pub(super) fn open(&mut self, gate: &OpenGate, name: &str) -> Result<Arc<dyn Storage>> {
        // The gate's general rules first (pseudo-filenames, absolute names, `..`, symlinks out of the folder).
        let canon = gate.resolve(&self.given, name, "VMDK extent")?;
        if canon == self.canonical {
            return Err(Error::invalid(
                FMT,
                format!("extent '{name}' is the descriptor file itself"),
            ));
        }
        if !gate.is_in_allowed_dir(&canon) && !self.is_own_file(name, &canon) {
            let (stem, ext) = self
                .descriptor_names
                .first()
                .map_or(("disk", ".vmdk"), |n| split_name(n));
            let via = if self.is_own_name(name) {
                format!(" (it leads to {})", canon.display())
            } else {
                String::new()
            };
            return Err(Error::untrusted(format!(
                "VMDK extent '{name}'{via} refused: by default a descriptor opens only its image's own extent \
                 files, those named *.vmdk or like '{stem}-flat{ext}' beside it (CVE-2022-47951), and its \
                 folder is not trusted"
            )));
        }
        if !self.opened.insert(canon.clone()) {
            return Err(Error::corrupt(
                FMT,
                format!(
                    "extent file '{name}' is named by two extent lines (a descriptor names each extent file once)"
                ),
            ));
        }
        // Opened without following a symlink swapped in since the check, and only if it is a regular file.
        let st = FileStorage::open_named(&canon)
            .map_err(|e| e.context(format!("VMDK extent '{name}'")))?;
        Ok(Arc::new(st))
    }

    /// The default rule: `name` (as written) and `canon` (the file it resolved to) are both named like a disk
    /// file of this descriptor, directly in its folder.
    fn is_own_file(&self, name: &str, canon: &Path) -> bool {
        let canon_name = canon.file_name().and_then(|n| n.to_str());
        canon.parent() == Some(self.folder.as_path())
            && self.is_own_name(name)
            && canon_name.is_some_and(|c| self.is_own_name(c))
    }

    /// `name` is named like a disk file of this descriptor.
    fn is_own_name(&self, name: &str) -> bool {
        is_plain_name(name)
            && (has_vmdk_extension(name)
                || self
                    .descriptor_names
                    .iter()
                    .any(|d| is_own_extent_name(d, name)))
    }
}

/// A file name alone: no path separator, not a dot file (`.ssh`, `.bash_history`, `.`, `..`).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.')
}

/// Named `*.vmdk`, in any case.
fn has_vmdk_extension(name: &str) -> bool {
    split_name(name).1.eq_ignore_ascii_case(".vmdk")
}

/// Whether `name` is named like an extent of the descriptor file named `descriptor`: `<stem>-<part><ext>`,
/// `<stem>` compared ignoring ASCII case, `<ext>` the descriptor's extension or `.vmdk` (either case), no path
/// separator.
pub(super) fn is_own_extent_name(descriptor: &str, name: &str) -> bool {
    if name.contains(['/', '\\']) {
        return false;
    }
    let (stem, ext) = split_name(descriptor);
    let (name_stem, name_ext) = split_name(name);
    let part = name_stem
        .get(..stem.len())
        .filter(|head| head.eq_ignore_ascii_case(stem))
        .and_then(|_| name_stem.get(stem.len()..))
        .and_then(|rest| rest.strip_prefix('-'));
    part.is_some_and(|p| !p.is_empty())
        && (name_ext.eq_ignore_ascii_case(ext) || name_ext.eq_ignore_ascii_case(".vmdk"))
}

#[cfg(test)]
mod tests {
    use super::{has_vmdk_extension, is_own_extent_name, is_plain_name};

    #[test]
    fn own_extent_names() {
        for (desc, ext) in [
            ("disk.vmdk", "disk-flat.vmdk"),
            ("disk.vmdk", "disk-s001.vmdk"),
            ("disk.vmdk", "disk-f012.VMDK"),
            ("disk.vmdk", "disk-000001-s001.vmdk"),
            ("disk-000001.vmdk", "disk-000001-s001.vmdk"),
            ("B.VMDK", "B-s001.VMDK"),
            ("a.img", "a-flat.img"),
            ("a.img", "a-flat.vmdk"),
            ("d.e.vmdk", "d.e-flat.vmdk"),
            ("noext", "noext-flat"),
            ("my disk.vmdk", "my disk-s002.vmdk"),
            // copied through a case-insensitive file system
            ("disk.vmdk", "Disk-flat.vmdk"),
            ("Disk.vmdk", "disk-flat.vmdk"),
            ("A.img", "a-flat.IMG"),
        ] {
            assert!(is_own_extent_name(desc, ext), "{desc} {ext}");
        }
        for (desc, ext) in [
            ("disk.vmdk", "disk.vmdk"),
            ("disk.vmdk", "disk-.vmdk"),
            ("disk.vmdk", "secret.txt"),
            ("disk.vmdk", "disk-flat.txt"),
            ("disk.vmdk", "disks-flat.vmdk"),
            ("disk.vmdk", "sub/disk-flat.vmdk"),
            ("disk.vmdk", "./disk-flat.vmdk"),
            ("disk.vmdk", "..\\disk-flat.vmdk"),
            ("disk.vmdk", ".bash_history"),
            ("noext", "noext-flat.txt"),
            ("noext", "noext"),
            ("dïsk.vmdk", "DÏSK-flat.vmdk"),
            ("é.vmdk", "\u{e9}x-flat.vmdk"),
        ] {
            assert!(!is_own_extent_name(desc, ext), "{desc} {ext}");
        }
    }

    #[test]
    fn plain_vmdk_names() {
        for name in ["Windows 10 x64-s001.vmdk", "disk-flat.VMDK", "x.Vmdk"] {
            assert!(is_plain_name(name) && has_vmdk_extension(name), "{name}");
        }
        for name in [".hidden.vmdk", ".vmdk", "sub/x.vmdk", "a\\b.vmdk", "..", ""] {
            assert!(!is_plain_name(name), "{name}");
        }
        for name in ["secret.txt", "id_rsa", "x.vmdk.txt", "vmdk", "x-vmdk"] {
            assert!(!has_vmdk_extension(name), "{name}");
        }
    }
}
