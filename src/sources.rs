//! Sources by name: a local image (a path, as always), or a disk in a cloud read in place — `aws:snap-...` (an
//! EBS snapshot), `aws:vol-...` (that volume's newest completed snapshot), `aws:ami-...` (every EBS mapping of an
//! AMI, boot disk first), `azure:disk/GROUP/NAME` (a managed disk), `azure:snapshot/GROUP/NAME` (a managed
//! disk's snapshot), `libvirt:POOL/VOLUME` (a storage volume), `libvirt:domain/NAME` (every disk of a domain, boot
//! disk first; a running one only when allowed). A cloud source is read through its cloud's read API straight
//! into the engine: nothing is written locally.
//!
//! A path keeps meaning a file: only a name that starts with `aws:`, `azure:` or `libvirt:` is a cloud source, so
//! `./aws:x` is a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use imgshift_converters::DiskSource;

use crate::open::{SourceDisks, open_disks, open_image};
use crate::targets::aws::config::AwsTarget as AwsConn;
use crate::targets::aws::source::AwsReader;
use crate::targets::azure::source::{AzureDiskSource, AzureReadConn, AzureSourceKind};

/// A source the user named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    /// A local image (or OVA).
    File(PathBuf),
    /// An EBS snapshot.
    AwsSnapshot(String),
    /// An AMI: every EBS mapping.
    AwsImage(String),
    /// An EBS volume, read as its newest completed snapshot.
    AwsVolume(String),
    /// A libvirt storage volume.
    LibvirtVolume {
        /// Its pool.
        pool: String,
        /// Its name.
        volume: String,
    },
    /// Every disk of a libvirt domain.
    LibvirtDomain {
        /// Its name.
        name: String,
    },
    /// A managed disk.
    AzureDisk {
        /// Its resource group.
        group: String,
        /// Its name.
        name: String,
    },
    /// A snapshot of a managed disk.
    AzureSnapshot {
        /// Its resource group.
        group: String,
        /// Its name.
        name: String,
    },
}

/// Longest cloud id accepted (EC2 ids are 21 characters).
const MAX_ID: usize = 64;

impl SourceRef {
    /// What `arg` names.
    pub fn parse(arg: &Path) -> Result<SourceRef> {
        let Some(text) = arg.to_str() else {
            return Ok(SourceRef::File(arg.to_path_buf()));
        };
        if let Some(rest) = text.strip_prefix("libvirt:") {
            let parts: Vec<&str> = rest.split('/').collect();
            return match parts.as_slice() {
                // `domain/NAME` is always a domain (a pool named "domain" is read volume by volume through a
                // domain, or renamed).
                ["domain", name] if !name.is_empty() && !name.contains('\0') => {
                    Ok(SourceRef::LibvirtDomain {
                        name: name.to_string(),
                    })
                }
                [pool, volume]
                    if [pool, volume].iter().all(|p| {
                        !p.is_empty() && !p.chars().all(|c| c == '.') && !p.contains('\0')
                    }) =>
                {
                    Ok(SourceRef::LibvirtVolume {
                        pool: pool.to_string(),
                        volume: volume.to_string(),
                    })
                }
                _ => bail!(
                    "{text}: a libvirt source is libvirt:POOL/VOLUME (a storage volume) or libvirt:domain/NAME \
                     (every disk of a domain); a file whose name starts with 'libvirt:' is ./{text}"
                ),
            };
        }
        if let Some(rest) = text.strip_prefix("azure:") {
            let parts: Vec<&str> = rest.split('/').collect();
            return match parts.as_slice() {
                [kind @ ("disk" | "snapshot"), group, name] => {
                    if [group, name].iter().any(|p| p.chars().all(|c| c == '.')) {
                        bail!("{text}: '.' and '..' are not Azure names");
                    }
                    crate::targets::azure::arm::check_name("the resource group", group)?;
                    crate::targets::azure::arm::check_name(&format!("the {kind}"), name)?;
                    let (group, name) = (group.to_string(), name.to_string());
                    Ok(if *kind == "disk" {
                        SourceRef::AzureDisk { group, name }
                    } else {
                        SourceRef::AzureSnapshot { group, name }
                    })
                }
                _ => bail!(
                    "{text}: an Azure source is azure:disk/RESOURCE-GROUP/NAME (a managed disk) or \
                     azure:snapshot/RESOURCE-GROUP/NAME (a snapshot); a file whose name starts with 'azure:' is \
                     ./{text}"
                ),
            };
        }
        let Some(id) = text.strip_prefix("aws:") else {
            return Ok(SourceRef::File(arg.to_path_buf()));
        };
        let valid = |prefix: &str| {
            id.len() <= MAX_ID
                && id.strip_prefix(prefix).is_some_and(|hex| {
                    !hex.is_empty() && hex.chars().all(|c| c.is_ascii_alphanumeric())
                })
        };
        if valid("snap-") {
            Ok(SourceRef::AwsSnapshot(id.to_string()))
        } else if valid("ami-") {
            Ok(SourceRef::AwsImage(id.to_string()))
        } else if valid("vol-") {
            Ok(SourceRef::AwsVolume(id.to_string()))
        } else {
            bail!(
                "{text}: an AWS source is aws:snap-ID (an EBS snapshot), aws:vol-ID (a volume's newest completed \
                 snapshot) or aws:ami-ID (an AMI); a file whose name starts with 'aws:' is ./{text}"
            )
        }
    }

    /// Whether this is a cloud disk.
    pub fn is_cloud(&self) -> bool {
        !matches!(self, SourceRef::File(_))
    }
}

/// How to reach the clouds sources are read from.
#[derive(Debug, Clone, Default)]
pub struct SourceConn {
    /// AWS region, profile, endpoint.
    pub aws: AwsConn,
    /// Attempts per request for retryable failures.
    pub max_attempts: u32,
    /// ARM endpoint, subscription, CA bundle.
    pub azure: AzureReadConn,
    /// libvirt connection URI.
    pub libvirt_uri: String,
    /// Read a running libvirt domain (`--allow-running`).
    pub allow_running: bool,
}

/// What the source's cloud says about the guest (carried to the target).
#[derive(Debug, Clone, Default)]
pub struct SourceFacts {
    /// AWS's boot mode (`legacy-bios`, `uefi`, `uefi-preferred`).
    pub boot_mode: Option<String>,
    /// `x86_64`, `arm64`.
    pub architecture: Option<String>,
    /// Whether the source's cloud marks the guest ENA-capable.
    pub ena: Option<bool>,
}

/// An opened source.
pub struct OpenedSource {
    /// Its disks, boot disk first.
    pub disks: SourceDisks,
    /// What its cloud says about the guest.
    pub facts: SourceFacts,
    /// Read grants held while it is open, as `(kind, id)` journal resources, so `jobs cancel` can end them
    /// after a killed run ([`crate::targets::azure::source::READ_GRANT_KIND`]).
    pub grants: Vec<(String, String)>,
}

/// Opens every disk of `src`.
pub fn open_all(
    src: &Path,
    format: Option<&str>,
    allow_dirs: &[PathBuf],
    conn: &SourceConn,
) -> Result<OpenedSource> {
    match SourceRef::parse(src)? {
        SourceRef::File(p) => Ok(OpenedSource {
            disks: open_disks(&p, format, allow_dirs)?,
            facts: SourceFacts::default(),
            grants: Vec::new(),
        }),
        SourceRef::LibvirtVolume { pool, volume } => {
            if format.is_some() {
                bail!("-f names a local image's format; a volume's format comes from libvirt");
            }
            let d =
                crate::targets::libvirt::source::open_volume(&conn.libvirt_uri, &pool, &volume)?;
            Ok(OpenedSource {
                disks: SourceDisks {
                    names: vec![format!("{pool}/{volume}")],
                    disks: vec![Arc::from(d)],
                    ova: false,
                },
                facts: SourceFacts::default(),
                grants: Vec::new(),
            })
        }
        SourceRef::LibvirtDomain { name } => {
            if format.is_some() {
                bail!(
                    "-f names a local image's format; a domain's disks' formats come from libvirt"
                );
            }
            let d = crate::targets::libvirt::source::open_domain(
                &conn.libvirt_uri,
                &name,
                conn.allow_running,
            )?;
            if d.running {
                warn_running(&name);
            }
            let (names, disks) = d
                .disks
                .into_iter()
                .map(|(n, s)| (n, Arc::<dyn DiskSource>::from(s)))
                .unzip();
            Ok(OpenedSource {
                disks: SourceDisks {
                    names,
                    disks,
                    ova: false,
                },
                facts: SourceFacts::default(),
                grants: Vec::new(),
            })
        }
        r @ (SourceRef::AzureDisk { .. } | SourceRef::AzureSnapshot { .. }) => {
            if format.is_some() {
                bail!(
                    "-f names a local image's format; a cloud disk is read as the raw disk it is"
                );
            }
            let (kind, group, name) = match r {
                SourceRef::AzureSnapshot { group, name } => {
                    (AzureSourceKind::Snapshot, group, name)
                }
                SourceRef::AzureDisk { group, name } => (AzureSourceKind::Disk, group, name),
                _ => bail!("{}: not an Azure source", src.display()),
            };
            let d = AzureDiskSource::open(&conn.azure, kind, &group, &name)?;
            let facts = SourceFacts {
                boot_mode: match d.hyper_v_generation.as_deref() {
                    Some("V2") => Some("uefi".into()),
                    Some("V1") => Some("legacy-bios".into()),
                    _ => None,
                },
                architecture: None,
                ena: None,
            };
            let grants = vec![(
                crate::targets::azure::source::READ_GRANT_KIND.to_string(),
                d.resource_id.clone(),
            )];
            Ok(OpenedSource {
                disks: SourceDisks {
                    names: vec![name],
                    disks: vec![Arc::new(d)],
                    ova: false,
                },
                facts,
                grants,
            })
        }
        r => {
            if format.is_some() {
                bail!(
                    "-f names a local image's format; a cloud disk is read as the raw disk it is"
                );
            }
            let reader = AwsReader::connect(&conn.aws, conn.max_attempts)?;
            match r {
                SourceRef::AwsSnapshot(id) => {
                    let s = reader.snapshot(&id)?;
                    Ok(OpenedSource {
                        disks: SourceDisks {
                            names: vec![id],
                            disks: vec![Arc::new(s)],
                            ova: false,
                        },
                        facts: SourceFacts::default(),
                        grants: Vec::new(),
                    })
                }
                SourceRef::AwsVolume(vol) => {
                    let snap = reader.newest_snapshot_of(&vol)?;
                    let s = reader.snapshot(&snap)?;
                    Ok(OpenedSource {
                        disks: SourceDisks {
                            names: vec![format!("{vol} ({snap})")],
                            disks: vec![Arc::new(s)],
                            ova: false,
                        },
                        facts: SourceFacts::default(),
                        grants: Vec::new(),
                    })
                }
                SourceRef::AwsImage(id) => {
                    let facts = reader.image(&id)?;
                    let mut names = Vec::new();
                    let mut disks: Vec<Arc<dyn DiskSource>> = Vec::new();
                    for (device, snap) in &facts.disks {
                        names.push(format!("{snap} ({device})"));
                        disks.push(Arc::new(reader.snapshot(snap)?));
                    }
                    Ok(OpenedSource {
                        disks: SourceDisks {
                            names,
                            disks,
                            ova: false,
                        },
                        facts: SourceFacts {
                            boot_mode: facts.boot_mode,
                            architecture: facts.architecture,
                            ena: facts.ena,
                        },
                        grants: Vec::new(),
                    })
                }
                SourceRef::File(_)
                | SourceRef::AzureDisk { .. }
                | SourceRef::AzureSnapshot { .. }
                | SourceRef::LibvirtVolume { .. }
                | SourceRef::LibvirtDomain { .. } => {
                    bail!("{}: not an AWS source", src.display())
                }
            }
        }
    }
}

/// Says once per process and domain that a running domain is being read (a command may open its source more
/// than once).
fn warn_running(name: &str) {
    static WARNED: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let first = WARNED
        .lock()
        .map(|mut w| w.insert(name.to_string()))
        .unwrap_or(true);
    if first {
        eprintln!(
            "imgshift: warning: domain '{name}' is running (--allow-running): its disks change while they are \
             read, so the copy is crash-consistent at best"
        );
    }
}

/// Opens `src` for a command that reads one disk (`info`, `map`, `inspect`, `compare`, `convert`): a local image
/// as always, or a cloud disk (an AMI's boot disk).
pub fn open_one(
    src: &Path,
    format: Option<&str>,
    allow_dirs: &[PathBuf],
    conn: &SourceConn,
) -> Result<Box<dyn DiskSource>> {
    match SourceRef::parse(src)? {
        SourceRef::File(p) => open_image(&p, format, allow_dirs),
        _ => {
            let opened = open_all(src, format, allow_dirs, conn)?;
            let Some(boot) = opened.disks.disks.into_iter().next() else {
                bail!("{}: no disk", src.display());
            };
            Ok(Box::new(boot))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let p = |s: &str| SourceRef::parse(Path::new(s));
        assert_eq!(
            p("aws:snap-0123abc").unwrap(),
            SourceRef::AwsSnapshot("snap-0123abc".into())
        );
        assert_eq!(
            p("aws:ami-0123abc").unwrap(),
            SourceRef::AwsImage("ami-0123abc".into())
        );
        assert_eq!(
            p("./aws:snap-1").unwrap(),
            SourceRef::File("./aws:snap-1".into())
        );
        assert_eq!(
            p("disk.qcow2").unwrap(),
            SourceRef::File("disk.qcow2".into())
        );
        assert_eq!(
            p("aws:vol-0123abc").unwrap(),
            SourceRef::AwsVolume("vol-0123abc".into())
        );
        assert!(p("aws:vol-").is_err());
        assert!(p("aws:vpc-1").is_err());
        assert!(p("aws:snap-").is_err());
        assert!(p("aws:snap-../x").is_err());
        assert_eq!(
            p("azure:disk/rg-1/web01-os").unwrap(),
            SourceRef::AzureDisk {
                group: "rg-1".into(),
                name: "web01-os".into()
            }
        );
        assert_eq!(
            p("azure:snapshot/rg-1/web01-snap").unwrap(),
            SourceRef::AzureSnapshot {
                group: "rg-1".into(),
                name: "web01-snap".into()
            }
        );
        assert!(p("azure:snapshot/rg").is_err());
        assert!(p("azure:snapshot/../x").is_err());
        assert!(p("azure:disk/rg").is_err());
        assert!(p("azure:disk/rg/a/b").is_err());
        assert!(p("azure:disk/rg/../x").is_err());
        assert!(p("azure:disk/../x").is_err());
        assert_eq!(
            p("libvirt:default/web01.qcow2").unwrap(),
            SourceRef::LibvirtVolume {
                pool: "default".into(),
                volume: "web01.qcow2".into()
            }
        );
        assert!(p("libvirt:default").is_err());
        assert_eq!(
            p("libvirt:domain/web01").unwrap(),
            SourceRef::LibvirtDomain {
                name: "web01".into()
            }
        );
        assert!(p("libvirt:domain/").is_err());
        assert!(p("libvirt:domain/a/b").is_err());
        assert!(p("libvirt:../x").is_err());
    }
}
