//! Launch templates pointing at an AMI imgshift made (EC2 API reference: CreateLaunchTemplate,
//! CreateLaunchTemplateVersion, DescribeLaunchTemplates, DescribeLaunchTemplateVersions, DeleteLaunchTemplate,
//! DeleteLaunchTemplateVersions).
//!
//! A template that does not exist is created (tagged with the job, so a rerun knows it made it); one that exists
//! gets a new version, and its default version is left alone (launching `$Latest` or the version number uses
//! the AMI). A version already pointing at the AMI is adopted, never duplicated. The instance type must boot the
//! AMI: see [`instance_type_for`].

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{
    InstanceType, LaunchTemplateHttpTokensState, LaunchTemplateInstanceMetadataOptionsRequest,
    RequestLaunchTemplateData, ResourceType, Tag, TagSpecification,
};
use serde::Serialize;

use super::images::{AwsImages, JOB_TAG, has_code};
use super::retry;

/// Longest launch template name (CreateLaunchTemplate `LaunchTemplateName`: 3 to 128 characters of letters,
/// digits, `(`, `)`, `.`, `-`, `/`, `_`).
const NAME_MAX: usize = 128;
/// Longest idempotency token EC2 takes (64 ASCII characters).
const TOKEN_MAX: usize = 64;
/// Versions listed per DescribeLaunchTemplateVersions page (the API's maximum is 200).
const VERSIONS_PAGE: i32 = 200;
/// Most versions looked through for one already pointing at the AMI (a template holds at most 10,000).
const VERSIONS_MAX: usize = 10_000;

/// Whether `name` is a valid launch template name; the reason when not.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "().-/_".contains(c);
    if name.len() < 3 || name.len() > NAME_MAX || !name.chars().all(ok_char) {
        return Err(format!(
            "--launch-template: '{name}' is not a launch template name (3 to {NAME_MAX} letters, digits, \
             '(', ')', '.', '-', '/' or '_')"
        ));
    }
    Ok(())
}

/// An instance type that boots an AMI of `architecture` with `boot_mode` (`None`: EC2's default, legacy BIOS
/// on x86_64) and ENA on or off.
///
/// Facts (EC2 User Guide, "Boot modes" and "Instance types built on the Nitro System"): Graviton (arm64) types
/// boot UEFI only; Nitro x86_64 types (t3) boot both UEFI and legacy BIOS and need ENA for networking; Xen
/// types (t2) boot legacy BIOS only and do not need ENA. A UEFI guest without ENA has no type that both boots
/// it and reaches the network.
pub fn instance_type_for(
    architecture: &str,
    boot_mode: Option<&str>,
    ena: bool,
) -> std::result::Result<&'static str, String> {
    let uefi = boot_mode == Some("uefi");
    match architecture {
        "arm64" => {
            if boot_mode == Some("legacy-bios") {
                return Err("an arm64 AMI cannot boot legacy BIOS (Graviton types boot UEFI only)".into());
            }
            Ok("t4g.micro")
        }
        "x86_64" if ena => Ok("t3.micro"),
        "x86_64" if uefi => Err(
            "a UEFI guest without ENA: UEFI needs a Nitro instance type, and Nitro types need ENA; pass \
             --instance-type to choose one anyway"
                .into(),
        ),
        "x86_64" => Ok("t2.micro"),
        other => Err(format!("no default instance type for architecture {other}: pass --instance-type")),
    }
}

/// What the template should say.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    /// Template name.
    pub name: String,
    /// The AMI.
    pub image_id: String,
    /// Instance type.
    pub instance_type: String,
    /// Require IMDSv2 on instances launched from it.
    pub imds_v2_required: bool,
    /// The job (tag [`JOB_TAG`] on a template it creates; version description).
    pub job: String,
}

/// The template version pointing at the AMI, and whether the job created the whole template.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TemplateOutcome {
    /// Template name.
    pub name: String,
    /// Template id.
    pub id: String,
    /// The version pointing at the AMI.
    pub version: i64,
    /// Whether this job created the template (else it added a version).
    pub created_template: bool,
    /// Whether this run made it (false: found from an earlier run).
    pub created_now: bool,
}

/// A template as listed.
struct Found {
    id: String,
    job: Option<String>,
}

fn token(job: &str, what: &str) -> String {
    format!("imgshift-{what}-{job}")
        .chars()
        .take(TOKEN_MAX)
        .collect()
}

impl AwsImages {
    fn find_template(&self, name: &str) -> Result<Option<Found>> {
        let res = self.rt.block_on(retry::with_retry(
            &self.policy,
            "DescribeLaunchTemplates",
            |_| {},
            || {
                self.ec2
                    .describe_launch_templates()
                    .launch_template_names(name)
                    .send()
            },
        ));
        let out = match res {
            Ok(o) => o,
            Err(e) if has_code(&e, &["InvalidLaunchTemplateName.NotFoundException"]) => {
                return Ok(None);
            }
            Err(e) => return Err(e.context(format!("cannot look up launch template '{name}'"))),
        };
        Ok(out
            .launch_templates()
            .iter()
            .find(|t| t.launch_template_name() == Some(name))
            .and_then(|t| {
                Some(Found {
                    id: t.launch_template_id()?.to_string(),
                    job: t
                        .tags()
                        .iter()
                        .find(|g| g.key() == Some(JOB_TAG))
                        .and_then(|g| g.value().map(str::to_string)),
                })
            }))
    }

    /// The number of a version of template `name` that launches `image`.
    fn version_with_image(&self, name: &str, image: &str) -> Result<Option<i64>> {
        let mut token: Option<String> = None;
        let mut seen = 0usize;
        loop {
            let page = self
                .rt
                .block_on(retry::with_retry(
                    &self.policy,
                    "DescribeLaunchTemplateVersions",
                    |_| {},
                    || {
                        self.ec2
                            .describe_launch_template_versions()
                            .launch_template_name(name)
                            .max_results(VERSIONS_PAGE)
                            .set_next_token(token.clone())
                            .send()
                    },
                ))
                .with_context(|| format!("cannot list the versions of launch template '{name}'"))?;
            for v in page.launch_template_versions() {
                if v.launch_template_data().and_then(|d| d.image_id()) == Some(image) {
                    return Ok(v.version_number());
                }
            }
            seen = seen.saturating_add(page.launch_template_versions().len());
            match page.next_token() {
                Some(t) if !t.is_empty() && token.as_deref() != Some(t) && seen < VERSIONS_MAX => {
                    token = Some(t.to_string())
                }
                _ => return Ok(None),
            }
        }
    }

    /// Makes template `spec.name` launch the AMI: creates it, or adds a version; adopts what an earlier run of
    /// the job made. `before` is called before any create call (to record the name for `jobs cancel`).
    pub fn ensure_launch_template(
        &self,
        spec: &TemplateSpec,
        mut before: impl FnMut() -> Result<()>,
    ) -> Result<TemplateOutcome> {
        let mut data = RequestLaunchTemplateData::builder()
            .image_id(&spec.image_id)
            .instance_type(InstanceType::from(spec.instance_type.as_str()));
        if spec.imds_v2_required {
            data = data.metadata_options(
                LaunchTemplateInstanceMetadataOptionsRequest::builder()
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .build(),
            );
        }
        let data = data.build();
        let description = format!("imgshift job {}: {}", spec.job, spec.image_id);
        let description: String = description.chars().take(255).collect();
        let name = spec.name.as_str();
        match self.find_template(name)? {
            None => {
                before()?;
                let tags = TagSpecification::builder()
                    .resource_type(ResourceType::LaunchTemplate)
                    .tags(Tag::builder().key(JOB_TAG).value(&spec.job).build())
                    .build();
                let tok = token(&spec.job, "lt");
                let out = self
                    .rt
                    .block_on(retry::with_retry(
                        &self.policy,
                        "CreateLaunchTemplate",
                        |_| {},
                        || {
                            self.ec2
                                .create_launch_template()
                                .launch_template_name(name)
                                .client_token(&tok)
                                .version_description(&description)
                                .launch_template_data(data.clone())
                                .tag_specifications(tags.clone())
                                .send()
                        },
                    ))
                    .with_context(|| format!("cannot create launch template '{name}'"))?;
                let t = out
                    .launch_template()
                    .context("CreateLaunchTemplate returned no template")?;
                Ok(TemplateOutcome {
                    name: name.to_string(),
                    id: t
                        .launch_template_id()
                        .context("CreateLaunchTemplate returned no template id")?
                        .to_string(),
                    version: t.latest_version_number().unwrap_or(1),
                    created_template: true,
                    created_now: true,
                })
            }
            Some(found) => {
                let ours = found.job.as_deref() == Some(spec.job.as_str());
                if let Some(v) = self.version_with_image(name, &spec.image_id)? {
                    return Ok(TemplateOutcome {
                        name: name.to_string(),
                        id: found.id,
                        version: v,
                        created_template: ours,
                        created_now: false,
                    });
                }
                before()?;
                let tok = token(&spec.job, "ltv");
                let out = self
                    .rt
                    .block_on(retry::with_retry(
                        &self.policy,
                        "CreateLaunchTemplateVersion",
                        |_| {},
                        || {
                            self.ec2
                                .create_launch_template_version()
                                .launch_template_name(name)
                                .client_token(&tok)
                                .version_description(&description)
                                .launch_template_data(data.clone())
                                .send()
                        },
                    ))
                    .with_context(|| format!("cannot add a version to launch template '{name}'"))?;
                let v = out
                    .launch_template_version()
                    .and_then(|v| v.version_number())
                    .context("CreateLaunchTemplateVersion returned no version number")?;
                Ok(TemplateOutcome {
                    name: name.to_string(),
                    id: found.id,
                    version: v,
                    created_template: ours,
                    created_now: true,
                })
            }
        }
    }

    /// What `jobs cancel` does with a template the job touched: deletes the template when the job created it
    /// (`whole`), else the version pointing at `image` (looked up, so a crash before the version number reached
    /// the journal is covered). Absent is fine.
    pub fn remove_launch_template(
        &self,
        name: &str,
        whole: bool,
        image: Option<&str>,
        job: &str,
    ) -> Result<Option<String>> {
        let Some(found) = self.find_template(name)? else {
            return Ok(None);
        };
        if whole || found.job.as_deref() == Some(job) {
            let res = self.rt.block_on(retry::with_retry(
                &self.policy,
                "DeleteLaunchTemplate",
                |_| {},
                || {
                    self.ec2
                        .delete_launch_template()
                        .launch_template_name(name)
                        .send()
                },
            ));
            return match res {
                Ok(_) => Ok(Some(format!(
                    "deleted launch template '{name}' ({})",
                    found.id
                ))),
                Err(e) if has_code(&e, &["InvalidLaunchTemplateName.NotFoundException"]) => {
                    Ok(None)
                }
                Err(e) => Err(e.context(format!("cannot delete launch template '{name}'"))),
            };
        }
        let Some(image) = image else {
            return Ok(None);
        };
        let Some(v) = self.version_with_image(name, image)? else {
            return Ok(None);
        };
        let out = self
            .rt
            .block_on(retry::with_retry(
                &self.policy,
                "DeleteLaunchTemplateVersions",
                |_| {},
                || {
                    self.ec2
                        .delete_launch_template_versions()
                        .launch_template_name(name)
                        .versions(v.to_string())
                        .send()
                },
            ))
            .with_context(|| format!("cannot delete version {v} of launch template '{name}'"))?;
        if let Some(f) = out
            .unsuccessfully_deleted_launch_template_versions()
            .first()
        {
            let code = f
                .response_error()
                .and_then(|r| r.code())
                .map(|c| c.as_str().to_string());
            bail!(
                "cannot delete version {v} of launch template '{name}' ({}): delete it with `aws ec2 \
                 delete-launch-template-versions --launch-template-name {name} --versions {v}`",
                code.unwrap_or_else(|| "no reason given".into())
            );
        }
        Ok(Some(format!(
            "deleted version {v} of launch template '{name}'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_types_boot_what_the_guest_boots() {
        assert_eq!(
            instance_type_for("arm64", Some("uefi"), true),
            Ok("t4g.micro")
        );
        assert!(instance_type_for("arm64", Some("legacy-bios"), true).is_err());
        assert_eq!(
            instance_type_for("x86_64", Some("uefi"), true),
            Ok("t3.micro")
        );
        assert_eq!(instance_type_for("x86_64", None, true), Ok("t3.micro"));
        assert_eq!(
            instance_type_for("x86_64", Some("legacy-bios"), false),
            Ok("t2.micro")
        );
        assert!(instance_type_for("x86_64", Some("uefi"), false).is_err());
    }

    #[test]
    fn names_follow_the_api_reference() {
        assert!(check_name("web-servers/prod_1").is_ok());
        assert!(check_name("ab").is_err());
        assert!(check_name("has space").is_err());
        assert!(check_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn tokens_fit() {
        assert!(token(&"j".repeat(100), "ltv").len() <= TOKEN_MAX);
        assert_ne!(token("j", "lt"), token("j", "ltv"));
    }
}
