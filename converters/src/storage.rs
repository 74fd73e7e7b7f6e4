//! `Storage`: the bytes under an image. Format code reads only through this trait, never `std::fs`, so the
//! same reader works on a file, a member inside an OVA tar, or an in-memory buffer (tests, fuzzing).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Positional, read-only access to a byte container.
pub trait Storage: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True when the storage holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; reading past the end is an error naming the storage.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`, zero-filling past the end; returns bytes really read.
    fn read_at_zero_fill(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let avail = self.len().saturating_sub(offset);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        if n > 0 {
            self.read_exact_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(n)
    }
    /// Data ranges (`(start, len)`) inside `[offset, offset+len)`, from SEEK_DATA/SEEK_HOLE where the storage
    /// knows; `None` when it cannot tell (then everything counts as data).
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let _ = (offset, len);
        Ok(None)
    }
    /// A name for messages (a path, or a description).
    fn name(&self) -> String;
    /// The filesystem path, when the storage is a file (used to resolve relative names inside images).
    fn path(&self) -> Option<&Path> {
        None
    }
    /// Bytes the storage occupies on disk (`actual-size`), when known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
}

/// A read-only local file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    len: u64,
}

impl FileStorage {
    /// Opens `path` read-only. Sources are never opened for writing.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", path, e))?;
        if meta.is_dir() {
            // An I/O-kind error, so the CLI prints "cannot open adir: is a directory" once, not the path twice.
            return Err(Error::io(
                "cannot open",
                path,
                std::io::Error::from(std::io::ErrorKind::IsADirectory),
            ));
        }
        let len = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report 0 in metadata; seek to the end instead.
            use std::io::Seek;
            let mut f = &file;
            f.seek(std::io::SeekFrom::End(0))
                .map_err(|e| Error::io("cannot size", path, e))?
        };
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            len,
        })
    }

    /// Opens a file named *inside* an image, at `canonical`: the absolute, symlink-free path `OpenGate`
    /// resolved and checked. Unlike `open` (the file the user names, which may be a block device), this
    /// opens with O_NOFOLLOW | O_NONBLOCK, so a FIFO cannot hang open(2) and a symlink in the last place is not
    /// followed; it requires a regular file, and requires the kernel's name for the opened file to still be
    /// `canonical`, so a file or folder on the path swapped for a symlink between the check and the open is
    /// refused rather than followed out of the checked folder.
    pub fn open_named(canonical: &Path) -> Result<Self> {
        use rustix::fs::{Mode, OFlags};
        let changed = |how: &str| {
            Error::denied(format!(
                "{} changed while being opened ({how})",
                canonical.display()
            ))
        };
        let flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        let fd = match rustix::fs::open(canonical, flags, Mode::empty()) {
            Ok(fd) => fd,
            // The checked path had no symlink in it: one there now was put in after the check.
            Err(rustix::io::Errno::LOOP) => return Err(changed("it is now a symbolic link")),
            Err(e) => return Err(Error::io("cannot open", canonical, e.into())),
        };
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", canonical, e))?;
        if !meta.file_type().is_file() {
            return Err(Error::denied(format!(
                "{} is not a regular file",
                canonical.display()
            )));
        }
        match opened_path(&file) {
            Some(actual) if actual == canonical => {}
            Some(actual) => {
                return Err(changed(&format!("the file opened is {}", actual.display())));
            }
            // No /proc: the file at `canonical` now must be the one opened, and `canonical` must still have no
            // symlink in it (a narrower race than the check above, which /proc closes entirely).
            None => {
                use std::os::unix::fs::MetadataExt;
                let now = std::fs::symlink_metadata(canonical)
                    .map_err(|e| Error::io("cannot stat", canonical, e))?;
                let still_canonical = canonical.canonicalize().is_ok_and(|c| c == canonical);
                if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) || !still_canonical {
                    return Err(changed("it was replaced"));
                }
            }
        }
        // Reads of a regular file never block; clear the flag anyway so the descriptor is an ordinary one.
        let fl = rustix::fs::fcntl_getfl(&file)
            .map_err(|e| Error::io("cannot read the flags of", canonical, e.into()))?;
        rustix::fs::fcntl_setfl(&file, fl - OFlags::NONBLOCK)
            .map_err(|e| Error::io("cannot set the flags of", canonical, e.into()))?;
        Ok(FileStorage {
            file,
            path: canonical.to_path_buf(),
            len: meta.len(),
        })
    }
}

/// The path the kernel records for an open file (`/proc/self/fd/N`), or `None` without /proc.
fn opened_path(file: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

impl Storage for FileStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(Error::new(
                crate::ErrorKind::Corrupt,
                format!(
                    "{}: read of {} bytes at offset {offset} is past the end of the file ({} bytes)",
                    self.path.display(),
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                &format!("cannot read {} bytes at offset {offset} of", buf.len()),
                &self.path,
                e,
            )
        })
    }

    fn data_ranges(&self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        use rustix::fs::{SeekFrom, seek};
        let end = offset.saturating_add(len).min(self.len);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                // Filesystems without SEEK_DATA: everything is data.
                Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                    return Ok(None);
                }
                Err(e) => return Err(Error::io("cannot SEEK_DATA in", &self.path, e.into())),
            };
            if data >= end {
                break;
            }
            let hole = match seek(&self.file, SeekFrom::Hole(data)) {
                Ok(h) => h.min(end),
                Err(e) => return Err(Error::io("cannot SEEK_HOLE in", &self.path, e.into())),
            };
            if hole <= data {
                break;
            }
            out.push((data, hole - data));
            pos = hole;
        }
        Ok(Some(out))
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file
            .metadata()
            .ok()
            .map(|m| m.blocks().saturating_mul(512))
    }
}

/// An in-memory image (tests and fuzzing).
#[derive(Debug, Clone)]
pub struct MemStorage {
    data: Arc<Vec<u8>>,
    name: String,
}

impl MemStorage {
    /// Wraps `data`.
    pub fn new(data: Vec<u8>, name: impl Into<String>) -> Self {
        MemStorage {
            data: Arc::new(data),
            name: name.into(),
        }
    }

    /// The bytes back, unless a clone of this storage still shares them (the fuzz targets reuse the buffer).
    pub fn into_inner(self) -> Option<Vec<u8>> {
        Arc::into_inner(self.data)
    }
}

impl Storage for MemStorage {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let start = usize::try_from(offset).ok();
        let src = start.and_then(|s| self.data.get(s..s.checked_add(buf.len())?));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::new(
                crate::ErrorKind::Corrupt,
                format!(
                    "{}: read of {} bytes at offset {offset} is past the end ({} bytes)",
                    self.name,
                    buf.len(),
                    self.data.len()
                ),
            )),
        }
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

/// A window `[offset, offset+len)` of another storage (an OVA member, a VMDK embedded in a tar).
pub struct SliceStorage {
    inner: Arc<dyn Storage>,
    offset: u64,
    len: u64,
    name: String,
}

impl SliceStorage {
    /// A window of `inner`; fails when the window does not fit.
    pub fn new(
        inner: Arc<dyn Storage>,
        offset: u64,
        len: u64,
        name: impl Into<String>,
    ) -> Result<Self> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > inner.len()) {
            return Err(Error::input(format!(
                "window {offset}+{len} is outside {}",
                inner.name()
            )));
        }
        Ok(SliceStorage {
            inner,
            offset,
            len,
            name: name.into(),
        })
    }
}

impl Storage for SliceStorage {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(Error::new(
                crate::ErrorKind::Corrupt,
                format!(
                    "{}: read of {} bytes at offset {offset} is past its end ({} bytes)",
                    self.name,
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.inner.read_exact_at(buf, self.offset + offset)
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state an attacker leaves after the gate's check: a folder on the checked path is now a symlink.
    #[test]
    fn open_named_refuses_a_path_the_kernel_names_differently() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        std::fs::write(root.join("real/base"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("swapped")).unwrap();
        std::os::unix::fs::symlink(root.join("real/base"), root.join("link")).unwrap();
        assert_eq!(
            FileStorage::open_named(&root.join("real/base"))
                .unwrap()
                .len(),
            1
        );

        let e = FileStorage::open_named(&root.join("swapped/base")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Denied, "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "{} changed while being opened (the file opened is {})",
                root.join("swapped/base").display(),
                root.join("real/base").display()
            )
        );
        let e = FileStorage::open_named(&root.join("link")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Denied, "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "{} changed while being opened (it is now a symbolic link)",
                root.join("link").display()
            )
        );
        let e = FileStorage::open_named(&root.join("real")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} is not a regular file", root.join("real").display())
        );
    }
}
