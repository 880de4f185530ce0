//! Origins and tokens at upgrade time (README: policies): a refused origin
//! gets HTTP 403 JSON naming it (global allowlist and per-route override);
//! a missing, invalid or expired token gets HTTP 401 JSON with the reason;
//! HS256 and RS256 tokens are accepted from the `Authorization` header, the
//! `token` query parameter and `Sec-WebSocket-Protocol: bearer, <jwt>` (the
//! router then selects `bearer`); the verified claims reach the worker.
//!
//! The RS256 keys are test-only fixtures (`tests/fixtures/policies/`).

mod policies_support;

use std::time::Duration;

use e2e_tests::{run, RouterConfig, RouterProc};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use policies_support::{
    assert_refusal, connect_with, next_json, now_s, send_json, try_upgrade, Ws,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);

const SECRET_ENV: &str = "E2E_POLICIES_JWT_SECRET";
const SECRET: &str = "e2e-policies-test-only-hs256-secret";
/// Relative to the workspace root, the router's working directory.
const PUBLIC_KEY_FILE: &str = "tests/fixtures/policies/test_only_jwt_rs256_public.pem";
const PRIVATE_KEY: &[u8] = include_bytes!("../fixtures/policies/test_only_jwt_rs256_private.pem");
const UNTRUSTED_PRIVATE_KEY: &[u8] =
    include_bytes!("../fixtures/policies/test_only_jwt_rs256_untrusted_private.pem");

const APP_ORIGIN: &str = "https://app.example.com";
const EVIL_ORIGIN: &str = "https://evil.example";

fn routes() -> String {
    let hs = json!({"hs256SecretEnv": SECRET_ENV, "leewaySeconds": 0});
    json!({
        "defaults": {"allowedOrigins": [APP_ORIGIN]},
        "routes": [
            {"path": "/ws/origin", "service": "echo"},
            {"path": "/ws/origin-other", "service": "echo", "allowedOrigins": ["https://other.example"]},
            {"path": "/ws/any-origin", "service": "echo", "allowedOrigins": ["*"]},
            {"path": "/ws/hs", "service": "echo", "auth": hs},
            {"path": "/ws/rs", "service": "echo",
             "auth": {"rs256PublicKeyFile": PUBLIC_KEY_FILE, "leewaySeconds": 0}},
            {"path": "/ws/strict", "service": "echo",
             "auth": {"hs256SecretEnv": SECRET_ENV, "rs256PublicKeyFile": PUBLIC_KEY_FILE,
                      "issuer": "e2e-issuer", "audience": "e2e-audience", "leewaySeconds": 0}},
            {"path": "/ws/optional", "service": "echo",
             "auth": {"required": false, "hs256SecretEnv": SECRET_ENV, "leewaySeconds": 0}}
        ]
    })
    .to_string()
}

async fn router() -> RouterProc {
    RouterProc::start_with(RouterConfig::new(&routes()).env(SECRET_ENV, SECRET)).await
}

fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("cannot sign HS256: {e}"))
}

fn rs256(claims: &Value, private_pem: &[u8]) -> String {
    let key = EncodingKey::from_rsa_pem(private_pem)
        .unwrap_or_else(|e| panic!("cannot read the test RSA key: {e}"));
    encode(&Header::new(Algorithm::RS256), claims, &key)
        .unwrap_or_else(|e| panic!("cannot sign RS256: {e}"))
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "role": "tester", "exp": now_s() + 600})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_origins_get_403_json_naming_the_origin() {
    run(LIMIT, async {
        let router = router().await;

        let resp = try_upgrade(router.http, "/ws/origin", &[("Origin", EVIL_ORIGIN)]).await;
        let body = assert_refusal(&resp, 403, "origin_not_allowed");
        assert_eq!(
            body["origin"], EVIL_ORIGIN,
            "the body names the origin: {body}"
        );
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains(EVIL_ORIGIN)),
            "the message says which origin and why: {body}"
        );
        // Logged the same way.
        let logged = router
            .proc
            .stderr
            .wait_line(
                "the refusal in the router log",
                Duration::from_secs(5),
                |l| l.contains("refused") && l.contains(EVIL_ORIGIN),
            )
            .await;
        assert!(logged.is_ok(), "{logged:?}");

        // The global allowlist admits its origin, and clients without Origin.
        let resp = try_upgrade(router.http, "/ws/origin", &[("Origin", APP_ORIGIN)]).await;
        assert_eq!(resp.status, 101, "allowed origin refused: {resp:?}");
        let resp = try_upgrade(router.http, "/ws/origin", &[]).await;
        assert_eq!(
            resp.status, 101,
            "a non-browser client (no Origin) refused: {resp:?}"
        );

        // A route's own list replaces the global one.
        let resp = try_upgrade(router.http, "/ws/origin-other", &[("Origin", APP_ORIGIN)]).await;
        let body = assert_refusal(&resp, 403, "origin_not_allowed");
        assert_eq!(body["origin"], APP_ORIGIN, "{body}");
        let resp = try_upgrade(
            router.http,
            "/ws/origin-other",
            &[("Origin", "https://other.example")],
        )
        .await;
        assert_eq!(resp.status, 101, "{resp:?}");
        let resp = try_upgrade(router.http, "/ws/any-origin", &[("Origin", EVIL_ORIGIN)]).await;
        assert_eq!(resp.status, 101, "\"*\" admits any origin: {resp:?}");
    })
    .await;
}

/// Asserts a 401 whose message contains `reason`.
async fn assert_401(router: &RouterProc, path: &str, headers: &[(&str, &str)], reason: &str) {
    let resp = try_upgrade(router.http, path, headers).await;
    let body = assert_refusal(&resp, 401, "unauthorized");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.to_lowercase().contains(&reason.to_lowercase()),
        "{path}: the 401 must say {reason:?}, got {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_invalid_and_expired_tokens_get_401_with_the_reason() {
    run(LIMIT, async {
        let router = router().await;
        let bearer = |t: &str| format!("Bearer {t}");

        assert_401(&router, "/ws/hs", &[], "needs a token").await;

        let expired = hs256(&json!({"sub": "u", "exp": now_s() - 120}), SECRET);
        let resp = try_upgrade(router.http, "/ws/hs", &[("Authorization", &bearer(&expired))]).await;
        let body = assert_refusal(&resp, 401, "unauthorized");
        assert_eq!(
            body["message"], "token has expired",
            "the README's documented reason: {body}"
        );
        // Expired is refused whichever way it comes.
        assert_401(&router, &format!("/ws/hs?token={expired}"), &[], "expired").await;
        let proto = format!("bearer, {expired}");
        assert_401(&router, "/ws/hs", &[("Sec-WebSocket-Protocol", &proto)], "expired").await;

        let forged = hs256(&claims("mallory"), "not-the-secret");
        assert_401(&router, "/ws/hs", &[("Authorization", &bearer(&forged))], "signature").await;
        let no_exp = hs256(&json!({"sub": "u"}), SECRET);
        assert_401(&router, "/ws/hs", &[("Authorization", &bearer(&no_exp))], "exp").await;
        assert_401(
            &router,
            "/ws/hs",
            &[("Authorization", "Bearer not.a.jwt")],
            "well-formed",
        )
        .await;
        let rs_token = rs256(&claims("u"), PRIVATE_KEY);
        assert_401(
            &router,
            "/ws/hs",
            &[("Authorization", &bearer(&rs_token))],
            "not configured",
        )
        .await;

        // RS256 signed by a key the route does not trust.
        let untrusted = rs256(&claims("mallory"), UNTRUSTED_PRIVATE_KEY);
        assert_401(&router, "/ws/rs", &[("Authorization", &bearer(&untrusted))], "signature").await;

        // Issuer and audience, where configured.
        let wrong_iss = hs256(
            &json!({"sub": "u", "iss": "someone-else", "aud": "e2e-audience", "exp": now_s() + 600}),
            SECRET,
        );
        assert_401(&router, "/ws/strict", &[("Authorization", &bearer(&wrong_iss))], "issuer").await;
        let wrong_aud = rs256(
            &json!({"sub": "u", "iss": "e2e-issuer", "aud": "other-audience", "exp": now_s() + 600}),
            PRIVATE_KEY,
        );
        assert_401(&router, "/ws/strict", &[("Authorization", &bearer(&wrong_aud))], "audience")
            .await;

        // Optional auth: no token passes, but a bad token is still refused.
        let resp = try_upgrade(router.http, "/ws/optional", &[]).await;
        assert_eq!(resp.status, 101, "{resp:?}");
        assert_401(&router, "/ws/optional", &[("Authorization", &bearer(&forged))], "signature")
            .await;
    })
    .await;
}

/// Where a test puts its token: a name, the URL, extra request headers.
type TokenSource<'a> = (&'static str, String, Vec<(&'static str, &'a str)>);

/// Connects with a token, reads the welcome, asks the worker for the claims
/// it received; returns the response's subprotocol and the claims.
async fn claims_via(url: &str, headers: &[(&str, &str)]) -> (Option<String>, Value) {
    let (mut ws, resp): (Ws, _) = connect_with(url, headers)
        .await
        .unwrap_or_else(|e| panic!("{url}: a valid token was refused: {e}"));
    let protocol = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let w = next_json(&mut ws, "the welcome").await;
    assert_eq!(w["type"], "welcome", "{w}");
    send_json(&mut ws, &json!({"type": "claims", "id": "c"})).await;
    let reply = next_json(&mut ws, "the claims reply").await;
    assert_eq!(reply["id"], "c", "{reply}");
    assert_ne!(reply["type"], "error", "{url}: {reply}");
    (protocol, reply["data"]["claims"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_hs256_and_rs256_tokens_from_every_source_deliver_their_claims_to_the_worker() {
    run(LIMIT, async {
        let router = router().await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;

        let strict = |sub: &str| {
            json!({"sub": sub, "role": "tester", "iss": "e2e-issuer", "aud": "e2e-audience",
                   "exp": now_s() + 600})
        };
        let cases: Vec<(&str, String, String)> = vec![
            (
                "/ws/hs",
                "hs-user".into(),
                hs256(&claims("hs-user"), SECRET),
            ),
            (
                "/ws/rs",
                "rs-user".into(),
                rs256(&claims("rs-user"), PRIVATE_KEY),
            ),
            (
                "/ws/strict",
                "strict-hs".into(),
                hs256(&strict("strict-hs"), SECRET),
            ),
            (
                "/ws/strict",
                "strict-rs".into(),
                rs256(&strict("strict-rs"), PRIVATE_KEY),
            ),
        ];
        for (path, sub, token) in &cases {
            let url = router.ws_url(path);
            let auth = format!("Bearer {token}");
            let protos = format!("bearer, {token}");
            let sources: [TokenSource<'_>; 3] = [
                (
                    "header",
                    url.clone(),
                    vec![("Authorization", auth.as_str())],
                ),
                ("query", format!("{url}?token={token}"), vec![]),
                (
                    "subprotocol",
                    url.clone(),
                    vec![("Sec-WebSocket-Protocol", protos.as_str())],
                ),
            ];
            for (source, url, headers) in &sources {
                let (protocol, got) = claims_via(url, headers).await;
                assert_eq!(
                    got["sub"], *sub,
                    "{path} via {source}: claims at the worker: {got}"
                );
                assert_eq!(got["role"], "tester", "{path} via {source}: {got}");
                assert!(got["exp"].is_u64(), "{path} via {source}: {got}");
                if *source == "subprotocol" {
                    assert_eq!(
                        protocol.as_deref(),
                        Some("bearer"),
                        "{path}: the router must select the `bearer` subprotocol"
                    );
                } else {
                    assert_eq!(protocol, None, "{path} via {source}: no subprotocol asked");
                }
            }
        }

        // Optional auth: claims when a token is given, null without one.
        let token = hs256(&claims("optional-user"), SECRET);
        let (_, got) = claims_via(
            &router.ws_url("/ws/optional"),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(got["sub"], "optional-user", "{got}");
        let (_, got) = claims_via(&router.ws_url("/ws/optional"), &[]).await;
        assert!(got.is_null(), "no token, no claims: {got}");
        // A route without auth forwards no claims, whatever the client sends.
        let (_, got) = claims_via(
            &router.ws_url("/ws/any-origin"),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert!(
            got.is_null(),
            "a route without auth verified nothing: {got}"
        );
    })
    .await;
}
