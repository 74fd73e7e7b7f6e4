//! Which credential signs ARM requests. azure_identity 1.x has no `DefaultAzureCredential`, so the chain is
//! spelled out: a service principal from `AZURE_TENANT_ID` + `AZURE_CLIENT_ID` + `AZURE_CLIENT_SECRET`
//! (`ClientSecretCredential`; `AZURE_AUTHORITY_HOST` picks another Entra endpoint), else the Azure CLI's login
//! (`AzureCliCredential`, which runs `az account get-access-token`). A token is fetched once up front so that
//! missing credentials fail before anything is created.

use std::sync::Arc;

use anyhow::{Result, bail};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions,
};

use super::redact::redact;

/// The scope of Azure Resource Manager tokens.
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";

/// A credential and the name of where it came from.
pub struct Chosen {
    /// The credential.
    pub credential: Arc<dyn TokenCredential>,
    /// "service principal (AZURE_CLIENT_ID)" or "Azure CLI".
    pub source: &'static str,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Picks the credential from the environment.
pub fn choose(transport: &Transport) -> Result<Chosen> {
    let (tenant, client, secret) = (
        env("AZURE_TENANT_ID"),
        env("AZURE_CLIENT_ID"),
        env("AZURE_CLIENT_SECRET"),
    );
    match (tenant, client, secret) {
        (Some(t), Some(c), Some(s)) => {
            let opts = ClientSecretCredentialOptions {
                client_options: ClientOptions {
                    transport: Some(transport.clone()),
                    // A bad certificate or an unreachable authority is not worth a minute of retries.
                    retry: RetryOptions::exponential(ExponentialRetryOptions {
                        max_retries: 3,
                        max_total_elapsed: azure_core::time::Duration::seconds(15),
                        ..ExponentialRetryOptions::default()
                    }),
                    ..ClientOptions::default()
                },
            };
            let cred =
                ClientSecretCredential::new(&t, c, Secret::new(s), Some(opts)).map_err(|e| {
                    anyhow::anyhow!("bad service principal settings: {}", redact(&e.to_string()))
                })?;
            Ok(Chosen {
                credential: cred,
                source: "service principal (AZURE_CLIENT_ID)",
            })
        }
        (None, None, None) => {
            let cred = AzureCliCredential::new(Some(AzureCliCredentialOptions::default()))
                .map_err(|e| {
                    anyhow::anyhow!("cannot use the Azure CLI: {}", redact(&e.to_string()))
                })?;
            Ok(Chosen {
                credential: cred,
                source: "Azure CLI",
            })
        }
        (t, c, s) => {
            let missing: Vec<&str> = [
                ("AZURE_TENANT_ID", t.is_none()),
                ("AZURE_CLIENT_ID", c.is_none()),
                ("AZURE_CLIENT_SECRET", s.is_none()),
            ]
            .iter()
            .filter(|x| x.1)
            .map(|x| x.0)
            .collect();
            bail!(
                "incomplete service principal settings: {} not set",
                missing.join(" and ")
            )
        }
    }
}

/// Fetches an ARM token once, to fail early with a clear message.
pub async fn check(c: &Chosen) -> Result<()> {
    match c.credential.get_token(&[ARM_SCOPE], None).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let first = redact(&e.to_string());
            let first = first.lines().next().unwrap_or("").trim().to_string();
            bail!(
                "no Azure credentials ({} failed: {first}); set AZURE_TENANT_ID, AZURE_CLIENT_ID and \
                 AZURE_CLIENT_SECRET, or log in with `az login`",
                c.source
            )
        }
    }
}
