//! TLS on the client port (README, "TLS"), end to end with certificates the
//! test makes (`openssl`): a `wss://` client connects and is served; a
//! certificate swap is picked up by new connections while an old one keeps
//! streaming; a broken certificate file is rejected whole; a client that
//! stalls mid-handshake is closed at the handshake deadline; a forged
//! `X-Forwarded-For` from an untrusted peer is ignored.

use std::time::Duration;

use e2e_tests::{
    http_get, run,
    tls::{server_cert_der, tls_connect, Issued, TestPki},
    RouterConfig, RouterProc,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};

const LIMIT: Duration = Duration::from_secs(120);
const ROUTES: &str = r#"{"routes":[{"path":"/ws/echo","service":"echo"}]}"#;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

async fn start(pair: &Issued, args: &[&str]) -> RouterProc {
    let mut cfg = RouterConfig::new(ROUTES)
        .arg("--tls-cert")
        .arg(pair.cert.to_str().unwrap())
        .arg("--tls-key")
        .arg(pair.key.to_str().unwrap());
    for a in args {
        cfg = cfg.arg(a);
    }
    RouterProc::start_with(cfg).await
}

/// A `wss://` session: the TLS stream's server certificate, and the
/// WebSocket after its welcome.
async fn wss(router: &RouterProc, pki: &TestPki) -> (Vec<u8>, Wss) {
    let tls = tls_connect(router.http, pki.client_config(None))
        .await
        .expect("TLS handshake");
    let der = server_cert_der(&tls);
    let url = format!("wss://localhost:{}/ws/echo", router.http.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket over TLS");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (der, ws)
}

async fn next_json(ws: &mut Wss) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("the connection is open")
            .expect("a WebSocket frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).expect("JSON frame");
        }
    }
}

async fn request(ws: &mut Wss, msg_type: &str, id: &str, data: Value) {
    let frame = json!({"type": msg_type, "id": id, "data": data}).to_string();
    ws.send(Message::Text(frame.into())).await.expect("send");
}

/// Frames of request `id` until its terminal one (`done`, or an error).
async fn until_done(ws: &mut Wss, id: &str) -> Value {
    loop {
        let f = next_json(ws).await;
        if f["id"] == id && (f["done"] == true || f["type"] == "error") {
            return f;
        }
    }
}

/// `GET /stats` over TLS, parsed.
async fn stats(router: &RouterProc, pki: &TestPki) -> Value {
    let mut tls = tls_connect(router.http, pki.client_config(None))
        .await
        .expect("TLS handshake");
    tls.write_all(b"GET /stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).await.ok();
    let text = String::from_utf8_lossy(&raw);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // axum sends /stats with a Content-Length: the body is the JSON.
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/stats over TLS: {e}: {text}"))
}

/// Replaces `dst`'s files with `src`'s by rename (as certificate tools do).
fn install(src: &Issued, dst: &Issued) {
    for (from, to) in [(&src.key, &dst.key), (&src.cert, &dst.cert)] {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_clients_are_served_and_a_certificate_swap_reaches_new_connections_only() {
    run(LIMIT, async {
        let pki = TestPki::new("tls-swap");
        let first = pki.issue("first", "router-one");
        let second = pki.issue("second", "router-two");
        // The router reads these two paths; their content changes.
        let live = Issued {
            cert: pki.dir.join("live.pem"),
            key: pki.dir.join("live.key"),
        };
        install(&first, &live);
        let router = start(&live, &[]).await;
        let _worker = router.worker("echo_worker", &["echo"], &[]).await;

        let (der, mut old) = wss(&router, &pki).await;
        assert_eq!(der, first.der(), "the first certificate is served");
        request(&mut old, "echo", "e1", json!({"x": 1.5})).await;
        assert_eq!(until_done(&mut old, "e1").await["data"], json!({"x": 1.5}));
        // A request in flight across the swap.
        request(&mut old, "slow", "s1", json!({"ms": 1500})).await;

        install(&second, &live);
        let swapped = Instant::now();
        loop {
            let (der, _ws) = wss(&router, &pki).await;
            if der == second.der() {
                break;
            }
            assert!(
                swapped.elapsed() < Duration::from_secs(5),
                "new connections still get the old certificate 5 s after the swap"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "new connections got the new certificate {:?} after the swap",
            swapped.elapsed()
        );
        // The old connection streams on, on its old session.
        let done = until_done(&mut old, "s1").await;
        assert_eq!(done["data"], json!({"slept_ms": 1500}), "{done}");
        request(&mut old, "stream", "st", json!({"n": 50})).await;
        let mut partials = 0;
        loop {
            let f = next_json(&mut old).await;
            assert_eq!(f["id"], "st", "{f}");
            if f["done"] == true {
                break;
            }
            partials += 1;
        }
        assert_eq!(partials, 50);
        let s = stats(&router, &pki).await;
        assert_eq!(s["tls"]["ok"], true, "{s}");
        assert!(s["tls"]["reloads"].as_u64() >= Some(1), "{s}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_certificate_is_rejected_whole_and_the_old_pair_stays() {
    run(LIMIT, async {
        let pki = TestPki::new("tls-broken");
        let good = pki.issue("good", "router");
        let other = pki.issue("other", "router-other");
        let router = start(&good, &[]).await;
        let original = good.der();
        // Garbage in the certificate file.
        std::fs::write(&good.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
        let started = Instant::now();
        let s = loop {
            let s = stats(&router, &pki).await;
            if s["tls"]["failedReloads"].as_u64() >= Some(1) {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no rejection: {s}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(s["tls"]["ok"], false, "{s}");
        let error = s["tls"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("good.pem"),
            "the error names the file: {error}"
        );
        // A key that does not match the certificate: rejected too.
        std::fs::copy(&other.cert, &good.cert).unwrap();
        let started = Instant::now();
        let s = loop {
            let s = stats(&router, &pki).await;
            if s["tls"]["failedReloads"].as_u64() >= Some(2) {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no rejection: {s}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let error = s["tls"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("good.key"),
            "mismatch names the pair: {error}"
        );
        // The pair loaded at start is still what clients get.
        let (der, _ws) = wss(&router, &pki).await;
        assert_eq!(der, original, "the running pair stays");
        let metrics = {
            let mut tls = tls_connect(router.http, pki.client_config(None))
                .await
                .unwrap();
            tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut raw = Vec::new();
            tls.read_to_end(&mut raw).await.ok();
            String::from_utf8_lossy(&raw).into_owned()
        };
        assert!(
            metrics.contains("router_tls_reloads_total{result=\"rejected\"} 2"),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_closed_at_the_deadline_and_plain_http_is_refused() {
    run(LIMIT, async {
        let pki = TestPki::new("tls-stall");
        let pair = pki.issue("pair", "router");
        let router = start(&pair, &["--handshake-timeout-ms", "500"]).await;
        // Half a ClientHello: a TLS record header that promises 512 bytes,
        // then silence.
        let mut s = TcpStream::connect(router.http).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        let took = t.elapsed();
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "closed, not answered: {r:?}"
        );
        eprintln!("a stalled handshake was closed after {took:?} (deadline 500 ms)");
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // Plain HTTP on the TLS port gets no HTTP answer.
        let r = http_get(router.http, "/health").await;
        assert!(
            r.is_err(),
            "plain HTTP must not be served on a TLS port: {r:?}"
        );
        // And TLS still works.
        wss(&router, &pki).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    run(LIMIT, async {
        // 127.0.0.2 plays the proxy (Linux routes 127/8 over loopback);
        // 127.0.0.1 is a client forging the header.
        let router = RouterProc::start(ROUTES, &[("TRUSTED_PROXIES", "127.0.0.2")]).await;
        let forged = upgrade_from("127.0.0.1", &router, "1.2.3.4").await;
        let proxied = upgrade_from("127.0.0.2", &router, "1.2.3.4, 203.0.113.9").await;
        let opened = |needle: &str| {
            router
                .proc
                .stderr
                .lines()
                .iter()
                .any(|l| l.contains("connection opened") && l.contains(needle))
        };
        let started = Instant::now();
        while !(opened("remote=203.0.113.9 ") && opened("remote=127.0.0.1:")) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "log:\n{}",
                router.proc.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!opened("remote=1.2.3.4"), "a forged hop was believed");
        drop((forged, proxied));
    })
    .await;
}

/// A WebSocket upgrade from `source` with an `X-Forwarded-For` header.
async fn upgrade_from(source: &str, router: &RouterProc, xff: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(router.http).await.unwrap();
    let req = format!(
        "GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-Forwarded-For: {xff}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101", "upgrade from {source}");
    s
}

/// The README's haproxy block, as written, with its paths and ports
/// pointed at this test's files and router.
fn readme_haproxy_config(listen: &str, pem: &str, router: &str) -> String {
    let readme = std::fs::read_to_string(e2e_tests::workspace_root().join("README.md")).unwrap();
    let start = readme
        .find("haproxy, terminating TLS")
        .expect("the README's haproxy example");
    let block = readme[start..]
        .split("```")
        .nth(1)
        .expect("a code block after the haproxy sentence");
    assert!(
        block.contains("bind :443 ") && block.contains("127.0.0.1:8001"),
        "{block}"
    );
    block
        .replace("bind :443 ", &format!("bind {listen} "))
        .replace("/etc/haproxy/site.pem", pem)
        .replace("127.0.0.1:8001", router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_readme_haproxy_the_router_sees_the_real_client() {
    run(LIMIT, async {
        let pki = TestPki::new("tls-haproxy");
        let site = pki.issue("site", "proxy");
        let pem = pki.dir.join("site-combined.pem");
        let mut combined = std::fs::read(&site.cert).unwrap();
        combined.extend(std::fs::read(&site.key).unwrap());
        std::fs::write(&pem, combined).unwrap();
        let router = RouterProc::start(ROUTES, &[("TRUSTED_PROXIES", "127.0.0.1")]).await;
        let _worker = router.worker("echo_worker", &["echo"], &[]).await;

        let port = e2e_tests::free_tcp_port();
        let listen = format!("127.0.0.1:{port}");
        let cfg = pki.dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            readme_haproxy_config(&listen, pem.to_str().unwrap(), &router.http.to_string()),
        )
        .unwrap();
        let mut cmd = std::process::Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        let _haproxy = e2e_tests::Proc::spawn("haproxy", cmd);
        let proxy: std::net::SocketAddr = listen.parse().unwrap();

        // Ready when a wss:// session through it gets its welcome (bounded).
        let started = Instant::now();
        let source: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        let mut ws = loop {
            match wss_via(proxy, source, &pki, "1.2.3.4").await {
                Ok(ws) => break ws,
                Err(e) => assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "haproxy did not pass a session within 15 s: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        request(&mut ws, "echo", "e", json!({"via": "haproxy"})).await;
        assert_eq!(
            until_done(&mut ws, "e").await["data"],
            json!({"via": "haproxy"})
        );
        // haproxy appended the client it saw (127.0.0.3) to the forged
        // header; the router trusts haproxy (127.0.0.1) and takes that hop.
        let log = router.proc.stderr.text();
        assert!(
            log.lines()
                .any(|l| l.contains("connection opened") && l.contains("remote=127.0.0.3 ")),
            "the router did not see the client behind haproxy:\n{log}"
        );
        assert!(
            !log.contains("remote=1.2.3.4"),
            "a forged hop was believed:\n{log}"
        );
    })
    .await;
}

/// A `wss://` session through a TLS-terminating proxy, from `source`, with a
/// forged `X-Forwarded-For`.
async fn wss_via(
    proxy: std::net::SocketAddr,
    source: std::net::IpAddr,
    pki: &TestPki,
    forged: &str,
) -> Result<Wss, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tls = e2e_tests::tls::tls_connect_from(Some(source), proxy, pki.client_config(None))
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let mut req = format!("wss://localhost:{}/ws/echo", proxy.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", forged.parse().unwrap());
    // haproxy passes a client's `Forwarded` through untouched: the router
    // must not read it (it trusts only the header its proxies write).
    req.headers_mut()
        .insert("forwarded", format!("for={forged}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .map_err(|e| format!("WebSocket: {e}"))?;
    let welcome = next_json(&mut ws).await;
    if welcome["type"] != "welcome" {
        return Err(format!("first frame: {welcome}"));
    }
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_that_require_a_client_certificate_admit_only_verified_ones() {
    use tokio_tungstenite::tungstenite::Error as WsError;
    run(LIMIT, async {
        let pki = TestPki::new("mtls");
        let server = pki.issue("server", "router");
        let alice = pki.issue("alice", "alice");
        let rogue_ca = TestPki::new("mtls-rogue");
        let mallory = rogue_ca.issue("mallory", "mallory");
        let routes = json!({"routes": [
            {"path": "/ws/echo", "service": "echo"},
            {"path": "/ws/secure", "service": "echo", "clientCert": "required"},
        ]});
        let cfg = RouterConfig::new(&routes.to_string())
            .arg("--tls-cert")
            .arg(server.cert.to_str().unwrap())
            .arg("--tls-key")
            .arg(server.key.to_str().unwrap())
            .arg("--tls-client-ca")
            .arg(pki.ca_cert.to_str().unwrap());
        let router = RouterProc::start_with(cfg).await;
        let _worker = router.worker("echo_worker", &["echo"], &[]).await;
        let url = |path: &str| format!("wss://localhost:{}{path}", router.http.port());

        // No certificate: the open route admits, the secure one refuses.
        let tls = tls_connect(router.http, pki.client_config(None))
            .await
            .unwrap();
        match tokio_tungstenite::client_async(url("/ws/secure"), tls).await {
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status(), 403);
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                    .into_owned();
                assert!(body.contains("client_cert_required"), "{body}");
            }
            other => panic!("expected 403 client_cert_required, got {other:?}"),
        }
        let tls = tls_connect(router.http, pki.client_config(None))
            .await
            .unwrap();
        let (mut open, _) = tokio_tungstenite::client_async(url("/ws/echo"), tls)
            .await
            .expect("the open route admits clients without a certificate");
        assert_eq!(next_json(&mut open).await["type"], "welcome");

        // A certificate from the client CA: admitted, and the worker sees
        // its subject in `connect`.
        let tls = tls_connect(router.http, pki.client_config(Some(&alice)))
            .await
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(url("/ws/secure"), tls)
            .await
            .expect("a verified client certificate is admitted");
        assert_eq!(next_json(&mut ws).await["type"], "welcome");
        let seen = next_json(&mut ws).await;
        assert_eq!(seen["type"], "client_cert", "{seen}");
        let subject = seen["data"]["subject"].as_str().unwrap_or_default();
        assert!(subject.contains("CN=alice"), "{subject}");

        // A certificate from another CA (the client trusts the router's CA,
        // so only the router's verdict on the client counts) fails the TLS
        // handshake.
        let refused = async {
            let tls = tls_connect(router.http, pki.client_config(Some(&mallory)))
                .await
                .map_err(|e| e.to_string())?;
            let (mut ws, _) = tokio_tungstenite::client_async(url("/ws/echo"), tls)
                .await
                .map_err(|e| e.to_string())?;
            // TLS 1.3 reports the client's rejection after the handshake:
            // the first read fails.
            match ws.next().await {
                Some(Ok(m)) => Ok(format!("{m:?}")),
                other => Err(format!("{other:?}")),
            }
        }
        .await;
        assert!(
            refused.is_err(),
            "an unknown CA's certificate was served: {refused:?}"
        );
    })
    .await;
}

/// Kubernetes mounts a secret as `tls.crt -> ..data/tls.crt` with `..data`
/// a symlink to a timestamped directory, and rotates it by swapping
/// `..data` whole: the files the router watches never change name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_style_secret_rotation_is_picked_up() {
    use std::os::unix::fs::symlink;
    run(LIMIT, async {
        let pki = TestPki::new("tls-k8s");
        let first = pki.issue("first", "router-one");
        let second = pki.issue("second", "router-two");
        let mount = pki.dir.join("mount");
        let version = |n: &str, pair: &Issued| {
            let dir = mount.join(n);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(&pair.cert, dir.join("tls.crt")).unwrap();
            std::fs::copy(&pair.key, dir.join("tls.key")).unwrap();
        };
        version("..2026_11_29_v1", &first);
        symlink("..2026_11_29_v1", mount.join("..data")).unwrap();
        symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
        symlink("..data/tls.key", mount.join("tls.key")).unwrap();
        let live = Issued {
            cert: mount.join("tls.crt"),
            key: mount.join("tls.key"),
        };
        let router = start(&live, &[]).await;
        let (der, _ws) = wss(&router, &pki).await;
        assert_eq!(der, first.der());
        // The rotation: a new version, then `..data` swapped by rename.
        version("..2026_11_29_v2", &second);
        symlink("..2026_11_29_v2", mount.join("..data_tmp")).unwrap();
        std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        let started = Instant::now();
        loop {
            let (der, _ws) = wss(&router, &pki).await;
            if der == second.der() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the rotation was not seen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// The README's self-signed certificate command, run as written: a client
/// that trusts `cert.pem` (rustls, as browsers' and most libraries' checks
/// go) connects to a router serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_self_signed_certificate_is_accepted_by_a_client_that_trusts_it() {
    run(LIMIT, async {
        let readme =
            std::fs::read_to_string(e2e_tests::workspace_root().join("README.md")).unwrap();
        let from = readme
            .find("openssl req -x509")
            .expect("the README's openssl command");
        let end = from
            + readme[from..]
                .find("\nTLS_CERT=")
                .expect("the line after it");
        let command = &readme[from..end];
        let pki = TestPki::new("tls-readme"); // a scratch directory, and a CA we do not use
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(&pki.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pair = Issued {
            cert: pki.dir.join("cert.pem"),
            key: pki.dir.join("key.pem"),
        };
        let router = start(&pair, &[]).await;
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
        roots
            .add(CertificateDer::from_pem_file(&pair.cert).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = tls_connect(router.http, std::sync::Arc::new(config)).await;
        assert!(tls.is_ok(), "a client trusting cert.pem: {:?}", tls.err());
    })
    .await;
}
