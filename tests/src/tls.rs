//! TLS for the tests: a throwaway certificate authority made with the
//! `openssl` command (Debian's `openssl` package), certificates it issues
//! for `localhost` / 127.0.0.1, and a rustls client that trusts it.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{
    client::TlsStream,
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
        ClientConfig, RootCertStore,
    },
    TlsConnector,
};

use crate::unique;

/// A certificate authority in a temporary directory, removed on drop.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    ca_key: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// The certificate's DER bytes (to compare with what a server presented).
    pub fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_file(&self.cert)
            .unwrap_or_else(|e| panic!("{}: {e:?}", self.cert.display()))
            .as_ref()
            .to_vec()
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

impl TestPki {
    /// A new CA (`CN=<tag> test CA`, EC P-256).
    pub fn new(tag: &str) -> TestPki {
        let dir = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca_cert = dir.join("ca.pem");
        let ca_key = dir.join("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&ca_key),
            "-out",
            path_str(&ca_cert),
            "-days",
            "2",
            "-subj",
            &format!("/CN={tag} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        TestPki {
            dir,
            ca_cert,
            ca_key,
        }
    }

    /// A certificate for `localhost` and 127.0.0.1, usable by servers and
    /// clients, with subject `CN=<cn>`; files `<name>.pem` and `<name>.key`.
    pub fn issue(&self, name: &str, cn: &str) -> Issued {
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             basicConstraints=CA:FALSE\n",
        )
        .expect("ext file");
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&key),
            "-out",
            path_str(&csr),
            "-subj",
            &format!("/CN={cn}/O=e2e tests"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr),
            "-CA",
            path_str(&self.ca_cert),
            "-CAkey",
            path_str(&self.ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            path_str(&ext),
            "-out",
            path_str(&cert),
        ]);
        Issued { cert, key }
    }

    /// A client that trusts this CA, presenting `identity` if given.
    pub fn client_config(&self, identity: Option<&Issued>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca_cert).expect("CA file") {
            roots.add(cert.expect("CA PEM")).expect("CA certificate");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some(id) => {
                let chain: Vec<_> = CertificateDer::pem_file_iter(&id.cert)
                    .expect("client cert")
                    .map(|c| c.expect("client cert PEM"))
                    .collect();
                let key = PrivateKeyDer::from_pem_file(&id.key).expect("client key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client identity")
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection to `addr` as `localhost`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_from(None, addr, config).await
}

/// [`tls_connect`] from a chosen local address (e.g. `127.0.0.3`, which
/// Linux routes over loopback: another client IP on one machine).
pub async fn tls_connect_from(
    source: Option<IpAddr>,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    let name = ServerName::try_from("localhost").expect("a valid name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// The DER of the certificate the server presented.
pub fn server_cert_der(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default()
}
