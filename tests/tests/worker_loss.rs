//! One dead worker costs only its own requests. Two echo workers serve a
//! route without retries under steady load; one is killed with SIGKILL. Its
//! connection closes at once, so the router must stop sending it work at
//! once (not after heartbeat × liveness), end its in-flight requests with
//! `worker_error` at once, and keep the route's breaker closed: the other
//! worker is healthy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::{run, RouterConfig, RouterProc};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);
/// Clients, each with one request in flight at a time.
const CLIENTS: usize = 16;
/// How long after the kill the survivor must serve every new request (a
/// generous bound for a loaded 2-core machine; the figure is printed).
const RECOVERY_BOUND: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Outcome {
    sent: Instant,
    answered: Instant,
    code: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_worker_fails_only_its_own_requests_and_keeps_the_breaker_closed() {
    run(LIMIT, async {
        let routes = json!({"routes": [{
            "path": "/ws/echo", "service": "echo", "requestTimeoutMs": 10_000, "retries": 0,
            "circuitBreaker": {"failureThreshold": 5, "openMs": 10_000}
        }]})
        .to_string();
        // The default heartbeat (1 s × 3): detection by liveness would take 3 s.
        let router =
            RouterProc::start_with(RouterConfig::new(&routes).env("ENABLE_RATE_LIMIT", "false"))
                .await;
        let mut victim = router.worker("echo_worker", &["echo"], &[]).await;
        let _survivor = router.worker("echo_worker", &["echo"], &[]).await;
        router.wait_live_workers("echo", 2).await;

        let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let stop_at = Instant::now() + Duration::from_secs(4);
        let mut tasks = Vec::new();
        for k in 0..CLIENTS {
            let url = router.ws_url("/ws/echo");
            let outcomes = outcomes.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = e2e_tests::WsClient::connect(&url).await;
                let mut i = 0u64;
                while Instant::now() < stop_at {
                    i += 1;
                    let id = format!("c{k}-{i}");
                    let sent = Instant::now();
                    let frames = c.request("slow", &id, json!({"ms": 20})).await;
                    let last = frames.last().expect("a terminal frame");
                    let code = last["error"]["code"].as_str().map(str::to_owned);
                    outcomes.lock().unwrap().push(Outcome {
                        sent,
                        answered: Instant::now(),
                        code,
                    });
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let killed_at = Instant::now();
        victim.proc.kill9();
        for t in tasks {
            t.await.unwrap();
        }

        let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
        let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.code.is_some()).collect();
        for f in &failed {
            assert_eq!(
                f.code.as_deref(),
                Some("worker_error"),
                "only the dead worker's requests may fail, with worker_error: {failed:?}"
            );
        }
        assert!(
            failed.len() <= CLIENTS,
            "at most the requests in flight at the kill fail: {}",
            failed.len()
        );
        let last_failure = failed
            .iter()
            .map(|f| f.sent.saturating_duration_since(killed_at))
            .max()
            .unwrap_or_default();
        // The dead worker's requests end at once, not after the liveness period.
        let slowest_failure = failed
            .iter()
            .map(|f| f.answered.saturating_duration_since(killed_at))
            .max()
            .unwrap_or_default();
        let after = outcomes
            .iter()
            .filter(|o| o.sent > killed_at + RECOVERY_BOUND)
            .count();
        eprintln!(
            "{} requests, {} failed, the last of them answered {:?} after the kill; the last \
             failed request was sent {:?} after the kill; {after} requests sent later than \
             {RECOVERY_BOUND:?} after it all succeeded",
            outcomes.len(),
            failed.len(),
            slowest_failure,
            last_failure
        );
        assert!(
            slowest_failure <= RECOVERY_BOUND,
            "the dead worker's requests ended {slowest_failure:?} after the kill"
        );
        assert!(
            last_failure <= RECOVERY_BOUND,
            "a request sent {last_failure:?} after the kill still failed"
        );
        assert!(after > 0, "the load went on after the recovery bound");
        let info = router.wait_live_workers("echo", 1).await;
        assert_eq!(
            info.raw["breaker"], "closed",
            "the loss of one worker among live siblings must not open the breaker: {}",
            info.raw
        );
    })
    .await;
}
