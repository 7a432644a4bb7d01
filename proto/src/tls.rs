//! TLS on the component links (gateway → coordinator across pods), from PEM files: the server
//! presents `cert`/`key` and, when a CA is given, requires a client certificate it signed
//! (mutual TLS); the client checks the server against `ca` and presents `cert`/`key` when given.
//! rustls through tonic (ring). Without files, the links stay plain (the shared secret of
//! [`crate::auth`] still applies, TLS or not).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Only one of certificate and key was given.
    #[error("--tls-cert and --tls-key go together")]
    Pair,
    /// A server needs its certificate and key.
    #[error("TLS on a server needs --tls-cert and --tls-key")]
    ServerIdentity,
    /// A client needs the CA that signed the server's certificate.
    #[error("TLS on a client needs --tls-ca (the CA that signed the coordinator's certificate)")]
    ClientCa,
}

/// PEM files of one component (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// Certificate chain presented to the peer.
    pub cert: Option<PathBuf>,
    /// Private key of `cert`.
    pub key: Option<PathBuf>,
    /// CA certificates: a server requires client certificates signed by them, a client checks
    /// the server against them.
    pub ca: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl TlsFiles {
    /// Whether any file is given (TLS is on).
    pub fn is_set(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(read(c)?, read(k)?))),
            (None, None) => Ok(None),
            _ => Err(TlsError::Pair),
        }
    }

    /// The server side, or `None` without files. With a CA, clients must present a certificate
    /// it signed.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        if !self.is_set() {
            return Ok(None);
        }
        let identity = self.identity()?.ok_or(TlsError::ServerIdentity)?;
        let mut cfg = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(Some(cfg))
    }

    /// The client side, or `None` without files.
    pub fn client(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        if !self.is_set() {
            return Ok(None);
        }
        let ca = self.ca.as_ref().ok_or(TlsError::ClientCa)?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some(identity) = self.identity()? {
            cfg = cfg.identity(identity);
        }
        Ok(Some(cfg))
    }
}
