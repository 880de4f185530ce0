//! `scripts/start_unified_backend.sh` itself: it brings the whole default
//! stack up on the ports it is given, serves a real request, and on SIGTERM
//! stops every process it started, exits 0 and frees its ports.

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use e2e_tests::{
    example_bin, free_tcp_ports, pid_alive, router_bin, run, target_dir, unique, workspace_root,
    Proc, WsClient, RECV_TIMEOUT,
};
use serde_json::json;

const WORKERS: [&str; 4] = [
    "vision_worker",
    "voice_worker",
    "automation_worker",
    "chat_worker",
];

/// Removes the script's log directory when the test ends.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_script_serves_the_default_routes_and_stops_cleanly_on_sigterm() {
    run(Duration::from_secs(120), async {
        // Fail early, with the usual hint, if the debug binaries are missing.
        router_bin();
        for w in WORKERS {
            example_bin(w);
        }
        let [http, bridge, publish] = free_tcp_ports::<3>();
        let logs = TempDir(std::env::temp_dir().join(unique("start-script-logs")));

        let mut cmd = Command::new(workspace_root().join("scripts/start_unified_backend.sh"));
        cmd.arg("--no-build")
            .current_dir(workspace_root())
            .env("ROUTER_BIN_DIR", target_dir().join("debug"))
            .env("WEBSOCKET_HOST", "127.0.0.1")
            .env("WEBSOCKET_PORT", http.to_string())
            .env("BRIDGE_ENDPOINT", format!("tcp://127.0.0.1:{bridge}"))
            .env("PUBLISH_ENDPOINT", format!("tcp://127.0.0.1:{publish}"))
            .env("LOG_DIR", &logs.0)
            .env_remove("WEBSOCKET_ROUTES")
            .env_remove("ENABLE_RATE_LIMIT")
            .env_remove("ENABLE_DYNAMIC_ROUTING");
        // Its own process group, so a failing test can kill whatever is left.
        let mut script = Proc::spawn_group("start_unified_backend.sh", cmd);

        script
            // The banner's last line: the whole banner is out.
            .wait_stdout("the ready banner", Duration::from_secs(60), |l| {
                l.contains("Press Ctrl-C to stop")
            })
            .await;
        // Every child the script reports, so none can outlive the test unseen.
        let mut children = Vec::new();
        for line in script.stdout.lines() {
            if let Some((name, pid)) = parse_started(&line) {
                script.adopt(pid);
                children.push((name, pid));
            }
        }
        let mut names: Vec<&str> = children.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        let mut expected = vec!["router"];
        expected.extend(WORKERS);
        expected.sort_unstable();
        assert_eq!(names, expected, "processes the script reported starting");
        let out = script.stdout.text();
        for path in ["/ws/vision", "/ws/voice", "/ws/automation", "/ws"] {
            let url = format!("ws://127.0.0.1:{http}{path}\n");
            assert!(out.contains(&url), "banner lacks {url:?}:\n{out}");
        }
        assert!(
            out.contains(&format!("http://127.0.0.1:{http}/health")),
            "{out}"
        );
        assert!(
            out.contains(&format!("http://127.0.0.1:{http}/routes")),
            "{out}"
        );

        // A real request through the stack the script started.
        let mut c = WsClient::connect(&format!("ws://127.0.0.1:{http}/ws/vision")).await;
        c.send_request(
            "request_workspace_analysis",
            "via-script",
            json!({"files": ["x"]}),
        )
        .await;
        let frames = c.collect_until_done("via-script", RECV_TIMEOUT).await;
        let last = frames.last().expect("a done frame");
        assert_ne!(last["type"], "error", "{last}");
        assert!(!last["data"]["result"].is_null(), "{last}");
        drop(c);

        // The banner names the console (the router listens on loopback),
        // and it is served.
        let console = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Console:"))
            .unwrap_or_else(|| panic!("the banner has no `Console:` line:\n{out}"))
            .trim()
            .to_owned();
        let addr: std::net::SocketAddr = console
            .trim_start_matches("http://")
            .trim_end_matches("/console")
            .parse()
            .unwrap_or_else(|e| panic!("{console}: {e}"));
        let page = e2e_tests::http_get(addr, "/console")
            .await
            .expect("GET /console");
        assert_eq!(page.status, 200, "{page:?}");
        assert!(page.body.contains("<!doctype html>"), "{}", page.body);

        // The banner's one-liner, run as printed (`sh -c`), answers from the chat worker.
        let try_it = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Try it:"))
            .unwrap_or_else(|| panic!("the banner has no `Try it:` line:\n{out}"));
        let poked = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(try_it.trim())
            .output();
        let poked = tokio::time::timeout(Duration::from_secs(30), poked)
            .await
            .expect("poke finishes")
            .expect("sh runs");
        let printed = String::from_utf8_lossy(&poked.stdout);
        assert!(
            poked.status.success(),
            "{try_it}: {}\n{printed}",
            poked.status
        );
        let reply: serde_json::Value = printed
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("{try_it} printed no JSON: {printed}"));
        assert_eq!(
            (&reply["data"], &reply["done"]),
            (&json!("hi"), &json!(true))
        );

        script.sigterm();
        let status = script
            .wait_exit(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            status.success(),
            "script exit status {status}; stdout:\n{}\nstderr:\n{}",
            script.stdout.text(),
            script.stderr.text()
        );
        for (name, pid) in &children {
            assert!(!pid_alive(*pid), "{name} (pid {pid}) outlived the script");
        }
        for port in [http, bridge, publish] {
            if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
                panic!("port {port} still taken after the script exited: {e}");
            }
        }
    })
    .await;
}

/// `[start] started NAME (pid N)` → (NAME, N).
fn parse_started(line: &str) -> Option<(String, u32)> {
    let rest = line.strip_prefix("[start] started ")?;
    let (name, rest) = rest.split_once(" (pid ")?;
    let pid = rest.strip_suffix(')')?.parse().ok()?;
    Some((name.to_owned(), pid))
}

#[test]
fn parses_started_lines() {
    assert_eq!(
        parse_started("[start] started router (pid 42)"),
        Some(("router".to_owned(), 42))
    );
    assert_eq!(parse_started("[start] stopped"), None);
}
