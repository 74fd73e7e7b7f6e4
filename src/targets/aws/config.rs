//! SDK configuration: aws-config's default chain (env, profiles, SSO, IMDS), an optional endpoint (the standard
//! `AWS_ENDPOINT_URL` is honoured by aws-config itself), per-request timeouts, and SDK retries off (imgshift
//! classifies and retries itself, see `retry`).

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::ProvideCredentials as _;

/// Where and as whom to talk to AWS.
#[derive(Debug, Clone, Default)]
pub struct AwsTarget {
    /// Region (else the default chain's).
    pub region: Option<String>,
    /// Named profile.
    pub profile: Option<String>,
    /// Endpoint override (a stand-in, a VPC endpoint).
    pub endpoint_url: Option<String>,
}

/// Per-attempt limits: an upload from outside AWS must never hang for ever.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read timeout for one response.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole-attempt timeout.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Loads the SDK configuration.
pub async fn load(t: &AwsTarget) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        );
    if let Some(r) = &t.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    if let Some(p) = &t.profile {
        loader = loader.profile_name(p);
    }
    if let Some(e) = &t.endpoint_url {
        loader = loader.endpoint_url(e);
    }
    loader.load().await
}

/// Where the default credential chain looks, in order (aws-config's `DefaultCredentialsChain`).
pub const CREDENTIAL_CHAIN: &str = "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE or --profile \
     (~/.aws/credentials, ~/.aws/config, SSO after `aws sso login`), web identity (AWS_WEB_IDENTITY_TOKEN_FILE), \
     the ECS container role, the EC2 instance role";

/// Resolves the credentials once, before any request: a missing, expired or refused credential fails at once
/// with where they are looked for, instead of as a retried request.
pub async fn check_credentials(sdk: &aws_config::SdkConfig) -> anyhow::Result<()> {
    let Some(provider) = sdk.credentials_provider() else {
        anyhow::bail!("no AWS credentials provider is configured; set one of: {CREDENTIAL_CHAIN}");
    };
    match provider.provide_credentials().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why.push_str(&format!(": {s}"));
                src = s.source();
            }
            anyhow::bail!("no usable AWS credentials ({why}); set one of: {CREDENTIAL_CHAIN}")
        }
    }
}
