//! TLS and mutual TLS with rustls. The certificate, key and client CA are
//! read from PEM files and read again when a file changes, so a rotated
//! certificate takes effect without a restart; a broken new file is logged
//! and the previous configuration keeps serving.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// How often the files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The current TLS configuration, shared by the accept loop and the task
/// that reloads it. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptors {
    current: Arc<RwLock<TlsAcceptor>>,
}

impl std::fmt::Debug for TlsAcceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptors").finish_non_exhaustive()
    }
}

impl TlsAcceptors {
    /// Loads `files` (an error here stops start-up) and starts watching
    /// them. Must run inside a tokio runtime.
    pub fn load(files: &TlsFiles) -> Result<TlsAcceptors, TlsError> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(files)?));
        let acceptors = TlsAcceptors {
            current: Arc::new(RwLock::new(acceptor)),
        };
        tokio::spawn(watch(files.clone(), acceptors.clone()));
        Ok(acceptors)
    }

    /// The acceptor for the next handshake.
    pub fn current(&self) -> TlsAcceptor {
        match self.current.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, acceptor: TlsAcceptor) {
        match self.current.write() {
            Ok(mut a) => *a = acceptor,
            Err(poisoned) => *poisoned.into_inner() = acceptor,
        }
    }
}

/// Reloads the configuration whenever one of the files' modification times
/// changes. Stops when nothing but this task holds the acceptors.
async fn watch(files: TlsFiles, acceptors: TlsAcceptors) {
    let paths: Vec<_> = [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    let stamp = |paths: &[std::path::PathBuf]| -> Vec<Option<SystemTime>> {
        paths
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    };
    let mut seen = stamp(&paths);
    loop {
        tokio::time::sleep(RELOAD_CHECK).await;
        if Arc::strong_count(&acceptors.current) == 1 {
            return;
        }
        let now = stamp(&paths);
        if now == seen {
            continue;
        }
        seen = now;
        match server_config(&files) {
            Ok(config) => {
                acceptors.replace(TlsAcceptor::from(Arc::new(config)));
                tracing::info!(cert = %files.cert.display(), "reloaded the TLS certificate");
            }
            Err(e) => tracing::error!(
                error = %e,
                "TLS files changed but cannot be used; still serving the previous certificate"
            ),
        }
    }
}

/// A rustls server configuration from PEM files: HTTP/2 only (gRPC), TLS
/// 1.2 and 1.3, client certificates required when a client CA is given.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}
