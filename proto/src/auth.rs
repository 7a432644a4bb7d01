//! The shared secret that authenticates every gRPC call between components (gateway →
//! coordinator, coordinator → worker): the caller sends it in the `x-r4b-secret` metadata
//! ([`AttachSecret`]), the server refuses a call without it, or with another, as
//! `UNAUTHENTICATED` ([`RequireSecret`], constant-time comparison).
//!
//! `r4b serve` generates one per process; split deployments give the same value to the gateway
//! and the coordinator (`--cluster-secret` / `R4B_CLUSTER_SECRET`). A coordinator hands its
//! secret to the workers it spawns through their environment, so a worker accepts `Init`,
//! `Step` and `Shutdown` only from its own coordinator.

use std::fmt;
use std::io::Read;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Metadata key that carries the secret.
pub const SECRET_METADATA: &str = "x-r4b-secret";
/// Environment variable that carries the secret (to spawned workers, and from the operator).
pub const SECRET_ENV: &str = "R4B_CLUSTER_SECRET";

/// A secret that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Empty, or not printable ASCII (it travels as a gRPC metadata value).
    #[error("the cluster secret must be 16 to 256 printable ASCII characters without spaces")]
    Invalid,
    /// The random source failed.
    #[error("generating the cluster secret: {0}")]
    Random(#[from] std::io::Error),
}

/// The cluster secret; `Debug` does not show it.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Wraps `value`: 16 to 256 visible ASCII characters.
    pub fn new(value: &str) -> Result<Self, SecretError> {
        let ok = (16..=256).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Secret(value.into()))
        } else {
            Err(SecretError::Invalid)
        }
    }

    /// 32 random bytes from the kernel, as 64 hex characters.
    pub fn generate() -> Result<Self, SecretError> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Secret::new(&hex)
    }

    /// The secret in [`SECRET_ENV`], if set.
    pub fn from_env() -> Result<Option<Self>, SecretError> {
        match std::env::var(SECRET_ENV) {
            Ok(v) => Secret::new(&v).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The value (to hand to a spawned process).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Client side: adds the secret to every request.
#[derive(Clone, Debug)]
pub struct AttachSecret(Option<MetadataValue<tonic::metadata::Ascii>>);

impl AttachSecret {
    /// Attaches `secret` (none: requests go without, for servers that need none).
    pub fn new(secret: Option<&Secret>) -> Self {
        AttachSecret(secret.and_then(|s| MetadataValue::try_from(s.expose()).ok()))
    }
}

impl Interceptor for AttachSecret {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(SECRET_METADATA, v.clone());
        }
        Ok(req)
    }
}

/// A channel whose requests carry the secret.
pub type AuthChannel = InterceptedService<Channel, AttachSecret>;

/// Server side: refuses requests without the secret (`UNAUTHENTICATED`).
#[derive(Clone, Debug)]
pub struct RequireSecret(Secret);

impl RequireSecret {
    /// Requires `secret`.
    pub fn new(secret: Secret) -> Self {
        RequireSecret(secret)
    }
}

impl Interceptor for RequireSecret {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let sent = req
            .metadata()
            .get(SECRET_METADATA)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let expected = self.0.expose().as_bytes();
        // Equal lengths first (the length is not the secret); then every byte, in constant time.
        if sent.len() == expected.len() && bool::from(sent.ct_eq(expected)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong cluster secret (x-r4b-secret)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_secret_passes() {
        let s = Secret::new("0123456789abcdef").expect("valid");
        let mut require = RequireSecret::new(s.clone());
        let mut attach = AttachSecret::new(Some(&s));
        let signed = attach.call(Request::new(())).expect("attached");
        assert!(require.call(signed).is_ok());
        let none = require.call(Request::new(())).expect_err("no secret");
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        let other = Secret::new("0123456789abcdeF").expect("valid");
        let wrong = AttachSecret::new(Some(&other))
            .call(Request::new(()))
            .expect("attached");
        assert!(require.call(wrong).is_err());
        assert!(Secret::new("short").is_err());
        assert!(Secret::new("has a space in it, sixteen+").is_err());
        let g = Secret::generate().expect("random");
        assert_eq!(g.expose().len(), 64);
        assert_ne!(g.expose(), Secret::generate().expect("random").expose());
        assert_eq!(format!("{g:?}"), "Secret(..)");
    }
}
