//! TLS on the client port (README, "TLS"): HTTPS and `wss://` on the same
//! port as plain HTTP would be, with rustls (ring provider), TLS 1.2 and
//! 1.3, ALPN `http/1.1`.
//!
//! The certificate chain and key (PEM files, `TLS_CERT` / `TLS_KEY`), and
//! the client CA when mutual TLS is on (`TLS_CLIENT_CA`), are loaded into
//! a whole new `ServerConfig` on every change of the files and on SIGHUP
//! (`watch`). A pair that does not load (unreadable, no certificate, no
//! key, a key that does not match the certificate) is rejected whole: the
//! running configuration stays, and the failure is logged, shown in
//! `/stats` and counted. New connections take the configuration current
//! when they are accepted; established ones keep theirs.
//!
//! With a client CA, a client may present a certificate signed by it (one
//! that does not verify fails the handshake); routes with
//! `"clientCert": "required"` admit only clients that did, and workers see
//! its subject in `connect` (`PeerInfo::client_cert`).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use serde::Serialize;
use tokio_rustls::{
    rustls::{
        self,
        crypto::CryptoProvider,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    TlsAcceptor,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info};

use crate::{
    client::unix_ms,
    metrics::Metrics,
    watch::{watch_files, Trigger},
};

/// Where the certificate pair (and the optional client CA) live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.cert.clone(), self.key.clone()];
        v.extend(self.client_ca.clone());
        v
    }
}

/// Why a certificate pair was rejected; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {problem}")]
    Pem { path: PathBuf, problem: String },
    #[error("{path}: no certificate in the file")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {problem}")]
    ClientCa { path: PathBuf, problem: String },
    #[error("{cert} and {key}: {problem}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        problem: rustls::Error,
    },
}

/// The outcome of the last load, for `/stats`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TlsStatus {
    /// Whether the last attempt was applied.
    pub ok: bool,
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
    /// When the configuration in use was loaded.
    pub loaded_at_unix_ms: u64,
    /// The last rejection, if the last attempt failed.
    pub error: Option<String>,
    pub reloads: u64,
    pub failed_reloads: u64,
}

/// The live TLS configuration of the client port.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<TlsAcceptor>,
    status: Mutex<TlsStatus>,
    metrics: Arc<Metrics>,
}

impl Tls {
    /// Loads the files at start; an error here stops the router.
    pub fn load(files: TlsFiles, metrics: Arc<Metrics>) -> Result<Arc<Tls>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = build(&files, &provider)?;
        let status = TlsStatus {
            ok: true,
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
            client_ca: files.client_ca.as_ref().map(|p| p.display().to_string()),
            loaded_at_unix_ms: unix_ms(),
            error: None,
            reloads: 0,
            failed_reloads: 0,
        };
        Ok(Arc::new(Tls {
            files,
            provider,
            current: RwLock::new(TlsAcceptor::from(Arc::new(config))),
            status: Mutex::new(status),
            metrics,
        }))
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> TlsAcceptor {
        // A poisoned lock still holds a whole acceptor (it is replaced in
        // one assignment).
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether clients may present certificates (`TLS_CLIENT_CA` is set).
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }

    pub fn status(&self) -> TlsStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the files again: a valid set replaces the configuration for
    /// new connections, an invalid one is rejected whole. Returns whether
    /// it was applied.
    pub fn reload(&self) -> bool {
        let result = build(&self.files, &self.provider);
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                    TlsAcceptor::from(Arc::new(config));
                status.ok = true;
                status.error = None;
                status.loaded_at_unix_ms = unix_ms();
                status.reloads += 1;
                self.metrics.tls_reload(true);
                info!(cert = %self.files.cert.display(), "TLS certificate reloaded: new connections use it");
                true
            }
            Err(e) => {
                status.ok = false;
                status.error = Some(e.to_string());
                status.failed_reloads += 1;
                self.metrics.tls_reload(false);
                error!(problem = %e, "TLS certificate rejected; the running one stays");
                false
            }
        }
    }

    /// Reloads on changes of the files and on SIGHUP until `stop` fires.
    pub fn spawn_reloader(self: &Arc<Self>, tracker: &TaskTracker, stop: CancellationToken) {
        let tls = self.clone();
        let files = self.files.paths();
        tracker.spawn(watch_files("TLS files", files, stop, move |trigger| {
            if trigger == Trigger::Hangup {
                info!("SIGHUP: reloading the TLS certificate");
            }
            tls.reload();
        }));
    }
}

/// A whole server configuration from the files, or why not.
fn build(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<ServerConfig, TlsError> {
    let chain = read_chain(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        problem: pem_problem(e, "private key"),
    })?;
    // Invariant: both versions are supported by the ring provider.
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("TLS 1.2 and 1.3 with the ring provider");
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_chain(ca)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    path: ca.clone(),
                    problem: e.to_string(),
                })?;
            }
            // Clients without a certificate still connect: routes decide
            // whether they need one.
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::ClientCa {
                        path: ca.clone(),
                        problem: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|problem| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            problem,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            problem: pem_problem(e, "certificate"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

fn pem_problem(e: rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(e) => format!("cannot read: {e}"),
        E::NoItemsFound => format!("no {what} in the file (PEM expected)"),
        other => format!("not valid PEM: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        let files = TlsFiles {
            cert: dir.join("missing.pem"),
            key: empty.clone(),
            client_ca: None,
        };
        let err = Tls::load(files, Arc::new(Metrics::new())).err().unwrap();
        let text = err.to_string();
        assert!(
            text.contains("missing.pem") && text.contains("cannot read"),
            "{text}"
        );
        let files = TlsFiles {
            cert: empty.clone(),
            key: empty.clone(),
            client_ca: None,
        };
        let text = Tls::load(files, Arc::new(Metrics::new()))
            .err()
            .unwrap()
            .to_string();
        assert!(text.contains("empty.pem"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
