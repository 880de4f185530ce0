//! A ROUTER exposed to untrusted peers: routing ids cannot be taken over,
//! handshakes have a deadline, and a peer that does not read cannot make the
//! sender queue without bound. Raw TCP clients play the misbehaving peers.
#![cfg(feature = "tokio-runtime")]

use zeromq::prelude::*;
use zeromq::util::PeerIdentity;
use zeromq::{DealerSocket, RouterSocket, SocketEvent, SocketOptions, ZmqError, ZmqMessage};

use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

/// ZMTP 3.0 greeting, NULL mechanism.
fn greeting() -> Vec<u8> {
    let mut greeting = vec![0; 64];
    greeting[0] = 0xff;
    greeting[9] = 0x7f;
    greeting[10] = 3;
    greeting[12..16].copy_from_slice(b"NULL");
    greeting
}

/// READY command frame for a DEALER announcing `identity`.
fn dealer_ready(identity: &[u8]) -> Vec<u8> {
    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    for (name, value) in [("Socket-Type", &b"DEALER"[..]), ("Identity", identity)] {
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

async fn bind(router: &mut RouterSocket) -> (String, String) {
    let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let address = endpoint.trim_start_matches("tcp://").to_string();
    (endpoint, address)
}

fn dealer_with_identity(identity: &PeerIdentity) -> DealerSocket {
    let mut options = SocketOptions::default();
    options.peer_identity(identity.clone());
    DealerSocket::with_options(options)
}

fn routed(peer: &[u8], body: &'static str) -> ZmqMessage {
    let mut message = ZmqMessage::from(body);
    message.push_front(Bytes::copy_from_slice(peer));
    message
}

async fn next_event<F>(monitor: &mut mpsc::Receiver<SocketEvent>, mut wanted: F) -> SocketEvent
where
    F: FnMut(&SocketEvent) -> bool,
{
    timeout(WAIT, async {
        loop {
            let event = monitor.next().await.expect("monitor closed");
            if wanted(&event) {
                return event;
            }
        }
    })
    .await
    .expect("no such monitor event")
}

#[tokio::test]
async fn router_refuses_a_second_connection_with_a_connected_routing_id() {
    let mut router = RouterSocket::new();
    let mut monitor = router.monitor();
    let (endpoint, _) = bind(&mut router).await;
    let id: PeerIdentity = "worker-1".parse().unwrap();

    let mut first = dealer_with_identity(&id);
    first.connect(&endpoint).await.unwrap();
    first.send("from-first".into()).await.unwrap();
    let message = timeout(WAIT, router.recv()).await.unwrap().unwrap();
    assert_eq!(message.get(0).unwrap().as_ref(), id.as_ref());

    // Same routing id from a second connection: refused and closed.
    let mut second = dealer_with_identity(&id);
    let _ = second.connect(&endpoint).await;
    let refused = next_event(&mut monitor, |e| matches!(e, SocketEvent::AcceptFailed(_))).await;
    assert!(matches!(
        refused,
        SocketEvent::AcceptFailed(ZmqError::Socket(reason)) if reason.contains("already connected")
    ));
    let _ = second.send("from-second".into()).await;

    // The first connection keeps its routing id, its queue and its stream.
    router.send(routed(&id, "to-first")).await.unwrap();
    let reply = timeout(WAIT, first.recv()).await.unwrap().unwrap();
    assert_eq!(reply.get(0).unwrap().as_ref(), b"to-first");
    assert!(
        timeout(Duration::from_millis(300), second.recv())
            .await
            .map_or(true, |received| received.is_err()),
        "the refused connection must receive nothing"
    );

    first.send("again-from-first".into()).await.unwrap();
    let message = timeout(WAIT, router.recv()).await.unwrap().unwrap();
    assert_eq!(message.get(0).unwrap().as_ref(), id.as_ref());
    assert_eq!(message.get(1).unwrap().as_ref(), b"again-from-first");
}

#[tokio::test]
async fn assigned_peer_ids_ignore_the_announced_identity() {
    let mut options = SocketOptions::default();
    options.assign_peer_ids(true);
    let mut router = RouterSocket::with_options(options);
    let (endpoint, _) = bind(&mut router).await;
    let announced: PeerIdentity = "worker-1".parse().unwrap();

    let mut dealers = Vec::new();
    for body in ["from-a", "from-b"] {
        let mut dealer = dealer_with_identity(&announced);
        dealer.connect(&endpoint).await.unwrap();
        dealer.send(body.into()).await.unwrap();
        dealers.push((body, dealer));
    }

    let mut ids = HashMap::new();
    for _ in 0..2 {
        let message = timeout(WAIT, router.recv()).await.unwrap().unwrap();
        let id = message.get(0).unwrap().clone();
        assert_ne!(id.as_ref(), announced.as_ref());
        ids.insert(message.get(1).unwrap().clone(), id);
    }
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[&b"from-a"[..]], ids[&b"from-b"[..]]);

    for (body, dealer) in &mut dealers {
        let id = ids[body.as_bytes()].clone();
        router.send(routed(&id, "reply")).await.unwrap();
        let reply = timeout(WAIT, dealer.recv()).await.unwrap().unwrap();
        assert_eq!(reply.get(0).unwrap().as_ref(), b"reply");
    }
}

/// Reads until EOF (or error); returns the bytes read and when it ended.
async fn read_until_closed(stream: &mut TcpStream) -> (usize, Instant) {
    let mut total = 0;
    let mut buffer = [0; 1024];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return (total, Instant::now()),
            Ok(n) => total += n,
        }
    }
}

#[tokio::test]
async fn handshake_timeout_closes_silent_and_stalled_peers() {
    const DEADLINE: Duration = Duration::from_millis(300);
    let mut options = SocketOptions::default();
    options.handshake_timeout(Some(DEADLINE));
    let mut router = RouterSocket::with_options(options);
    let mut monitor = router.monitor();
    let (_, address) = bind(&mut router).await;

    let started = Instant::now();
    // Sends nothing at all.
    let mut silent = TcpStream::connect(&address).await.unwrap();
    // Sends its greeting but never READY.
    let mut stalled = TcpStream::connect(&address).await.unwrap();
    stalled.write_all(&greeting()).await.unwrap();

    for stream in [&mut silent, &mut stalled] {
        let (read, closed_at) = timeout(WAIT, read_until_closed(stream))
            .await
            .expect("peer still open long after the handshake deadline");
        assert!(read >= 64, "the server greets first");
        assert!(closed_at - started >= DEADLINE - Duration::from_millis(50));
    }
    for _ in 0..2 {
        let event = next_event(&mut monitor, |e| matches!(e, SocketEvent::AcceptFailed(_))).await;
        assert!(matches!(
            event,
            SocketEvent::AcceptFailed(ZmqError::ConnectTimeout(d)) if d == DEADLINE
        ));
    }
}

#[tokio::test]
async fn without_handshake_timeout_a_silent_peer_stays_open() {
    let mut router = RouterSocket::new();
    let (_, address) = bind(&mut router).await;
    let mut silent = TcpStream::connect(&address).await.unwrap();
    assert!(
        timeout(Duration::from_millis(500), read_until_closed(&mut silent))
            .await
            .is_err(),
        "default: no handshake deadline"
    );
}

#[tokio::test]
async fn send_fails_fast_with_buffer_full_when_a_peer_does_not_read() {
    const MAX_QUEUED: usize = 1 << 20;
    const PAYLOAD: usize = 64 * 1024;
    let mut options = SocketOptions::default();
    options.send_queue_max_bytes(MAX_QUEUED);
    let mut router = RouterSocket::with_options(options);
    let mut monitor = router.monitor();
    let (_, address) = bind(&mut router).await;

    // A peer that completes the handshake and then never reads.
    let id = b"slow-reader";
    let mut slow = TcpStream::connect(&address).await.unwrap();
    slow.write_all(&greeting()).await.unwrap();
    slow.write_all(&dealer_ready(id)).await.unwrap();
    next_event(&mut monitor, |e| matches!(e, SocketEvent::Accepted(..))).await;

    let payload = Bytes::from(vec![0x5a; PAYLOAD]);
    let message = |payload: &Bytes| {
        let mut message = ZmqMessage::from(payload.clone());
        message.push_front(Bytes::from_static(id));
        message
    };
    // Kernel socket buffers absorb some megabytes first; then the queue fills.
    let mut sent = 0;
    let full_after = loop {
        assert!(sent < 4096, "send never reported BufferFull");
        let started = Instant::now();
        let result = timeout(WAIT, router.send(message(&payload)))
            .await
            .expect("send waited on a peer that does not read");
        match result {
            Ok(()) => sent += 1,
            Err(ZmqError::BufferFull(_)) => break started.elapsed(),
            Err(other) => panic!("unexpected send error: {other:?}"),
        }
    };
    assert!(full_after < Duration::from_secs(1), "took {full_after:?}");
    // Still full, still immediate.
    let started = Instant::now();
    assert!(matches!(
        router.send(message(&payload)).await,
        Err(ZmqError::BufferFull(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1));

    // The peer was not dropped: once it reads, the writer releases queued
    // bytes and sends succeed again.
    let drain = tokio::spawn(async move { read_until_closed(&mut slow).await });
    timeout(WAIT, async {
        while let Err(error) = router.send(message(&payload)).await {
            assert!(matches!(error, ZmqError::BufferFull(_)), "{error:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("queued bytes were never released");
    drop(router);
    let _ = timeout(WAIT, drain).await;
}
