//! Which AWS failures are worth another try, and the backoff between tries.
//!
//! Retryable: 5xx, timeouts and connection failures, throttling (ThrottlingException, RequestThrottledException,
//! ConcurrentLimitExceededException, ServiceQuotaExceededException, HTTP 429), and "snapshot does not exist"
//! (ResourceNotFoundException) which EBS can answer for a short while after StartSnapshot. Fatal: everything
//! else (AccessDenied, validation, unknown ids after that grace period) — never retried.

use std::time::Duration;

use aws_sdk_ebs::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

/// How a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Try again after a backoff.
    Retry,
    /// Try again, and lower the request rate.
    Throttle,
    /// The resource may not be visible yet (eventual consistency).
    NotFoundYet,
    /// Give up.
    Fatal,
}

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

/// Retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Attempts for retryable failures (1 = no retry).
    pub max_attempts: u32,
    /// First backoff.
    pub base: Duration,
    /// Longest backoff.
    pub cap: Duration,
    /// How long "not found yet" is retried.
    pub not_found_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_attempts: 10,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(20),
            not_found_grace: Duration::from_secs(120),
        }
    }
}

impl Policy {
    /// Backoff before attempt `attempt` (1-based retry count): capped exponential with full jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.min(16));
        let max = exp.min(self.cap);
        let ms = rand::random_range(max.as_millis() as u64 / 2..=max.as_millis().max(1) as u64);
        Duration::from_millis(ms)
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

    #[test]
    fn backoff_is_capped() {
        let p = Policy::default();
        for a in 1..40 {
            assert!(p.backoff(a) <= p.cap);
        }
    }
}
