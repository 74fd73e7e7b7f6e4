//! The HTTP transport shared by the ARM client, the credentials and the page blob client: reqwest with rustls,
//! the platform's trust store plus, optionally, extra trust anchors from a PEM bundle (`--ca-bundle`, for a TLS
//! inspecting proxy or a test server). Certificate verification is never switched off.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use azure_core::http::{ClientOptions, RetryOptions, Transport};

/// Connecting gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// A request with no response bytes for this long fails (and is retried when idempotent).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// A transport trusting the platform roots plus the certificates in `ca_bundle`.
pub fn transport(ca_bundle: Option<&Path>) -> Result<Transport> {
    Ok(Transport::new(Arc::new(client(ca_bundle)?)))
}

/// The reqwest client behind [`transport`], for the few blob calls the SDK does not offer (the managed-disk
/// page-range diff).
pub fn client(ca_bundle: Option<&Path>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(p) = ca_bundle {
        let pem = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} holds no PEM certificates", p.display()))?;
        if certs.is_empty() {
            anyhow::bail!("{} holds no PEM certificates", p.display());
        }
        b = b.tls_certs_merge(certs);
    }
    b.build().context("cannot set up HTTPS")
}

/// Client options over `transport` with azure_core's own retries off (callers retry and count).
pub fn options_no_retry(transport: &Transport) -> ClientOptions {
    ClientOptions {
        transport: Some(transport.clone()),
        retry: RetryOptions::none(),
        ..ClientOptions::default()
    }
}
