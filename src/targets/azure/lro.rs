//! Long-running ARM operations (Azure REST API guidelines, "Long-running operations"; ARM RPC "Asynchronous
//! operations"): a PUT/POST/DELETE answered 201/202 names an `Azure-AsyncOperation` URL (poll until its `status`
//! is `Succeeded`, `Failed` or `Canceled`) and/or a `Location` URL (202 while running, then 200 with the result).
//! `Retry-After` (seconds) paces the polls. A synchronous 200/201 whose `provisioningState` is not terminal is
//! polled through the resource itself. Poll URLs must lie on the ARM endpoint's own origin: the bearer token is
//! never sent anywhere else.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use azure_core::http::{Method, Url};
use serde_json::Value;

use super::arm::{Arm, Reply};

/// Wait between polls when the server gives no `Retry-After`.
const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// Longest wait between polls, whatever `Retry-After` says.
const MAX_POLL: Duration = Duration::from_secs(60);

/// The pause a reply asks for.
pub fn retry_after(r: &Reply) -> Duration {
    r.header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_POLL, |s| Duration::from_secs(s).min(MAX_POLL))
}

fn terminal(state: &str) -> Option<bool> {
    match state.to_ascii_lowercase().as_str() {
        "succeeded" => Some(true),
        "failed" | "canceled" | "cancelled" => Some(false),
        _ => None,
    }
}

fn failure(what: &str, body: &Value, state: &str) -> anyhow::Error {
    let e = &body["error"];
    let code = e["code"].as_str().unwrap_or("no error code");
    let msg = e["message"].as_str().unwrap_or("no message");
    anyhow::anyhow!(
        "{what} {}: {code}: {}",
        state.to_ascii_lowercase(),
        super::redact::redact(&msg.replace('\n', " "))
    )
}

/// Follows the operation `first` started, until done or `limit` passes. `resource` is the resource's URL (for
/// PUTs). Returns the final result body (the Location result, or the resource), `Value::Null` when there is none.
pub async fn wait(
    arm: &Arm,
    what: &str,
    first: Reply,
    resource: Option<&Url>,
    limit: Duration,
) -> Result<Value> {
    let start = Instant::now();
    let async_op = first
        .header("azure-asyncoperation")
        .map(|u| arm.poll_url(&u))
        .transpose()?;
    let location = first
        .header("location")
        .map(|u| arm.poll_url(&u))
        .transpose()?;
    let mut pause = retry_after(&first);
    let overdue = |start: Instant| -> Result<()> {
        if start.elapsed() > limit {
            bail!("{what} did not finish within {} s", limit.as_secs());
        }
        Ok(())
    };

    if let Some(op) = async_op {
        loop {
            tokio::time::sleep(pause).await;
            overdue(start)?;
            let r = arm.call(Method::Get, &op, None, what).await?;
            let body = r.json();
            let status = body["status"].as_str().unwrap_or("InProgress").to_string();
            match terminal(&status) {
                Some(true) => break,
                Some(false) => return Err(failure(what, &body, &status)),
                None => pause = retry_after(&r),
            }
        }
        if let Some(loc) = location {
            let r = arm.call(Method::Get, &loc, None, what).await?;
            return Ok(r.json());
        }
        if let Some(res) = resource {
            let r = arm.call(Method::Get, res, None, what).await?;
            return Ok(r.json());
        }
        return Ok(Value::Null);
    }
    if let Some(loc) = location {
        loop {
            tokio::time::sleep(pause).await;
            overdue(start)?;
            let r = arm.call(Method::Get, &loc, None, what).await?;
            if r.status == 202 {
                pause = retry_after(&r);
                continue;
            }
            return Ok(r.json());
        }
    }
    // Synchronous reply: done unless the resource says it is still provisioning.
    let mut body = first.json();
    loop {
        let state = body["properties"]["provisioningState"]
            .as_str()
            .unwrap_or("Succeeded")
            .to_string();
        match terminal(&state) {
            Some(true) => return Ok(body),
            Some(false) => return Err(failure(what, &body, &state)),
            None => {}
        }
        let Some(res) = resource else {
            return Ok(body);
        };
        tokio::time::sleep(pause).await;
        overdue(start)?;
        let r = arm.call(Method::Get, res, None, what).await?;
        pause = retry_after(&r);
        body = r.json();
    }
}
