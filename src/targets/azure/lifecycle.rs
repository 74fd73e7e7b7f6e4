//! The Azure lifecycle of a job (`migrate --to azure`, `upload azure`, `resume`, `jobs cancel`): one managed disk per source disk (`NAME-os` for the boot disk, `NAME-data1`, ... for the
//! others: Azure keeps data disks apart from the image), each created for upload and filled through a fresh write
//! SAS exactly as `upload azure` does (resumable per 4 MiB window); then the image `NAME` from the OS disk and,
//! when asked, a gallery image version. Verified by reading every disk back through a read SAS: its page ranges
//! against the source's map, its fixed-VHD footer, and sampled contents.
//!
//! Each disk's progress is kept in its journal ids under [`STAGE_KEY`]: `creating` (recorded, PUT about to be
//! sent) → `created` → `granted` (a write SAS was asked for at least once; the SAS itself is never stored) →
//! `uploaded` (every window and the footer acknowledged) → `revoked`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use azure_core::http::Transport;
use imgshift_converters::{DiskSource, ExtentKind, ExtentMap};
use serde_json::json;

use crate::job::{DiskInfo, Job, Target, UploadStats, map_disk, verify};
use crate::journal::{DiskKey, JobKey, Resource};
use crate::progress::{Bar, human_size};
use crate::targets::azure::arm::{Arm, DISK_API, DiskSpec, GALLERY_API, IMAGE_API, check_name};
use crate::targets::azure::pages::slot_count;
use crate::targets::azure::readback::{self, PageBlob, PageBlobSource};
use crate::targets::azure::retry::Policy;
use crate::targets::azure::{
    FOOTER, GEN1_MAX_OS_DISK, MAX_DISK, MAX_PUT_PAGE, credential, disk_data_size, http, hyperv,
    upload, vhd,
};

/// Default windows in flight per disk.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Most windows in flight per disk.
pub const MAX_CONCURRENCY: usize = 256;
/// Most disks one job makes: the OS disk and the 64 data disks the largest VM sizes attach.
const MAX_DISKS: usize = 65;
/// Longest managed disk or image name (Azure naming rules for Microsoft.Compute: 1 to 80 characters).
const MAX_NAME: usize = 80;
/// Lifetime of the read SAS the verify stage asks for (revoked as soon as the disk is checked).
const VERIFY_ACCESS_SECONDS: u64 = 3600;
/// Where a disk's stage is kept in its journal ids.
pub const STAGE_KEY: DiskKey = DiskKey::AzureStage;
const CREATING: &str = "creating";
const CREATED: &str = "created";
const GRANTED: &str = "granted";
const UPLOADED: &str = "uploaded";
const REVOKED: &str = "revoked";

/// The managed disk made from source disk `i` of job `name`.
pub fn disk_name(name: &str, i: usize) -> String {
    if i == 0 {
        format!("{name}-os")
    } else {
        format!("{name}-data{i}")
    }
}

/// Connected clients.
struct Conn {
    rt: tokio::runtime::Runtime,
    transport: Transport,
    arm: Arm,
}

/// What an Azure job makes, and how it reaches Azure: the target's own settings (the command line maps its
/// flags to these).
#[derive(Debug, Clone)]
pub struct AzureSettings {
    /// ARM endpoint (https).
    pub arm_endpoint: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_bundle: Option<PathBuf>,
    /// Subscription id.
    pub subscription: Option<String>,
    /// Resource group.
    pub resource_group: Option<String>,
    /// Region of what is made.
    pub location: Option<String>,
    /// Attempts per request for retryable failures.
    pub max_attempts: u32,
    /// Say each step.
    pub verbose: bool,
    /// Windows in flight per disk (at most [`MAX_CONCURRENCY`]).
    pub concurrency: usize,
    /// Lifetime of each write SAS, in seconds.
    pub access_duration: u64,
    /// Disk SKU.
    pub sku: String,
    /// "windows" or "linux".
    pub os_type: String,
    /// "V1", "V2" or "auto".
    pub generation: String,
    /// Gallery, image definition, version.
    pub gallery: Option<(String, String, String)>,
    /// The managed disks' names, boot disk first; `None`: `NAME-os`, `NAME-data1`, ...
    pub disk_names: Option<Vec<String>>,
    /// The image to make from the OS disk; `None`: no image.
    pub image_name: Option<String>,
}

/// The Azure target of one job.
pub struct AzureTarget {
    arm_endpoint: String,
    ca_bundle: Option<PathBuf>,
    subscription: Option<String>,
    resource_group: Option<String>,
    location: Option<String>,
    max_attempts: u32,
    verbose: bool,
    concurrency: usize,
    access_duration: u64,
    sku: String,
    /// "Linux" or "Windows".
    os_type: &'static str,
    /// "V1", "V2" or "auto".
    generation: String,
    /// Gallery, image definition, version.
    gallery: Option<(String, String, String)>,
    disk_names: Option<Vec<String>>,
    image_name: Option<String>,
    conn: Option<Conn>,
}

impl AzureTarget {
    /// The target `s` describe (no request is made); the subscription, resource group and location must be
    /// given.
    pub fn new(s: AzureSettings) -> Result<AzureTarget> {
        if s.concurrency == 0 || s.concurrency > MAX_CONCURRENCY {
            bail!("the concurrency must be between 1 and {MAX_CONCURRENCY}");
        }
        if !(300..=7 * 86400).contains(&s.access_duration) {
            bail!("the SAS access duration must be between 300 and 604800 seconds");
        }
        let mut t = AzureTarget::connection(
            s.arm_endpoint,
            s.ca_bundle,
            s.subscription,
            s.resource_group,
            s.max_attempts,
        );
        t.location = s.location;
        t.verbose = s.verbose;
        t.concurrency = s.concurrency;
        t.access_duration = s.access_duration;
        t.sku = s.sku;
        t.os_type = if s.os_type.eq_ignore_ascii_case("windows") {
            "Windows"
        } else {
            "Linux"
        };
        t.generation = s.generation;
        t.gallery = s.gallery;
        t.disk_names = s.disk_names;
        t.image_name = s.image_name;
        t.required()?;
        Ok(t)
    }

    /// The managed disk made from source disk `i` of job `name`.
    fn disk_name(&self, name: &str, i: usize) -> String {
        self.disk_names
            .as_ref()
            .and_then(|n| n.get(i).cloned())
            .unwrap_or_else(|| disk_name(name, i))
    }

    /// A connection only (for `jobs cancel` of an `upload azure` job).
    pub fn connection(
        arm_endpoint: String,
        ca_bundle: Option<PathBuf>,
        subscription: Option<String>,
        resource_group: Option<String>,
        max_attempts: u32,
    ) -> AzureTarget {
        AzureTarget {
            arm_endpoint,
            ca_bundle,
            subscription,
            resource_group,
            location: None,
            max_attempts: max_attempts.max(1),
            verbose: false,
            concurrency: DEFAULT_CONCURRENCY,
            access_duration: 86400,
            sku: "Standard_LRS".into(),
            os_type: "Linux",
            generation: "auto".into(),
            gallery: None,
            disk_names: None,
            image_name: None,
            conn: None,
        }
    }

    /// The options every Azure job needs.
    fn required(&self) -> Result<(&str, &str, &str)> {
        let missing = |flag: &str, hint: &str| anyhow::anyhow!("--to azure needs {flag} ({hint})");
        let sub = self.subscription.as_deref().ok_or_else(|| {
            missing(
                "--subscription",
                "or set AZURE_SUBSCRIPTION_ID; `az account show --query id` prints yours",
            )
        })?;
        let rg = self
            .resource_group
            .as_deref()
            .ok_or_else(|| missing("--resource-group", "the group the disks and image go in"))?;
        let loc = self
            .location
            .as_deref()
            .ok_or_else(|| missing("--location", "the region, e.g. westeurope"))?;
        Ok((sub, rg, loc))
    }

    fn policy(&self) -> Policy {
        Policy {
            max_attempts: self.max_attempts,
            ..Policy::default()
        }
    }

    /// Connects (runtime, HTTPS transport, credentials checked with one token request, ARM client) once.
    fn open(&mut self) -> Result<()> {
        if self.conn.is_some() {
            return Ok(());
        }
        let (Some(sub), Some(rg)) = (self.subscription.clone(), self.resource_group.clone()) else {
            bail!("--to azure needs --subscription and --resource-group");
        };
        let rt = crate::targets::runtime()?;
        let transport = http::transport(self.ca_bundle.as_deref())?;
        let cred = credential::choose(&transport)?;
        rt.block_on(credential::check(&cred))?;
        if self.verbose {
            eprintln!("imgshift: Azure credentials: {}", cred.source);
        }
        let arm = Arm::new(
            &self.arm_endpoint,
            cred.credential.clone(),
            &transport,
            self.max_attempts,
            &sub,
            &rg,
            self.verbose,
        )?;
        self.conn = Some(Conn { rt, transport, arm });
        Ok(())
    }

    fn conn(&self) -> Result<&Conn> {
        self.conn.as_ref().context("not connected to Azure")
    }

    fn location(&self) -> Result<&str> {
        Ok(self.required()?.2)
    }

    /// Refuses when `provider_path` exists and this job did not record it as `kind`/`id`.
    fn refuse_taken(
        &self,
        job: &Job,
        kind: &str,
        id: &str,
        provider_path: &str,
        api: &str,
    ) -> Result<()> {
        if job.owns(kind, id) {
            return Ok(());
        }
        let c = self.conn()?;
        let what = format!("looking up {kind} {id}");
        if c.rt
            .block_on(c.arm.get(provider_path, api, &what))?
            .is_some()
        {
            bail!(
                "{} '{id}' already exists in resource group {} and is not this job's: choose another --name, or delete it",
                kind.replace('-', " "),
                c.arm.resource_group
            );
        }
        Ok(())
    }

    /// The Hyper-V generation: the flag, else (auto) what an earlier run used, the preflight's setting, or
    /// the boot disk's partition table.
    fn generation(&self, job: &Job, boot: Option<&dyn DiskSource>) -> Result<String> {
        if self.generation != "auto" {
            return Ok(self.generation.clone());
        }
        if let Some(g) = job.id_of(JobKey::HyperVGeneration)? {
            return Ok(g);
        }
        if let Some(g) = job.settings.get("hyper_v_generation") {
            return Ok(g.clone());
        }
        match boot {
            Some(b) => {
                let (g, why) = hyperv::detect(b);
                job.ui.say(&format!("Hyper-V generation {g}: {why}"));
                Ok(g.to_string())
            }
            None => Ok("V1".into()),
        }
    }

    fn gallery_path((g, d, v): &(String, String, String)) -> String {
        format!("galleries/{g}/images/{d}/versions/{v}")
    }

    /// Deletes one resource; a line saying what happened.
    fn delete(&self, what: &str, name: &str, provider_path: &str, api: &str) -> Result<String> {
        let c = self.conn()?;
        let doing = format!("deleting {what} {name}");
        let gone =
            c.rt.block_on(c.arm.delete(provider_path, api, &doing))
                .with_context(|| format!("cannot delete {what} {name}"))?;
        Ok(if gone {
            format!("deleted {what} {name}")
        } else {
            format!("{what} {name} was already gone")
        })
    }
}

impl Target for AzureTarget {
    fn units(&self, virtual_size: u64) -> Result<(u64, u64)> {
        let data_size = disk_data_size(virtual_size).with_context(|| {
            format!(
                "a disk of {virtual_size} bytes does not fit an Azure managed disk (at most {MAX_DISK} bytes)"
            )
        })?;
        Ok((MAX_PUT_PAGE, slot_count(data_size)))
    }

    fn plan(&self, job_name: &str, disks: &[DiskInfo]) -> Vec<String> {
        let mut out: Vec<String> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let size = disk_data_size(d.virtual_size)
                    .map_or_else(|| "too large".to_string(), |s| human_size(s + FOOTER));
                format!(
                    "managed disk {} ({size} fixed VHD, {}) from disk {i}",
                    self.disk_name(job_name, i),
                    if i == 0 { "OS disk" } else { "data disk" }
                )
            })
            .collect();
        if let Some(image) = &self.image_name {
            out.push(format!(
                "image '{image}' from {}{}",
                self.disk_name(job_name, 0),
                if disks.len() > 1 {
                    " (the data disks stay separate managed disks)"
                } else {
                    ""
                }
            ));
        }
        if let Some(g) = &self.gallery {
            out.push(format!("gallery image version {}/{}/{}", g.0, g.1, g.2));
        }
        out
    }

    fn connect(&mut self, job: &Job) -> Result<()> {
        self.required()?;
        if job.disks.len() > MAX_DISKS {
            bail!(
                "the source has {} disks; an Azure VM attaches an OS disk and at most {} data disks",
                job.disks.len(),
                MAX_DISKS - 1
            );
        }
        let names: Vec<String> = (0..job.disks.len())
            .map(|i| self.disk_name(&job.name, i))
            .collect();
        for n in names.iter().chain(self.image_name.iter()) {
            check_name("name", n)?;
            if n.len() > MAX_NAME {
                bail!(
                    "'{n}' is longer than the {MAX_NAME} characters Azure allows: choose a shorter --name"
                );
            }
        }
        if let Some((g, d, v)) = &self.gallery {
            check_name("--gallery", g)?;
            check_name("--gallery-image", d)?;
            check_name("--gallery-version", v)?;
        }
        for (i, d) in job.disks.iter().enumerate() {
            self.units(d.virtual_size)
                .with_context(|| format!("disk {i} ({})", d.name))?;
        }
        if let Some(boot) = job.disks.first() {
            let generation = self.generation(job, None)?;
            let size = disk_data_size(boot.virtual_size).unwrap_or(0);
            if generation == "V1" && size > GEN1_MAX_OS_DISK {
                bail!(
                    "an OS disk over 2 TiB boots only as Hyper-V generation V2; this one is {size} bytes: pass \
                     --hyper-v-generation V2 if the guest boots by UEFI"
                );
            }
        }
        self.open()?;
        {
            let c = self.conn()?;
            job.say(&format!(
                "Azure subscription {}, resource group {}",
                c.arm.subscription, c.arm.resource_group
            ));
        }
        // A taken name would fail (or, for a disk, be overwritten) only later: refuse now, unless this job made it.
        for n in &names {
            self.refuse_taken(job, "disk", n, &format!("disks/{n}"), DISK_API)?;
        }
        if let Some(image) = &self.image_name {
            self.refuse_taken(job, "image", image, &format!("images/{image}"), IMAGE_API)?;
        }
        if let Some(g) = &self.gallery {
            let id = format!("{}/{}/{}", g.0, g.1, g.2);
            self.refuse_taken(
                job,
                "gallery-version",
                &id,
                &Self::gallery_path(g),
                GALLERY_API,
            )?;
        }
        Ok(())
    }

    fn upload(
        &mut self,
        job: &Job,
        disk: usize,
        src: &dyn DiskSource,
        map: &ExtentMap,
        bar: Arc<Bar>,
    ) -> Result<UploadStats> {
        self.open()?;
        let name = self.disk_name(&job.name, disk);
        let size = src.virtual_size();
        let data_size = disk_data_size(size)
            .with_context(|| format!("disk {disk} is too large for Azure ({size} bytes)"))?;
        let mut stage = job.disk_id(disk, STAGE_KEY)?.unwrap_or_default();
        if stage.is_empty() {
            // On record before the PUT: a crash in between still leaves it for `jobs cancel`.
            job.record("disk", &name)?;
            job.set_disk_id(disk, DiskKey::ManagedDisk, &name)?;
            job.set_disk_id(disk, STAGE_KEY, CREATING)?;
            stage = CREATING.into();
        }
        let c = self.conn()?;
        let rg = c.arm.resource_group.clone();
        let leftover = |e: anyhow::Error| {
            e.context(format!(
                "disk {name} (disk {disk}) is kept in resource group {rg} for `imgshift resume {}`",
                job.id
            ))
        };
        if stage == CREATING {
            let (os_type, generation) = if disk == 0 {
                let g = self.generation(job, Some(src))?;
                job.set_id(JobKey::HyperVGeneration, &g)?;
                (Some(self.os_type), Some(g))
            } else {
                (None, None)
            };
            if disk == 0 && generation.as_deref() == Some("V1") && data_size > GEN1_MAX_OS_DISK {
                bail!(
                    "an OS disk over 2 TiB boots only as Hyper-V generation V2; this one is {data_size} bytes"
                );
            }
            // The interrupted run may have created it already (an upload disk with an active SAS refuses a
            // second PUT): create it only when it is not there.
            let what = format!("looking up disk {name}");
            let there =
                c.rt.block_on(c.arm.get(&format!("disks/{name}"), DISK_API, &what))?
                    .is_some();
            if !there {
                let spec = DiskSpec {
                    name: &name,
                    location: self.location()?,
                    sku: &self.sku,
                    os_type,
                    hyper_v_generation: generation.as_deref(),
                    upload_size_bytes: data_size + FOOTER,
                    tags: &job.tags,
                };
                c.rt.block_on(c.arm.create_disk(&spec)).map_err(leftover)?;
                job.say(&format!(
                    "created disk {name}: uploadSizeBytes {}{}",
                    data_size + FOOTER,
                    generation
                        .map(|g| format!(", {g}, {}", self.os_type))
                        .unwrap_or_default()
                ));
            }
            job.set_disk_id(
                disk,
                DiskKey::ManagedDiskId,
                &c.arm.id(&format!("disks/{name}")),
            )?;
            job.set_disk_id(disk, STAGE_KEY, CREATED)?;
            stage = CREATED.into();
        }
        let mut sent = UploadStats::default();
        if stage == CREATED || stage == GRANTED {
            // A fresh SAS on every run; never stored (only its expiry, for the messages).
            let sas =
                c.rt.block_on(c.arm.grant_write(&name, self.access_duration))
                    .map_err(leftover)?;
            if let Some(e) = upload::sas_expiry(&sas) {
                job.set_disk_id(disk, DiskKey::SasExpiry, &e)?;
            }
            job.set_disk_id(disk, STAGE_KEY, GRANTED)?;
            job.say(&format!("write access granted to disk {name}"));
            let client = upload::blob_client(&sas, &c.transport).map_err(leftover)?;
            drop(sas);
            imgshift_converters::Progress::set_total(bar.as_ref(), map.bytes(ExtentKind::Data));
            let bar2 = bar.clone();
            let progress: Arc<dyn Fn(u64) + Send + Sync> =
                Arc::new(move |n| imgshift_converters::Progress::inc(bar2.as_ref(), n));
            let src_name = job
                .disks
                .get(disk)
                .map_or_else(|| format!("disk {disk}"), |d| d.name.clone());
            let r = upload::stream_disk(
                &c.rt,
                client,
                upload::DiskStream {
                    src,
                    map,
                    src_name: &src_name,
                    data_size,
                    concurrency: self.concurrency,
                    policy: self.policy(),
                    ledger: job.ledger(disk),
                    progress,
                },
            );
            let counts = match r {
                Ok(c) => c,
                Err(e) => {
                    // The SAS stops working now; the next run asks for a new one.
                    if let Err(r) = c.rt.block_on(c.arm.revoke(&name)) {
                        job.say(&format!("could not revoke access to disk {name}: {r:#}"));
                    }
                    return Err(leftover(e));
                }
            };
            job.say(&format!(
                "disk {name}: {} bytes in {} Put Page requests ({} retried)",
                counts.bytes_sent, counts.requests, counts.retries
            ));
            job.set_disk_id(disk, STAGE_KEY, UPLOADED)?;
            stage = UPLOADED.into();
            sent = UploadStats {
                bytes_sent: counts.bytes_sent,
                requests: counts.requests,
                retries: counts.retries,
                throttled: counts.throttled,
                ..UploadStats::default()
            };
        }
        if stage == UPLOADED {
            c.rt.block_on(c.arm.revoke(&name)).map_err(leftover)?;
            job.say(&format!("revoked access to disk {name}"));
            job.set_disk_id(disk, STAGE_KEY, REVOKED)?;
        }
        Ok(sent)
    }

    fn register(&mut self, job: &Job) -> Result<String> {
        self.open()?;
        for i in 0..job.disks.len() {
            if job.disk_id(i, STAGE_KEY)?.as_deref() != Some(REVOKED) {
                bail!(
                    "disk {i} ({}) is not uploaded yet",
                    self.disk_name(&job.name, i)
                );
            }
        }
        let os_disk = self.disk_name(&job.name, 0);
        let generation = self.generation(job, None)?;
        let location = self.location()?.to_string();
        // What `imgshift images list --on azure` finds imgshift's images and gallery versions by.
        let mut tags = job.tags.clone();
        tags.extend(super::images::origin_tags(
            &job.id,
            job.disks.first().map(|d| d.name.as_str()),
            &job.tags,
        ));
        let c = self.conn()?;
        let mut made = Vec::new();
        if let Some(image) = &self.image_name
            && job.id_of(JobKey::Image)?.is_none()
        {
            job.record("image", image)?;
            c.rt.block_on(c.arm.create_image(
                image,
                &location,
                &os_disk,
                self.os_type,
                &generation,
                &tags,
            ))
            .with_context(|| {
                format!(
                    "the disks are uploaded and kept; `imgshift resume {}` retries the image",
                    job.id
                )
            })?;
            job.set_id(JobKey::Image, &c.arm.id(&format!("images/{image}")))?;
            job.say(&format!("created image {image}"));
        }
        if let Some(image) = &self.image_name {
            made.push(format!("image {image}"));
        }
        let mut gallery = String::new();
        if let Some(g) = &self.gallery {
            let id = format!("{}/{}/{}", g.0, g.1, g.2);
            if job.id_of(JobKey::GalleryVersion)?.is_none() {
                job.record("gallery-version", &id)?;
                c.rt.block_on(c.arm.create_gallery_version(
                    &g.0, &g.1, &g.2, &location, &os_disk, &tags,
                ))
                .with_context(|| {
                    format!(
                        "the disks are uploaded and kept; `imgshift resume {}` retries the gallery version",
                        job.id
                    )
                })?;
                job.set_id(JobKey::GalleryVersion, &c.arm.id(&Self::gallery_path(g)))?;
                job.say(&format!("created gallery image version {id}"));
            }
            gallery = format!("; gallery image version {id}");
        }
        let data: Vec<String> = (1..job.disks.len())
            .map(|i| self.disk_name(&job.name, i))
            .collect();
        if made.is_empty() {
            made.push("no image".into());
        }
        Ok(format!(
            "{} (Hyper-V {generation}, {}) from disk {os_disk}{}{gallery}",
            made.join(", "),
            self.os_type,
            if data.is_empty() {
                String::new()
            } else {
                format!(
                    "; data disk{} {}",
                    if data.len() == 1 { "" } else { "s" },
                    data.join(", ")
                )
            }
        ))
    }

    fn verify(&mut self, job: &Job, sources: &[Arc<dyn DiskSource>]) -> Result<String> {
        self.open()?;
        let policy = self.policy();
        let c = self.conn()?;
        let mut listed = 0u64;
        let mut compared = 0u64;
        for (i, src) in sources.iter().enumerate() {
            let name = self.disk_name(&job.name, i);
            let size = src.virtual_size();
            let data_size = disk_data_size(size)
                .with_context(|| format!("disk {i} is too large for Azure ({size} bytes)"))?;
            let map = map_disk(src.as_ref(), &format!("disk {i}"))?;
            let sas =
                c.rt.block_on(c.arm.grant_read(&name, VERIFY_ACCESS_SECONDS))?;
            let checked = (|| -> Result<(u64, u64)> {
                let blob = PageBlob::open(c.rt.handle().clone(), &sas, &c.transport, policy)?;
                if blob.size() != data_size + FOOTER {
                    bail!(
                        "the blob holds {} bytes; a fixed VHD of this disk is {}",
                        blob.size(),
                        data_size + FOOTER
                    );
                }
                let ranges = blob.page_ranges()?;
                let n = readback::check_ranges(&ranges, &map, data_size)?;
                let mut footer = vec![0u8; FOOTER as usize];
                blob.read(&mut footer, data_size)?;
                vhd::check_fixed_footer(&footer, data_size)?;
                let copy = PageBlobSource::new(blob, data_size, ranges)?;
                let m = verify::sample_compare(src.as_ref(), &map, &copy)?;
                Ok((n, m))
            })();
            drop(sas);
            let revoked = c.rt.block_on(c.arm.revoke(&name));
            let (n, m) = checked.with_context(|| format!("disk {name} (disk {i})"))?;
            revoked?;
            listed += n;
            compared += m;
        }
        Ok(format!(
            "{} disk{} read back: page ranges ({} written) only where the source has data, fixed-VHD footers \
             valid (cookie, checksum, size), {} sampled and identical",
            sources.len(),
            if sources.len() == 1 { "" } else { "s" },
            human_size(listed),
            human_size(compared)
        ))
    }

    fn outputs(&self, job: &Job) -> Result<serde_json::Value> {
        Ok(json!({
            "image_id": job.id_of(JobKey::Image)?,
            "disk_ids": job.disk_ids(DiskKey::ManagedDiskId)?,
            "gallery_image_version_id": job.id_of(JobKey::GalleryVersion)?,
            "hyper_v_generation": job.id_of(JobKey::HyperVGeneration)?,
            "resource_group": self.resource_group,
            "location": self.location,
        }))
    }

    fn cancel(&mut self, resources: &[Resource]) -> Result<Vec<String>> {
        self.open()?;
        let mut done = Vec::new();
        // What uses a disk goes first: the gallery version, then the image, then the disks.
        for r in resources.iter().filter(|r| r.kind == "gallery-version") {
            let parts: Vec<&str> = r.id.split('/').collect();
            let [g, d, v] = parts.as_slice() else {
                bail!(
                    "the job's record names a malformed gallery version '{}'",
                    r.id
                );
            };
            let path = format!("galleries/{g}/images/{d}/versions/{v}");
            done.push(self.delete("gallery image version", &r.id, &path, GALLERY_API)?);
        }
        for r in resources.iter().filter(|r| r.kind == "image") {
            check_name("image", &r.id)?;
            done.push(self.delete("image", &r.id, &format!("images/{}", r.id), IMAGE_API)?);
        }
        for r in resources.iter().filter(|r| r.kind == "disk") {
            check_name("disk", &r.id)?;
            let path = format!("disks/{}", r.id);
            let c = self.conn()?;
            let what = format!("looking up disk {}", r.id);
            let Some(d) = c.rt.block_on(c.arm.get(&path, DISK_API, &what))? else {
                done.push(format!("disk {} was already gone", r.id));
                continue;
            };
            // A disk with an active SAS cannot be deleted: revoke it first.
            let state = d["properties"]["diskState"].as_str().unwrap_or("");
            if state.starts_with("Active") {
                c.rt.block_on(c.arm.revoke(&r.id))
                    .with_context(|| format!("cannot revoke access to disk {}", r.id))?;
            }
            done.push(self.delete("disk", &r.id, &path, DISK_API)?);
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AzureSettings {
        AzureSettings {
            arm_endpoint: "https://management.azure.com".into(),
            ca_bundle: None,
            subscription: Some("s".into()),
            resource_group: Some("rg".into()),
            location: Some("westeurope".into()),
            max_attempts: 3,
            verbose: false,
            concurrency: DEFAULT_CONCURRENCY,
            access_duration: 86400,
            sku: "Standard_LRS".into(),
            os_type: "linux".into(),
            generation: "auto".into(),
            gallery: None,
            disk_names: None,
            image_name: Some("vm".into()),
        }
    }

    #[test]
    fn disk_names() {
        assert_eq!(disk_name("web", 0), "web-os");
        assert_eq!(disk_name("web", 1), "web-data1");
        assert_eq!(disk_name("web", 12), "web-data12");
        let t = AzureTarget::new(AzureSettings {
            disk_names: Some(vec!["given".into()]),
            ..settings()
        })
        .unwrap();
        assert_eq!(t.disk_name("web", 0), "given");
        assert_eq!(t.disk_name("web", 1), "web-data1");
    }

    #[test]
    fn required_settings_are_named() {
        let e = |s: AzureSettings| AzureTarget::new(s).err().map(|e| e.to_string());
        assert_eq!(e(settings()), None);
        assert!(
            e(AzureSettings {
                resource_group: None,
                ..settings()
            })
            .unwrap()
            .contains("--resource-group")
        );
        assert!(
            e(AzureSettings {
                location: None,
                ..settings()
            })
            .unwrap()
            .contains("--location")
        );
        assert!(
            e(AzureSettings {
                concurrency: 0,
                ..settings()
            })
            .unwrap()
            .contains("concurrency")
        );
    }

    #[test]
    fn units_are_4_mib_windows_plus_the_footer() {
        let t = AzureTarget::new(settings()).unwrap();
        // 64 MiB: 16 windows + the footer; small disks are padded to 20 MiB.
        assert_eq!(t.units(64 << 20).unwrap(), (MAX_PUT_PAGE, 17));
        assert_eq!(t.units(1).unwrap(), (MAX_PUT_PAGE, 6));
        assert!(t.units(MAX_DISK + 1).is_err());
    }

    #[test]
    fn plan_names_every_disk_and_the_image() {
        let t = AzureTarget::new(AzureSettings {
            gallery: Some(("g".into(), "d".into(), "1.0.0".into())),
            ..settings()
        })
        .unwrap();
        let d = |n: &str| DiskInfo {
            name: n.into(),
            virtual_size: 64 << 20,
            data_bytes: 1 << 20,
        };
        let p = t.plan("vm", &[d("a"), d("b")]);
        assert!(p[0].starts_with("managed disk vm-os"), "{p:?}");
        assert!(p[1].starts_with("managed disk vm-data1"), "{p:?}");
        assert!(p[2].starts_with("image 'vm' from vm-os"), "{p:?}");
        assert_eq!(p[3], "gallery image version g/d/1.0.0");
    }
}
