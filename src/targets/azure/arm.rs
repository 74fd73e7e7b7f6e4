//! A small typed Azure Resource Manager client for the few Microsoft.Compute calls an upload needs, on
//! azure_core's `Pipeline` (bearer token from the credential, retries with `Retry-After` on 429 and 5xx).
//! API versions are pinned: disks 2024-03-02, images 2024-07-01, galleries 2023-07-03 (Microsoft.Compute REST
//! reference). Request and response bodies are never logged: a grant-access reply holds the SAS.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use azure_core::credentials::TokenCredential;
use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::{
    ClientOptions, Context as Ctx, ExponentialRetryOptions, Method, Pipeline, PipelineSendOptions,
    Request, RetryOptions, Transport, Url,
};
use serde_json::{Value, json};

use super::credential::ARM_SCOPE;
use super::lro;
use super::redact::redact;

/// Microsoft.Compute/disks API version.
pub const DISK_API: &str = "2024-03-02";
/// Microsoft.Compute/images API version.
pub const IMAGE_API: &str = "2024-07-01";
/// Microsoft.Compute/galleries API version.
pub const GALLERY_API: &str = "2023-07-03";
/// How long a long-running operation may take.
pub const LRO_LIMIT: Duration = Duration::from_secs(3600);

/// A reply: status, lower-case headers, body.
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
    /// The body as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Checks a name that goes into a resource path.
pub fn check_name(what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 90
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '(' | ')'));
    if !ok {
        bail!("{what} '{v}' is not a valid Azure name (letters, digits, - _ . ( ), at most 90)");
    }
    Ok(())
}

/// What an image says of its OS disk.
#[derive(Debug, Clone, Copy)]
pub struct ImageOs<'a> {
    /// "Linux" or "Windows".
    pub os_type: &'a str,
    /// "Generalized" or "Specialized".
    pub os_state: &'a str,
    /// "V1" or "V2".
    pub hyper_v_generation: &'a str,
}

/// What the disk is created with.
pub struct DiskSpec<'a> {
    /// Disk name.
    pub name: &'a str,
    /// Azure region.
    pub location: &'a str,
    /// Storage SKU.
    pub sku: &'a str,
    /// "Linux" or "Windows" for an OS disk; `None` for a data disk.
    pub os_type: Option<&'a str>,
    /// "V1" or "V2" for an OS disk; `None` for a data disk.
    pub hyper_v_generation: Option<&'a str>,
    /// Fixed VHD size (data part + footer).
    pub upload_size_bytes: u64,
    /// Tags.
    pub tags: &'a [(String, String)],
}

/// "disk NAME" for `disks/NAME`, "snapshot NAME" for `snapshots/NAME`.
fn resource_name(resource: &str) -> String {
    match resource.split_once('/') {
        Some((kind, name)) => format!("{} {name}", kind.strip_suffix('s').unwrap_or(kind)),
        None => resource.to_string(),
    }
}

/// The ARM client of one subscription and resource group.
pub struct Arm {
    pipeline: Pipeline,
    endpoint: Url,
    /// Subscription id.
    pub subscription: String,
    /// Resource group.
    pub resource_group: String,
    verbose: bool,
}

/// The one-line error of a non-2xx reply: `what`, the status and ARM's error code and message.
pub fn failed(r: &Reply, what: &str) -> anyhow::Error {
    let v = r.json();
    let code = v["error"]["code"].as_str().unwrap_or("");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    let detail = if code.is_empty() && msg.is_empty() {
        String::new()
    } else {
        format!(": {code}: {}", redact(&msg.replace('\n', " ")))
    };
    anyhow::anyhow!("{what} failed: HTTP {}{detail}", r.status)
}

fn tags_json(tags: &[(String, String)]) -> Value {
    Value::Object(
        tags.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

impl Arm {
    /// A client for `endpoint` (https only: the bearer token never travels in clear).
    pub fn new(
        endpoint: &str,
        credential: Arc<dyn TokenCredential>,
        transport: &Transport,
        max_attempts: u32,
        subscription: &str,
        resource_group: &str,
        verbose: bool,
    ) -> Result<Arm> {
        let endpoint =
            Url::parse(endpoint).with_context(|| format!("bad ARM endpoint '{endpoint}'"))?;
        if endpoint.scheme() != "https" {
            bail!(
                "the ARM endpoint must use https, not '{}'",
                endpoint.scheme()
            );
        }
        check_name("subscription", subscription)?;
        check_name("resource group", resource_group)?;
        let opts = ClientOptions {
            transport: Some(transport.clone()),
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                max_retries: max_attempts.saturating_sub(1),
                ..ExponentialRetryOptions::default()
            }),
            ..ClientOptions::default()
        };
        let auth: Arc<dyn azure_core::http::policies::Policy> =
            Arc::new(BearerTokenAuthorizationPolicy::new(credential, [ARM_SCOPE]));
        let pipeline = Pipeline::new(
            Some("imgshift"),
            Some(env!("CARGO_PKG_VERSION")),
            opts,
            Vec::new(),
            vec![auth],
            None,
        );
        Ok(Arm {
            pipeline,
            endpoint,
            subscription: subscription.to_string(),
            resource_group: resource_group.to_string(),
            verbose,
        })
    }

    /// The resource id of `provider_path` (e.g. "disks/NAME") in this resource group.
    pub fn id(&self, provider_path: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{provider_path}",
            self.subscription, self.resource_group
        )
    }

    fn url(&self, provider_path: &str, api: &str, action: Option<&str>) -> Result<Url> {
        let mut path = self.id(provider_path);
        if let Some(a) = action {
            path.push('/');
            path.push_str(a);
        }
        let mut u = self
            .endpoint
            .join(&path)
            .context("cannot build an ARM URL")?;
        u.set_query(Some(&format!("api-version={api}")));
        Ok(u)
    }

    /// The URL of `path` (from the endpoint's root, e.g. a role assignment under a resource's id) at `api`.
    pub fn url_at(&self, path: &str, api: &str) -> Result<Url> {
        let mut u = self
            .endpoint
            .join(path)
            .context("cannot build an ARM URL")?;
        u.set_query(Some(&format!("api-version={api}")));
        Ok(u)
    }

    /// Accepts a poll URL from a reply only on the endpoint's own origin.
    pub fn poll_url(&self, u: &str) -> Result<Url> {
        let parsed = self
            .endpoint
            .join(u)
            .with_context(|| format!("bad operation URL '{}'", redact(u)))?;
        if parsed.origin() != self.endpoint.origin() {
            bail!(
                "the server asked to poll {} which is not on the ARM endpoint {}",
                redact(&parsed.origin().ascii_serialization()),
                self.endpoint.origin().ascii_serialization()
            );
        }
        Ok(parsed)
    }

    /// Sends one request; non-2xx replies become one-line errors naming `what`, the status and ARM's code.
    pub async fn call(
        &self,
        method: Method,
        url: &Url,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Reply> {
        let r = self.send(method, url, body, what).await?;
        if !(200..300).contains(&r.status) {
            return Err(failed(&r, what));
        }
        Ok(r)
    }

    /// Sends one request and returns the reply whatever its status (the caller decides on the status and ARM's
    /// error code).
    pub async fn send(
        &self,
        method: Method,
        url: &Url,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Reply> {
        if self.verbose {
            eprintln!("imgshift: ARM {method} {}", url.path());
        }
        let mut req = Request::new(url.clone(), method);
        req.insert_header("accept", "application/json");
        if let Some(b) = body {
            req.insert_header("content-type", "application/json");
            req.set_body(serde_json::to_vec(b)?);
        }
        let resp = self
            .pipeline
            .send(
                &Ctx::new(),
                &mut req,
                Some(PipelineSendOptions {
                    skip_checks: true,
                    ..PipelineSendOptions::default()
                }),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{what} failed: {}", super::retry::describe(&e)))?;
        let (status, headers, body) = resp.deconstruct();
        Ok(Reply {
            status: u16::from(status),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.as_str().to_string()))
                .collect(),
            body: body.to_vec(),
        })
    }

    /// GETs a resource; `None` when it does not exist (404 `ResourceNotFound`/`NotFound`). A missing resource
    /// group or subscription is an error.
    pub async fn get(&self, provider_path: &str, api: &str, what: &str) -> Result<Option<Value>> {
        let url = self.url(provider_path, api, None)?;
        let r = self.send(Method::Get, &url, None, what).await?;
        if r.status == 404 {
            let v = r.json();
            let code = v["error"]["code"].as_str().unwrap_or("");
            if code.is_empty() || code == "ResourceNotFound" || code == "NotFound" {
                return Ok(None);
            }
        }
        if !(200..300).contains(&r.status) {
            // Re-issue through `call` for the error text.
            self.call(Method::Get, &url, None, what).await?;
        }
        Ok(Some(r.json()))
    }

    /// Creates the upload disk and waits for it to be provisioned.
    pub async fn create_disk(&self, d: &DiskSpec<'_>) -> Result<Value> {
        let path = format!("disks/{}", d.name);
        let url = self.url(&path, DISK_API, None)?;
        let mut props = json!({
            "creationData": {"createOption": "Upload", "uploadSizeBytes": d.upload_size_bytes},
        });
        if let Some(os) = d.os_type {
            props["osType"] = json!(os);
        }
        if let Some(g) = d.hyper_v_generation {
            props["hyperVGeneration"] = json!(g);
        }
        let body = json!({
            "location": d.location,
            "sku": {"name": d.sku},
            "tags": tags_json(d.tags),
            "properties": props,
        });
        let what = format!("creating disk {}", d.name);
        let r = self.call(Method::Put, &url, Some(&body), &what).await?;
        lro::wait(self, &what, r, Some(&url), LRO_LIMIT).await
    }

    /// `beginGetAccess` with access Write: returns the SAS URL of the disk's page blob.
    pub async fn grant_write(&self, disk: &str, seconds: u64) -> Result<String> {
        self.grant(disk, "Write", seconds).await
    }

    /// `beginGetAccess` with access Read: returns a read-only SAS URL of the disk's page blob.
    pub async fn grant_read(&self, disk: &str, seconds: u64) -> Result<String> {
        self.grant(disk, "Read", seconds).await
    }

    async fn grant(&self, disk: &str, access: &str, seconds: u64) -> Result<String> {
        self.grant_on(&format!("disks/{disk}"), access, seconds)
            .await
    }

    /// `beginGetAccess` with access Read on a disk or snapshot (`disks/NAME`, `snapshots/NAME`): a read-only SAS
    /// URL of its page blob.
    pub async fn grant_read_on(&self, resource: &str, seconds: u64) -> Result<String> {
        self.grant_on(resource, "Read", seconds).await
    }

    async fn grant_on(&self, resource: &str, access: &str, seconds: u64) -> Result<String> {
        let url = self.url(resource, DISK_API, Some("beginGetAccess"))?;
        let body = json!({"access": access, "durationInSeconds": seconds});
        let what = format!(
            "granting {} access to {}",
            access.to_ascii_lowercase(),
            resource_name(resource)
        );
        let r = self.call(Method::Post, &url, Some(&body), &what).await?;
        let v = lro::wait(self, &what, r, None, LRO_LIMIT).await?;
        let sas = v["accessSAS"]
            .as_str()
            .or_else(|| v["properties"]["output"]["accessSAS"].as_str())
            .ok_or_else(|| anyhow::anyhow!("{what}: the reply holds no accessSAS"))?;
        Ok(sas.to_string())
    }

    /// `endGetAccess`: revokes the SAS (the disk is usable only after this).
    pub async fn revoke(&self, disk: &str) -> Result<()> {
        self.revoke_on(&format!("disks/{disk}")).await
    }

    /// `endGetAccess` on a disk or snapshot (`disks/NAME`, `snapshots/NAME`).
    pub async fn revoke_on(&self, resource: &str) -> Result<()> {
        let url = self.url(resource, DISK_API, Some("endGetAccess"))?;
        let what = format!("revoking access to {}", resource_name(resource));
        let r = self.call(Method::Post, &url, None, &what).await?;
        lro::wait(self, &what, r, None, LRO_LIMIT).await?;
        Ok(())
    }

    /// DELETEs a resource and waits for the deletion. Returns false when it did not exist (404 or 204).
    pub async fn delete(&self, provider_path: &str, api: &str, what: &str) -> Result<bool> {
        let url = self.url(provider_path, api, None)?;
        let r = self.send(Method::Delete, &url, None, what).await?;
        if r.status == 404 || r.status == 204 {
            return Ok(false);
        }
        if !(200..300).contains(&r.status) {
            return Err(failed(&r, what));
        }
        lro::wait(self, what, r, None, LRO_LIMIT).await?;
        Ok(true)
    }

    /// Creates an image whose OS disk is the managed disk `disk`.
    pub async fn create_image(
        &self,
        name: &str,
        location: &str,
        disk: &str,
        os: ImageOs<'_>,
        tags: &[(String, String)],
    ) -> Result<Value> {
        let ImageOs {
            os_type,
            os_state,
            hyper_v_generation,
        } = os;
        let path = format!("images/{name}");
        let url = self.url(&path, IMAGE_API, None)?;
        let body = json!({
            "location": location,
            "tags": tags_json(tags),
            "properties": {
                "hyperVGeneration": hyper_v_generation,
                "storageProfile": {
                    "osDisk": {
                        "osType": os_type,
                        "osState": os_state,
                        "managedDisk": {"id": self.id(&format!("disks/{disk}"))},
                    },
                },
            },
        });
        let what = format!("creating image {name}");
        let r = self.call(Method::Put, &url, Some(&body), &what).await?;
        lro::wait(self, &what, r, Some(&url), LRO_LIMIT).await
    }

    /// Creates gallery image version `version` of definition `image` in `gallery` from the managed disk.
    pub async fn create_gallery_version(
        &self,
        gallery: &str,
        image: &str,
        version: &str,
        location: &str,
        disk: &str,
        tags: &[(String, String)],
    ) -> Result<Value> {
        let path = format!("galleries/{gallery}/images/{image}/versions/{version}");
        let url = self.url(&path, GALLERY_API, None)?;
        let body = json!({
            "location": location,
            "tags": tags_json(tags),
            "properties": {
                "storageProfile": {
                    "osDiskImage": {"source": {"id": self.id(&format!("disks/{disk}"))}},
                },
            },
        });
        let what = format!("creating gallery image version {gallery}/{image}/{version}");
        let r = self.call(Method::Put, &url, Some(&body), &what).await?;
        lro::wait(self, &what, r, Some(&url), LRO_LIMIT).await
    }
}
