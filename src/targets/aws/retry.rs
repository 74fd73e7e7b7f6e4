//! Which AWS failures are worth another try, and the backoff between tries.
//!
//! Retryable: 5xx, timeouts and connection failures, throttling (ThrottlingException, RequestThrottledException,
//! ConcurrentLimitExceededException, ServiceQuotaExceededException, HTTP 429), and "snapshot does not exist"
//! (ResourceNotFoundException) which EBS can answer for a short while after StartSnapshot. Fatal: everything
//! else (AccessDenied, validation, unknown ids after that grace period) — never retried.

use aws_sdk_ebs::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

pub use crate::targets::retry::{Class, Policy};

/// Classifies an SDK error.
pub fn classify<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Class {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Class::Retry
        }
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            classify_code(se.err().code(), status)
        }
        _ => Class::Fatal,
    }
}

/// Classifies by error code and HTTP status.
pub fn classify_code(code: Option<&str>, status: u16) -> Class {
    match code {
        Some(
            "ThrottlingException"
            | "RequestThrottledException"
            | "ConcurrentLimitExceededException"
            | "ServiceQuotaExceededException"
            | "RequestLimitExceeded"
            | "Throttling",
        ) => Class::Throttle,
        Some("ResourceNotFoundException") => Class::NotFoundYet,
        Some(
            "InternalServerException" | "InternalError" | "ServiceUnavailable" | "InternalFailure",
        ) => Class::Retry,
        _ if status == 429 => Class::Throttle,
        _ if status >= 500 => Class::Retry,
        _ => Class::Fatal,
    }
}

/// A one-line description of an SDK error (code and message, never request contents).
pub fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    err: &SdkError<E, HttpResponse>,
) -> String {
    match err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            format!(
                "{} (HTTP {}): {}",
                e.code().unwrap_or("error"),
                se.raw().status().as_u16(),
                e.message().unwrap_or("no message")
            )
        }
        SdkError::TimeoutError(_) => "request timed out".to_string(),
        SdkError::DispatchFailure(d) => {
            let mut s = "cannot reach the endpoint".to_string();
            if let Some(c) = d.as_connector_error() {
                s.push_str(&format!(": {c}"));
                let mut src = std::error::Error::source(c);
                while let Some(e) = src {
                    s.push_str(&format!(": {e}"));
                    src = e.source();
                }
            }
            s
        }
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(e) = src {
                s.push_str(&format!(": {e}"));
                src = e.source();
            }
            s
        }
    }
}

/// A failed AWS call after its retries, with the service's error code and HTTP status kept as data: callers
/// decide on `code`/`status`, never on the message text.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed{tries}: {detail}", tries = if *.attempts > 1 { format!(" after {} attempts", .attempts) } else { String::new() })]
pub struct CallError {
    /// The operation ("DeregisterImage").
    pub what: String,
    /// The service's error code, when it answered with one.
    pub code: Option<String>,
    /// The HTTP status, when there was a response.
    pub status: Option<u16>,
    /// How the failure was classified.
    pub class: Class,
    /// Attempts made.
    pub attempts: u32,
    /// One line: code, status and message (never request contents).
    pub detail: String,
}

impl CallError {
    fn new<E: ProvideErrorMetadata + std::error::Error + 'static>(
        what: &str,
        err: &SdkError<E, HttpResponse>,
        class: Class,
        attempts: u32,
    ) -> CallError {
        let (code, status) = match err {
            SdkError::ServiceError(se) => (
                se.err().code().map(str::to_string),
                Some(se.raw().status().as_u16()),
            ),
            _ => (None, None),
        };
        CallError {
            what: what.to_string(),
            code,
            status,
            class,
            attempts,
            detail: describe(err),
        }
    }
}

/// Runs `op` until it succeeds, fails fatally, or runs out of attempts. `on_class` sees every failure's class
/// (for throttling feedback).
pub async fn with_retry<T, E, F, Fut>(
    policy: &Policy,
    what: &str,
    mut on_class: impl FnMut(Class),
    mut op: F,
) -> anyhow::Result<T>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
{
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let class = classify(&e);
                on_class(class);
                let give_up = match class {
                    Class::Fatal => true,
                    Class::NotFoundYet => {
                        started.elapsed() > policy.not_found_grace
                            || attempt >= policy.max_attempts.max(1) * 3
                    }
                    Class::Retry | Class::Throttle => attempt >= policy.max_attempts,
                };
                if give_up {
                    return Err(CallError::new(what, &e, class, attempt).into());
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
        assert_eq!(
            classify_code(Some("ThrottlingException"), 400),
            Class::Throttle
        );
        assert_eq!(
            classify_code(Some("RequestThrottledException"), 400),
            Class::Throttle
        );
        assert_eq!(classify_code(None, 503), Class::Retry);
        assert_eq!(
            classify_code(Some("AccessDeniedException"), 403),
            Class::Fatal
        );
        assert_eq!(
            classify_code(Some("ValidationException"), 400),
            Class::Fatal
        );
        assert_eq!(
            classify_code(Some("ResourceNotFoundException"), 404),
            Class::NotFoundYet
        );
        assert_eq!(classify_code(None, 429), Class::Throttle);
    }
}
