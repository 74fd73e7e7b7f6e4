//! After the image exists, on Azure: delete a managed image or a gallery image version, then the managed disks
//! of this resource group it was made from (an Azure image is a copy: its source disks are billed on their own).

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::Value;

use super::arm::{Arm, DISK_API, GALLERY_API, IMAGE_API, check_name};
use super::{credential, http};

/// Where and as whom to reach ARM.
#[derive(Debug, Clone)]
pub struct AzureImagesSettings {
    /// ARM endpoint (https).
    pub arm_endpoint: String,
    /// Extra trusted CA certificates (PEM).
    pub ca_bundle: Option<PathBuf>,
    /// Subscription id.
    pub subscription: String,
    /// Resource group.
    pub resource_group: String,
    /// Attempts per request for retryable failures.
    pub max_attempts: u32,
}

/// What `images delete --on azure` removes.
#[derive(Debug, Clone, Serialize)]
pub struct AzureDeletePlan {
    /// "image" or "gallery image version".
    pub kind: String,
    /// Its resource id.
    pub id: String,
    /// Managed disks of this resource group it was made from, deleted after it.
    pub delete_disks: Vec<String>,
    /// Source disks outside this resource group: kept.
    pub kept_disks: Vec<String>,
    #[serde(skip)]
    path: String,
    #[serde(skip)]
    api: &'static str,
}

/// A connection to ARM for one subscription and resource group.
pub struct AzureImages {
    rt: tokio::runtime::Runtime,
    arm: Arm,
}

/// The source disk ids an image or gallery version names.
fn source_disks(kind: &str, v: &Value) -> Vec<String> {
    let sp = &v["properties"]["storageProfile"];
    let mut ids = Vec::new();
    if kind == "image" {
        ids.extend(
            sp["osDisk"]["managedDisk"]["id"]
                .as_str()
                .map(str::to_string),
        );
        if let Some(d) = sp["dataDisks"].as_array() {
            ids.extend(
                d.iter()
                    .filter_map(|x| x["managedDisk"]["id"].as_str().map(str::to_string)),
            );
        }
    } else {
        ids.extend(
            sp["osDiskImage"]["source"]["id"]
                .as_str()
                .map(str::to_string),
        );
        if let Some(d) = sp["dataDiskImages"].as_array() {
            ids.extend(
                d.iter()
                    .filter_map(|x| x["source"]["id"].as_str().map(str::to_string)),
            );
        }
    }
    ids
}

impl AzureImages {
    /// Connects (credentials checked with one token request).
    pub fn connect(s: &AzureImagesSettings) -> Result<AzureImages> {
        let rt = crate::targets::runtime()?;
        let transport = http::transport(s.ca_bundle.as_deref())?;
        let cred = credential::choose(&transport)?;
        rt.block_on(credential::check(&cred))?;
        let arm = Arm::new(
            &s.arm_endpoint,
            cred.credential.clone(),
            &transport,
            s.max_attempts.max(1),
            &s.subscription,
            &s.resource_group,
            false,
        )?;
        Ok(AzureImages { rt, arm })
    }

    /// The disk name of `id` when it is a managed disk of this resource group.
    fn own_disk(&self, id: &str) -> Option<String> {
        let prefix = self.arm.id("disks/");
        let head = id.get(..prefix.len())?;
        if !head.eq_ignore_ascii_case(&prefix) {
            return None;
        }
        let name = id.get(prefix.len()..)?;
        (!name.is_empty() && !name.contains('/')).then(|| name.to_string())
    }

    /// What deleting image `name` (or, with `gallery` = (gallery, image definition), version `name`) removes.
    pub fn delete_plan(
        &self,
        name: &str,
        gallery: Option<(&str, &str)>,
    ) -> Result<AzureDeletePlan> {
        let (kind, path, api) = match gallery {
            Some((g, d)) => {
                check_name("gallery", g)?;
                check_name("gallery image", d)?;
                check_name("version", name)?;
                (
                    "gallery image version",
                    format!("galleries/{g}/images/{d}/versions/{name}"),
                    GALLERY_API,
                )
            }
            None => {
                check_name("image", name)?;
                ("image", format!("images/{name}"), IMAGE_API)
            }
        };
        let what = format!("reading {kind} {name}");
        let Some(v) = self.rt.block_on(self.arm.get(&path, api, &what))? else {
            bail!(
                "no {kind} {name} in resource group {}",
                self.arm.resource_group
            );
        };
        let mut delete = Vec::new();
        let mut kept = Vec::new();
        for id in source_disks(kind, &v) {
            match self.own_disk(&id) {
                Some(n) if !delete.contains(&n) => delete.push(n),
                Some(_) => {}
                None => kept.push(id),
            }
        }
        Ok(AzureDeletePlan {
            kind: kind.to_string(),
            id: self.arm.id(&path),
            delete_disks: delete,
            kept_disks: kept,
            path,
            api,
        })
    }

    /// Deletes the image or version, then its disks (already gone is fine); returns what was done.
    pub fn delete(&self, plan: &AzureDeletePlan) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let what = format!("deleting {} {}", plan.kind, plan.id);
        let existed = self
            .rt
            .block_on(self.arm.delete(&plan.path, plan.api, &what))?;
        done.push(if existed {
            format!("deleted {} {}", plan.kind, plan.id)
        } else {
            format!("{} {} was already gone", plan.kind, plan.id)
        });
        for d in &plan.delete_disks {
            let what = format!("deleting disk {d}");
            let existed =
                self.rt
                    .block_on(self.arm.delete(&format!("disks/{d}"), DISK_API, &what))?;
            done.push(if existed {
                format!("deleted disk {d}")
            } else {
                format!("disk {d} was already gone")
            });
        }
        for k in &plan.kept_disks {
            done.push(format!(
                "kept disk {k}: not in resource group {}",
                self.arm.resource_group
            ));
        }
        Ok(done)
    }
}
