//! `examples/secure-routes.json` (README: routes file), loaded by the real
//! router: its auth, origin and rate-limit policies do what its descriptions
//! say.

mod policies_support;

use std::time::Duration;

use e2e_tests::{run, workspace_root, RouterConfig, RouterProc};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use policies_support::{assert_refusal, connect_with, next_json, now_s, send_json, try_upgrade};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);
const SECRET: &str = "example-routes-test-only-secret";
const APP: &str = "https://app.example.com";
const DEV: &str = "http://localhost:3000";

fn token(issuer: &str) -> String {
    let claims = json!({
        "sub": "alice", "iss": issuer, "aud": "websocket-router", "exp": now_s() + 600,
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("cannot sign: {e}"))
}

async fn router() -> RouterProc {
    let path = workspace_root().join("examples/secure-routes.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    RouterProc::start_with(RouterConfig::new(&text).env("JWT_SECRET", SECRET)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secure_routes_example_loads_and_enforces_its_policies() {
    run(LIMIT, async {
        let router = router().await;
        let good = format!("Bearer {}", token("https://auth.example.com"));
        let forged = format!("Bearer {}", token("https://elsewhere.example"));

        // Signed-in users of the app's origins (the defaults).
        let resp = try_upgrade(router.http, "/ws/vision", &[("Origin", APP)]).await;
        assert_refusal(&resp, 401, "unauthorized");
        let resp = try_upgrade(
            router.http,
            "/ws/vision",
            &[("Origin", APP), ("Authorization", &forged)],
        )
        .await;
        assert_refusal(&resp, 401, "unauthorized");
        let resp = try_upgrade(
            router.http,
            "/ws/vision",
            &[("Origin", "https://evil.example"), ("Authorization", &good)],
        )
        .await;
        assert_refusal(&resp, 403, "origin_not_allowed");
        for origin in [APP, DEV] {
            let (mut ws, _) = connect_with(
                &router.ws_url("/ws/vision"),
                &[("Origin", origin), ("Authorization", &good)],
            )
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
            assert_eq!(next_json(&mut ws, "the welcome").await["type"], "welcome");
        }

        // The automation route narrows the origins to the app's own.
        let resp = try_upgrade(
            router.http,
            "/ws/automation",
            &[("Origin", DEV), ("Authorization", &good)],
        )
        .await;
        assert_refusal(&resp, 403, "origin_not_allowed");

        // Public chat: any page, no token needed, only the chat's types, tight limits.
        let (mut ws, _) = connect_with(&router.ws_url("/ws"), &[("Origin", "https://blog.example")])
            .await
            .expect("public chat without a token");
        assert_eq!(next_json(&mut ws, "the welcome").await["type"], "welcome");
        send_json(&mut ws, &json!({"type": "deploy", "id": "d"})).await;
        let refused = next_json(&mut ws, "unknown_type").await;
        assert_eq!(
            refused["error"]["message"],
            "/ws does not handle messages of type `deploy`; it accepts `echo`, `join`, `leave`, `say`",
            "{refused}"
        );
        // Burst 10 (one already spent): the 11th ping in a row is refused.
        for i in 0..10 {
            send_json(&mut ws, &json!({"type": "ping", "id": i})).await;
        }
        let mut answers: Vec<Value> = Vec::new();
        for _ in 0..10 {
            answers.push(next_json(&mut ws, "a pong or a refusal").await);
        }
        let limited: Vec<&Value> = answers
            .iter()
            .filter(|f| f["error"]["code"] == "rate_limited")
            .collect();
        assert!(!limited.is_empty(), "no rate_limited among {answers:?}");
        assert!(limited.iter().all(|f| f["error"]["retry_after_ms"].is_u64()));
    })
    .await;
}
