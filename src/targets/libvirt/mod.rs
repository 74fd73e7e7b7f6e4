//! libvirt target: a storage volume filled through `virStorageVolUpload` streams straight from the converter
//! engine, and optionally a domain that boots from it.
//!
//! - [`conn`]: connecting (one-line errors), looking up pools, volumes and domains.
//! - [`volume`]: creating and deleting the volume.
//! - [`sink`]: the engine's [`Sink`](imgshift_converters::Sink) that sends the output over libvirt Streams.
//! - [`fill`]: converting a source disk into a fresh volume through the sink (no temporary file).
//! - [`download`]: reading a volume back (download streams under imgshift's own format readers).
//! - [`xml`]: volume and domain XML, written with quick-xml's writer.
//! - [`plan`]: the domain to define, with `auto` firmware, disk bus and domain type resolved.
//! - [`caps`]: reading the host's capabilities (is KVM offered?).
//! - [`inuse`]: which running domains use a volume (never replaced under them).
//! - [`rpc`]: imgshift's own client of libvirt's RPC protocol (no libvirt library is linked): sparse streams
//!   included, so holes travel as holes.
//!
//! This module takes plain settings ([`plan::DomainChoices`], [`plan::GuestHints`]); mapping command-line
//! options and inspecting the guest is the caller's business.

pub mod caps;
pub mod conn;
pub mod download;
pub mod fill;
pub mod images;
pub mod inuse;
pub mod lifecycle;
pub mod plan;
pub mod replica;
pub mod rpc;
pub mod sink;
pub mod source;
pub mod volume;
pub mod xml;

/// An error from the libvirt target. Messages are one line and say what to do where there is something to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The daemon could not be reached.
    #[error(
        "cannot connect to libvirt at '{uri}': {message}; start libvirtd (`systemctl start libvirtd`, or \
         `systemctl start virtqemud.socket` on a modular daemon) or point --connect at a running daemon, \
         e.g. 'qemu:///system?socket=/path/to/libvirt-sock'"
    )]
    Connect {
        /// The URI tried.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// No pool of that name.
    #[error(
        "storage pool '{pool}' not found at {uri}; list pools with `virsh -c '{uri}' pool-list --all`"
    )]
    NoPool {
        /// Pool name.
        pool: String,
        /// Connection URI.
        uri: String,
    },
    /// The pool exists but is not running.
    #[error(
        "storage pool '{pool}' is not running; start it with `virsh -c '{uri}' pool-start {pool}`"
    )]
    PoolInactive {
        /// Pool name.
        pool: String,
        /// Connection URI.
        uri: String,
    },
    /// The volume name is taken and replacing was not asked for.
    #[error("volume '{volume}' already exists in pool '{pool}' (pass --overwrite to replace it)")]
    VolumeExists {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// `--overwrite` would delete a volume a running domain uses.
    #[error(
        "volume '{volume}' in pool '{pool}' is in use by running domain(s) {domains}; shut them down before \
         replacing it"
    )]
    VolumeInUse {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
        /// The domains, quoted and comma-separated.
        domains: String,
    },
    /// The domain name is taken and replacing was not asked for.
    #[error("domain '{name}' already exists (pass --overwrite to replace it)")]
    DomainExists {
        /// Domain name.
        name: String,
    },
    /// The domain to replace is running: it is never replaced.
    #[error(
        "domain '{name}' is running; shut it down first (`virsh shutdown {name}`) to replace it"
    )]
    DomainRunning {
        /// Domain name.
        name: String,
    },
    /// A domain to read from is running, and reading it anyway was not asked for.
    #[error(
        "domain '{name}' is running: a copy of its disks would be crash-consistent at best; shut it down \
         (`virsh shutdown {name}`), or pass --allow-running to copy it anyway"
    )]
    SourceDomainRunning {
        /// Domain name.
        name: String,
    },
    /// No domain of that name.
    #[error("no domain '{name}' at {uri}; list domains with `virsh -c '{uri}' list --all`")]
    NoDomain {
        /// Domain name.
        name: String,
        /// Connection URI.
        uri: String,
    },
    /// A volume this run created could not be deleted after a failure.
    #[error(
        "volume '{volume}' was left in pool '{pool}' ({message}): remove it with `virsh vol-delete --pool {pool} \
         {volume}`"
    )]
    LeftOver {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
        /// Why deletion failed.
        message: String,
    },
    /// Any other libvirt call failed.
    #[error("{op}: {message}")]
    Libvirt {
        /// What was being done.
        op: String,
        /// libvirt's message.
        message: String,
    },
    /// Writing or reading XML failed.
    #[error("XML: {0}")]
    Xml(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A failed libvirt call: `op` says what was being done.
    pub fn call(op: impl Into<String>, e: &rpc::Error) -> Error {
        Error::Libvirt {
            op: op.into(),
            message: msg(e),
        }
    }
}

/// The message of a libvirt error on one line.
pub fn msg(e: &rpc::Error) -> String {
    e.to_string().trim().replace('\n', " ")
}

/// True when `e` says the object looked up does not exist (decided by libvirt's error code).
pub fn is_not_found(e: &rpc::Error) -> bool {
    e.is_not_found()
}

/// Volume (and disk driver) formats imgshift writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VolFormat {
    /// qcow2 (compact: only data clusters).
    Qcow2,
    /// Raw.
    Raw,
}

impl VolFormat {
    /// libvirt's name (`<format type=…>`, `<driver type=…>`).
    pub fn name(self) -> &'static str {
        match self {
            VolFormat::Qcow2 => "qcow2",
            VolFormat::Raw => "raw",
        }
    }
}

/// Guest firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS).
    Bios,
    /// UEFI (libvirt picks an OVMF build without Secure Boot).
    Uefi,
}

/// Bus of the domain's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk (needs virtio drivers in the guest).
    Virtio,
    /// SATA on q35's built-in AHCI controller (drivers in every current OS).
    Sata,
    /// SCSI on a virtio-scsi controller.
    Scsi,
}

impl DiskBus {
    /// libvirt's name (`<target bus=…>`).
    pub fn name(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Sata => "sata",
            DiskBus::Scsi => "scsi",
        }
    }
}

/// Domain (hypervisor) type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    /// QEMU with TCG (emulation; works everywhere, slowly).
    Qemu,
    /// QEMU with KVM.
    Kvm,
}

impl DomainType {
    /// libvirt's name (`<domain type=…>`).
    pub fn name(self) -> &'static str {
        match self {
            DomainType::Qemu => "qemu",
            DomainType::Kvm => "kvm",
        }
    }
}
