//! Which Azure failures are worth another try. Retryable: HTTP 408, 429, 500, 502, 503 (Storage's `ServerBusy`
//! throttling), 504, connection and I/O failures. Throttling (429, 503) also lowers the requests in flight.
//! Fatal: everything else — 403 (an expired or revoked SAS, wrong credentials), 404, other 4xx.

use azure_core::error::ErrorKind;

use super::redact::redact;
pub use crate::targets::retry::{Class, Policy};

/// Classifies an azure_core error.
pub fn classify(err: &azure_core::Error) -> Class {
    match err.kind() {
        ErrorKind::HttpResponse { status, .. } => classify_status(u16::from(*status)),
        ErrorKind::Connection | ErrorKind::Io => Class::Retry,
        _ => Class::Fatal,
    }
}

/// Classifies an HTTP status.
pub fn classify_status(status: u16) -> Class {
    match status {
        429 | 503 => Class::Throttle,
        408 | 500 | 502 | 504 => Class::Retry,
        _ => Class::Fatal,
    }
}

/// One line about an azure_core error: status and service error code, or the transport error chain; secrets
/// redacted.
pub fn describe(err: &azure_core::Error) -> String {
    let s = match err.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => format!(
            "HTTP {}{}",
            u16::from(*status),
            error_code
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        ),
        _ => {
            let mut s = err.to_string();
            let mut src = std::error::Error::source(err);
            while let Some(e) = src {
                let m = e.to_string();
                if !s.contains(&m) {
                    s.push_str(": ");
                    s.push_str(&m);
                }
                src = e.source();
            }
            s
        }
    };
    redact(&s.replace('\n', " "))
}

/// Runs `op` until it succeeds, fails fatally, or runs out of attempts; `on_class` sees every failure's class.
/// A failed Azure call after its retries, with the HTTP status kept as data: callers decide on `status`, never
/// on the message text.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed{tries}: {detail}", tries = if *.attempts > 1 { format!(" after {} attempts", .attempts) } else { String::new() })]
pub struct CallError {
    /// What was being done.
    pub what: String,
    /// The HTTP status, when there was a response.
    pub status: Option<u16>,
    /// Attempts made.
    pub attempts: u32,
    /// One line: status, error code (secrets redacted).
    pub detail: String,
}

impl CallError {
    /// `err`, the failure of `what` after `attempts` attempts.
    pub fn new(what: &str, err: &azure_core::Error, attempts: u32) -> CallError {
        let status = match err.kind() {
            ErrorKind::HttpResponse { status, .. } => Some(u16::from(*status)),
            _ => None,
        };
        CallError {
            what: what.to_string(),
            status,
            attempts,
            detail: describe(err),
        }
    }
}

/// Whether `e` is an Azure call refused with HTTP `status`.
pub fn has_status(e: &anyhow::Error, status: u16) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<CallError>())
        .any(|c| c.status == Some(status))
}

pub async fn with_retry<T, F, Fut>(
    policy: &Policy,
    what: &str,
    mut on_class: impl FnMut(Class),
    mut op: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = azure_core::Result<T>>,
{
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let class = classify(&e);
                on_class(class);
                if class == Class::Fatal || attempt >= policy.max_attempts.max(1) {
                    return Err(CallError::new(what, &e, attempt).into());
                }
                tokio::time::sleep(policy.backoff(attempt)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify_status(503), Class::Throttle);
        assert_eq!(classify_status(429), Class::Throttle);
        assert_eq!(classify_status(500), Class::Retry);
        assert_eq!(classify_status(403), Class::Fatal);
        assert_eq!(classify_status(404), Class::Fatal);
        assert_eq!(classify_status(416), Class::Fatal);
        let e = azure_core::Error::with_message(ErrorKind::Connection, "refused");
        assert_eq!(classify(&e), Class::Retry);
    }
}
