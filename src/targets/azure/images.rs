//! After the image exists, on Azure: list the images and gallery image versions imgshift made (by the tag
//! [`JOB_TAG`]), share a gallery image (a Reader role assignment for a principal on the image definition, or the
//! gallery's sharing profile for a direct-shared or community gallery), replicate a gallery image version to more
//! regions, and delete a managed image or a gallery image version, then the managed disks of this resource group
//! it was made from (an Azure image is a copy: its source disks are billed on their own).
//!
//! ARM REST reference: Images - List By Resource Group, Galleries - List By Resource Group, Gallery Images - List
//! By Gallery, Gallery Image Versions - List By Gallery Image and - Update (PATCH, long-running), Gallery Sharing
//! Profile - Update (POST `share`, operationType Add/Remove/EnableCommunity/Reset), Role Assignments - Create and
//! - Delete (Microsoft.Authorization, api-version 2022-04-01). Lists follow `nextLink` on the endpoint only.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use azure_core::http::{Method, Url};
use serde::Serialize;
use serde_json::{Value, json};

use super::arm::{Arm, DISK_API, GALLERY_API, IMAGE_API, LRO_LIMIT, check_name, failed};
use super::{credential, http, lro};

/// The job that made an image or gallery version (tag set at creation).
pub const JOB_TAG: &str = "imgshift:job";
/// The source it was made from.
pub const SOURCE_TAG: &str = "imgshift:source";
/// Longest Azure tag value.
const TAG_VALUE_MAX: usize = 256;
/// Microsoft.Authorization/roleAssignments API version.
const ROLE_API: &str = "2022-04-01";
/// The built-in Reader role (its id is the same in every tenant: Azure RBAC built-in roles reference).
const READER_ROLE: &str = "acdd72a7-3385-48ef-bd42-f606fba81ae7";
/// Most pages followed through `nextLink` in one list.
const MAX_PAGES: usize = 1000;

/// The tags a job adds to the image or gallery version it makes (those not already in `given`).
pub fn origin_tags(
    job: &str,
    source: Option<&str>,
    given: &[(String, String)],
) -> Vec<(String, String)> {
    let has = |k: &str| given.iter().any(|(g, _)| g == k);
    let clip = |v: &str| v.chars().take(TAG_VALUE_MAX).collect::<String>();
    let mut out = Vec::new();
    if !has(JOB_TAG) {
        out.push((JOB_TAG.to_string(), clip(job)));
    }
    if let Some(src) = source
        && !has(SOURCE_TAG)
    {
        out.push((SOURCE_TAG.to_string(), clip(src)));
    }
    out
}

/// One image or gallery image version, as `images list --on azure` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AzureImageInfo {
    /// "image" or "gallery image version".
    pub kind: String,
    /// Its name (a version: GALLERY/DEFINITION/VERSION).
    pub name: String,
    /// Resource id.
    pub id: String,
    /// Region.
    pub location: String,
    /// Regions a gallery version is replicated to.
    pub target_regions: Vec<String>,
    /// A gallery's sharing kind (Private, Groups, Community).
    pub sharing: Option<String>,
    /// The managed disks it was made from.
    pub source_disks: Vec<String>,
    /// The job that made it (tag `imgshift:job`).
    pub job: Option<String>,
}

/// Whom `images share --on azure` is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureGrantee {
    /// A Microsoft Entra principal (object id): Reader on the image definition.
    Principal(String),
    /// Subscriptions, through a direct-shared gallery's sharing profile.
    Subscriptions(Vec<String>),
    /// Tenants, likewise.
    Tenants(Vec<String>),
    /// Everyone: a community gallery.
    Public,
}

/// What a share or unshare did.
#[derive(Debug, Clone, Serialize)]
pub struct AzureShareOutcome {
    /// The resource the grant is on.
    pub scope: String,
    /// How: "role assignment" or "gallery sharing profile".
    pub how: String,
    /// The role assignment's id, or the sharing update's operation type.
    pub detail: String,
    /// One line each.
    pub notes: Vec<String>,
}

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

/// A deterministic GUID for a role assignment name: the same scope, role and principal always give the same name,
/// so sharing twice is one assignment (RFC 9562 layout, version 8 "custom" bits).
fn assignment_name(scope: &str, role: &str, principal: &str) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(format!("{scope}\0{role}\0{principal}").to_ascii_lowercase());
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(h.iter()) {
        *d = *s;
    }
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let part = |a: usize, z: usize| hex.get(a..z).unwrap_or_default().to_string();
    format!(
        "{}-{}-{}-{}-{}",
        part(0, 8),
        part(8, 12),
        part(12, 16),
        part(16, 20),
        part(20, 32)
    )
}

/// Whether `v` looks like a GUID (principal, subscription and tenant ids).
pub fn is_guid(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn tag_of(v: &Value, key: &str) -> Option<String> {
    v["tags"][key].as_str().map(str::to_string)
}

/// Region names compare without case or spaces ("West Europe" is westeurope).
fn region_eq(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_lowercase)
            .collect()
    };
    norm(a) == norm(b)
}

/// The regions a gallery version is replicated to.
fn target_regions(v: &Value) -> Vec<String> {
    v["properties"]["publishingProfile"]["targetRegions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl AzureImages {
    /// Every item of an ARM list at `path` (from the root), following `nextLink` on the endpoint only.
    fn list_at(&self, path: &str, api: &str, what: &str) -> Result<Vec<Value>> {
        let mut url: Url = self.arm.url_at(path, api)?;
        let mut out = Vec::new();
        for _ in 0..MAX_PAGES {
            let r = self
                .rt
                .block_on(self.arm.call(Method::Get, &url, None, what))?;
            let v = r.json();
            if let Some(items) = v["value"].as_array() {
                out.extend(items.iter().cloned());
            }
            match v["nextLink"].as_str().filter(|n| !n.is_empty()) {
                Some(n) => url = self.arm.poll_url(n)?,
                None => return Ok(out),
            }
        }
        bail!("{what}: more than {MAX_PAGES} pages")
    }

    /// The images and gallery image versions of this resource group that imgshift made (tagged [`JOB_TAG`]);
    /// with `all`, every one.
    pub fn list(&self, all: bool) -> Result<Vec<AzureImageInfo>> {
        let rg = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute",
            self.arm.subscription, self.arm.resource_group
        );
        let keep = |v: &Value| all || tag_of(v, JOB_TAG).is_some();
        let mut out = Vec::new();
        for v in self.list_at(&format!("{rg}/images"), IMAGE_API, "listing images")? {
            if !keep(&v) {
                continue;
            }
            let name = v["name"].as_str().unwrap_or("").to_string();
            out.push(AzureImageInfo {
                kind: "image".into(),
                id: v["id"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| self.arm.id(&format!("images/{name}"))),
                name,
                location: v["location"].as_str().unwrap_or("").to_string(),
                target_regions: Vec::new(),
                sharing: None,
                source_disks: source_disks("image", &v),
                job: tag_of(&v, JOB_TAG),
            });
        }
        for g in self.list_at(&format!("{rg}/galleries"), GALLERY_API, "listing galleries")? {
            let Some(gname) = g["name"].as_str() else {
                continue;
            };
            check_name("gallery", gname)?;
            let sharing = g["properties"]["sharingProfile"]["permissions"]
                .as_str()
                .unwrap_or("Private")
                .to_string();
            let defs = self.list_at(
                &format!("{rg}/galleries/{gname}/images"),
                GALLERY_API,
                &format!("listing the image definitions of gallery {gname}"),
            )?;
            for d in defs {
                let Some(dname) = d["name"].as_str() else {
                    continue;
                };
                check_name("gallery image", dname)?;
                let versions = self.list_at(
                    &format!("{rg}/galleries/{gname}/images/{dname}/versions"),
                    GALLERY_API,
                    &format!("listing the versions of {gname}/{dname}"),
                )?;
                for v in versions {
                    if !keep(&v) {
                        continue;
                    }
                    let vname = v["name"].as_str().unwrap_or("").to_string();
                    let path = format!("galleries/{gname}/images/{dname}/versions/{vname}");
                    out.push(AzureImageInfo {
                        kind: "gallery image version".into(),
                        id: v["id"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| self.arm.id(&path)),
                        name: format!("{gname}/{dname}/{vname}"),
                        location: v["location"].as_str().unwrap_or("").to_string(),
                        target_regions: target_regions(&v),
                        sharing: Some(sharing.clone()),
                        source_disks: source_disks("gallery image version", &v),
                        job: tag_of(&v, JOB_TAG),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.kind.cmp(&b.kind)));
        Ok(out)
    }

    /// Refuses to share a plain managed image (one that exists, or not): only gallery images can be shared.
    pub fn refuse_managed_image(&self, name: &str) -> Result<AzureShareOutcome> {
        check_name("image", name)?;
        let exists = self
            .rt
            .block_on(self.arm.get(
                &format!("images/{name}"),
                IMAGE_API,
                &format!("reading image {name}"),
            ))?
            .is_some();
        if exists {
            bail!(
                "{name} is a managed image, which Azure cannot share with other subscriptions or tenants: publish \
                 it to a Compute Gallery (`imgshift migrate ... --gallery G --gallery-image D --gallery-version \
                 V`), then share the gallery image (--gallery G --gallery-image D)"
            );
        }
        bail!(
            "no image {name} in resource group {}; to share a gallery image, name it with --gallery and \
             --gallery-image",
            self.arm.resource_group
        )
    }

    /// Shares (or, with `add` false, stops sharing) gallery image definition `def` of `gallery` with `who`: a
    /// Reader role assignment on the definition for a principal; the sharing profile of a direct-shared
    /// ("Groups") gallery for subscriptions or tenants; a community gallery for everyone.
    pub fn share(
        &self,
        gallery: &str,
        def: &str,
        who: &AzureGrantee,
        add: bool,
    ) -> Result<AzureShareOutcome> {
        check_name("gallery", gallery)?;
        check_name("gallery image", def)?;
        let gpath = format!("galleries/{gallery}");
        let g = self
            .rt
            .block_on(
                self.arm
                    .get(&gpath, GALLERY_API, &format!("reading gallery {gallery}")),
            )?
            .with_context(|| {
                format!(
                    "no gallery {gallery} in resource group {}",
                    self.arm.resource_group
                )
            })?;
        let dpath = format!("{gpath}/images/{def}");
        if self
            .rt
            .block_on(self.arm.get(
                &dpath,
                GALLERY_API,
                &format!("reading gallery image {gallery}/{def}"),
            ))?
            .is_none()
        {
            bail!("no image definition {def} in gallery {gallery}");
        }
        let kind = g["properties"]["sharingProfile"]["permissions"]
            .as_str()
            .unwrap_or("Private")
            .to_string();
        match who {
            AzureGrantee::Principal(p) => self.role_assignment(&dpath, p, add),
            AzureGrantee::Subscriptions(ids) | AzureGrantee::Tenants(ids) => {
                if kind != "Groups" {
                    bail!(
                        "gallery {gallery} is not a direct-shared gallery (its sharing profile is {kind}): share \
                         with a principal (--principal ID: a Reader role assignment), or make the gallery \
                         direct-shared (sharingProfile.permissions Groups) first"
                    );
                }
                let (ty, whom) = if matches!(who, AzureGrantee::Tenants(_)) {
                    ("AADTenants", "tenant(s)")
                } else {
                    ("Subscriptions", "subscription(s)")
                };
                let op = if add { "Add" } else { "Remove" };
                let body = json!({"operationType": op, "groups": [{"type": ty, "ids": ids}]});
                self.sharing_update(gallery, &body)?;
                Ok(AzureShareOutcome {
                    scope: self.arm.id(&gpath),
                    how: "gallery sharing profile".into(),
                    detail: op.into(),
                    notes: vec![
                        format!(
                            "{} gallery {gallery} with {whom} {}",
                            if add { "shared" } else { "stopped sharing" },
                            ids.join(", ")
                        ),
                        format!("a direct-shared gallery shares all its images, {def} included"),
                    ],
                })
            }
            AzureGrantee::Public => {
                if kind != "Community" {
                    bail!(
                        "gallery {gallery} is not a community gallery (its sharing profile is {kind}): only a \
                         gallery created with sharingProfile.permissions Community (and its publisher info) can \
                         be made public"
                    );
                }
                let op = if add { "EnableCommunity" } else { "Reset" };
                self.sharing_update(gallery, &json!({"operationType": op}))?;
                Ok(AzureShareOutcome {
                    scope: self.arm.id(&gpath),
                    how: "gallery sharing profile".into(),
                    detail: op.into(),
                    notes: vec![if add {
                        format!(
                            "community gallery {gallery} is public: every image in it, {def} included"
                        )
                    } else {
                        format!(
                            "gallery {gallery} is private again (its sharing profile was reset)"
                        )
                    }],
                })
            }
        }
    }

    fn sharing_update(&self, gallery: &str, body: &Value) -> Result<()> {
        let url = self.arm.url_at(
            &format!("{}/share", self.arm.id(&format!("galleries/{gallery}"))),
            GALLERY_API,
        )?;
        let what = format!("updating the sharing profile of gallery {gallery}");
        self.rt.block_on(async {
            let r = self.arm.call(Method::Post, &url, Some(body), &what).await?;
            lro::wait(&self.arm, &what, r, None, LRO_LIMIT).await
        })?;
        Ok(())
    }

    fn role_assignment(&self, path: &str, principal: &str, add: bool) -> Result<AzureShareOutcome> {
        if !is_guid(principal) {
            bail!("--principal wants a principal's object id (a GUID), not '{principal}'");
        }
        let scope = self.arm.id(path);
        let role = format!(
            "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{READER_ROLE}",
            self.arm.subscription
        );
        let name = assignment_name(&scope, READER_ROLE, principal);
        let id = format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}");
        let url = self.arm.url_at(&id, ROLE_API)?;
        if add {
            let body = json!({"properties": {"roleDefinitionId": role, "principalId": principal}});
            let what = format!("assigning Reader on {path} to {principal}");
            let r = self
                .rt
                .block_on(self.arm.send(Method::Put, &url, Some(&body), &what))?;
            let note = match r.status {
                200..=299 => format!("{principal} may read {path} (Reader role assignment {name})"),
                // The same principal and role on this scope under another assignment name.
                409 if error_code(&r.json()) == "RoleAssignmentExists" => {
                    format!("{principal} already had the Reader role on {path}")
                }
                _ => return Err(failed(&r, &what)),
            };
            return Ok(AzureShareOutcome {
                scope,
                how: "role assignment".into(),
                detail: id,
                notes: vec![note],
            });
        }
        let what = format!("removing the Reader role of {principal} on {path}");
        let r = self
            .rt
            .block_on(self.arm.send(Method::Delete, &url, None, &what))?;
        let note = match r.status {
            204 | 404 => format!("{principal} had no Reader role assignment by imgshift on {path}"),
            200..=299 => format!("removed the Reader role of {principal} on {path}"),
            _ => return Err(failed(&r, &what)),
        };
        Ok(AzureShareOutcome {
            scope,
            how: "role assignment".into(),
            detail: id,
            notes: vec![note],
        })
    }

    /// Adds `regions` to the replication of gallery image version `version` of `gallery`/`def` (its own region
    /// stays) and waits for the update; returns the regions it is replicated to afterwards and whether anything
    /// changed.
    pub fn copy(
        &self,
        gallery: &str,
        def: &str,
        version: &str,
        regions: &[String],
    ) -> Result<(Vec<String>, bool)> {
        check_name("gallery", gallery)?;
        check_name("gallery image", def)?;
        check_name("version", version)?;
        let path = format!("galleries/{gallery}/images/{def}/versions/{version}");
        let what = format!("reading gallery image version {gallery}/{def}/{version}");
        let Some(v) = self.rt.block_on(self.arm.get(&path, GALLERY_API, &what))? else {
            bail!(
                "no gallery image version {gallery}/{def}/{version} in resource group {}",
                self.arm.resource_group
            );
        };
        let home = v["location"].as_str().unwrap_or("").to_string();
        let mut targets: Vec<Value> = v["properties"]["publishingProfile"]["targetRegions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let has = |t: &[Value], r: &str| {
            t.iter()
                .any(|x| x["name"].as_str().is_some_and(|n| region_eq(n, r)))
        };
        let mut changed = false;
        // The version's own region stays among its target regions once any are given.
        for r in std::iter::once(&home).chain(regions) {
            if !r.is_empty() && !has(&targets, r) {
                targets.push(json!({"name": r, "regionalReplicaCount": 1}));
                changed = true;
            }
        }
        if changed {
            let body = json!({"properties": {"publishingProfile": {"targetRegions": targets}}});
            let url = self.arm.url_at(&self.arm.id(&path), GALLERY_API)?;
            let what = format!("replicating {gallery}/{def}/{version}");
            self.rt.block_on(async {
                let r = self
                    .arm
                    .call(Method::Patch, &url, Some(&body), &what)
                    .await?;
                lro::wait(&self.arm, &what, r, Some(&url), LRO_LIMIT).await
            })?;
        }
        let names = targets
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect();
        Ok((names, changed))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_names_are_stable_guids() {
        let a = assignment_name("/s/x", READER_ROLE, "p");
        assert!(is_guid(&a), "{a}");
        assert_eq!(a, assignment_name("/S/X", READER_ROLE, "P"));
        assert_ne!(a, assignment_name("/s/y", READER_ROLE, "p"));
    }

    #[test]
    fn guids_and_regions() {
        assert!(is_guid("11111111-2222-3333-4444-555555555555"));
        assert!(!is_guid("11111111-2222-3333-4444-55555555555"));
        assert!(!is_guid("not-a-guid"));
        assert!(region_eq("West Europe", "westeurope"));
        assert!(!region_eq("westus", "westus2"));
    }
}
