//! Windows on an NTFS volume, read-only through the `ntfs` crate: a volume holding
//! `\Windows\System32\ntoskrnl.exe` is a Windows system root (virt-inspector's rule); the kernel's PE header gives
//! the architecture; the SOFTWARE and SYSTEM hives (`\Windows\System32\config`) give the product, version,
//! computer name, control set, sysprep state and the boot-critical drivers with their start types, read with
//! [`super::hive`]. Bounded: hive files of at most [`hive::MAX_HIVE`] bytes, lookups within the hive's cell budget,
//! a fixed list of drivers.

use std::io::{Read, Seek};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::{Ntfs, NtfsFile, NtfsReadSeek};
use serde::Serialize;

use super::Window;
use super::hive::{self, Hive};

/// Boot-critical storage and network drivers looked for (service names under `Services`), with what they are.
pub const DRIVERS: &[(&str, &str)] = &[
    ("viostor", "virtio-blk storage"),
    ("vioscsi", "virtio-scsi storage"),
    ("netkvm", "virtio network"),
    ("storvsc", "Hyper-V storage"),
    ("vmbus", "Hyper-V VMBus"),
    ("netvsc", "Hyper-V network"),
    ("stornvme", "NVMe storage (in-box)"),
    ("AWSNVMe", "AWS NVMe storage"),
    ("ena", "AWS ENA network"),
    ("xenvbd", "Xen PV storage"),
    ("storahci", "SATA AHCI storage (in-box)"),
    ("msahci", "SATA AHCI storage (in-box, Windows 7/2008 R2)"),
    ("pciide", "IDE storage (in-box)"),
    ("atapi", "IDE/ATAPI storage (in-box)"),
];
/// Service name prefixes also listed (AWS PV drivers: AWSPVStorage and friends).
const DRIVER_PREFIXES: &[&str] = &["AWSPV"];
/// Most services whose names are compared against [`DRIVER_PREFIXES`].
const MAX_SERVICES: usize = 8192;

/// A driver's service entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Driver {
    /// Service name as the registry spells it.
    pub name: String,
    /// `Start`: 0 boot, 1 system, 2 automatic, 3 on demand, 4 disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<u32>,
    /// `start` in words.
    pub start_type: String,
    /// `ImagePath`, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_path: Option<String>,
    /// Whether the driver file (`ImagePath`, or `System32\drivers\<name>.sys`) is on the volume.
    pub file_present: bool,
}

impl Driver {
    /// Loaded by the boot loader (Start = 0) and its file is there: the storage driver a boot disk needs.
    pub fn boot_start(&self) -> bool {
        self.start == Some(0) && self.file_present
    }
}

/// A Windows installation found on a volume (virt-inspector's field names where it has them).
#[derive(Debug, Clone, Serialize, Default)]
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
    /// `ProductName` ("Windows Server 2019 Datacenter").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_name: Option<String>,
    /// `EditionID` ("ServerDatacenter", "Professional").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edition: Option<String>,
    /// `InstallationType` ("Server", "Client").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_variant: Option<String>,
    /// `CurrentMajorVersionNumber`, else the major part of `CurrentVersion` (6 for 2012 R2, 10 for 2016+).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_version: Option<u32>,
    /// `CurrentMinorVersionNumber`, else the minor part of `CurrentVersion`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_version: Option<u32>,
    /// `CurrentBuild` ("17763").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// `DisplayVersion` ("23H2"), when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_version: Option<String>,
    /// `ControlSet00N\Control\ComputerName\ComputerName\ComputerName`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The control set `SYSTEM\Select\Current` names ("ControlSet002").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_control_set: Option<String>,
    /// Windows' boot loader on this disk: "uefi" (a BCD store on the ESP) or "bios" (`bootmgr` and `\Boot\BCD`
    /// on an active MBR partition); absent when neither was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_loader: Option<String>,
    /// Where it was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_store: Option<String>,
    /// `SOFTWARE\Microsoft\Windows\CurrentVersion\Setup\State\ImageState`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_state: Option<String>,
    /// `SYSTEM\Setup`: `SystemSetupInProgress` and `CmdLine` (sysprep's OOBE pass sets them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_in_progress: Option<u32>,
    /// `SYSTEM\Setup\CmdLine`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_cmdline: Option<String>,
    /// Sysprep'd with /generalize: `Some(true)` or `Some(false)`; `None` when the hives could not tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generalized: Option<bool>,
    /// The boot-critical drivers present (service key exists), from [`DRIVERS`].
    pub drivers: Vec<Driver>,
    /// Whether the registry was read.
    pub registry_read: bool,
}

impl WindowsInstall {
    /// The driver `name` (case-insensitive), if present.
    pub fn driver(&self, name: &str) -> Option<&Driver> {
        self.drivers
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(name))
    }
    /// `name` is present with a boot start type and its file.
    pub fn boot_driver(&self, name: &str) -> bool {
        self.driver(name).is_some_and(Driver::boot_start)
    }
    /// `InstallationType` is "Server" (or, without it, the product name says so).
    pub fn is_server(&self) -> bool {
        match &self.product_variant {
            Some(v) => v.eq_ignore_ascii_case("server"),
            None => self
                .product_name
                .as_deref()
                .is_some_and(|p| p.contains("Server")),
        }
    }
    /// (major, minor) when known.
    pub fn version(&self) -> Option<(u32, u32)> {
        Some((self.major_version?, self.minor_version.unwrap_or(0)))
    }
}

/// Looks for a Windows system root on the NTFS volume `part` (device name `device`). `Err` names what could not
/// be read; `Ok(None)` is an NTFS volume without Windows on it. Registry problems go to `problems`.
pub fn detect(
    part: &Window,
    device: &str,
    problems: &mut Vec<String>,
) -> Result<Option<WindowsInstall>, String> {
    let mut local = Vec::new();
    let found = super::no_panic(|| find(part, &mut local));
    problems.extend(local.into_iter().map(|p| format!("{device}: {p}")));
    match found {
        Some(Ok(Some(mut w))) => {
            w.root = device.to_string();
            w.name = "windows".into();
            w.distro = "windows".into();
            w.windows_systemroot = "\\Windows".into();
            Ok(Some(w))
        }
        Some(Ok(None)) => Ok(None),
        Some(Err(e)) => Err(format!("{device}: NTFS volume unreadable: {e}")),
        None => Err(format!(
            "{device}: NTFS volume unreadable (the ntfs crate panicked on it)"
        )),
    }
}

/// The installation when `\Windows\System32\ntoskrnl.exe` exists.
fn find(
    part: &Window,
    problems: &mut Vec<String>,
) -> Result<Option<WindowsInstall>, ntfs::NtfsError> {
    if let Err(e) = ntfs_sane(part) {
        problems.push(e);
        return Ok(None);
    }
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
    let mut w = WindowsInstall {
        arch: read_head(&mut r, &kernel, 4096)
            .and_then(|h| super::boot::pe_arch(&h).map(str::to_string)),
        ..WindowsInstall::default()
    };
    let config = child(&fs, &mut r, &system32, "config")?;
    let hive_of = |r: &mut Window, name: &str, problems: &mut Vec<String>| -> Option<Hive> {
        let dir = config.as_ref()?;
        let file = match child(&fs, r, dir, name) {
            Ok(Some(f)) => f,
            Ok(None) => {
                problems.push(format!("\\Windows\\System32\\config\\{name} is missing"));
                return None;
            }
            Err(e) => {
                problems.push(format!(
                    "\\Windows\\System32\\config\\{name} unreadable: {e}"
                ));
                return None;
            }
        };
        match read_all(r, &file, hive::MAX_HIVE) {
            Ok(bytes) => match Hive::new(bytes) {
                Ok(h) => Some(h),
                Err(e) => {
                    problems.push(format!("\\Windows\\System32\\config\\{name}: {e}"));
                    None
                }
            },
            Err(e) => {
                problems.push(format!("\\Windows\\System32\\config\\{name}: {e}"));
                None
            }
        }
    };
    if let Some(sw) = hive_of(&mut r, "SOFTWARE", problems) {
        if let Err(e) = software(&sw, &mut w) {
            problems.push(format!("SOFTWARE hive: {e}"));
        }
        w.registry_read = true;
    }
    if let Some(sys) = hive_of(&mut r, "SYSTEM", problems) {
        let drivers_dir = child(&fs, &mut r, &system32, "drivers").ok().flatten();
        let mut present = |file: &str| -> bool {
            drivers_dir
                .as_ref()
                .is_some_and(|d| matches!(child(&fs, &mut r, d, file), Ok(Some(_))))
        };
        if let Err(e) = system(&sys, &mut w, &mut present) {
            problems.push(format!("SYSTEM hive: {e}"));
        }
        w.registry_read = true;
    }
    w.generalized = generalized(&w);
    // `bootmgr` and \Boot\BCD on this volume: what an active MBR partition's boot code starts.
    if child(&fs, &mut r, &root, "bootmgr")?.is_some()
        && let Some(boot) = child(&fs, &mut r, &root, "Boot")?
        && child(&fs, &mut r, &boot, "BCD")?.is_some()
    {
        w.boot_store = Some("\\bootmgr, \\Boot\\BCD".into());
    }
    Ok(Some(w))
}

/// Sysprep's state: `IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE` (or `..._TO_AUDIT`) after `/generalize`;
/// `IMAGE_STATE_COMPLETE` on an installed, specialised system. Without ImageState, `SYSTEM\Setup` says whether
/// the next boot runs Windows Deploy (windeploy.exe, which sysprep /generalize /oobe arranges).
fn generalized(w: &WindowsInstall) -> Option<bool> {
    if let Some(s) = &w.image_state {
        return Some(s.starts_with("IMAGE_STATE_GENERALIZE_RESEAL"));
    }
    match (w.setup_in_progress, &w.setup_cmdline) {
        (Some(1), Some(c)) => Some(c.to_ascii_lowercase().contains("windeploy")),
        (Some(0), _) => Some(false),
        _ => None,
    }
}

fn string(k: Option<hive::Key<'_>>, name: &str) -> Result<Option<String>, hive::HiveError> {
    match k {
        Some(k) => Ok(k.value(name)?.and_then(|v| v.string())),
        None => Ok(None),
    }
}
fn dword(k: Option<hive::Key<'_>>, name: &str) -> Result<Option<u32>, hive::HiveError> {
    match k {
        Some(k) => Ok(k.value(name)?.and_then(|v| v.dword())),
        None => Ok(None),
    }
}

fn software(h: &Hive, w: &mut WindowsInstall) -> Result<(), hive::HiveError> {
    let cv = h.key("Microsoft\\Windows NT\\CurrentVersion")?;
    w.product_name = string(cv, "ProductName")?;
    w.edition = string(cv, "EditionID")?;
    w.product_variant = string(cv, "InstallationType")?;
    w.build = string(cv, "CurrentBuild")?.or(string(cv, "CurrentBuildNumber")?);
    w.display_version = string(cv, "DisplayVersion")?;
    w.major_version = dword(cv, "CurrentMajorVersionNumber")?;
    w.minor_version = dword(cv, "CurrentMinorVersionNumber")?;
    if w.major_version.is_none()
        && let Some(v) = string(cv, "CurrentVersion")?
        && let Some((a, b)) = v.split_once('.')
    {
        w.major_version = a.trim().parse().ok();
        w.minor_version = b.trim().parse().ok();
    }
    let state = h.key("Microsoft\\Windows\\CurrentVersion\\Setup\\State")?;
    w.image_state = string(state, "ImageState")?;
    Ok(())
}

fn system(
    h: &Hive,
    w: &mut WindowsInstall,
    present: &mut dyn FnMut(&str) -> bool,
) -> Result<(), hive::HiveError> {
    let current = dword(h.key("Select")?, "Current")?;
    let Some(n) = current.filter(|n| (1..=999).contains(n)) else {
        return Ok(());
    };
    let cs = format!("ControlSet{n:03}");
    w.current_control_set = Some(cs.clone());
    let setup = h.key("Setup")?;
    w.setup_in_progress = dword(setup, "SystemSetupInProgress")?;
    w.setup_cmdline = string(setup, "CmdLine")?;
    w.hostname = string(
        h.key(&format!("{cs}\\Control\\ComputerName\\ComputerName"))?,
        "ComputerName",
    )?;
    let Some(services) = h.key(&format!("{cs}\\Services"))? else {
        return Ok(());
    };
    let mut names: Vec<String> = Vec::new();
    for k in services.subkeys()?.into_iter().take(MAX_SERVICES) {
        let name = k.name()?;
        let wanted = DRIVERS.iter().any(|(d, _)| d.eq_ignore_ascii_case(&name))
            || DRIVER_PREFIXES.iter().any(|p| {
                name.get(..p.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(p))
            });
        if !wanted {
            continue;
        }
        names.push(name.clone());
        let start = k.value("Start")?.and_then(|v| v.dword());
        let image_path = k.value("ImagePath")?.and_then(|v| v.string());
        let file = image_path
            .as_deref()
            .and_then(|p| p.rsplit(['\\', '/']).next())
            .filter(|f| !f.is_empty())
            .map_or_else(|| format!("{name}.sys"), str::to_string);
        w.drivers.push(Driver {
            start_type: start_type(start).into(),
            file_present: present(&file),
            name,
            start,
            image_path,
        });
    }
    w.drivers.sort_by_key(|d| d.name.to_ascii_lowercase());
    Ok(())
}

/// A service's `Start` in words.
pub fn start_type(start: Option<u32>) -> &'static str {
    match start {
        Some(0) => "boot",
        Some(1) => "system",
        Some(2) => "automatic",
        Some(3) => "demand",
        Some(4) => "disabled",
        Some(_) => "invalid",
        None => "unset",
    }
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

/// The first `n` bytes of a file's data; `None` when unreadable.
fn read_head<T: Read + Seek>(r: &mut T, file: &NtfsFile<'_>, n: usize) -> Option<Vec<u8>> {
    let item = file.data(r, "")?.ok()?;
    let attr = item.to_attribute().ok()?;
    let mut value = attr.value(r).ok()?;
    let mut head = vec![0u8; n];
    let mut filled = 0usize;
    while filled < head.len() {
        match value.read(r, head.get_mut(filled..)?) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled = filled.saturating_add(n),
        }
    }
    head.truncate(filled);
    Some(head)
}

/// A whole file of at most `cap` bytes (a larger one is refused, not truncated).
fn read_all<T: Read + Seek>(r: &mut T, file: &NtfsFile<'_>, cap: u64) -> Result<Vec<u8>, String> {
    let item = file
        .data(r, "")
        .ok_or("no data attribute")?
        .map_err(|e| e.to_string())?;
    let attr = item.to_attribute().map_err(|e| e.to_string())?;
    let mut value = attr.value(r).map_err(|e| e.to_string())?;
    let len = value.len();
    if len > cap {
        return Err(format!(
            "{len} bytes, more than the {cap} bytes imgshift reads from a hive"
        ));
    }
    let n = usize::try_from(len).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; n];
    let mut filled = 0usize;
    while filled < n {
        let Some(rest) = out.get_mut(filled..) else {
            break;
        };
        match value.read(r, rest) {
            Ok(0) => break,
            Ok(k) => filled = filled.saturating_add(k),
            Err(e) => return Err(format!("read failed at byte {filled}: {e}")),
        }
    }
    out.truncate(filled);
    Ok(out)
}

/// Checks an NTFS boot sector before the `ntfs` crate reads it (the layout libyal's "New Technologies File
/// System (NTFS)" documents: bytes per sector at 0x0B, total sectors at 0x28): a whole boot sector, a sector
/// size of 512-4096 bytes, and the volume inside its partition. ntfs 0.4 turns a short read while parsing the
/// boot sector (or any structure past the partition's end) into an `unreachable!` panic (found by the `ntfs`
/// fuzz target on a volume shorter than its boot sector).
pub fn ntfs_sane(part: &Window) -> Result<(), String> {
    let b = part
        .read_vec(0, 512)
        .map_err(|e| format!("NTFS boot sector unreadable: {e}"))?;
    let (Some(bps), Some(total)) = (super::le_u16(&b, 0x0B), super::le_u64(&b, 0x28)) else {
        return Err(format!(
            "NTFS boot sector: the {} byte volume is shorter than one sector",
            part.len()
        ));
    };
    if b.len() < 512 {
        return Err(format!(
            "NTFS boot sector: the {} byte volume is shorter than one sector",
            part.len()
        ));
    }
    if !matches!(bps, 512 | 1024 | 2048 | 4096) {
        return Err(format!(
            "NTFS boot sector: {bps} bytes per sector (512, 1024, 2048 or 4096)"
        ));
    }
    match total.checked_mul(u64::from(bps)) {
        Some(n) if n <= part.len() => Ok(()),
        _ => Err(format!(
            "NTFS boot sector: {total} sectors of {bps} bytes do not fit the {} byte partition",
            part.len()
        )),
    }
}

/// Whether the NTFS volume `part` holds `\bootmgr` and `\Boot\BCD` (a "System Reserved" partition, or the
/// Windows volume itself).
pub fn bootmgr(part: &Window) -> bool {
    if ntfs_sane(part).is_err() {
        return false;
    }
    let look = || -> Result<bool, ntfs::NtfsError> {
        let mut r = part.clone();
        let mut fs = Ntfs::new(&mut r)?;
        fs.read_upcase_table(&mut r)?;
        let root = fs.root_directory(&mut r)?;
        if child(&fs, &mut r, &root, "bootmgr")?.is_none() {
            return Ok(false);
        }
        let Some(boot) = child(&fs, &mut r, &root, "Boot")? else {
            return Ok(false);
        };
        Ok(child(&fs, &mut r, &boot, "BCD")?.is_some())
    };
    super::no_panic(look).is_some_and(|r| r.unwrap_or(false))
}

/// Whether the FAT ESP `part` holds Windows Boot Manager's BCD store (`\EFI\Microsoft\Boot\BCD`).
pub fn esp_bcd(part: &Window) -> bool {
    let Ok(fs) = super::fs::open_fat(part) else {
        return false;
    };
    super::no_panic(|| fs.root_dir().open_file("EFI/Microsoft/Boot/BCD").is_ok()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::guest::mem_window;

    /// An NTFS boot sector (OEM id, `bps`-byte sectors, `total` sectors) at the start of `size` bytes.
    fn ntfs(size: usize, bps: u16, total: u64) -> Vec<u8> {
        let mut b = vec![0u8; size];
        let n = size.min(0x30);
        let mut head = [0u8; 0x30];
        head[3..11].copy_from_slice(b"NTFS    ");
        head[0x0B..0x0D].copy_from_slice(&bps.to_le_bytes());
        head[0x28..0x30].copy_from_slice(&total.to_le_bytes());
        b[..n].copy_from_slice(&head[..n]);
        b
    }

    #[test]
    fn ntfs_boot_sector_that_fits_passes() {
        assert_eq!(ntfs_sane(&mem_window(ntfs(1 << 20, 512, 2047))), Ok(()));
    }

    /// The `ntfs` fuzz target's crash: a volume shorter than its boot sector made the ntfs crate reach an
    /// `unreachable!` (a short read inside binrw). Now a problem line, no panic.
    #[test]
    fn rejects_ntfs_volume_shorter_than_its_boot_sector() {
        let w = mem_window(ntfs(100, 512, 1));
        assert!(ntfs_sane(&w).is_err());
        let mut problems = Vec::new();
        assert!(matches!(detect(&w, "/dev/sda1", &mut problems), Ok(None)));
        assert!(
            problems[0].starts_with("/dev/sda1: NTFS boot sector"),
            "{problems:?}"
        );
        assert!(!bootmgr(&w));
    }

    #[test]
    fn rejects_ntfs_volume_larger_than_its_partition() {
        let e = ntfs_sane(&mem_window(ntfs(1 << 20, 512, 4096))).unwrap_err();
        assert!(e.contains("do not fit the 1048576 byte partition"), "{e}");
        assert!(
            ntfs_sane(&mem_window(ntfs(1 << 20, 0, 1))).is_err(),
            "0-byte sectors"
        );
    }
}
