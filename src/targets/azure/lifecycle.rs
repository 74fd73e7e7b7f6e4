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
use crate::targets::azure::arm::{
    Arm, DISK_API, DiskSpec, GALLERY_API, IMAGE_API, ImageOs, check_name,
};
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
/// An image's osState: generalised (sysprep'd Windows; every Linux image, as before) or specialised.
const GENERALIZED: &str = "Generalized";
const SPECIALIZED: &str = "Specialized";

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
    /// "windows", "linux" or "auto" (the guest's, from inspection: Windows when a Windows system root was found).
    pub os_type: String,
    /// "V1", "V2" or "auto".
    pub generation: String,
    /// Gallery, image definition, version.
    pub gallery: Option<(String, String, String)>,
    /// The managed disks' names, boot disk first; `None`: `NAME-os`, `NAME-data1`, ...
    pub disk_names: Option<Vec<String>>,
    /// The image to make from the OS disk; `None`: no image.
    pub image_name: Option<String>,
    /// The image was asked for by name (`upload azure --image-name`): a guest that cannot become a managed
    /// image (a specialised Windows) is refused instead of being left as a disk.
    pub image_explicit: bool,
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
    /// `--os-type` when given (not `auto`).
    os_type_flag: Option<&'static str>,
    /// "Generalized" or "Specialized": the image's osState (the preflight's `os_state`; generalised unless it says
    /// otherwise).
    os_state: &'static str,
    /// The managed image not made because the guest is specialised (`migrate` leaves the disk instead).
    skipped_image: Option<String>,
    image_explicit: bool,
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
        t.os_type_flag = if s.os_type.eq_ignore_ascii_case("windows") {
            Some("Windows")
        } else if s.os_type.eq_ignore_ascii_case("linux") {
            Some("Linux")
        } else {
            None
        };
        t.os_type = t.os_type_flag.unwrap_or("Linux");
        t.image_explicit = s.image_explicit;
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
            os_type_flag: None,
            os_state: GENERALIZED,
            skipped_image: None,
            image_explicit: false,
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

    /// Refuses a gallery image definition whose osType, osState or Hyper-V generation differ from the guest's:
    /// every version of a definition shares them, and Azure refuses a version whose disk does not match
    /// (<https://learn.microsoft.com/rest/api/compute/gallery-images/create-or-update>). A definition that
    /// cannot be read is left to Azure's answer to the version.
    fn check_definition(&self, job: &Job, (g, d, _): &(String, String, String)) -> Result<()> {
        let c = self.conn()?;
        let what = format!("looking up gallery image definition {g}/{d}");
        let Some(def) = c.rt.block_on(c.arm.get(
            &format!("galleries/{g}/images/{d}"),
            GALLERY_API,
            &what,
        ))?
        else {
            return Ok(());
        };
        let p = &def["properties"];
        let mut wrong = Vec::new();
        if let Some(t) = p["osType"].as_str()
            && !t.eq_ignore_ascii_case(self.os_type)
        {
            wrong.push(format!("osType {t}, the guest is {}", self.os_type));
        }
        if let Some(st) = p["osState"].as_str()
            && !st.eq_ignore_ascii_case(self.os_state)
        {
            wrong.push(format!("osState {st}, the guest is {}", self.os_state));
        }
        let generation_known =
            self.generation != "auto" || job.settings.contains_key("hyper_v_generation");
        let generation = self.generation(job, None)?;
        if generation_known
            && let Some(hv) = p["hyperVGeneration"].as_str()
            && !hv.eq_ignore_ascii_case(&generation)
        {
            wrong.push(format!("hyperVGeneration {hv}, the guest is {generation}"));
        }
        if !wrong.is_empty() {
            bail!(
                "gallery image definition {g}/{d} does not fit this guest ({}): use a definition made with \
                 --os-type {} --os-state {} --hyper-v-generation {generation} (az sig image-definition create)",
                wrong.join("; "),
                self.os_type,
                self.os_state
            );
        }
        Ok(())
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
    /// The guest's OS type (unless `--os-type` says), and its state: a specialised Windows (not sysprep'd)
    /// becomes no managed image (Azure's managed images are generalised only,
    /// <https://learn.microsoft.com/azure/virtual-machines/capture-image-resource>): `migrate` leaves its disk
    /// (and the gallery version, when asked), `upload azure --image-name` is refused in `connect`.
    fn follow(&mut self, settings: &std::collections::BTreeMap<String, String>) {
        if self.os_type_flag.is_none() {
            self.os_type = if settings.get("os_type").map(String::as_str) == Some("windows") {
                "Windows"
            } else {
                "Linux"
            };
        }
        self.os_state = if settings.get("os_state").map(String::as_str) == Some(SPECIALIZED) {
            SPECIALIZED
        } else {
            GENERALIZED
        };
        if self.os_state == SPECIALIZED && !self.image_explicit && self.skipped_image.is_none() {
            self.skipped_image = self.image_name.take();
        }
    }

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
        if let Some(image) = &self.skipped_image {
            out.push(format!(
                "no managed image '{image}': the guest is a specialised {} (not generalised by sysprep), which \
                 Azure takes only as a specialized gallery image version{}",
                self.os_type,
                if self.gallery.is_some() {
                    ""
                } else {
                    " (--gallery, --gallery-image, --gallery-version)"
                }
            ));
        }
        if let Some(g) = &self.gallery {
            out.push(format!(
                "gallery image version {}/{}/{} ({}, {})",
                g.0, g.1, g.2, self.os_type, self.os_state
            ));
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
        if self.os_state == SPECIALIZED
            && let Some(image) = &self.image_name
        {
            bail!(
                "the guest is a specialised {} (not generalised by sysprep), and Azure makes managed images of \
                 generalised guests only: image '{image}' is refused (nothing was created); drop --image-name and \
                 pass --gallery, --gallery-image and --gallery-version for a specialized gallery image version, or \
                 run `sysprep /generalize /oobe /shutdown` inside the guest first",
                self.os_type
            );
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
            self.check_definition(job, g)?;
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
                ImageOs {
                    os_type: self.os_type,
                    os_state: self.os_state,
                    hyper_v_generation: &generation,
                },
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
        if let Some(image) = &self.skipped_image {
            made.push(format!(
                "no managed image '{image}' (a specialised guest becomes a specialized gallery image version only)"
            ));
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
            "{} (Hyper-V {generation}, {}, {}) from disk {os_disk}{}{gallery}",
            made.join(", "),
            self.os_type,
            self.os_state,
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
            image_explicit: false,
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
        assert_eq!(p[3], "gallery image version g/d/1.0.0 (Linux, Generalized)");
    }

    /// A specialised Windows guest (inspection's settings): osType Windows, no managed image for `migrate`
    /// (the plan says why), a Specialized gallery version; `--os-type` given wins over inspection.
    #[test]
    fn a_specialised_windows_guest_gets_no_managed_image() {
        let windows: std::collections::BTreeMap<String, String> = [
            ("os_type", "windows"),
            ("os_state", "Specialized"),
            ("hyper_v_generation", "V1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let d = DiskInfo {
            name: "w".into(),
            virtual_size: 64 << 20,
            data_bytes: 1 << 20,
        };
        let mut t = AzureTarget::new(AzureSettings {
            os_type: "auto".into(),
            gallery: Some(("g".into(), "d".into(), "1.0.0".into())),
            ..settings()
        })
        .unwrap();
        t.follow(&windows);
        let p = t.plan("vm", std::slice::from_ref(&d));
        assert!(
            p[1].starts_with("no managed image 'vm': the guest is a specialised Windows"),
            "{p:?}"
        );
        assert_eq!(
            p[2],
            "gallery image version g/d/1.0.0 (Windows, Specialized)"
        );
        assert_eq!(
            (t.os_type, t.os_state, t.image_name.as_deref()),
            ("Windows", SPECIALIZED, None)
        );
        // Asked for by name: kept, so that `connect` refuses it before anything is created.
        let mut t = AzureTarget::new(AzureSettings {
            os_type: "linux".into(),
            image_explicit: true,
            ..settings()
        })
        .unwrap();
        t.follow(&windows);
        assert_eq!((t.os_type, t.image_name.as_deref()), ("Linux", Some("vm")));
        // A generalised Windows: a managed image, Generalized.
        let mut t = AzureTarget::new(AzureSettings {
            os_type: "auto".into(),
            ..settings()
        })
        .unwrap();
        let mut g = windows.clone();
        g.insert("os_state".into(), "Generalized".into());
        t.follow(&g);
        assert_eq!((t.os_type, t.os_state), ("Windows", GENERALIZED));
        assert!(t.plan("vm", &[d])[1].starts_with("image 'vm' from vm-os"));
    }
}
