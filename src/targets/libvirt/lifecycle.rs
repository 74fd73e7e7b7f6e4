//! `migrate --to libvirt`: one storage volume per disk, all attached to one domain.
//!
//! - Names: the domain is `NAME`; disk 0's volume is `NAME.qcow2` (or `NAME.raw` with `--volume-format raw`),
//!   disk N's `NAME-dataN.qcow2`. The suffix is the format's name, as virt-install and imgshift's own tests name
//!   volumes, so a dir pool's files say what they hold. A name that exists and is not this job's is refused in
//!   `connect`, before anything is created.
//! - Resumable unit: a whole disk. A libvirt upload stream cannot be resumed in the middle, so a disk whose upload
//!   did not finish is sent again from scratch after deleting the partial volume; a finished disk is never resent.
//! - Everything is recorded in the journal before it is created (`volume` as `POOL/VOLUME`, `domain` as its
//!   name), which is what `jobs cancel` removes.
//! - Register: defines the domain with the `auto` firmware and disk bus of `upload libvirt`
//!   ([`crate::targets::libvirt::plan`]), from the inspect stage's preflight settings; `--start` starts it.
//! - Verify: each volume's capacity, a sampled content check of each volume read back through libvirt (download
//!   streams under imgshift's own qcow2/raw reader), and the domain's XML naming every volume.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use imgshift_converters::{DiskSource, ExtentMap};
use serde_json::json;

use crate::job::{DiskInfo, Job, Target, UploadStats, map_disk, verify};
use crate::journal::{DiskKey, JobKey, Resource};
use crate::progress::Bar;
use crate::targets::libvirt::plan::{self, DomainChoices, GuestHints};
use crate::targets::libvirt::rpc::{self, Connect, StoragePool};
use crate::targets::libvirt::xml::{DomainDisk, domain_xml};
use crate::targets::libvirt::{
    Error as LvError, Firmware, VolFormat, conn as lv, download, fill, inuse, volume,
};

/// The libvirt target of one job.
pub struct LibvirtTarget {
    uri: String,
    pool: String,
    format: VolFormat,
    choices: DomainChoices,
    start: bool,
    volume_names: Option<Vec<String>>,
    define: bool,
    overwrite: bool,
    stop: Option<Arc<AtomicBool>>,
    conn: Option<Connect>,
}

/// The volume of disk `disk` of a job named `name`.
pub fn volume_name(name: &str, disk: usize, format: VolFormat) -> String {
    if disk == 0 {
        format!("{name}.{}", format.name())
    } else {
        format!("{name}-data{disk}.{}", format.name())
    }
}

/// `POOL/VOLUME`, as volumes are recorded in the journal (libvirt refuses '/' in pool names).
fn volume_resource(pool: &str, vol: &str) -> String {
    format!("{pool}/{vol}")
}

/// What a libvirt job makes, and where: the target's own settings (the command line maps its flags to these).
#[derive(Debug, Clone)]
pub struct LibvirtSettings {
    /// Connection URI.
    pub uri: String,
    /// The running storage pool that receives the volumes.
    pub pool: String,
    /// Volume format.
    pub format: VolFormat,
    /// Domain settings (`auto` choices resolved from inspection at registration).
    pub choices: DomainChoices,
    /// Start the domain once defined.
    pub start: bool,
    /// The volumes' names, one per disk (`upload libvirt --volume`); `None`: named after the job
    /// ([`volume_name`]).
    pub volume_names: Option<Vec<String>>,
    /// Define a domain named after the job in the register stage (a taken name is refused in `connect`).
    pub define: bool,
    /// Replace a volume or a stopped domain of the same name that is not this job's (never one a running domain
    /// uses, never a running domain): the old volume is deleted in `connect`, the old domain undefined just
    /// before the new one is defined.
    pub overwrite: bool,
    /// When set (Ctrl-C, SIGTERM), a running upload fails its next write, which deletes the partial volume: for
    /// one-shot uploads, which are rolled back anyway. `None`: a disk's upload runs to its end and the job stops
    /// at the next disk boundary, keeping what is finished for `resume`.
    pub stop: Option<Arc<AtomicBool>>,
}

/// The firmware a disk's partition table suggests (guest inspection's fact): UEFI for a GPT with an EFI system
/// partition, else BIOS; and why.
fn partition_firmware(src: &dyn DiskSource) -> (Firmware, &'static str) {
    let table = crate::guest::partitions::read_source(src);
    if table.gpt_with_esp() {
        (
            Firmware::Uefi,
            "the disk has a GPT with an EFI system partition (UEFI boot)",
        )
    } else if table.scheme == "gpt" {
        (
            Firmware::Bios,
            "the disk has a GPT but no EFI system partition",
        )
    } else {
        (Firmware::Bios, "the disk has no GPT (BIOS boot)")
    }
}

impl LibvirtTarget {
    /// The target `s` describe (no connection yet).
    pub fn new(s: LibvirtSettings) -> Result<LibvirtTarget> {
        if s.pool.is_empty() {
            bail!(
                "no storage pool named: the running pool that receives the volumes (`virsh pool-list` lists them)"
            );
        }
        s.choices.check()?;
        if let Some(names) = &s.volume_names
            && names.iter().any(String::is_empty)
        {
            bail!("a volume name is empty");
        }
        Ok(LibvirtTarget {
            uri: s.uri,
            pool: s.pool,
            format: s.format,
            choices: s.choices,
            start: s.start,
            volume_names: s.volume_names,
            define: s.define,
            overwrite: s.overwrite,
            stop: s.stop,
            conn: None,
        })
    }

    /// Whether registering needs what inspection finds (a domain whose firmware or bus is `auto`).
    pub fn needs_guest(&self) -> bool {
        self.define && self.choices.needs_guest()
    }

    /// The volumes' format.
    pub fn format(&self) -> VolFormat {
        self.format
    }

    fn conn(&mut self) -> Result<Connect> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let c = lv::connect(&self.uri)?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    fn pool(&mut self) -> Result<StoragePool> {
        let conn = self.conn()?;
        Ok(lv::running_pool(&conn, &self.pool, &self.uri)?)
    }

    fn volume(&self, job: &Job, disk: usize) -> String {
        self.volume_for(&job.name, disk)
    }

    /// The volume of disk `disk`: the name given for it, else named after the job.
    fn volume_for(&self, job_name: &str, disk: usize) -> String {
        match self.volume_names.as_ref().and_then(|n| n.get(disk)) {
            Some(n) => n.clone(),
            None => volume_name(job_name, disk, self.format),
        }
    }

    /// Checks a taken volume name that is not this job's: refused unless `overwrite`, and never replaced under a
    /// running domain.
    fn check_replaceable_volume(
        &self,
        conn: &Connect,
        old: &rpc::StorageVol,
        vol: &str,
    ) -> Result<()> {
        if !self.overwrite {
            if self.volume_names.is_some() {
                return Err(LvError::VolumeExists {
                    pool: self.pool.clone(),
                    volume: vol.to_string(),
                }
                .into());
            }
            bail!(
                "volume '{vol}' already exists in pool '{}' and is not this job's: choose another --name, or \
                 remove it (`virsh vol-delete --pool {} {vol}`)",
                self.pool,
                self.pool
            );
        }
        let path = old
            .path()
            .map_err(|e| LvError::call(format!("cannot read the path of volume '{vol}'"), &e))?;
        let vref = inuse::VolumeRef {
            pool: &self.pool,
            volume: vol,
            path: &path,
        };
        let users = inuse::running_users(conn, &vref)?;
        if !users.is_empty() {
            return Err(LvError::VolumeInUse {
                pool: self.pool.clone(),
                volume: vol.to_string(),
                domains: users
                    .iter()
                    .map(|u| format!("'{u}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        }
        Ok(())
    }

    /// Where each disk's volume is on the daemon's host (`None` for one not made yet).
    fn paths(&self, job: &Job) -> Result<Vec<Option<String>>> {
        let Some(conn) = &self.conn else {
            return Ok(vec![None; job.disks.len()]);
        };
        let pool = lv::running_pool(conn, &self.pool, &self.uri)?;
        let mut out = Vec::new();
        for i in 0..job.disks.len() {
            let vol = self.volume(job, i);
            out.push(match lv::find_volume(&pool, &self.pool, &vol)? {
                Some(v) => Some(v.path().map_err(|e| {
                    LvError::call(format!("cannot read the path of volume '{vol}'"), &e)
                })?),
                None => None,
            });
        }
        Ok(out)
    }

    /// Whether domain XML `xml` attaches any of the job's volumes.
    fn uses_job_volumes(&self, job: &Job, xml: &str) -> Result<bool> {
        for i in 0..job.disks.len() {
            let vol = self.volume(job, i);
            let r = inuse::VolumeRef {
                pool: &self.pool,
                volume: &vol,
                path: "",
            };
            if inuse::uses(xml, &r)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// What inspection found, as the inspect stage kept it: the preflight settings, whether a Linux root was
    /// read, and the firmware disk 0's partition table suggests (kept by its upload).
    fn hints(job: &Job) -> Result<GuestHints> {
        let os_read = job.settings.get("os_read").map(String::as_str) == Some("yes");
        let partition_firmware = match job.id_of(JobKey::PartitionFirmware)?.as_deref() {
            Some("uefi") => Some(Firmware::Uefi),
            Some("bios") => Some(Firmware::Bios),
            _ => None,
        }
        .map(|fw| {
            let why = job
                .id_of(JobKey::PartitionFirmwareWhy)
                .ok()
                .flatten()
                .unwrap_or_else(|| "from the disk's partition table".into());
            (fw, why)
        });
        Ok(GuestHints {
            os_read,
            settings: job.settings.clone(),
            partition_firmware,
        })
    }
}

impl Target for LibvirtTarget {
    fn units(&self, virtual_size: u64) -> Result<(u64, u64)> {
        Ok((fill::capacity(self.format, virtual_size)?, 1))
    }

    fn plan(&self, job_name: &str, disks: &[DiskInfo]) -> Vec<String> {
        let mut out: Vec<String> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                format!(
                    "volume '{}' in pool '{}' ({}, {} virtual) from disk {i}",
                    self.volume_for(job_name, i),
                    self.pool,
                    self.format.name(),
                    crate::progress::human_size(d.virtual_size)
                )
            })
            .collect();
        if self.define {
            out.push(format!(
                "domain '{job_name}' with {} disk{}{}",
                disks.len(),
                if disks.len() == 1 { "" } else { "s" },
                if self.start { ", started" } else { "" }
            ));
        }
        out
    }

    fn connect(&mut self, job: &Job) -> Result<()> {
        let pool = self.pool()?;
        let conn = self.conn()?;
        job.say(&format!("libvirt at {}, pool '{}'", self.uri, self.pool));
        match job.id_of(JobKey::VolumeFormat)? {
            Some(f) if f != self.format.name() => bail!(
                "job {} makes {f} volumes: rerun it with --volume-format {f}, or cancel it (`imgshift jobs cancel {}`)",
                job.id,
                job.id
            ),
            Some(_) => {}
            None => job.set_id(JobKey::VolumeFormat, self.format.name())?,
        }
        // A taken name is refused before anything is created, unless this job made (or was making) it, or
        // replacing it was asked for; everything is checked before an old volume is deleted.
        let mut replace = Vec::new();
        for i in 0..job.disks.len() {
            let vol = self.volume(job, i);
            if let Some(old) = lv::find_volume(&pool, &self.pool, &vol)?
                && !job.owns("volume", &volume_resource(&self.pool, &vol))
            {
                self.check_replaceable_volume(&conn, &old, &vol)?;
                replace.push((old, vol));
            }
        }
        if self.define
            && let Some(d) = lv::find_domain(&conn, &job.name)?
            && !job.owns("domain", &job.name)
        {
            if !self.overwrite && self.volume_names.is_none() {
                bail!(
                    "domain '{}' already exists and is not this job's: choose another --name, or remove it \
                     (`virsh undefine {}`)",
                    job.name,
                    job.name
                );
            }
            lv::check_replaceable(&d, &job.name, self.overwrite)?;
        }
        for (old, vol) in replace {
            volume::replace(&old, &self.pool, &vol)?;
            job.say(&format!(
                "deleted the existing volume '{vol}' (--overwrite)"
            ));
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
        let pool = self.pool()?;
        if disk == 0 && job.id_of(JobKey::PartitionFirmware)?.is_none() {
            let (fw, why) = partition_firmware(src);
            job.set_id(JobKey::PartitionFirmwareWhy, why)?;
            job.set_id(JobKey::PartitionFirmware, plan::fw_name(fw))?;
        }
        let vol = self.volume(job, disk);
        let pool_name = self.pool.clone();
        job.record("volume", &volume_resource(&pool_name, &vol))?;
        job.set_disk_id(disk, DiskKey::Volume, &vol)?;
        // A volume left by an interrupted run of this job is partial: a stream cannot be resumed, so start over.
        if let Some(old) = lv::find_volume(&pool, &pool_name, &vol)? {
            old.delete(0).map_err(|e| {
                LvError::call(
                    format!("cannot delete the partial volume '{vol}' in pool '{pool_name}'"),
                    &e,
                )
            })?;
            job.say(&format!(
                "deleted the partial volume '{vol}' an interrupted run left"
            ));
        }
        let capacity = fill::capacity(self.format, src.virtual_size())?;
        let created = volume::create(&pool, &pool_name, &vol, capacity, self.format)?;
        job.say(&format!(
            "created volume '{vol}' ({capacity} bytes) at {}",
            created.path
        ));
        match fill::fill(
            &created,
            self.format,
            src,
            Some(map),
            bar.as_ref(),
            self.stop.clone(),
        ) {
            Ok((sent, _)) => Ok(UploadStats {
                bytes_sent: sent.bytes_sent,
                streams: sent.streams,
                holes: sent.holes,
                skipped_bytes: sent.skipped_bytes,
                zero_fill_bytes: sent.zero_fill_bytes,
                ..UploadStats::default()
            }),
            Err(f) => {
                let e = anyhow::Error::new(f.error).context(format!(
                    "cannot upload disk {disk} to volume '{vol}' ({} bytes had been sent)",
                    f.sent.bytes_sent
                ));
                Err(match volume::delete(&created.vol, &pool_name, &vol) {
                    Ok(()) => e.context(format!(
                        "the partial volume '{vol}' was removed from pool '{pool_name}'"
                    )),
                    Err(d) => e.context(d.to_string()),
                })
            }
        }
    }

    fn register(&mut self, job: &Job) -> Result<String> {
        let conn = self.conn()?;
        let disks: Vec<DomainDisk> = (0..job.disks.len())
            .map(|i| DomainDisk {
                pool: self.pool.clone(),
                volume: self.volume(job, i),
                format: self.format,
            })
            .collect();
        let hints = Self::hints(job)?;
        let plan = plan::plan_domain(&job.name, &self.choices, disks, Some(&hints), &conn)?;
        let name = plan.spec.name.clone();
        let existing = match lv::find_domain(&conn, &name)? {
            Some(d) => {
                let xml = d
                    .xml_desc(0)
                    .map_err(|e| LvError::call(format!("cannot read domain '{name}'"), &e))?;
                Some((
                    d,
                    job.owns("domain", &name) && self.uses_job_volumes(job, &xml)?,
                ))
            }
            None => None,
        };
        let dom = match existing {
            // Defined by an earlier run of this job.
            Some((d, true)) => {
                job.say(&format!("domain '{name}' was defined by an earlier run"));
                d
            }
            // Not this job's: `connect` let it through only for --overwrite (a stopped domain); checked again.
            Some((old, false)) => {
                lv::check_replaceable(&old, &name, self.overwrite)?;
                lv::undefine(&old, &name)?;
                job.record("domain", &name)?;
                let xml = domain_xml(&plan.spec)?;
                lv::define(&conn, &xml, &name)
                    .with_context(|| format!("the previous domain '{name}' was undefined"))?
            }
            None => {
                job.record("domain", &name)?;
                let xml = domain_xml(&plan.spec)?;
                lv::define(&conn, &xml, &name)?
            }
        };
        job.set_id(JobKey::Domain, &name)?;
        job.set_id(JobKey::Firmware, plan::fw_name(plan.spec.firmware))?;
        job.set_id(JobKey::DiskBus, plan.spec.disk_bus.name())?;
        job.set_id(JobKey::DomainType, plan.spec.domain_type.name())?;
        let mut started = false;
        if self.start {
            let active = dom
                .is_active()
                .map_err(|e| LvError::call(format!("cannot query domain '{name}'"), &e))?;
            if !active {
                lv::start(&dom, &name)?;
            }
            started = true;
            job.set_id(JobKey::Started, "true")?;
        }
        // Why each `auto` choice was made, once the domain is there (a failed definition says only what failed).
        for n in &plan.notes {
            job.ui.say(n);
        }
        Ok(format!(
            "domain '{name}' with {} disk{} ({} firmware, {} bus, type {}){}",
            plan.spec.disks.len(),
            if plan.spec.disks.len() == 1 { "" } else { "s" },
            plan::fw_name(plan.spec.firmware),
            plan.spec.disk_bus.name(),
            plan.spec.domain_type.name(),
            if started { ", started" } else { "" }
        ))
    }

    fn verify(&mut self, job: &Job, sources: &[Arc<dyn DiskSource>]) -> Result<String> {
        let pool = self.pool()?;
        let conn = self.conn()?;
        let mut compared = 0u64;
        let mut vols = Vec::new();
        for (i, src) in sources.iter().enumerate() {
            let name = self.volume(job, i);
            let vol = lv::find_volume(&pool, &self.pool, &name)?.with_context(|| {
                format!("volume '{name}' (disk {i}) is not in pool '{}'", self.pool)
            })?;
            let info = vol
                .info()
                .map_err(|e| LvError::call(format!("cannot read volume '{name}'"), &e))?;
            let want = fill::capacity(self.format, src.virtual_size())?;
            if info.capacity != want {
                bail!(
                    "volume '{name}' (disk {i}) has a capacity of {} bytes; the disk's virtual size needs {want}",
                    info.capacity
                );
            }
            let copy = download::open(&vol, &name, self.format)
                .with_context(|| format!("cannot read volume '{name}' back"))?;
            let map = map_disk(src.as_ref(), &format!("disk {i}"))?;
            compared += verify::sample_compare(src.as_ref(), &map, copy.as_ref())
                .with_context(|| format!("volume '{name}' (disk {i})"))?;
            let path = vol.path().map_err(|e| {
                LvError::call(format!("cannot read the path of volume '{name}'"), &e)
            })?;
            vols.push((name, path));
        }
        if !self.define {
            return Ok(format!(
                "{} volume{}: capacities as expected, {} sampled and identical",
                vols.len(),
                if vols.len() == 1 { "" } else { "s" },
                crate::progress::human_size(compared)
            ));
        }
        let dom = lv::find_domain(&conn, &job.name)?
            .with_context(|| format!("domain '{}' is not defined", job.name))?;
        let xml = dom
            .xml_desc(0)
            .map_err(|e| LvError::call(format!("cannot read domain '{}'", job.name), &e))?;
        for (name, path) in &vols {
            let r = inuse::VolumeRef {
                pool: &self.pool,
                volume: name,
                path,
            };
            if !inuse::uses(&xml, &r)? {
                bail!(
                    "domain '{}' does not list volume '{name}' among its disks",
                    job.name
                );
            }
        }
        Ok(format!(
            "{} volume{}: capacities as expected, {} sampled and identical; domain '{}' lists every volume",
            vols.len(),
            if vols.len() == 1 { "" } else { "s" },
            crate::progress::human_size(compared),
            job.name
        ))
    }

    fn outputs(&self, job: &Job) -> Result<serde_json::Value> {
        Ok(json!({
            "domain": job.id_of(JobKey::Domain)?,
            "pool": self.pool,
            "volumes": job.disk_ids(DiskKey::Volume)?,
            "paths": self.paths(job)?,
            "uri": self.uri,
            "firmware": job.id_of(JobKey::Firmware)?,
            "disk_bus": job.id_of(JobKey::DiskBus)?,
            "domain_type": job.id_of(JobKey::DomainType)?,
            "started": job.id_of(JobKey::Started)?.is_some(),
        }))
    }

    fn cancel(&mut self, resources: &[Resource]) -> Result<Vec<String>> {
        let conn = self.conn()?;
        let mut done = Vec::new();
        let volumes: Vec<(&str, &str)> = resources
            .iter()
            .filter(|r| r.kind == "volume")
            .filter_map(|r| r.id.split_once('/'))
            .collect();
        // The domain first: its disks are the volumes.
        for r in resources.iter().filter(|r| r.kind == "domain") {
            let Some(dom) = lv::find_domain(&conn, &r.id)? else {
                done.push(format!("domain '{}' was already gone", r.id));
                continue;
            };
            // Recorded before it was defined: a domain of that name that uses none of the job's volumes was made
            // by someone else after a crash in between, and is left alone.
            let xml = dom
                .xml_desc(0)
                .map_err(|e| LvError::call(format!("cannot read domain '{}'", r.id), &e))?;
            let mut ours = volumes.is_empty();
            for (pool, vol) in &volumes {
                let r = inuse::VolumeRef {
                    pool,
                    volume: vol,
                    path: "",
                };
                ours |= inuse::uses(&xml, &r)?;
            }
            if !ours {
                done.push(format!(
                    "domain '{}' uses none of this job's volumes: left alone",
                    r.id
                ));
                continue;
            }
            let active = dom
                .is_active()
                .map_err(|e| LvError::call(format!("cannot query domain '{}'", r.id), &e))?;
            if active {
                dom.destroy()
                    .map_err(|e| LvError::call(format!("cannot stop domain '{}'", r.id), &e))?;
                done.push(format!("stopped domain '{}'", r.id));
            }
            lv::undefine(&dom, &r.id)?;
            done.push(format!("undefined domain '{}'", r.id));
        }
        for (pool_name, vol) in volumes {
            let pool = match conn.lookup_storage_pool_by_name(pool_name) {
                Ok(p) => p,
                Err(e) if crate::targets::libvirt::is_not_found(&e) => {
                    done.push(format!(
                        "pool '{pool_name}' is gone, and volume '{vol}' with it"
                    ));
                    continue;
                }
                Err(e) => {
                    return Err(LvError::call(
                        format!("cannot look up storage pool '{pool_name}'"),
                        &e,
                    )
                    .into());
                }
            };
            match lv::find_volume(&pool, pool_name, vol)? {
                Some(v) => {
                    v.delete(0).map_err(|e| {
                        LvError::call(
                            format!("cannot delete volume '{vol}' in pool '{pool_name}'"),
                            &e,
                        )
                    })?;
                    done.push(format!("deleted volume '{vol}' from pool '{pool_name}'"));
                }
                None => done.push(format!("volume '{vol}' was already gone")),
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        assert_eq!(volume_name("vm", 0, VolFormat::Qcow2), "vm.qcow2");
        assert_eq!(volume_name("vm", 1, VolFormat::Qcow2), "vm-data1.qcow2");
        assert_eq!(volume_name("vm", 2, VolFormat::Raw), "vm-data2.raw");
        assert_eq!(volume_resource("p", "vm.raw"), "p/vm.raw");
    }
}
