//! Windows detection on an NTFS volume, read-only through the `ntfs` crate: a volume holding
//! `\Windows\System32\ntoskrnl.exe` is a Windows system root (virt-inspector's rule); the kernel's PE header
//! gives the architecture. Bounded: a handful of index lookups and one 4 KiB read.

use std::io::{Read, Seek};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::{Ntfs, NtfsFile, NtfsReadSeek};
use serde::Serialize;

use super::Window;

/// A Windows installation found on a volume (virt-inspector's field names).
#[derive(Debug, Clone, Serialize)]
pub struct WindowsInstall {
    /// Device of the volume (`/dev/sda2`).
    pub root: String,
    /// "windows".
    pub name: String,
    /// "windows".
    pub distro: String,
    /// The system root as Windows names it.
    pub windows_systemroot: String,
    /// From ntoskrnl.exe's PE header: x86_64, i386, aarch64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// Looks for a Windows system root on the NTFS volume `part` (device name `device`). `Err` names what could not
/// be read; `Ok(None)` is an NTFS volume without Windows on it.
pub fn detect(part: &Window, device: &str) -> Result<Option<WindowsInstall>, String> {
    match super::no_panic(|| find(part)) {
        Some(Ok(Some(arch))) => Ok(Some(WindowsInstall {
            root: device.to_string(),
            name: "windows".into(),
            distro: "windows".into(),
            windows_systemroot: "\\Windows".into(),
            arch,
        })),
        Some(Ok(None)) => Ok(None),
        Some(Err(e)) => Err(format!("{device}: NTFS volume unreadable: {e}")),
        None => Err(format!(
            "{device}: NTFS volume unreadable (the ntfs crate panicked on it)"
        )),
    }
}

/// `Some(arch)` when `\Windows\System32\ntoskrnl.exe` exists.
fn find(part: &Window) -> Result<Option<Option<String>>, ntfs::NtfsError> {
    let mut r = part.clone();
    let mut fs = Ntfs::new(&mut r)?;
    fs.read_upcase_table(&mut r)?;
    let root = fs.root_directory(&mut r)?;
    let Some(windows) = child(&fs, &mut r, &root, "Windows")? else {
        return Ok(None);
    };
    let Some(system32) = child(&fs, &mut r, &windows, "System32")? else {
        return Ok(None);
    };
    let Some(kernel) = child(&fs, &mut r, &system32, "ntoskrnl.exe")? else {
        return Ok(None);
    };
    Ok(Some(kernel_arch(&mut r, &kernel)))
}

/// The entry `name` (case-insensitive, NTFS's rule) of directory `dir`.
fn child<'n, T: Read + Seek>(
    fs: &'n Ntfs,
    r: &mut T,
    dir: &NtfsFile<'n>,
    name: &str,
) -> Result<Option<NtfsFile<'n>>, ntfs::NtfsError> {
    if !dir.is_directory() {
        return Ok(None);
    }
    let index = dir.directory_index(r)?;
    let mut finder = index.finder();
    match NtfsFileNameIndex::find(&mut finder, fs, r, name) {
        None => Ok(None),
        Some(Err(e)) => Err(e),
        Some(Ok(entry)) => Ok(Some(entry.to_file(fs, r)?)),
    }
}

/// The architecture in the PE header of the kernel's first 4 KiB; `None` when unreadable.
fn kernel_arch<T: Read + Seek>(r: &mut T, kernel: &NtfsFile<'_>) -> Option<String> {
    let item = kernel.data(r, "")?.ok()?;
    let attr = item.to_attribute().ok()?;
    let mut value = attr.value(r).ok()?;
    let mut head = vec![0u8; 4096];
    let mut filled = 0usize;
    while filled < head.len() {
        match value.read(r, head.get_mut(filled..)?) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled = filled.saturating_add(n),
        }
    }
    head.truncate(filled);
    super::boot::pe_arch(&head).map(str::to_string)
}
