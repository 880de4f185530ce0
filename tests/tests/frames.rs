//! Binary frames both ways on an enveloped route, and a raw route where every
//! frame passes unchanged (the path the Autobahn conformance run takes).

use std::time::Duration;

use e2e_tests::{run, Frame, RouterProc, WsClient, RECV_TIMEOUT};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

const ROUTES: &str = r#"{
  "routes": [
    {"path": "/ws/echo", "service": "echo"},
    {"path": "/ws/raw", "service": "echo", "raw": true}
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_go_to_the_worker_and_come_back() {
    run(LIMIT, async {
        let router = RouterProc::start(ROUTES, &[]).await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        let mut c = router.client("/ws/echo").await;

        let payloads: Vec<Vec<u8>> = vec![
            vec![0],
            (0..=255u8).collect(),
            vec![0xff; 70_000], // past the 16-bit WebSocket length form
            b"not utf-8 \xc3\x28 at all".to_vec(),
        ];
        for p in &payloads {
            c.send_binary(p).await;
        }
        // One worker, one connection: frames keep their order.
        for (i, p) in payloads.iter().enumerate() {
            match c.next_frame(RECV_TIMEOUT).await {
                Frame::Binary(b) => assert_eq!(&b, p, "binary frame {i} changed"),
                other => panic!("expected binary frame {i} back, got {other:?}"),
            }
        }
        // JSON still works on the same connection.
        let last = c
            .request_ok("echo", "after-binary", json!({"ok": true}))
            .await;
        assert_eq!(last["data"], json!({"ok": true}));
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_route_passes_frames_unchanged_without_welcome() {
    run(LIMIT, async {
        let router = RouterProc::start(ROUTES, &[]).await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        let mut c = WsClient::connect_raw(&router.ws_url("/ws/raw")).await;

        // The first frame we get must be the echo of the first one we sent:
        // no welcome, no envelope.
        let text = r#"{"type":"echo","id":"1","data":"this is not interpreted"}"#;
        c.send_text(text).await;
        assert_eq!(
            c.next_frame(RECV_TIMEOUT).await,
            Frame::Text(text.to_owned()),
            "expected the text frame back unchanged"
        );

        let frames: Vec<Frame> = vec![
            Frame::Text("plain text, not JSON ✓".into()),
            Frame::Binary(vec![1, 2, 3, 0, 255]),
            Frame::Text(String::new()),
            Frame::Binary(Vec::new()),
            Frame::Text("x".repeat(100_000)),
        ];
        for f in &frames {
            match f {
                Frame::Text(t) => c.send_text(t).await,
                Frame::Binary(b) => c.send_binary(b).await,
                _ => unreachable!(),
            }
        }
        for (i, sent) in frames.iter().enumerate() {
            let got = c.next_frame(RECV_TIMEOUT).await;
            assert_eq!(&got, sent, "raw frame {i} changed");
        }
    })
    .await;
}
