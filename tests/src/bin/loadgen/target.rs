//! Where loadgen connects: the URL (`ws://` or `wss://`), the address its
//! host resolves to, and for `wss://` the TLS client (tokio-rustls, ring
//! provider, like the router) that trusts `--tls-ca`.
//!
//! Parsing is kept apart from resolving and from the sockets so the URL
//! rules are unit-tested with plain values.
//!
//! What must stay true:
//! - the handshake goes to the URL as given (its `Host` header is the URL's
//!   authority), and the certificate is checked against `--tls-server-name`,
//!   else the URL's host (a name, or an IP literal checked against the
//!   certificate's IP addresses);
//! - TLS session resumption is off: every connection does a full handshake,
//!   as many distinct clients would, so a run measures the server's full
//!   handshake cost and does not depend on a ticket cache in the tool.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// The host part of a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// A parsed `ws://` or `wss://` URL (no user info, no query rules: the path
/// is passed on as written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    pub tls: bool,
    pub host: Host,
    pub port: u16,
}

impl WsUrl {
    /// Parses `ws[s]://HOST[:PORT][/PATH]`; HOST is an IPv4 literal, an IPv6
    /// literal in brackets, or a name; PORT defaults to 80 (`ws`) or 443 (`wss`).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("ws://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (true, rest)
        } else {
            bail!("only ws:// and wss:// URLs are supported, got {url}");
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
        if authority.contains('@') {
            bail!("user info is not supported in {url}");
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (ip, after) = v6
                .split_once(']')
                .ok_or_else(|| anyhow!("unclosed '[' in the host of {url}"))?;
            let ip: IpAddr = ip
                .parse()
                .with_context(|| format!("bad IPv6 address in {url}"))?;
            (Host::Ip(ip), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (host_of(h), Some(p)),
                None => (host_of(authority), None),
            }
        };
        if host == Host::Name(String::new()) {
            bail!("no host in {url}");
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse()
                .with_context(|| format!("bad port {p:?} in {url}"))?,
        };
        Ok(Self { tls, host, port })
    }

    /// The name the server's certificate must carry: `override_name` if
    /// given, else the URL's host.
    pub fn server_name(&self, override_name: Option<&str>) -> anyhow::Result<ServerName<'static>> {
        let name = match (override_name, &self.host) {
            (Some(name), _) => name,
            (None, Host::Name(name)) => name.as_str(),
            (None, Host::Ip(ip)) => return Ok(ServerName::IpAddress((*ip).into())),
        };
        ServerName::try_from(name.to_owned())
            .with_context(|| format!("{name:?} is not a valid TLS server name"))
    }
}

fn host_of(s: &str) -> Host {
    match s.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(s.to_ascii_lowercase()),
    }
}

/// Where to connect: the URL for the handshake, the socket address, and
/// the TLS client for `wss://`.
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    pub tls: Option<Tls>,
}

/// A TLS client and the name it checks the server's certificate against.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl Target {
    /// Parses `url`, resolves its host once (an IP literal as is), and for
    /// `wss://` loads the CA to trust from `ca` (PEM, one or more
    /// certificates).
    pub async fn new(
        url: &str,
        ca: Option<&Path>,
        server_name: Option<&str>,
    ) -> anyhow::Result<Self> {
        let parsed = WsUrl::parse(url)?;
        let addr = match &parsed.host {
            Host::Ip(ip) => SocketAddr::new(*ip, parsed.port),
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), parsed.port))
                .await
                .with_context(|| format!("cannot resolve {name}"))?
                // IPv4 first: the client sockets are bound to 127.0.0.k.
                .min_by_key(|a| a.is_ipv6())
                .ok_or_else(|| anyhow!("{name} resolves to no address"))?,
        };
        let tls = match (parsed.tls, ca) {
            (false, None) => None,
            (false, Some(_)) => bail!("--tls-ca is given but {url} is not a wss:// URL"),
            (true, None) => {
                bail!("a wss:// URL needs --tls-ca (the CA that signed the server's certificate)")
            }
            (true, Some(ca)) => Some(Tls {
                connector: TlsConnector::from(client_config(ca)?),
                name: parsed.server_name(server_name)?,
            }),
        };
        Ok(Self {
            url: url.to_owned(),
            addr,
            tls,
        })
    }
}

/// A rustls client trusting the certificates in `ca`, without resumption.
fn client_config(ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).map_err(|e| anyhow!("--tls-ca {}: {e}", ca.display()))?
    {
        let cert = cert.map_err(|e| anyhow!("--tls-ca {}: {e}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("--tls-ca {}: not a usable CA certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("--tls-ca {}: no certificate in the file", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

impl Tls {
    /// The TLS handshake over an established TCP connection.
    pub async fn wrap(&self, tcp: TcpStream) -> io::Result<Stream> {
        let tls = self.connector.connect(self.name.clone(), tcp).await?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// A client connection, plain or TLS. The TLS state is boxed so a plain
/// connection does not carry its size.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let v4 = |a, b, c, d| Host::Ip(IpAddr::from([a, b, c, d]));
        let cases: &[(&str, bool, Host, u16)] = &[
            ("ws://127.0.0.1:8001/ws", false, v4(127, 0, 0, 1), 8001),
            ("wss://127.0.0.1:8443/ws", true, v4(127, 0, 0, 1), 8443),
            (
                "wss://localhost:8001/",
                true,
                Host::Name("localhost".into()),
                8001,
            ),
            ("wss://LocalHost:1", true, Host::Name("localhost".into()), 1),
            (
                "ws://example.org/a/b",
                false,
                Host::Name("example.org".into()),
                80,
            ),
            (
                "wss://example.org?x=1",
                true,
                Host::Name("example.org".into()),
                443,
            ),
            (
                "ws://[::1]:9/ws",
                false,
                Host::Ip("::1".parse().unwrap()),
                9,
            ),
            ("wss://[::1]/", true, Host::Ip("::1".parse().unwrap()), 443),
        ];
        for (url, tls, host, port) in cases {
            let got = WsUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e:#}"));
            assert_eq!(
                got,
                WsUrl {
                    tls: *tls,
                    host: host.clone(),
                    port: *port
                },
                "{url}"
            );
        }
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "http://127.0.0.1:1/",
            "https://127.0.0.1:1/",
            "127.0.0.1:1",
            "ws://",
            "ws://:80/",
            "wss://127.0.0.1:port/",
            "wss://127.0.0.1:70000/",
            "ws://[::1/",
            "ws://user@127.0.0.1:1/",
        ] {
            assert!(WsUrl::parse(url).is_err(), "{url} should be refused");
        }
    }

    #[test]
    fn server_name_comes_from_the_flag_or_the_host() {
        let name = |url: &str, flag: Option<&str>| {
            WsUrl::parse(url)
                .unwrap()
                .server_name(flag)
                .map(|n| n.to_str().into_owned())
        };
        assert_eq!(name("wss://localhost:1/", None).unwrap(), "localhost");
        assert_eq!(name("wss://127.0.0.1:1/", None).unwrap(), "127.0.0.1");
        assert_eq!(
            name("wss://127.0.0.1:1/", Some("localhost")).unwrap(),
            "localhost"
        );
        assert!(name("wss://127.0.0.1:1/", Some("not a name")).is_err());
    }

    #[tokio::test]
    async fn wss_needs_a_ca_and_ws_refuses_one() {
        let no_ca = Target::new("wss://127.0.0.1:1/", None, None).await;
        assert!(no_ca.err().unwrap().to_string().contains("--tls-ca"));
        let ca_on_ws = Target::new("ws://127.0.0.1:1/", Some(Path::new("ca.pem")), None).await;
        assert!(ca_on_ws.err().unwrap().to_string().contains("not a wss://"));
        let missing = Target::new(
            "wss://127.0.0.1:1/",
            Some(Path::new("/nonexistent.pem")),
            None,
        )
        .await;
        assert!(missing.is_err());
        let plain = Target::new("ws://127.0.0.1:8001/ws", None, None)
            .await
            .unwrap();
        assert_eq!((plain.addr.port(), plain.tls.is_none()), (8001, true));
    }
}
