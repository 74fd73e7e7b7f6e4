//! Managed disks and snapshots as sources (`azure:disk/RG/NAME`, `azure:snapshot/RG/NAME`): read access granted (beginGetAccess Read), the page blob's
//! fixed-VHD footer checked, its page ranges as the allocation map (only allocated pages are read), ranged reads
//! in place; the grant is ended (endGetAccess) when the source is dropped, on success and on failure alike.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use imgshift_converters::{DiskSource, ExtentMap, Format, ImageInfo};

use super::arm::{Arm, DISK_API};
use super::readback::{PageBlob, PageBlobSource};
use super::retry::Policy;
use super::{FOOTER, credential, http, vhd};

/// How long a source's read SAS lasts (a copy longer than this fails with the SAS's expiry named).
const READ_ACCESS_SECONDS: u64 = 24 * 3600;

/// Where and as whom to read.
#[derive(Debug, Clone, Default)]
pub struct AzureReadConn {
    /// ARM endpoint.
    pub arm_endpoint: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_bundle: Option<PathBuf>,
    /// Subscription.
    pub subscription: Option<String>,
    /// Attempts per request.
    pub max_attempts: u32,
}

/// What is read: a managed disk or a snapshot (both grant read access the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AzureSourceKind {
    /// `Microsoft.Compute/disks`.
    Disk,
    /// `Microsoft.Compute/snapshots`.
    Snapshot,
}

impl AzureSourceKind {
    /// The ARM collection (`disks`, `snapshots`).
    pub fn collection(self) -> &'static str {
        match self {
            AzureSourceKind::Disk => "disks",
            AzureSourceKind::Snapshot => "snapshots",
        }
    }

    /// "disk", "snapshot".
    pub fn noun(self) -> &'static str {
        match self {
            AzureSourceKind::Disk => "disk",
            AzureSourceKind::Snapshot => "snapshot",
        }
    }
}

/// Ends the read grant of a disk or snapshot when dropped.
struct Grant {
    rt: Arc<tokio::runtime::Runtime>,
    arm: Arc<Arm>,
    /// `disks/NAME` or `snapshots/NAME`.
    resource: String,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Err(e) = self.rt.block_on(self.arm.revoke_on(&self.resource)) {
            eprintln!(
                "imgshift: could not end read access to {} (it ends by itself when its SAS expires): {e:#}",
                self.resource
            );
        }
    }
}

/// The journal's resource kind of a read grant on a source disk or snapshot (its id is the ARM resource id), so
/// `jobs cancel` ends a grant a killed run left open (issue 22).
pub const READ_GRANT_KIND: &str = "azure-read-grant";

/// A managed disk or snapshot read in place through a read SAS.
pub struct AzureDiskSource {
    inner: PageBlobSource,
    _grant: Grant,
    /// The ARM resource id of what is read (what the grant is on).
    pub resource_id: String,
    /// The disk's Hyper-V generation (`V1`, `V2`), when recorded.
    pub hyper_v_generation: Option<String>,
}

impl AzureDiskSource {
    /// Opens disk or snapshot `name` of resource group `group`: refuses a disk attached to a VM (snapshot it
    /// first); a snapshot (full or incremental) reads as the whole disk it was taken of.
    pub fn open(
        conn: &AzureReadConn,
        kind: AzureSourceKind,
        group: &str,
        name: &str,
    ) -> Result<AzureDiskSource> {
        let noun = kind.noun();
        let resource = format!("{}/{name}", kind.collection());
        let Some(sub) = conn.subscription.as_deref() else {
            bail!(
                "an azure: source needs a subscription (the subscription option, or AZURE_SUBSCRIPTION_ID)"
            );
        };
        let rt = Arc::new(crate::targets::runtime()?);
        let transport = http::transport(conn.ca_bundle.as_deref())?;
        let cred = credential::choose(&transport)?;
        rt.block_on(credential::check(&cred))?;
        let arm = Arm::new(
            &conn.arm_endpoint,
            cred.credential.clone(),
            &transport,
            conn.max_attempts.max(1),
            sub,
            group,
            false,
        )?;
        let what = format!("looking up {noun} {name}");
        let Some(d) = rt.block_on(arm.get(&resource, DISK_API, &what))? else {
            bail!(
                "no {} {name} in resource group {group}",
                match kind {
                    AzureSourceKind::Disk => "managed disk",
                    AzureSourceKind::Snapshot => "snapshot",
                }
            );
        };
        let state = d["properties"]["diskState"].as_str().unwrap_or_default();
        if kind == AzureSourceKind::Disk && state == "Attached" {
            bail!(
                "disk {name} is attached to a VM and cannot be exported while it runs: snapshot it (az snapshot create \
                 -g {group} --source {name} -n {name}-snap) and read the snapshot, or stop and deallocate the VM"
            );
        }
        let sas = rt
            .block_on(arm.grant_read_on(&resource, READ_ACCESS_SECONDS))
            .with_context(|| format!("cannot read {noun} {name}"))?;
        let resource_id = arm.id(&resource);
        let arm = Arc::new(arm);
        let grant = Grant {
            rt: Arc::clone(&rt),
            arm: Arc::clone(&arm),
            resource: resource.clone(),
        };
        let policy = Policy {
            max_attempts: conn.max_attempts.max(1),
            ..Policy::default()
        };
        // A copy that outlives its SAS asks for a new one (the grant is the same disk's; endGetAccess ends all).
        let (rt2, arm2, res2) = (Arc::clone(&rt), Arc::clone(&arm), resource.clone());
        let renew: super::readback::Renew =
            Box::new(move || rt2.block_on(arm2.grant_read_on(&res2, READ_ACCESS_SECONDS)));
        // The SAS may already have expired when its first request arrives (a slow grant): once more, fresh.
        let blob = match PageBlob::open(rt.handle().clone(), &sas, &transport, policy) {
            Err(e) if super::retry::has_status(&e, 403) => {
                PageBlob::open(rt.handle().clone(), &renew()?, &transport, policy)?
            }
            r => r?,
        }
        .renewing(renew);
        drop(sas);
        let size = blob.size();
        let Some(data_size) = size.checked_sub(FOOTER) else {
            bail!("{noun} {name}'s blob holds {size} bytes: too small for a fixed VHD");
        };
        let mut footer = vec![0u8; FOOTER as usize];
        blob.read(&mut footer, data_size)?;
        vhd::check_fixed_footer(&footer, data_size)
            .with_context(|| format!("{noun} {name} is not a fixed VHD as managed disks are"))?;
        let ranges = blob.page_ranges()?;
        Ok(AzureDiskSource {
            inner: PageBlobSource::new(blob, data_size, ranges)?,
            _grant: grant,
            resource_id,
            hyper_v_generation: d["properties"]["hyperVGeneration"]
                .as_str()
                .map(str::to_string),
        })
    }
}

/// Ends the read grant on `resource_id` (an ARM id of a disk or snapshot, as [`READ_GRANT_KIND`] records it):
/// endGetAccess, for `jobs cancel` after a run was killed while reading. Ending a grant already ended is harmless.
pub fn end_read_grant(conn: &AzureReadConn, resource_id: &str) -> Result<String> {
    let parts: Vec<&str> = resource_id.trim_start_matches('/').split('/').collect();
    let [
        "subscriptions",
        sub,
        "resourceGroups",
        group,
        "providers",
        "Microsoft.Compute",
        kind,
        name,
    ] = parts.as_slice()
    else {
        bail!("the job's record names a malformed read grant '{resource_id}'");
    };
    let noun = match *kind {
        "disks" => "disk",
        "snapshots" => "snapshot",
        _ => {
            bail!("the job's record names a read grant on '{kind}', neither a disk nor a snapshot")
        }
    };
    super::arm::check_name("the resource group", group)?;
    super::arm::check_name(&format!("the {noun}"), name)?;
    let rt = crate::targets::runtime()?;
    let transport = http::transport(conn.ca_bundle.as_deref())?;
    let cred = credential::choose(&transport)?;
    rt.block_on(credential::check(&cred))?;
    let arm = Arm::new(
        &conn.arm_endpoint,
        cred.credential.clone(),
        &transport,
        conn.max_attempts.max(1),
        sub,
        group,
        false,
    )?;
    rt.block_on(arm.revoke_on(&format!("{kind}/{name}")))
        .with_context(|| format!("cannot end read access to {noun} {name}"))?;
    Ok(format!("ended read access to {noun} {name}"))
}

impl DiskSource for AzureDiskSource {
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn extents(&self, offset: u64, len: u64) -> imgshift_converters::Result<ExtentMap> {
        self.inner.extents(offset, len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgshift_converters::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn info(&self) -> ImageInfo {
        self.inner.info()
    }
}
